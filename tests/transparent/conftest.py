"""Transparent mode (issue 12): binding a client's address needs CAP_NET_ADMIN (CI runs as root)."""

from __future__ import annotations

import os

import pytest

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="transparent mode and network namespaces need root (CI runs as root)"
)
