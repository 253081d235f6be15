"""The fleet suites' topology, built for a test and always removed after it (network namespaces
named ``l4f-<run>-<role>``, every process in them killed). Needs root; CI runs as root."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fleet.topology import Fleet


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    try:
        f.build()
        yield f
    finally:
        f.close()
        left = f.spaces.left_behind()
        assert not left, f"namespaces left behind: {left}"
