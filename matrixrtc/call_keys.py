"""Sender-key distribution for one call: the key manager wired to the agent and to Olm.

``async with CallKeys(agent) as keys`` (inside ``async with CallAgent(...) as agent``) runs
the pure :class:`~matrixrtc.e2ee.keys.KeyManager` for the agent's call:

* **inputs**: the agent's participant list (seeded from :attr:`CallAgent.participants`, then
  :meth:`CallAgent.changes`), key messages from the adapter's to-device stream, the clock;
* **sending** (:class:`~matrixrtc.e2ee.keys.SendKey`): one ``io.element.call.encryption_keys``
  (spec/matrixrtc.md §4.2) Olm-encrypted to each listed device. Devices the adapter could not
  reach are retried with the newest key handed out; a send that reached nobody is reported
  failed to the manager and the distribution is re-run after a back-off (js-sdk waits for the
  next membership recalculation, which here may be an hour away);
* **receiving**: :func:`~matrixrtc.e2ee.inbound.screen_key_message` (Olm only, the verified
  sender device, no lying ``claimed_device_id``, both dialects); drops are logged and counted;
* **keys**: :class:`~matrixrtc.e2ee.keys.UseKey` and ``InstallRemoteKey`` go into
  :attr:`CallKeys.rings` (one ring per LiveKit identity), which transports encrypt and
  decrypt with; our sending ring's current index moves when the manager says ``UseKey``.
  Every other holder of keys (a LiveKit transport's key table) registers a :class:`KeySink`
  with :meth:`CallKeys.add_sink`: it is handed every key held so far at once and every later
  one as it comes. This is the one way keys leave this object: pushed, never looked up again.
* **delivery**: :meth:`CallKeys.key_sent_to` says whether a device has been sent a key index
  (the mesh holds back frames a peer could not decrypt).

Key 0 is put into use while entering, before anyone could have subscribed: so a new
subscription to :meth:`CallKeys.events` starts with the "used" event of the key in use (a
replay), and a sink added later is handed that key at once. Nobody misses the first key.

Per-participant keys need an encrypted room, as in Element Call (§4.1): elsewhere entering
raises :class:`~matrixrtc.errors.LocalError` unless ``allow_plaintext_keys`` is set, an
explicit opt-in for test pages, which also accepts plaintext key messages in such rooms.

Every task is owned and cancelled on exit; leaving the block forgets the keys (a rejoin starts
again at index 0). The agent's own leave is the agent's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType
from typing import Any, Protocol, Self

import structlog

from matrixrtc.agent import CallAgent, Participant, ParticipantsChanged
from matrixrtc.e2ee.cryptor import KeyRings
from matrixrtc.e2ee.inbound import AcceptedKey, DropReason, RejectedKey, screen_key_message
from matrixrtc.e2ee.keys import (
    GRACE_MS,
    USE_KEY_DELAY_MS,
    InstallRemoteKey,
    KeyAction,
    KeyManager,
    Member,
    SendKey,
    UseKey,
)
from matrixrtc.e2ee.messages import ELEMENT_CALL_KEYS_TYPE, ElementCallKeys
from matrixrtc.errors import LocalError, MatrixRTCError
from matrixrtc.matrix import Broadcaster, DeviceRef, Subscription, ToDeviceEvent
from matrixrtc.matrix.wire import now_ms
from matrixrtc.model.rejections import RejectionLog
from matrixrtc.tasks import OwnedTasks

__all__ = [
    "CallKeys",
    "CallKeysConfig",
    "CallKeysStats",
    "KeyEvent",
    "KeyEventKind",
    "KeySink",
]

log = structlog.get_logger(__name__)

_ENCRYPTION_STATE = ("m.room.encryption", "")


@dataclass(frozen=True, slots=True, kw_only=True)
class CallKeysConfig:
    """Key policy settings; defaults are js-sdk's (spec/matrixrtc.md §4.4)."""

    allow_plaintext_keys: bool = False  # E2EE in unencrypted rooms (test pages only)
    grace_ms: int = GRACE_MS  # a joiner within this key age gets the current key
    use_key_delay_ms: int = USE_KEY_DELAY_MS
    retry_ms: int = 1_000  # first retry of a failed key send; doubles up to max_retry_ms
    max_retry_ms: int = 30_000
    # Send the next key ahead, so a joiner after the grace period can decrypt at once
    # (matrixrtc.e2ee.keys: "prepared next key"); False: matrix-js-sdk's policy exactly.
    prepare_next_key: bool = True


class KeySink(Protocol):
    """Something that needs the call's keys pushed to it (a LiveKit key table, …)."""

    def use_own_key(self, index: int, key: bytes) -> None:
        """Our media is encrypted with ``key`` at ``index`` from now on."""
        ...

    def set_remote_key(self, identity: str, index: int, key: bytes) -> None:
        """A remote sender's key, under its LiveKit identity."""
        ...


class KeyEventKind(StrEnum):
    SENT = "sent"  # our key at ``index`` went to ``devices``
    USED = "used"  # we encrypt with ``index`` from now on
    INSTALLED = "installed"  # a remote key was installed for ``identity``
    DROPPED = "dropped"  # a received key message was refused (``reason``)


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyEvent:
    """Something happened to a key (never carries key material)."""

    kind: KeyEventKind
    index: int | None = None
    identity: str | None = None  # whose key: ours for SENT/USED, the sender's for INSTALLED
    user_id: str | None = None  # the remote sender (INSTALLED, DROPPED)
    device_id: str | None = None
    devices: tuple[DeviceRef, ...] = ()  # recipients (SENT)
    reason: str | None = None  # DROPPED
    sent_ts: int | None = None  # the sender's clock (INSTALLED), for latency statistics
    at_ms: int  # local wall clock
    monotonic: float


@dataclass(slots=True)
class CallKeysStats:
    """Counters (monotonic over the object's life)."""

    messages_sent: int = 0  # to-device key messages delivered to the homeserver
    send_failures: int = 0  # devices the adapter could not encrypt for, or failed requests
    keys_received: int = 0  # accepted key messages
    keys_installed: int = 0
    keys_used: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # DropReason -> count

    def dropped_total(self) -> int:
        return sum(self.dropped.values())


@dataclass(frozen=True, slots=True)
class _Resend:
    """Send an already distributed key again to devices that missed it."""

    to: tuple[DeviceRef, ...]
    index: int
    key: bytes = field(repr=False)


class CallKeys:
    """See the module docstring."""

    def __init__(
        self,
        agent: CallAgent,
        config: CallKeysConfig | None = None,
        *,
        rings: KeyRings | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
        clock_ms: Callable[[], int] = now_ms,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.agent = agent
        self.hs = agent.hs
        self.room_id = agent.room_id
        self.config = config or CallKeysConfig()
        self.rings = rings if rings is not None else KeyRings()
        self.stats = CallKeysStats()
        self._random = random_bytes
        self._clock_ms = clock_ms
        self._mono = monotonic
        self._manager: KeyManager | None = None
        self._own_key: tuple[int, bytes] | None = None
        self._latest_sent: tuple[int, bytes] | None = None  # the newest key we handed out
        self._remote: dict[str, dict[int, bytes]] = {}  # identity -> index -> key
        self._sinks: list[KeySink] = []
        self._last_used: KeyEvent | None = None  # replayed to new subscribers
        # device -> (its membership's created_ts, key indices it has been sent)
        self._delivered: dict[DeviceRef, tuple[int, set[int]]] = {}
        # One sender task performs sends in order; timers never wait for the homeserver.
        self._sends: asyncio.Queue[SendKey | _Resend] = asyncio.Queue()
        self._undelivered: set[DeviceRef] = set()
        self._retry_at_ms: int | None = None
        self._retry_delay_ms = self.config.retry_ms
        self._redistribute = False  # the retry re-runs the distribution (nothing was sent)
        self._left = False  # the agent left the call: no more distribution
        self._wake = asyncio.Event()
        self._tasks = OwnedTasks(f"call-keys {self.hs.user_id}", log, event_prefix="call_keys")
        self._events: Broadcaster[KeyEvent] = Broadcaster()
        self._changes: Subscription[ParticipantsChanged] | None = None
        self._to_device: Subscription[ToDeviceEvent] | None = None
        self._log = log.bind(room_id=self.room_id, user_id=self.hs.user_id)
        self._drop_log = RejectionLog()  # dropped key messages: a line per sender+reason a minute

    # -- lifetime ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if not self.room_encrypted and not self.config.allow_plaintext_keys:
            raise LocalError(
                f"room {self.room_id} is not encrypted: per-participant media E2EE is used "
                "only in encrypted rooms, as Element Call does; enable encryption in the room "
                "(m.room.encryption), or opt in for a test page with "
                "CallKeysConfig(allow_plaintext_keys=True)"
            )
        if not self.agent.in_call:
            raise LocalError("the agent is not in the call (use `async with CallAgent(...)`)")
        identity = self.agent.rtc_backend_identity
        own = Member(
            user_id=self.hs.user_id,
            device_id=self.hs.device_id,
            created_ts=0,  # the manager uses only our identity and device
            member_id=self.agent.member_id,
            identity=identity,
        )
        self._manager = KeyManager(
            own,
            random_bytes=self._random,
            use_key_delay_ms=self.config.use_key_delay_ms,
            grace_ms=self.config.grace_ms,
            prepare_next_key=self.config.prepare_next_key,
        )
        # Subscribe before reading the current list, with no await between: nothing is missed.
        self._to_device = self.hs.to_device_events()
        self._changes = self.agent.changes()
        self._members_changed(self.agent.participants)
        self._spawn(self._changes_loop(self._changes), "changes")
        self._spawn(self._to_device_loop(self._to_device), "to-device")
        self._spawn(self._send_loop(), "send")
        self._spawn(self._timer_loop(), "timers")
        self._log.info("call_keys.started", identity=identity, encrypted=self.room_encrypted)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._tasks.aclose()
        finally:
            for sub in (self._changes, self._to_device):
                if sub is not None:
                    sub.close()
            if self._manager is not None:
                self._manager.leave()
            self._own_key = None
            self._events.end()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.spawn(coro, name)

    # -- public view ------------------------------------------------------------------------

    @property
    def room_encrypted(self) -> bool:
        return self.hs.is_encrypted(self.room_id) or (
            _ENCRYPTION_STATE in self.hs.room_state(self.room_id)
        )

    @property
    def manager(self) -> KeyManager:
        if self._manager is None:
            raise LocalError("call keys are not running (use `async with CallKeys(...)`)")
        return self._manager

    @property
    def identity(self) -> str:
        """Our LiveKit identity: the ring in :attr:`rings` our media is encrypted with."""
        return self.manager.own.identity

    @property
    def own_key(self) -> tuple[int, bytes] | None:
        """``(index, key)`` our media is encrypted with now (None before the first key)."""
        return self._own_key

    @property
    def current_index(self) -> int | None:
        return self._own_key[0] if self._own_key is not None else None

    def remote_key(self, identity: str, index: int) -> bytes | None:
        """The key installed for a remote LiveKit identity at ``index``, if any."""
        return self._remote.get(identity, {}).get(index)

    def remote_keys(self) -> Mapping[str, Mapping[int, bytes]]:
        """Every installed remote key: identity -> index -> key (a copy)."""
        return {ident: dict(keys) for ident, keys in self._remote.items()}

    def events(self) -> Subscription[KeyEvent]:
        """Subscribe to key events (sent, used, installed, dropped), e.g. to measure latency.
        The subscription starts with the "used" event of the key in use, if any (so the first
        key, used while entering, is seen too)."""
        current = self._last_used if self._own_key is not None else None
        return self._events.subscribe(first=() if current is None else (current,))

    def add_sink(self, sink: KeySink) -> None:
        """Push every key held now to ``sink`` (remote keys, then our current key), and every
        later one as it is installed or put into use, until :meth:`remove_sink`."""
        if any(s is sink for s in self._sinks):
            return
        self._sinks.append(sink)
        for identity, ring in self._remote.items():
            for index, key in ring.items():
                sink.set_remote_key(identity, index, key)
        if self._own_key is not None:
            sink.use_own_key(*self._own_key)

    def remove_sink(self, sink: KeySink) -> None:
        self._sinks = [s for s in self._sinks if s is not sink]

    def record_delivery(self, devices: Iterable[DeviceRef], index: int) -> None:
        """Note that our key at ``index`` reached ``devices`` (in their current memberships).
        Olm sends record themselves; a caller that delivers a key another way (the call-test's
        clear keys for test pages) records it here so that the mesh sends those devices media."""
        created = {DeviceRef(p.user_id, p.device_id): p.created_ts for p in self.agent.participants}
        for ref in devices:
            ts = created.get(ref)
            if ts is None:
                continue
            had = self._delivered.get(ref)
            if had is None or had[0] != ts:
                had = self._delivered[ref] = (ts, set())
            had[1].add(index)

    def key_sent_to(self, device: DeviceRef, index: int) -> bool:
        """True once our key at ``index`` went to ``device`` in its current membership (the
        homeserver accepted the message; it may still be on its way)."""
        sent = self._delivered.get(device)
        return sent is not None and index in sent[1]

    # -- inputs -----------------------------------------------------------------------------

    async def _changes_loop(self, changes: Subscription[ParticipantsChanged]) -> None:
        async for _ in changes:
            self._members_changed(self.agent.participants)

    def _members_changed(self, participants: tuple[Participant, ...]) -> None:
        if not self.agent.in_call:
            self._agent_left()
            return
        members = [
            Member(
                user_id=p.user_id,
                device_id=p.device_id,
                created_ts=p.created_ts,
                member_id=p.member_id,
                identity=p.rtc_backend_identity,
            )
            for p in participants
        ]
        for p in participants:
            ref = DeviceRef(p.user_id, p.device_id)
            known = self._delivered.get(ref)
            if known is not None and known[0] != p.created_ts:
                del self._delivered[ref]  # a rejoin: a new key store on that device
        self._apply(self.manager.update_members(members, self._clock_ms()))
        if self._undelivered:
            present = {DeviceRef(p.user_id, p.device_id) for p in participants}
            self._undelivered &= present

    def _agent_left(self) -> None:
        # Our own leave shows as a member leaving: without this we would rotate and hand a
        # fresh key to the others on the way out. Like js-sdk's leave: forget our keys.
        if self._left:
            return
        self._left = True
        self.manager.leave()
        self._own_key = self._latest_sent = None
        self._undelivered.clear()
        self._delivered.clear()
        self._retry_at_ms = None
        self._log.info("call_keys.agent_left")

    async def _to_device_loop(self, events: Subscription[ToDeviceEvent]) -> None:
        async for ev in events:
            self._on_to_device(ev)

    def _on_to_device(self, ev: ToDeviceEvent) -> None:
        verdict = screen_key_message(
            event_type=ev.type,
            content=ev.content,
            sender=ev.sender,
            sender_device=ev.sender_device if ev.encrypted else None,
            encrypted=ev.encrypted,
            room_id=self.room_id,
            room_encrypted=self.room_encrypted,
            own_device=(self.hs.user_id, self.hs.device_id),
            allow_plaintext=self.config.allow_plaintext_keys,
        )
        if verdict is None:
            return
        if isinstance(verdict, RejectedKey):
            self._dropped(ev, verdict)
            return
        self._accepted(verdict)

    def _dropped(self, ev: ToDeviceEvent, verdict: RejectedKey) -> None:
        reason = verdict.reason
        if reason is DropReason.OTHER_ROOM:
            return  # another call on this device: its own CallKeys handles it
        self.stats.dropped[reason.value] = self.stats.dropped.get(reason.value, 0) + 1
        # A flood of bad key messages (issue 18): one warning per sender and reason a minute.
        suppressed = self._drop_log.admit(f"{ev.sender}|{reason.value}") if reason.suspicious else 0
        if suppressed is not None:
            emit = self._log.warning if reason.suspicious else self._log.debug
            emit(
                "call_keys.key_message_dropped",
                reason=reason.value,
                detail=verdict.detail,
                type=ev.type,
                sender=ev.sender,
                sender_device=ev.sender_device,
                encrypted=ev.encrypted,
                **({"suppressed_before": suppressed} if suppressed else {}),
            )
        self._emit(
            KeyEvent(
                kind=KeyEventKind.DROPPED,
                user_id=ev.sender,
                device_id=ev.sender_device,
                reason=reason.value,
                at_ms=self._clock_ms(),
                monotonic=self._mono(),
            )
        )

    def _accepted(self, k: AcceptedKey) -> None:
        self.stats.keys_received += 1
        self._log.debug(
            "call_keys.key_received", sender=k.user_id, device=k.device_id, index=k.index
        )
        actions = self.manager.receive_key(
            k.user_id, k.device_id, k.member_id, k.index, k.key, self._clock_ms()
        )
        self._apply(actions, sent_ts=k.sent_ts)

    # -- actions ----------------------------------------------------------------------------

    def _apply(self, actions: list[KeyAction], *, sent_ts: int | None = None) -> None:
        for a in actions:
            if isinstance(a, SendKey):
                self._latest_sent = (a.index, a.key)
                self._sends.put_nowait(a)
            elif isinstance(a, UseKey):
                self.rings.install(a.identity, a.index, a.key)
                self._own_key = (a.index, a.key)
                for sink in list(self._sinks):
                    sink.use_own_key(a.index, a.key)
                self.stats.keys_used += 1
                self._log.info("call_keys.use_key", index=a.index)
                self._last_used = KeyEvent(
                    kind=KeyEventKind.USED,
                    index=a.index,
                    identity=a.identity,
                    at_ms=self._clock_ms(),
                    monotonic=self._mono(),
                )
                self._emit(self._last_used)
            elif isinstance(a, InstallRemoteKey):
                self.rings.install(a.identity, a.index, a.key)
                self._remote.setdefault(a.identity, {})[a.index] = a.key
                for sink in list(self._sinks):
                    sink.set_remote_key(a.identity, a.index, a.key)
                self.stats.keys_installed += 1
                who = next(
                    (p for p in self.agent.participants if p.rtc_backend_identity == a.identity),
                    None,
                )
                self._emit(
                    KeyEvent(
                        kind=KeyEventKind.INSTALLED,
                        index=a.index,
                        identity=a.identity,
                        user_id=who.user_id if who is not None else None,
                        device_id=who.device_id if who is not None else None,
                        sent_ts=sent_ts,
                        at_ms=self._clock_ms(),
                        monotonic=self._mono(),
                    )
                )
        self._wake.set()

    def _emit(self, event: KeyEvent) -> None:
        self._events.publish(event)

    async def _send_loop(self) -> None:
        while True:
            item = await self._sends.get()
            if isinstance(item, _Resend):
                await self._send(item.to, item.index, item.key)
                continue
            to = tuple(DeviceRef(u, d) for u, d in item.to)
            ok = await self._send(to, item.index, item.key)
            self._apply(self.manager.send_result(item.rollout, ok, self._clock_ms()))

    async def _send(self, to: tuple[DeviceRef, ...], index: int, key: bytes) -> bool:
        """Send ``key`` to ``to``; True when at least one device got it (the rest are retried)."""
        content = ElementCallKeys(
            room_id=self.room_id,
            index=index,
            key=key,
            claimed_device_id=self.hs.device_id,
            member_id=self.manager.own.member_id,
            sent_ts=self._clock_ms(),
        ).to_json()
        try:
            result = await self.hs.send_to_device(
                ELEMENT_CALL_KEYS_TYPE, dict.fromkeys(to, content), encrypted=True
            )
        except Exception as e:  # nio may raise its own or aiohttp errors, not only ours
            # Whatever went wrong, the call goes on: the key is retried, the task lives.
            self.stats.send_failures += len(to)
            known = isinstance(e, MatrixRTCError)
            self._log.warning(
                "call_keys.send_failed", index=index, error=repr(e), exc_info=not known
            )
            self._schedule_retry(redistribute=True)
            return False
        self.stats.messages_sent += len(result.sent)
        self._undelivered -= set(result.sent)
        self.record_delivery(result.sent, index)
        if result.sent:
            self._emit(
                KeyEvent(
                    kind=KeyEventKind.SENT,
                    index=index,
                    identity=self.manager.own.identity,
                    devices=result.sent,
                    at_ms=self._clock_ms(),
                    monotonic=self._mono(),
                )
            )
            self._log.debug("call_keys.key_sent", index=index, devices=len(result.sent))
        if result.failed:
            self.stats.send_failures += len(result.failed)
            self._undelivered |= set(result.failed)
            self._schedule_retry(redistribute=not result.sent)
        elif not self._undelivered:
            self._retry_at_ms = None
            self._retry_delay_ms = self.config.retry_ms
        return bool(result.sent)

    def _schedule_retry(self, *, redistribute: bool) -> None:
        self._redistribute = self._redistribute or redistribute
        if self._retry_at_ms is None:
            self._retry_at_ms = self._clock_ms() + self._retry_delay_ms
            self._retry_delay_ms = min(self._retry_delay_ms * 2, self.config.max_retry_ms)
        self._wake.set()

    def _retry(self) -> None:
        self._retry_at_ms = None
        if self._redistribute:
            self._redistribute = False
            self._members_changed(self.agent.participants)
        if self._undelivered and self._latest_sent is not None:
            # The newest key handed out is the one in use or about to be: the devices that
            # missed it need exactly that one.
            index, key = self._latest_sent
            targets = tuple(sorted(self._undelivered, key=lambda r: (r.user_id, r.device_id)))
            self._log.info("call_keys.resend", index=index, devices=len(targets))
            self._sends.put_nowait(_Resend(targets, index, key))

    async def _timer_loop(self) -> None:
        while True:
            self._wake.clear()
            deadlines = [
                t for t in (self.manager.next_deadline(), self._retry_at_ms) if t is not None
            ]
            timeout = None
            if deadlines:
                timeout = max(0.0, (min(deadlines) - self._clock_ms()) / 1000)
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation that
            # coincides with the event being set, and this loop then never stops (a hung close).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            now = self._clock_ms()
            self._apply(self.manager.tick(now))
            if self._retry_at_ms is not None and now >= self._retry_at_ms:
                self._retry()
