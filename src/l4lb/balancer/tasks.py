"""The balancer's background tasks (health checkers, DNS watchers): cancel them, then wait."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


class BackgroundTasks:
    """``stop()`` and ``aclose()`` for an owner of ``_tasks``, its running tasks by key."""

    _tasks: dict[Any, asyncio.Task[None]]

    def stop(self) -> None:
        """Cancel every task (idempotent)."""
        for task in self._tasks.values():
            task.cancel()
        self._tasks = {}

    async def aclose(self) -> None:
        """Cancel the tasks and wait until they have finished."""
        tasks = list(self._tasks.values())
        self.stop()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
