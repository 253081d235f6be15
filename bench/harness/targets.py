"""Issue 16's targets, checked against one run's results: a row per target and l4lb contender.

Each row names the target, l4lb's value, the reference (a named peer, or the best of the peers
that ran), the ratio l4lb ÷ reference, whether it is met, and how far it is. A † on a side
means that side's figure was load-generator-bound (see ``procs.CpuWindow.summary``): the figure
understates that balancer, so the comparison is less sure. On the fixed-rate p99 row ``how far``
adds the same requests' p99 counted from their own ``connect()`` (``p99_from_connect_ms``: each
request's own generator lag taken out, request by request) for both sides, and a ‡ marks a side
where that takes out half the p99 or more: that tail was mostly the generator's lateness.

A row that is not met also gets ``why``: where the figure comes from in this same run, for both
sides. For a CPU or rate target, the CPU per operation split into the balancer's user and
system time and the machine's time outside the balancer's process (softirq, kernel workers:
machine-wide minus direct, minus the balancer's own); for the p99, the median, the p99 counted
from each request's ``connect()`` and the generator's p99 lag. Measured, not canned: a
figure the run lacks is left out.
"""

from __future__ import annotations

import json
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_RELAY = "l4lb-splice"
"""The contender running l4lb's default relay (``relay = "splice"`` since issue 16)."""

KERNEL_RELAY = "l4lb-kernel"
PEERS = ("haproxy", "haproxy-splice", "nginx")
BEST_PEER = "best peer"
"""Reference: the best value among the peers that ran (the fastest, the cheapest)."""

CODEC_ROW = (
    "codec parse ≥ 3× the PyPI peer, every shape",
    "see bench/codec.py",
    "its own table: make bench runs it first",
)


@dataclass(frozen=True, slots=True)
class Target:
    label: str
    measurement: str
    key: str
    higher_is_better: bool
    unit: str
    reference: str = BEST_PEER
    factor: float = 1.0
    """The target is ``factor`` × the reference (0.5 for "≤ 0.5× HAProxy's")."""
    contenders: tuple[str, ...] = (DEFAULT_RELAY,)
    alt_key: str | None = None
    """The same figure without the generator's lag, stated beside it in ``how far`` (a ‡ when it
    is at most :data:`LAG_BOUND` × the figure)."""


LAG_BOUND = 0.5
"""A side is generator-lag-bound when taking each request's lag out leaves at most this share
of its p99."""


TARGETS: tuple[Target, ...] = (
    Target("new conn/s ≥ the fastest peer's", "newconn", "rate", True, "/s"),
    Target(
        "balancer CPU per new conn ≤ every peer's (nginx, HAProxy)",
        "newconn",
        "balancer_cpu_us_per_op",
        False,
        "µs",
    ),
    Target(
        "p99 at a fixed rate (paced) ≤ every peer's",
        "paced",
        "p99_ms",
        False,
        "ms",
        alt_key="p99_from_connect_ms",
    ),
    Target(
        "machine CPU per keep-alive req, minus direct, ≤ 0.5× HAProxy's",
        "keepalive",
        "machine_cpu_us_per_op_net",
        False,
        "µs",
        reference="haproxy",
        factor=0.5,
        contenders=(DEFAULT_RELAY, KERNEL_RELAY),
    ),
    Target(
        "machine CPU per GB (8 streams), minus direct, ≤ 0.5× HAProxy's",
        "bulk8",
        "machine_cpu_s_per_gb_net",
        False,
        "s",
        reference="haproxy",
        factor=0.5,
        contenders=(DEFAULT_RELAY, KERNEL_RELAY),
    ),
    Target(
        "machine CPU per GB (1 stream), minus direct, ≤ 0.5× HAProxy's",
        "bulk1",
        "machine_cpu_s_per_gb_net",
        False,
        "s",
        reference="haproxy",
        factor=0.5,
        contenders=(DEFAULT_RELAY, KERNEL_RELAY),
    ),
    Target("idle RSS per connection ≤ every peer's", "idle", "kib_per_conn", False, "KiB"),
)


def _num(v: float) -> str:
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _value(results: dict[str, Any], contender: str, t: Target) -> tuple[float | None, bool]:
    """(the figure, whether it was load-generator-bound); None when not measured or failed."""
    res = results.get(contender, {}).get(t.measurement)
    if not isinstance(res, dict) or "failed" in res:
        return None, False
    v = res.get(t.key)
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return None, False
    return float(v), bool(res.get("generator_bound"))


def _extra(results: dict[str, Any], contender: str, measurement: str, key: str) -> float | None:
    res = results.get(contender, {}).get(measurement)
    v = res.get(key) if isinstance(res, dict) else None
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return None
    return float(v)


def _lag_notes(t: Target, contender: str, peer: str, results: dict[str, Any]) -> dict[str, Any]:
    """For a target with ``alt_key``: which sides were generator-lag-bound, and the figure
    without the generator's lag for both sides."""
    notes: dict[str, Any] = {}
    if t.alt_key is not None:
        for field, who in (("lag_bound", contender), ("reference_lag_bound", peer)):
            alt = _extra(results, who, t.measurement, t.alt_key)
            value = _extra(results, who, t.measurement, t.key)
            notes[field] = alt is not None and value is not None and alt <= LAG_BOUND * value
        mine = _extra(results, contender, t.measurement, t.alt_key)
        theirs = _extra(results, peer, t.measurement, t.alt_key)
        if mine is not None and theirs is not None and theirs > 0:
            notes.update(
                alt_value=mine,
                reference_alt_value=theirs,
                alt_ratio=round(mine / theirs, 3),
            )
    return notes


def _reference(results: dict[str, Any], t: Target) -> tuple[str, float, bool] | None:
    """(peer, its value, generator-bound) for the target's reference; None if no peer has it."""
    names = PEERS if t.reference == BEST_PEER else (t.reference,)
    found = []
    for name in names:
        v, bound = _value(results, name, t)
        if v is not None:
            found.append((name, v, bound))
    if not found:
        return None
    pick = max if t.higher_is_better else min
    return pick(found, key=lambda x: x[1])


CPU_KEYS = {
    "newconn": ("op", "us"),
    "keepalive": ("op", "us"),
    "bulk1": ("gb", "s"),
    "bulk8": ("gb", "s"),
}
"""Measurements whose results carry the balancer's CPU per operation (or per GB): the keys'
suffix and unit (``balancer_cpu_us_per_op``). The per-operation ones also carry user CPU."""

LATENCY_PARTS = (
    ("p50", "p50_ms"),
    ("p99 from connect()", "p99_from_connect_ms"),
    ("generator lag p99", "lag_p99_ms"),
)


def _cpu_split(results: dict[str, Any], who: str, measurement: str) -> str | None:
    """``user U + system S + outside O µs`` per operation (``balancer B + outside O s`` per GB,
    where the run has no user time), or None when the run lacks them."""
    per, unit = CPU_KEYS[measurement]
    cpu = _extra(results, who, measurement, f"balancer_cpu_{unit}_per_{per}")
    if cpu is None:
        return None
    user = _extra(results, who, measurement, f"balancer_user_{unit}_per_{per}")
    if user is not None:
        text = f"user {_num(user)} + system {_num(cpu - user)}"
    elif per == "op":
        return None
    else:
        text = f"balancer {_num(cpu)}"
    net = _extra(results, who, measurement, f"machine_cpu_{unit}_per_{per}_net")
    if net is not None:
        text += f" + outside the process {_num(net - cpu)}"
    return f"{text} {'µs' if unit == 'us' else unit}"


def why(t: Target, contender: str, peer: str, results: dict[str, Any]) -> str | None:
    """Where this run's figures come from, for both sides of a row (None if it has none)."""
    if t.measurement in CPU_KEYS:
        mine = _cpu_split(results, contender, t.measurement)
        theirs = _cpu_split(results, peer, t.measurement)
        if mine is None or theirs is None:
            return None
        what = "GB" if CPU_KEYS[t.measurement][0] == "gb" else "operation"
        return f"CPU per {t.measurement} {what}: {contender} {mine}; {peer} {theirs}"
    if t.measurement == "paced":
        parts = []
        for name, key in LATENCY_PARTS:
            a = _extra(results, contender, t.measurement, key)
            b = _extra(results, peer, t.measurement, key)
            if a is not None and b is not None:
                parts.append(f"{name} {_num(a)} vs {_num(b)} ms")
        return f"{contender} vs {peer}: " + ", ".join(parts) if parts else None
    return None


def check(t: Target, contender: str, results: dict[str, Any]) -> dict[str, Any]:
    """One row: the target, the values, the ratio, the verdict and how far."""
    row: dict[str, Any] = {
        "target": t.label,
        "contender": contender,
        "measurement": t.measurement,
        "key": t.key,
        "unit": t.unit,
    }
    value, bound = _value(results, contender, t)
    ref = _reference(results, t)
    if value is None or ref is None:
        missing = (
            contender
            if value is None
            else "/".join(PEERS if t.reference == BEST_PEER else (t.reference,))
        )
        row.update(verdict="not measured", how_far=f"no {t.measurement} figure for {missing}")
        return row
    peer, ref_value, ref_bound = ref
    row.update(
        value=value,
        reference=peer,
        reference_value=ref_value,
        generator_bound=bound,
        reference_generator_bound=ref_bound,
    )
    for who, v in ((peer, ref_value), (contender, value)):
        if v <= 0 and (who == peer or t.key.endswith("_net")):
            # a minus-direct figure at or below zero is the noise of a shared machine, not a cost
            row.update(
                ratio=None,
                verdict="n/a",
                how_far=f"{who}'s figure is {_num(v)} {t.unit}: noise, no ratio",
            )
            return row
    ratio = value / ref_value
    goal = t.factor * ref_value
    met = value >= goal if t.higher_is_better else value <= goal
    diff = value - goal
    sign = "+" if diff >= 0 else "-"
    scale = f"{ratio:.2f}× {peer}"
    if t.factor != 1.0:
        scale += f", target {t.factor:g}× = {_num(goal)} {t.unit}"
    how_far = f"{sign}{_num(abs(diff))} {t.unit}, {scale}"
    notes = _lag_notes(t, contender, peer, results)
    if "alt_value" in notes:
        how_far += (
            f"; from connect(): {_num(notes['alt_value'])} vs {_num(notes['reference_alt_value'])}"
            f" {t.unit}, {notes['alt_ratio']:.2f}×"
        )
    row.update(
        notes,
        ratio=round(ratio, 3),
        target_value=round(goal, 3),
        verdict="met" if met else "NOT met",
        how_far=how_far,
    )
    if not met:
        reason = why(t, contender, peer, results)
        if reason is not None:
            row["why"] = reason
    return row


def check_all(results: dict[str, Any], contenders: list[str]) -> list[dict[str, Any]]:
    """Every target for every l4lb contender it concerns that ran (in this run's order)."""
    rows = []
    for t in TARGETS:
        for c in t.contenders:
            if c in contenders and "error" not in results.get(c, {}):
                rows.append(check(t, c, results))
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The targets as a Markdown table; † marks a load-generator-bound side, ‡ a side whose
    p99 was mostly its generator's own lateness."""
    head = ["target", "l4lb", "value", "reference", "ratio", "verdict", "how far"]
    lines = [head]
    for r in rows:
        if "value" not in r:
            lines.append([r["target"], r["contender"], "-", "-", "-", r["verdict"], r["how_far"]])
            continue
        mark = (" †" if r["generator_bound"] else "") + (" ‡" if r.get("lag_bound") else "")
        ref_mark = (" †" if r["reference_generator_bound"] else "") + (
            " ‡" if r.get("reference_lag_bound") else ""
        )
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") is not None else "-"
        lines.append(
            [
                r["target"],
                r["contender"],
                f"{_num(r['value'])} {r['unit']}{mark}",
                f"{r['reference']} {_num(r['reference_value'])}{ref_mark}",
                ratio,
                r["verdict"],
                r["how_far"],
            ]
        )
    lines.append([CODEC_ROW[0], "-", "-", "-", "-", CODEC_ROW[1], CODEC_ROW[2]])
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    out = []
    for n, x in enumerate(lines):
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)) + " |")
        if n == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    reasons = [f"- {r['target']} ({r['contender']}): {r['why']}" for r in rows if "why" in r]
    if reasons:
        out.append("\nWhere the figures of the rows not met come from, in this run:")
        out.extend(reasons)
    return "\n".join(out)


PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def compiled_set(pyproject: Path = PYPROJECT) -> list[str]:
    """The modules compiled with mypyc (``make setup`` in place, setup.py into the wheel): the
    ``[tool.l4lb] compiled`` list in pyproject.toml, as dotted names (the splice relay first: the
    build is called mypyc when it is compiled)."""
    with pyproject.open("rb") as file:
        names: list[str] = tomllib.load(file)["tool"]["l4lb"]["compiled"]
    return sorted(names, key=lambda n: (n != "l4lb.balancer.splice", n))


def build(python: str) -> dict[str, Any]:
    """Which l4lb ran: compiled with mypyc or pure Python, as the bench's interpreter imports it.

    The l4lb the bench starts is the one next to ``python`` (same virtual environment), so this
    asks that interpreter, not the harness's own imports.
    """
    modules = compiled_set()
    code = (
        "import importlib, json, sys\n"
        "out = {}\n"
        f"for m in {modules!r}:\n"
        "    try:\n"
        "        out[m] = importlib.import_module(m).__file__\n"
        "    except Exception as err:\n"
        "        out[m] = f'not importable: {err}'\n"
        "print(json.dumps(out))\n"
    )
    try:
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
        files: dict[str, str] = json.loads(proc.stdout)
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError) as err:
        return {"build": "unknown", "error": f"{type(err).__name__}: {err}"}
    compiled = sorted(m for m, f in files.items() if f.endswith(".so"))
    splice = files.get("l4lb.balancer.splice", "")
    return {
        "build": "mypyc" if splice.endswith(".so") else "pure Python",
        "compiled": compiled,
        "files": files,
    }
