"""`make bench` itself works: the harness in --quick mode, against real HAProxy, nginx and l4lb.

Durations and sizes are tiny (one second of wrk, an 8 MiB file, 100 held connections); this checks
that every figure is produced without errors and lands in the JSON and the table, not any speed.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.peers import have

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not (have("haproxy") and have("nginx") and have("wrk") and have("curl")),
    reason="the bench needs haproxy, nginx, wrk and curl (make sysdeps)",
)


def test_quick_run_produces_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    contenders = ["haproxy", "l4lb-splice"]
    figures = ["newconn", "bulk1", "paced", "idle"]
    proc = subprocess.run(
        [
            sys.executable, str(ROOT / "bench" / "run.py"), "--quick",
            "--contenders", ",".join(contenders), "--figures", ",".join(figures),
            "--workdir", str(tmp_path), "--out", str(out), "--gc-pauses",
        ],
        capture_output=True, text=True, timeout=90, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert doc["quick"] is True
    for name in contenders:
        res = doc["results"][name]
        assert "error" not in res, res
        assert res["newconn"]["rate"] > 0 and res["newconn"]["errors"] == 0
        assert res["bulk1"]["errors"] == 0 and res["bulk1"]["bytes"] == 8 << 20
        assert res["paced"]["ok"] == res["paced"]["requests"] > 0
        assert res["paced"]["lag_p99_ms"] >= 0  # the generator's own lateness, reported
        # each request counted from its own connect() is no longer than from its schedule
        assert 0 < res["paced"]["p99_from_connect_ms"] <= res["paced"]["p99_ms"]
        assert res["idle"]["connections"] == 100 and res["idle"]["errors"] == 0
        assert res["idle"]["backend_connections"] >= 100
    # the table: a row per figure, l4lb's values as a ratio to HAProxy's
    assert "| new conn/s" in proc.stdout
    assert "x)" in proc.stdout
    # then issue 16's targets, for the default relay, against the peer that ran
    assert "Issue 16's targets" in proc.stdout
    rows = {r["target"]: r for r in doc["targets"]}
    rate = rows["new conn/s ≥ the fastest peer's"]
    assert rate["contender"] == "l4lb-splice" and rate["reference"] == "haproxy"
    assert rate["value"] == doc["results"]["l4lb-splice"]["newconn"]["rate"]
    assert rate["reference_value"] == doc["results"]["haproxy"]["newconn"]["rate"]
    assert rate["verdict"] == ("met" if rate["value"] >= rate["reference_value"] else "NOT met")
    assert rows["p99 at a fixed rate (paced) ≤ every peer's"]["verdict"] in ("met", "NOT met")
    assert rows["idle RSS per connection ≤ every peer's"]["verdict"] in ("met", "NOT met")
    keepalive = next(t for t in rows if t.startswith("machine CPU per keep-alive"))
    assert rows[keepalive]["verdict"] == "not measured"  # not among this run's figures
    # --gc-pauses: l4lb ran under harness/gcprobe.py, which timed its collector
    gc = doc["results"]["l4lb-splice"]["gc"]
    assert gc["frozen_objects"] > 1000  # runtime.settle_gc froze the start-up objects
    assert gc["gen2"]["collections"] == len(gc["full_collections_at_s"]) >= 1  # settle_gc's own
    assert "gc pauses l4lb-splice: gen0" in proc.stdout
    # the collections connections met: after settle_gc's full one, none of them full
    assert gc["serving"]["gen2"]["collections"] == 0
    assert gc["serving"]["gen0"]["collections"] <= gc["gen0"]["collections"]
    assert "after the first full one (while serving)" in proc.stdout
    # which l4lb ran, on which commit, under what load
    splice = importlib.import_module("l4lb.balancer.splice").__file__ or ""
    assert doc["build"]["build"] == ("mypyc" if splice.endswith(".so") else "pure Python")
    assert f"l4lb build: {doc['build']['build']}" in proc.stdout
    assert doc["commit"] != "unknown"
    assert len(doc["machine"]["loadavg_at_start"]) == len(doc["machine"]["loadavg_at_end"]) == 3


def test_latency_probe_times_every_step_for_every_contender(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable, str(ROOT / "bench" / "latency.py"),
            "--contenders", "haproxy,l4lb-splice", "--conns", "5", "--warmup", "1",
            "--workdir", str(tmp_path),
        ],
        capture_output=True, text=True, timeout=90, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {
        line.split("|")[1].strip(): line.split("|")[2:-1]
        for line in proc.stdout.splitlines()
        if line.startswith("| ") and "contender" not in line
    }
    assert set(rows) == {"haproxy", "l4lb-splice"}
    for cells in rows.values():
        assert len(cells) == 4  # connect, first, rest, total: "p50 / p90" each
        for cell in cells:
            p50, p90 = (float(x) for x in cell.split("/"))
            assert 0 < p50 <= p90
