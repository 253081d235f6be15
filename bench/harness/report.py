"""The table: a row per figure, a column per contender, each value also as a ratio to HAProxy."""

from __future__ import annotations

from typing import Any

from harness.figures import ROWS

REFERENCE = "haproxy"


def _fmt(v: float) -> str:
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def cell(results: dict[str, Any], contender: str, measurement: str, key: str) -> str:
    res = results.get(contender, {}).get(measurement)
    if res is None:
        return "-"
    if "failed" in res:
        return "failed"
    v = res.get(key)
    if v is None:
        return "n/a"
    text = _fmt(float(v))
    ref = results.get(REFERENCE, {}).get(measurement, {}) or {}
    rv = ref.get(key)
    if contender != REFERENCE and isinstance(rv, (int, float)) and rv:
        text += f" ({float(v) / rv:.2f}x)"
    if res.get("generator_bound"):
        text += " †"
    if res.get("errors"):
        text += f" [{res['errors']} err]"
    return text


def table(results: dict[str, Any], contenders: list[str]) -> str:
    """A Markdown table; † marks a load-generator-bound figure."""
    head = ["figure", *contenders]
    rows = [head, ["---"] * len(head)]
    for label, measurement, key, _ in ROWS:
        if not any(measurement in results.get(c, {}) for c in contenders):
            continue
        row = [label] + [cell(results, c, measurement, key) for c in contenders]
        if all(x in ("-", "n/a") for x in row[1:]):
            continue
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for r in rows:
        if r[0] == "---":
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        else:
            lines.append(
                "| "
                + " | ".join(
                    x.ljust(w) if i == 0 else x.rjust(w)
                    for i, (x, w) in enumerate(zip(r, widths, strict=True))
                )
                + " |"
            )
    return "\n".join(lines)
