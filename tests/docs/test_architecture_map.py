"""docs/architecture.md names every module of ``src/l4lb`` in its module map, and its "where to
change what" table names the modules a change most often starts in; a module added without its
line fails here, named."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "l4lb"
DOC = ROOT / "docs" / "architecture.md"

TABLE_MUST_NAME = [
    "balancer/routes.py",
    "balancer/discovery.py",
    "balancer/transparent.py",
    "balancer/signals.py",
    "balancer/state_file.py",
    "balancer/reload_command.py",
    "balancer/reload_status.py",
    "balancer/tasks.py",
    "balancer/poller.py",
    "balancer/relay_contract.py",
    "balancer/command.py",
    "anycast/state.py",
    "anycast/announcer.py",
    "backend/",
]


def _section(heading: str) -> str:
    text = DOC.read_text()
    assert f"\n{heading}\n" in text, f"docs/architecture.md has no heading {heading!r}"
    body = text.split(f"\n{heading}\n", 1)[1]
    end = re.search(r"^## ", body, re.M)
    return body[: end.start()] if end else body


def modules() -> dict[str, list[str]]:
    """Package ("" for the top level) -> its modules' file names."""
    found: dict[str, list[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        package = path.parent.relative_to(SRC).as_posix()
        found.setdefault("" if package == "." else package, []).append(path.name)
    return found


def mapped(text: str) -> dict[str, set[str]]:
    """The module map's bullets: package (named as `pkg/` at a top-level bullet's start, "" when
    none) -> the `name.py` it names, nested bullets and continuation lines included."""
    found: dict[str, set[str]] = {}
    package = None
    for line in text.splitlines():
        if line.startswith("- "):
            first = re.match(r"- (?:[^`]*?)`(\w+)/`", line)
            package = first.group(1) if first else ""
        if package is not None:
            found.setdefault(package, set()).update(re.findall(r"`(\w+\.py)`", line))
    return found


def test_the_map_names_every_module() -> None:
    seen = mapped(_section("## Module map"))
    missing = [
        f"{package}/{name}" if package else name
        for package, names in modules().items()
        for name in names
        if name != "__init__.py" or not package  # a package's bullet names the package
        if name not in seen.get(package, set())
    ]
    missing += [f"{p}/ (its bullet)" for p in modules() if p and p not in seen]
    assert not missing, (
        "docs/architecture.md's module map lacks (add each to its package's bullet, "
        f"`name.py` in backticks): {', '.join(missing)}"
    )


def test_the_where_to_change_table_names_the_usual_starting_points() -> None:
    table = _section("## Where to change what")
    missing = [m for m in TABLE_MUST_NAME if f"`{m}" not in table]
    assert not missing, f"docs/architecture.md's 'Where to change what' lacks: {missing}"
    assert all((SRC / m).exists() for m in TABLE_MUST_NAME), "a module here was renamed"


def test_a_module_left_out_of_the_map_is_named() -> None:
    text = (
        "- `balancer/`: `routes.py` and\n  - `pool.py`\n- `trust/`: `cidr.py`\n"
        "- the rest: `cli.py`\n"
    )
    assert mapped(text) == {
        "balancer": {"routes.py", "pool.py"},
        "trust": {"cidr.py"},
        "": {"cli.py"},
    }
    assert "discovery.py" not in mapped(text)["balancer"]
