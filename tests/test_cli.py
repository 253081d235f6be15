"""The ``l4lb`` command's own options (each subcommand is tested with its module)."""

from __future__ import annotations

import importlib
import sysconfig
import tomllib
from pathlib import Path

import pytest

from l4lb import __version__, cli

COMPILED: list[str] = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())[
    "tool"
]["l4lb"]["compiled"]


@pytest.mark.parametrize("option", ["--version", "-V"])
def test_version_says_which_build_runs(option: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Compiled or pure, as the import system loads the modules pyproject.toml lists: CI runs
    this under both builds (.ci/run), and tests/test_wheel.py asks an installed wheel."""
    assert cli.main([option]) == 0
    files = [importlib.import_module(m).__file__ or "" for m in COMPILED]
    compiled = [f for f in files if f.endswith(sysconfig.get_config_var("EXT_SUFFIX"))]
    build = f"compiled with mypyc: {len(compiled)} modules" if compiled else "pure Python"
    assert capsys.readouterr().out == f"l4lb {__version__} ({build})\n"
