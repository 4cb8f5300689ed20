"""Owned asyncio tasks: the one pattern every long-lived I/O object here uses.

An owner starts named tasks, a task that fails is logged the moment it fails (not only when
the owner closes), and closing cancels and awaits every task, then reports the first failure
as a :class:`~matrixrtc.errors.RemoteError`. Nothing is fire-and-forget.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from matrixrtc.errors import RemoteError

__all__ = ["OwnedTasks"]


class OwnedTasks:
    def __init__(self, owner: str, log: Any, *, event_prefix: str) -> None:
        self._owner = owner
        self._log = log
        self._event = f"{event_prefix}.task_failed"
        self._tasks: list[asyncio.Task[None]] = []

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        # The coroutine goes straight into the task: cancelled before it starts, it is still
        # closed properly.
        task = asyncio.create_task(coro, name=f"{self._owner} {name}")
        task.add_done_callback(lambda t: self._done(name, t))
        self._tasks.append(task)
        return task

    def _done(self, name: str, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._log.error(self._event, task=name, exc_info=task.exception())

    def __len__(self) -> int:
        return len(self._tasks)

    async def cancel(self) -> RemoteError | None:
        """Cancel and await every task; the first failure, as an error to raise (or None)."""
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for r in results:
            if isinstance(r, Exception):
                err = RemoteError(f"{self._owner} task failed: {r!r}")
                err.__cause__ = r
                return err
        return None

    async def aclose(self) -> None:
        """Cancel and await every task; raise the first failure."""
        err = await self.cancel()
        if err is not None:
            raise err
