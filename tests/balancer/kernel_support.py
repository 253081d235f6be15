"""Whether this machine can run the kernel relay: one marker for the kernel relay's own tests."""

from __future__ import annotations

import pytest

from l4lb.balancer.kernel_path import KernelPath


def _kernel_path_or_reason() -> str | None:
    try:
        path = KernelPath(slots=64)
    except OSError as err:
        return f"the kernel relay cannot load here: {err}"
    path.close()
    return None


UNAVAILABLE = _kernel_path_or_reason()
"""Why the kernel relay cannot load here, or None when it can."""

needs_kernel_path = pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or "")
