"""The issue-16 targets table (bench/harness/targets.py) from hand-made results.

What a `make bench` run concludes depends only on this arithmetic, so it is checked here without
running anything: the reference picked (the best peer, or HAProxy), the verdict, how far, the
marks for a load-generator-bound side, and the rows that cannot be judged.
"""

from __future__ import annotations

import importlib
import subprocess
from typing import Any

from tests.bench.harness_module import ROOT, load

targets = load("targets")


def _target(label_start: str) -> Any:
    return next(t for t in targets.TARGETS if t.label.startswith(label_start))


def test_a_rate_is_compared_with_the_fastest_peer() -> None:
    results = {
        "haproxy": {"newconn": {"rate": 10_000.0}},
        "nginx": {"newconn": {"rate": 13_000.0, "generator_bound": True}},
        "l4lb-splice": {"newconn": {"rate": 11_700.0}},
    }
    row = targets.check(_target("new conn/s"), "l4lb-splice", results)
    assert row["reference"] == "nginx" and row["reference_value"] == 13_000.0
    assert row["ratio"] == 0.9
    assert row["verdict"] == "NOT met"
    assert row["how_far"] == "-1,300 /s, 0.90× nginx"
    assert row["reference_generator_bound"] is True and row["generator_bound"] is False


def test_a_cost_is_compared_with_the_cheapest_peer_and_may_be_met() -> None:
    results = {
        "haproxy": {"paced": {"p99_ms": 3.5}},
        "haproxy-splice": {"paced": {"p99_ms": 3.1}},
        "nginx": {"paced": {"p99_ms": 4.0}},
        "l4lb-splice": {"paced": {"p99_ms": 3.0}},
    }
    row = targets.check(_target("p99"), "l4lb-splice", results)
    assert row["reference"] == "haproxy-splice"
    assert row["verdict"] == "met"
    assert row["how_far"] == "-0.10 ms, 0.97× haproxy-splice"

    results["l4lb-splice"]["paced"]["p99_ms"] = 3.72
    row = targets.check(_target("p99"), "l4lb-splice", results)
    assert row["verdict"] == "NOT met"
    assert row["how_far"] == "+0.62 ms, 1.20× haproxy-splice"


def test_a_p99_mostly_the_generators_lag_is_marked_and_given_without_it() -> None:
    results = {
        "haproxy": {"paced": {"p99_ms": 4.0, "p99_from_connect_ms": 3.5}},
        "nginx": {"paced": {"p99_ms": 4.4, "p99_from_connect_ms": 1.9}},
        "l4lb-splice": {"paced": {"p99_ms": 5.0, "p99_from_connect_ms": 2.5}},
    }
    row = targets.check(_target("p99"), "l4lb-splice", results)
    assert row["reference"] == "haproxy"  # chosen by the figure itself, not the adjusted one
    assert row["verdict"] == "NOT met"  # the verdict stays on the figure from the schedule
    assert row["lag_bound"] is True  # 2.5 ms left of a 5.0 ms p99 without the lag: half
    assert row["reference_lag_bound"] is False  # 3.5 of 4.0
    assert row["alt_value"] == 2.5 and row["reference_alt_value"] == 3.5
    assert row["how_far"] == "+1.00 ms, 1.25× haproxy; from connect(): 2.50 vs 3.50 ms, 0.71×"
    text = targets.table([row])
    assert "5.00 ms ‡" in text and "haproxy 4.00 |" in text

    del results["haproxy"]["paced"]["p99_from_connect_ms"]  # an older result file: no note
    row = targets.check(_target("p99"), "l4lb-splice", results)
    assert row["how_far"] == "+1.00 ms, 1.25× haproxy" and "alt_value" not in row
    assert row["lag_bound"] is True and row["reference_lag_bound"] is False


def test_half_of_haproxy_machine_wide() -> None:
    results = {
        "haproxy": {"keepalive": {"machine_cpu_us_per_op_net": 52.1}},
        "nginx": {"keepalive": {"machine_cpu_us_per_op_net": 10.0}},  # not the reference here
        "l4lb-kernel": {"keepalive": {"machine_cpu_us_per_op_net": 32.8, "generator_bound": True}},
    }
    row = targets.check(_target("machine CPU per keep-alive"), "l4lb-kernel", results)
    assert row["reference"] == "haproxy"
    assert row["ratio"] == 0.63
    assert row["target_value"] == 26.05
    assert row["verdict"] == "NOT met"
    assert row["how_far"] == "+6.75 µs, 0.63× haproxy, target 0.5× = 26.1 µs"
    text = targets.table([row])
    assert "32.8 µs †" in text and "haproxy 52.1 |" in text.replace("  ", " ")


def test_a_row_not_met_says_where_its_cpu_goes_on_both_sides() -> None:
    ka = {"balancer_cpu_us_per_op": 0.3, "balancer_user_us_per_op": 0.1}
    results = {
        "haproxy": {
            "keepalive": {
                "machine_cpu_us_per_op_net": 13.7,
                "balancer_cpu_us_per_op": 13.4,
                "balancer_user_us_per_op": 1.4,
            }
        },
        "l4lb-kernel": {"keepalive": {"machine_cpu_us_per_op_net": 15.9, **ka}},
        "l4lb-splice": {"keepalive": {"machine_cpu_us_per_op_net": 5.0, **ka}},
    }
    t = _target("machine CPU per keep-alive")
    row = targets.check(t, "l4lb-kernel", results)
    assert row["verdict"] == "NOT met"
    assert row["why"] == (
        "CPU per keepalive operation: l4lb-kernel user 0.10 + system 0.20"
        " + outside the process 15.6 µs; haproxy user 1.40 + system 12.0"
        " + outside the process 0.30 µs"
    )
    assert "Where the figures of the rows not met come from" in targets.table([row])
    met = targets.check(t, "l4lb-splice", results)
    assert met["verdict"] == "met" and "why" not in met
    assert "Where the figures" not in targets.table([met])
    del results["haproxy"]["keepalive"]["balancer_user_us_per_op"]  # a figure the run lacks
    assert "why" not in targets.check(t, "l4lb-kernel", results)


def test_a_bulk_row_not_met_says_where_its_cpu_per_gb_goes() -> None:
    results = {
        "haproxy": {"bulk1": {"machine_cpu_s_per_gb_net": 0.95, "balancer_cpu_s_per_gb": 1.02}},
        "l4lb-splice": {"bulk1": {"machine_cpu_s_per_gb_net": 0.52, "balancer_cpu_s_per_gb": 0.30}},
    }
    row = targets.check(_target("machine CPU per GB (1 stream)"), "l4lb-splice", results)
    assert row["verdict"] == "NOT met"
    assert row["why"] == (
        "CPU per bulk1 GB: l4lb-splice balancer 0.30 + outside the process 0.22 s;"
        " haproxy balancer 1.02 + outside the process -0.07 s"
    )


def test_a_p99_not_met_says_where_its_tail_is() -> None:
    mine = {"p99_ms": 0.55, "p50_ms": 0.33, "p99_from_connect_ms": 0.47, "lag_p99_ms": 0.11}
    theirs = {"p99_ms": 0.49, "p50_ms": 0.32, "p99_from_connect_ms": 0.40}
    results = {"nginx": {"paced": theirs}, "l4lb-splice": {"paced": mine}}
    row = targets.check(_target("p99"), "l4lb-splice", results)
    assert row["why"] == (
        "l4lb-splice vs nginx: p50 0.33 vs 0.32 ms, p99 from connect() 0.47 vs 0.40 ms"
    )


def test_rows_that_cannot_be_judged_say_why() -> None:
    results = {
        "haproxy": {"bulk8": {"machine_cpu_s_per_gb_net": -0.2}, "idle": {"failed": "boom"}},
        "l4lb-splice": {"bulk8": {"machine_cpu_s_per_gb_net": 0.4}, "idle": {"kib_per_conn": 1.4}},
        "l4lb-kernel": {"bulk8": {"machine_cpu_s_per_gb_net": -0.1}},
    }
    bulk = _target("machine CPU per GB (8 streams)")
    assert targets.check(bulk, "l4lb-splice", results)["verdict"] == "n/a"  # reference ≤ 0
    results["haproxy"]["bulk8"]["machine_cpu_s_per_gb_net"] = 1.0
    kernel = targets.check(bulk, "l4lb-kernel", results)
    assert kernel["verdict"] == "n/a" and "l4lb-kernel's figure is -0.10 s" in kernel["how_far"]
    idle = targets.check(_target("idle RSS"), "l4lb-splice", results)  # the only peer failed
    assert idle["verdict"] == "not measured"
    paced = targets.check(_target("p99"), "l4lb-splice", results)
    assert paced["verdict"] == "not measured"
    assert "no paced figure for l4lb-splice" in paced["how_far"]


def test_every_target_for_the_relays_it_concerns() -> None:
    results: dict[str, Any] = {"haproxy": {}, "l4lb-splice": {}, "l4lb-kernel": {}}
    rows = targets.check_all(results, ["haproxy", "l4lb-splice", "l4lb-kernel", "l4lb-stream"])
    splice = [r["target"] for r in rows if r["contender"] == "l4lb-splice"]
    kernel = [r["target"] for r in rows if r["contender"] == "l4lb-kernel"]
    assert splice == [t.label for t in targets.TARGETS]
    assert kernel == [t.label for t in targets.TARGETS if t.label.startswith("machine CPU")]
    assert not any(r["contender"] == "l4lb-stream" for r in rows)
    results["l4lb-kernel"]["error"] = "needs root"  # did not start: no rows, not "not met"
    rows = targets.check_all(results, ["haproxy", "l4lb-splice", "l4lb-kernel"])
    assert {r["contender"] for r in rows} == {"l4lb-splice"}
    assert "codec parse" in targets.table(rows)


def test_the_build_line_names_every_module_the_makefile_compiles() -> None:
    """compiled_set() is pyproject.toml's [tool.l4lb] compiled list, the one `make compile`
    hands to mypyc (asked of make itself, which reads the list from pyproject.toml)."""
    names = targets.compiled_set()
    assert names[0] == "l4lb.balancer.splice"
    assert {"l4lb.balancer.connection", "l4lb.proxy_protocol.parse"} <= set(names)
    dry_run = subprocess.run(
        ["make", "-n", "--no-print-directory", "compile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (mypyc_line,) = [line for line in dry_run.splitlines() if "/mypyc " in line]
    handed = [arg for arg in mypyc_line.split() if arg.endswith(".py")]
    assert sorted(p.removesuffix(".py").replace("/", ".") for p in handed) == sorted(names)
    for name in names:
        importlib.import_module(name)
