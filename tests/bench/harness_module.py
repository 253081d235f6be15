"""Load one of bench/harness's modules by path (bench/ is not a package the tests import)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def load(name: str) -> ModuleType:
    """``bench/harness/<name>.py`` as the module ``bench_<name>``."""
    spec = importlib.util.spec_from_file_location(
        f"bench_{name}", ROOT / "bench" / "harness" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module
