"""Shared fixtures for the balancer tests."""

from __future__ import annotations

RELAY_MODES = ["stream", "splice", "kernel"]
"""Every relay implementation; relay tests run once per mode (``relay = MODE`` in the config)."""
