"""Delegated delayed leave (MSC4140 via MSC4195's ``delay_id``/``delay_timeout``).

A member hands us the id of its delayed "leave" event. While its LiveKit participant is
connected we restart the delayed event at 80 % of its timeout; when the participant goes away
we send it at once, so the call shows the member as gone without waiting for the timeout.

Theory of operation: one owned task per job, keyed by (LiveKit room, identity). Inputs are
*signals* (webhooks, presence lookups, timers); all state changes are rows of
:data:`TRANSITIONS`; a signal with no row in the current state is ignored (and logged).

- ``WAITING``: the participant has not been seen yet. Presence is polled with backoff
  (1 s × 1.5, at most 60 s) and ``participant_joined`` webhooks count. If it never shows up
  within ``min(1 h, delay_timeout)``, the leave is sent.
- ``CONNECTED``: restart now and then every 0.8 × timeout; presence is re-checked every
  ``check_interval``; ``participant_left``/``participant_connection_aborted`` or an absent
  participant → ``SENDING``. A 404 on restart or a deadline missed → done.
- ``SENDING``: POST send, retrying transient failures until the delay deadline (≥ 1 s).

Jobs are saved in the store (Redis) on creation, on first connection and after every restart,
and deleted when done; on start-up stored jobs resume. A resumed job whose participant had
connected and is now absent is sent immediately (lk-jwt-service would wait for the timeout).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Protocol

import structlog

from matrixrtc.tasks import OwnedTasks
from sfu.common import metrics
from sfu.controller.csapi import ActionResult, CsApi, DelayAction
from sfu.controller.store import JobParams, JobStore, StoredJob

__all__ = ["DelayedLeaveManager", "Presence", "Signal", "State"]

log = structlog.get_logger(__name__)


class State(Enum):
    WAITING = "waiting"
    CONNECTED = "connected"
    SENDING = "sending"
    DONE = "done"


class Signal(Enum):
    JOINED = "joined"
    LEFT = "left"  # participant_left, or presence check found it gone
    ABORTED = "aborted"  # participant_connection_aborted
    WAIT_TIMEOUT = "wait_timeout"
    NOT_FOUND = "not_found"  # homeserver: 404 on restart
    EXPIRED = "expired"  # could not restart before the deadline
    REPLACED = "replaced"


TRANSITIONS: dict[tuple[State, Signal], State] = {
    (State.WAITING, Signal.JOINED): State.CONNECTED,
    (State.WAITING, Signal.ABORTED): State.DONE,
    (State.WAITING, Signal.WAIT_TIMEOUT): State.SENDING,
    (State.WAITING, Signal.REPLACED): State.DONE,
    (State.CONNECTED, Signal.LEFT): State.SENDING,
    (State.CONNECTED, Signal.ABORTED): State.SENDING,
    (State.CONNECTED, Signal.NOT_FOUND): State.DONE,
    (State.CONNECTED, Signal.EXPIRED): State.DONE,
    (State.CONNECTED, Signal.REPLACED): State.DONE,
}


class Presence(Protocol):
    async def participant_present(self, room: str, identity: str) -> bool: ...


def redact(delay_id: str) -> str:
    """A short digest to correlate log lines without logging the capability itself."""
    return hashlib.sha256(delay_id.encode()).hexdigest()[:12]


@dataclass(eq=False)
class _Job:
    stored: StoredJob
    signals: asyncio.Queue[Signal] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None
    state: State = State.WAITING


class DelayedLeaveManager:
    """Owns every delayed-leave job task."""

    def __init__(
        self,
        presence: Presence,
        csapi: CsApi,
        store: JobStore,
        *,
        check_interval: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        on_gone: Callable[[str, str], Awaitable[None]] | None = None,
    ) -> None:
        self._on_gone = on_gone  # (room, identity): the member's delayed leave is gone
        self._presence = presence
        self._csapi = csapi
        self._store = store
        self._check_interval = check_interval
        self._clock = clock
        self._wall = wall_clock
        self._jobs: dict[tuple[str, str], _Job] = {}
        self._closing = False
        # A failed job is logged when it fails (with its room and identity in the task name)
        # and raised by close().
        self._tasks = OwnedTasks("delayed leave", log, event_prefix="delayed_leave")

    @property
    def closing(self) -> bool:
        return self._closing

    def jobs(self) -> dict[tuple[str, str], State]:
        return {k: j.state for k, j in self._jobs.items()}

    async def start(self) -> None:
        """Resume stored jobs."""
        try:
            stored = await self._store.all()
        except Exception as exc:
            log.error("could not load stored jobs", reason=str(exc)[:200])
            return
        now = self._wall()
        for job in stored:
            remaining = job.restarted_at + job.params.delay_timeout_ms / 1000 - now
            if remaining <= 0:
                log.info("dropping expired stored job", delay=redact(job.params.delay_id))
                await self._store_call(self._store.delete(job.params.key, job.params.delay_id))
                continue
            self._spawn(job, resumed=True)
        log.info("delayed-leave jobs resumed", count=len(self._jobs))

    async def close(self) -> None:
        """Stop every job (they stay in the store, to be resumed by the next process); a job
        that failed meanwhile (logged when it failed) is raised."""
        self._closing = True
        try:
            await self._tasks.aclose()
        finally:
            self._jobs.clear()

    async def resolve(self, server_name: str) -> str | None:
        return await self._csapi.base_url(server_name)

    async def add(self, params: JobParams) -> None:
        """Start (or replace) the job for ``params.key``."""
        stored = StoredJob(params, self._wall(), False)
        old = self._jobs.get(params.key)
        if old is not None:
            old.signals.put_nowait(Signal.REPLACED)
        await self._store_call(self._store.save(stored))
        self._spawn(stored, resumed=False)

    def superseded(self, room: str, identity: str, delay_id: str) -> None:
        """Another worker took over this participant with ``delay_id``: stop an older job."""
        job = self._jobs.get((room, identity))
        if job is not None and job.stored.params.delay_id != delay_id:
            job.signals.put_nowait(Signal.REPLACED)

    def on_webhook(self, room: str, identity: str, signal: Signal) -> bool:
        """Route a LiveKit webhook to its job; False when no job matches."""
        job = self._jobs.get((room, identity))
        if job is None:
            return False
        job.signals.put_nowait(signal)
        return True

    def _spawn(self, stored: StoredJob, *, resumed: bool) -> None:
        job = _Job(stored)
        job.state = State.CONNECTED if resumed and stored.seen_connected else State.WAITING
        self._jobs[stored.params.key] = job
        metrics.DELAYED_LEAVE_JOBS.inc()
        # A fresh context: the job outlives the request that created it (and its request id).
        p = stored.params
        job.task = self._tasks.spawn(
            self._run(job, resumed=resumed),
            f"job {p.room} {p.identity}",
            context=contextvars.Context(),
        )
        job.task.add_done_callback(lambda _t: self._finished(job))

    def _finished(self, job: _Job) -> None:
        metrics.DELAYED_LEAVE_JOBS.dec()
        if self._jobs.get(job.stored.params.key) is job:
            del self._jobs[job.stored.params.key]

    async def _store_call(self, coro: object) -> None:
        try:
            await coro  # type: ignore[misc]
        except Exception as exc:
            log.error("job store failed", reason=str(exc)[:200])

    async def _run(self, job: _Job, *, resumed: bool) -> None:
        p = job.stored.params
        lg = log.bind(room=p.room, identity=p.identity, delay=redact(p.delay_id))
        timeout = p.delay_timeout_ms / 1000
        started = self._clock()
        wait_until = started + min(3600.0, timeout)
        # The homeserver fires at restarted_at + timeout; keep the same clock base as stored.
        deadline = started + (job.stored.restarted_at + timeout - self._wall())
        next_restart = started  # restart as soon as connected
        backoff = 1.0
        poller = self._tasks.spawn(
            self._poll(job, immediate=resumed), f"poll {p.room} {p.identity}"
        )
        replaced = False
        try:
            while job.state in (State.WAITING, State.CONNECTED):
                now = self._clock()
                due = wait_until if job.state is State.WAITING else next_restart
                sig: Signal | None
                try:
                    sig = await asyncio.wait_for(job.signals.get(), max(0.0, due - now))
                except TimeoutError:
                    if job.state is State.WAITING:
                        sig = Signal.WAIT_TIMEOUT
                    else:
                        sig, next_restart, backoff, deadline = await self._restart(
                            job, lg, deadline, backoff
                        )
                if sig is None:
                    continue
                nxt = TRANSITIONS.get((job.state, sig))
                if nxt is None:
                    lg.debug("signal ignored", state=job.state.value, signal=sig.value)
                    continue
                lg.info("job transition", old=job.state.value, new=nxt.value, signal=sig.value)
                replaced = sig is Signal.REPLACED
                if sig is Signal.NOT_FOUND and self._on_gone is not None:
                    # the member sent or cancelled its leave itself: its call membership ended
                    await self._store_call(self._on_gone(p.room, p.identity))
                if nxt is State.CONNECTED:
                    next_restart = self._clock()
                    job.stored = replace(job.stored, seen_connected=True)
                    await self._store_call(self._store.save(job.stored))
                job.state = nxt
            if job.state is State.SENDING:
                await self._send(job, lg, deadline)
                job.state = State.DONE
        finally:
            poller.cancel()  # a failure of its own is the owner's (logged, raised by close)
            await asyncio.wait([poller])
        if not replaced and not self._closing:
            current = self._jobs.get(p.key)
            if current is None or current is job:
                await self._store_call(self._store.delete(p.key, p.delay_id))

    async def _restart(
        self, job: _Job, lg: structlog.typing.FilteringBoundLogger, deadline: float, backoff: float
    ) -> tuple[Signal | None, float, float, float]:
        p = job.stored.params
        timeout = p.delay_timeout_ms / 1000
        now = self._clock()
        if now >= deadline:
            return Signal.EXPIRED, now, backoff, deadline
        base = await self._csapi.base_url(p.server_name)
        if base is None:
            metrics.DELAYED_LEAVE.labels("restart", "no_cs_api").inc()
            return Signal.EXPIRED, now, backoff, deadline
        outcome = await self._csapi.act(base, p.delay_id, DelayAction.RESTART)
        metrics.DELAYED_LEAVE.labels("restart", outcome.result.value).inc()
        now = self._clock()
        if outcome.result is ActionResult.OK:
            job.stored = replace(job.stored, restarted_at=self._wall())
            await self._store_call(self._store.save(job.stored))
            lg.debug("delayed event restarted")
            return None, now + 0.8 * timeout, 1.0, now + timeout
        if outcome.result is ActionResult.GONE:
            lg.info("delayed event gone on restart")
            return Signal.NOT_FOUND, now, backoff, deadline
        wait = outcome.retry_after if outcome.retry_after is not None else backoff
        return None, min(now + wait, deadline), min(backoff * 1.5, 60.0), deadline

    async def _send(
        self, job: _Job, lg: structlog.typing.FilteringBoundLogger, deadline: float
    ) -> None:
        p = job.stored.params
        give_up = self._clock() + min(3600.0, max(1.0, deadline - self._clock()))
        backoff = 1.0
        while True:
            base = await self._csapi.base_url(p.server_name)
            if base is None:
                metrics.DELAYED_LEAVE.labels("send", "no_cs_api").inc()
                lg.warning("cannot send delayed leave: client-server API unknown")
                return
            outcome = await self._csapi.act(base, p.delay_id, DelayAction.SEND)
            metrics.DELAYED_LEAVE.labels("send", outcome.result.value).inc()
            if outcome.result is not ActionResult.RETRY:
                lg.info("delayed leave sent", result=outcome.result.value)
                return
            wait = outcome.retry_after if outcome.retry_after is not None else backoff
            if self._clock() + wait > give_up:
                lg.warning("delayed leave not sent before the deadline", status=outcome.status)
                return
            await asyncio.sleep(wait)
            backoff = min(backoff * 1.5, 60.0)

    async def _poll(self, job: _Job, *, immediate: bool) -> None:
        """Presence lookups: find the participant while waiting, notice it gone later."""
        p = job.stored.params
        delay = 0.0 if immediate else 1.0
        waiting_backoff = 1.0
        while True:
            await asyncio.sleep(delay)
            try:
                present = await self._presence.participant_present(p.room, p.identity)
            except Exception as exc:
                log.debug("presence lookup failed", reason=str(exc)[:200])
                present = None
            if job.state is State.WAITING:
                if present:
                    job.signals.put_nowait(Signal.JOINED)
                waiting_backoff = min(waiting_backoff * 1.5, 60.0)
                delay = waiting_backoff if not present else self._check_interval or 60.0
            elif job.state is State.CONNECTED:
                if present is False:
                    job.signals.put_nowait(Signal.LEFT)
                    return
                if self._check_interval <= 0:
                    return
                delay = self._check_interval
            else:
                return
