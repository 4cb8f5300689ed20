"""Owned asyncio tasks: the one pattern every long-lived I/O object here uses.

An owner starts named tasks through :meth:`OwnedTasks.spawn`. A task that fails is logged the
moment it fails (not only when the owner closes), the owner may be told at once
(``on_failure``), and the failure is kept until the owner collects it: :meth:`cancel` and
:meth:`join` return the first one as a :class:`~matrixrtc.errors.RemoteError`, :meth:`aclose`
raises it. Tasks that finish cleanly are forgotten at once, so an owner may spawn one task per
event for hours. Nothing is fire-and-forget, and nothing else in ``matrixrtc`` calls
``asyncio.create_task``.

A task spawned after :meth:`aclose` never runs (its coroutine is closed): the owner's I/O
callbacks may fire during and after its close without starting work nobody will await.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from matrixrtc.errors import RemoteError

__all__ = ["OwnedTasks", "first_of"]

T = TypeVar("T")


class OwnedTasks:
    def __init__(
        self,
        owner: str,
        log: Any,
        *,
        event_prefix: str,
        on_failure: Callable[[str, BaseException], None] | None = None,
        recancel_after_s: float = 2.0,
    ) -> None:
        self._owner = owner
        self._log = log
        self._event = f"{event_prefix}.task_failed"
        self._resisted = f"{event_prefix}.task_resisted_cancel"
        self._recancel_after_s = recancel_after_s
        self._on_failure = on_failure
        self._tasks: set[asyncio.Task[Any]] = set()
        self._failures: list[tuple[str, BaseException]] = []
        self._closed = False

    def spawn(
        self,
        coro: Coroutine[Any, Any, T],
        name: str,
        *,
        context: contextvars.Context | None = None,
        awaited: bool = False,
    ) -> asyncio.Task[T]:
        """Run ``coro`` as a task named ``"<owner> <name>"``, owned until it ends. ``context``:
        as for ``create_task`` (e.g. a fresh one for a job that outlives the request, and the
        request's log context, that started it).

        ``awaited``: the task's outcome belongs to whoever awaits it (a lookup several
        requests share): its failure is theirs to handle, so it is neither logged nor kept
        here; the owner still cancels and awaits it on close."""
        # The coroutine goes straight into the task: cancelled before it starts, it is still
        # closed properly (no "coroutine was never awaited").
        task = asyncio.get_running_loop().create_task(
            coro, name=f"{self._owner} {name}", context=context
        )
        if self._closed:
            task.cancel()
            return task
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(name, t, awaited))
        return task

    def _done(self, name: str, task: asyncio.Task[Any], awaited: bool) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()  # also marks it retrieved: asyncio's own warning stays quiet
        if exc is None or awaited:
            return
        self._failures.append((name, exc))
        self._log.error(self._event, owner=self._owner, task=name, exc_info=exc)
        if self._on_failure is not None:
            try:
                self._on_failure(name, exc)
            except Exception:  # the owner's callback: never lose the original failure
                self._log.error(f"{self._event}_callback", task=name, exc_info=True)

    def __len__(self) -> int:
        """Tasks still running."""
        return len(self._tasks)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def failures(self) -> list[tuple[str, BaseException]]:
        """Every ``(name, exception)`` not yet collected by cancel/join/aclose."""
        return list(self._failures)

    def _collect(self) -> RemoteError | None:
        failures, self._failures = self._failures, []
        if not failures:
            return None
        name, exc = failures[0]
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        err = RemoteError(f"{self._owner} task {name!r} failed: {exc!r}{more}")
        err.__cause__ = exc
        return err

    async def join(self) -> RemoteError | None:
        """Wait until every task ends by itself (none is cancelled); the first failure, as
        an error to raise (or None). Bound it yourself (``asyncio.timeout``) if it may hang."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))
        return self._collect()

    async def cancel(self) -> RemoteError | None:
        """Cancel and await every task; the first failure, as an error to raise (or None).
        The owner may spawn again afterwards.

        A task still running ``recancel_after_s`` after being cancelled is cancelled again
        (and logged, with where it waits): code that swallows a cancellation (Python 3.11's
        ``wait_for`` can, when its inner awaitable finishes at the same moment; so can a
        library catching ``CancelledError``) would otherwise hang its owner's close.
        """
        rounds = 0
        while self._tasks:
            tasks = set(self._tasks)
            for t in tasks:
                t.cancel()
            _, pending = await asyncio.wait(tasks, timeout=self._recancel_after_s)
            if pending:
                rounds += 1
                self._log.warning(
                    self._resisted,
                    owner=self._owner,
                    round=rounds,
                    tasks={t.get_name(): _where(t) for t in pending},
                )
        return self._collect()

    async def aclose(self) -> None:
        """Cancel and await every task, refuse new ones; raise the first failure."""
        self._closed = True
        err = await self.cancel()
        if err is not None:
            raise err


def _where(task: asyncio.Task[Any]) -> str:
    """The innermost frame a task is suspended in, as ``file:line`` (for logs)."""
    frames = task.get_stack()
    if not frames:
        return "?"
    code = frames[-1].f_code
    return f"{code.co_filename}:{frames[-1].f_lineno} in {code.co_name}"


async def first_of(**aws: Awaitable[Any]) -> tuple[str, asyncio.Future[Any]]:
    """Run the named awaitables side by side until one ends, then cancel and await the rest:
    nothing outlives the call (also when the caller is cancelled). Returns the first ended
    one's name (in argument order, when several ended together) and its future, whose
    ``result()`` gives its value or raises its exception."""
    futures = {name: asyncio.ensure_future(aw) for name, aw in aws.items()}
    try:
        await asyncio.wait(futures.values(), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for f in futures.values():
            f.cancel()  # no-op on the ones that ended
        await asyncio.gather(*futures.values(), return_exceptions=True)
    for name, f in futures.items():
        if not f.cancelled():
            return name, f
    raise asyncio.CancelledError  # every one was cancelled from outside
