"""Shared fixtures for the balancer tests."""

from __future__ import annotations

RELAY_MODES = ["stream", "splice", "kernel"]
"""Every relay implementation; relay tests run once per mode (``relay = MODE`` in the config)."""


def relay_top(mode: str) -> dict[str, object]:
    """The config's top-level keys for a relay test in ``mode``.

    In ``kernel`` mode every connection enters the kernel right after its PROXY header
    (``[kernel] handover_exchanges = 0``), so the relay suite tests the kernel data path itself;
    the default hand-over from splice is tested in test_kernel_relay_handover.py and
    test_kernel_relay_live.py.
    """
    if mode == "kernel":
        return {"relay": mode, "kernel": {"handover_exchanges": 0}}
    return {"relay": mode}
