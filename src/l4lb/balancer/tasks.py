"""The balancer's background tasks (health checkers, DNS watchers): cancel them, then wait."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any


def cancel_all(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel each task (idempotent: a finished task ignores it)."""
    for task in tasks:
        task.cancel()


async def wait_cancelled(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Wait until each (cancelled) task has finished; its cancellation is not an error."""
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
