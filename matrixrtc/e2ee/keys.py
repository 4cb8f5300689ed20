"""Sender-key manager (sans-I/O): matrix-js-sdk's RTCEncryptionManager rotation policy.

Theory of operation
-------------------
Every membership recalculation calls :meth:`KeyManager.update_members`; that *ensures a key
distribution* ("rollout"). At most one rollout is in flight; requests made meanwhile collapse
into a single follow-up that starts when the current one ends. A rollout compares the members
(``user_id``, ``device_id``, ``created_ts``) with the set the current key was shared with:

* no key yet → create index 0 and use it **immediately**; everyone present counts as joined;
* someone left (a shared-with tuple is gone) → **new key** (index ``(prev + 1) % 256``) to all;
* someone joined (incl. a rejoin: same user and device, new ``created_ts``) →
  key younger than ``grace_ms`` (10 s): the **current key to the joiners only**;
  otherwise the **prepared next key** (below) to whoever lacks it, used as soon as that send
  succeeds; without one, a **new key to all**;
* nothing changed → the rollout ends at once.

**Prepared next key** (``prepare_next_key``, on by default; matrix-js-sdk has no such step).
js-sdk rotates on a join after the grace period by sending a new key to everyone and switching
``use_key_delay_ms`` later, so the joiner receives nothing but undecryptable frames (under the
old key it will never get) until the switch: about a second of media, ~55 frames. Instead, once
the current key is ``grace_ms - use_key_delay_ms`` old, the next key (next index, never used)
is sent to everyone present, and nothing else happens. A joiner after the grace period then
needs only that key: it is sent to the joiner (and anyone else who lacks it) and put into use
once the send succeeded and at least ``use_key_delay_ms`` after the others got it. The joiner
still never holds a key that encrypted media from before it joined; existing members have had
the key for a while; frames under the old key stop as soon as the joiner can have the new one.
A leave throws the prepared key away (the leaver holds it) and rotates as before.

A rollout emits :class:`SendKey` and waits for :meth:`KeyManager.send_result`. After a
successful send of a key that is not in use yet it waits ``use_key_delay_ms`` (1000 ms, so the
key arrives before frames need it) and then emits :class:`UseKey`; that ends the rollout. A
failed send is only logged; the next membership update retries (a failed preparation is
tried again ``PREPARE_RETRY_MS`` later).

One deliberate difference: matrix-js-sdk creates a rotated key before sending it, and when that
send fails the retry hands the same key to everyone as "joiners" and never switches to it, so it
keeps encrypting with the key a leaver holds. Here a key that was never put into use is put into
use after the next successful send.

Received keys pass the outdated-key filter (per ``user:device(memberId)`` and index, a key
received earlier in local time than the one already stored is dropped), then are matched to a
current membership by user and device (not memberId) and installed under that membership's
LiveKit identity; keys from devices without a membership are buffered (bounded) and re-checked
on every membership update.

All inputs carry ``now_ms`` (local clock); keys come from an injected random source.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import structlog

from matrixrtc.model.livekit_ids import legacy_identity, livekit_identity
from matrixrtc.model.rejections import RejectionLog

__all__ = [
    "InstallRemoteKey",
    "KeyAction",
    "KeyManager",
    "Member",
    "SendKey",
    "UseKey",
    "key_ring_id",
]

log = structlog.get_logger(__name__)

KEY_BYTES = 16
INDEX_MODULUS = 256
USE_KEY_DELAY_MS = 1000  # matrix-js-sdk join(): useKeyDelay ?? 1000
GRACE_MS = 10_000  # keyRotationGracePeriodMs
PREPARE_RETRY_MS = 5_000  # a failed preparation of the next key is tried again after this
MAX_EARLY_KEYS = 256  # bound on keys buffered for devices without a membership (js: unbounded)
# Bounds against a to-device key flood (issue 18): the ring name carries the member id the
# *sender* claims, so without them one device could grow the records without limit.
MAX_RINGS = 1024  # remote key rings remembered (the oldest is forgotten first)
MAX_LATEST = 16_384  # (ring, index) pairs of the outdated-key filter
_NOISE = RejectionLog()  # per-sender throttle of the per-key info lines: one a minute


@dataclass(frozen=True, slots=True, kw_only=True)
class Member:
    """One call member as the key manager needs it (the own device included)."""

    user_id: str
    device_id: str
    created_ts: int
    member_id: str
    identity: str  # LiveKit participant identity this member publishes under

    @classmethod
    def state_form(
        cls, user_id: str, device_id: str, created_ts: int, member_id: str | None = None
    ) -> Member:
        """A ``call.member`` state-event member: identity ``user:device`` (``/sfu/get``)."""
        return cls(
            user_id=user_id,
            device_id=device_id,
            created_ts=created_ts,
            member_id=member_id if member_id is not None else f"{user_id}:{device_id}",
            identity=legacy_identity(user_id, device_id),
        )

    @classmethod
    def sticky_form(cls, user_id: str, device_id: str, created_ts: int, member_id: str) -> Member:
        """An ``rtc.member`` sticky-event member: the hashed identity (``/get_token``)."""
        return cls(
            user_id=user_id,
            device_id=device_id,
            created_ts=created_ts,
            member_id=member_id,
            identity=livekit_identity(user_id, device_id, member_id),
        )

    @property
    def device(self) -> tuple[str, str]:
        return (self.user_id, self.device_id)

    @property
    def tuple(self) -> tuple[str, str, int]:
        return (self.user_id, self.device_id, self.created_ts)


def key_ring_id(user_id: str, device_id: str, member_id: str) -> str:
    """The receiver key-ring name matrix-js-sdk uses: ``user:device(memberId)``."""
    return f"{user_id}:{device_id}({member_id})"


@dataclass(frozen=True, slots=True)
class SendKey:
    """Send ``key`` at ``index`` to these devices (to-device, Olm-encrypted), then report
    :meth:`KeyManager.send_result` with ``rollout``."""

    to: tuple[tuple[str, str], ...]
    index: int
    key: bytes = field(repr=False)
    rollout: int


@dataclass(frozen=True, slots=True)
class UseKey:
    """Encrypt our own media with this key from now on (install it as our current key)."""

    identity: str
    index: int
    key: bytes = field(repr=False)
    at_ms: int


@dataclass(frozen=True, slots=True)
class InstallRemoteKey:
    """Install a remote participant's key in its ring (LiveKit identity + index)."""

    identity: str
    index: int
    key: bytes = field(repr=False)
    ring: str  # key_ring_id of the sender


KeyAction = SendKey | UseKey | InstallRemoteKey


@dataclass(slots=True)
class _Outbound:
    key: bytes = field(repr=False)
    index: int
    created_ms: int
    in_use: bool
    shared_with: list[tuple[str, str, int]] = field(default_factory=list)
    sent_ms: int | None = None  # a prepared key: when everyone then present had it


class _Kind(enum.Enum):
    SHARE = "share"  # the current key to joiners, or a new key to all (used after the delay)
    PREPARE = "prepare"  # the next key to all, not used yet
    PROMOTE = "promote"  # the prepared key to whoever lacks it, used once they have it


@dataclass(slots=True)
class _Rollout:
    id: int
    outbound: _Outbound
    targets: list[tuple[str, str, int]]
    kind: _Kind = _Kind.SHARE
    use_at_ms: int | None = None  # set once sent: waiting for the use-key delay


@dataclass(frozen=True, slots=True)
class _EarlyKey:
    user_id: str
    device_id: str
    member_id: str
    index: int
    key: bytes = field(repr=False)


class KeyManager:
    """Own sender key rotation/distribution and remote key bookkeeping for one call."""

    def __init__(
        self,
        own: Member,
        *,
        random_bytes: Callable[[int], bytes] = os.urandom,
        use_key_delay_ms: int = USE_KEY_DELAY_MS,
        grace_ms: int = GRACE_MS,
        prepare_next_key: bool = True,
    ) -> None:
        self.own = own
        self._random = random_bytes
        self.use_key_delay_ms = use_key_delay_ms
        self.grace_ms = grace_ms
        self.prepare_next_key = prepare_next_key
        self._reset()

    def _reset(self) -> None:
        self._members: list[Member] = []
        self._outbound: _Outbound | None = None
        self._next: _Outbound | None = None  # the prepared next key (module docstring)
        self._prepare_retry_at: int | None = None
        self._current: int | None = None
        self._rollout: _Rollout | None = None
        self._again = False
        self._rollout_ids = 0
        self._early: list[_EarlyKey] = []
        self._latest: dict[tuple[str, int], int] = {}  # outdated-key filter: (ring, index) → ms
        self.rings: dict[str, dict[int, bytes]] = {}  # ring id → index → key (latest)

    # ------------------------------------------------------------------ inputs
    def update_members(self, members: Iterable[Member], now_ms: int) -> list[KeyAction]:
        """A membership recalculation: the full current member list, own device included."""
        self._members = list(members)
        actions = self._ensure_distribution(now_ms)
        actions += self._recheck_early_keys()
        return actions

    def send_result(self, rollout: int, ok: bool, now_ms: int) -> list[KeyAction]:
        """The outcome of a :class:`SendKey`."""
        r = self._rollout
        if r is None or r.id != rollout or r.use_at_ms is not None:
            log.debug("e2ee.stale_send_result", rollout=rollout)
            return []
        if not ok:
            log.warning("e2ee.key_send_failed", index=r.outbound.index, rollout=rollout)
            if r.kind is _Kind.PREPARE:
                self._next = None
                self._prepare_retry_at = now_ms + PREPARE_RETRY_MS
            return self._finish(now_ms)
        r.outbound.shared_with += r.targets
        if r.kind is _Kind.PREPARE:
            r.outbound.sent_ms = now_ms
            return self._finish(now_ms)
        if r.outbound.in_use:
            return self._finish(now_ms)
        r.use_at_ms = now_ms + self.use_key_delay_ms
        if r.kind is _Kind.PROMOTE and r.outbound.sent_ms is not None:
            # The others have had it since sent_ms; the joiners have it now.
            r.use_at_ms = max(now_ms, r.outbound.sent_ms + self.use_key_delay_ms)
        return self.tick(now_ms)

    def tick(self, now_ms: int) -> list[KeyAction]:
        """Advance timers; call at :meth:`next_deadline` (calling early is harmless)."""
        r = self._rollout
        if r is None:
            at = self._prepare_at()
            if at is not None and now_ms >= at:
                return self._start_rollout(now_ms)
            return []
        if r.use_at_ms is None or now_ms < r.use_at_ms:
            return []
        r.outbound.in_use = True
        if r.kind is _Kind.PROMOTE:
            r.outbound.created_ms = r.use_at_ms  # its age counts from its first use
        self._current = r.outbound.index
        use = UseKey(self.own.identity, r.outbound.index, r.outbound.key, r.use_at_ms)
        log.info("e2ee.use_key", index=r.outbound.index)
        return [use, *self._finish(now_ms)]

    def next_deadline(self) -> int | None:
        r = self._rollout
        if r is not None:
            return r.use_at_ms
        return self._prepare_at()

    def _prepare_at(self) -> int | None:
        """When the next key should be prepared (None: not now, or already prepared)."""
        out = self._outbound
        if not self.prepare_next_key or out is None or not out.in_use or self._next is not None:
            return None
        at = out.created_ms + max(0, self.grace_ms - self.use_key_delay_ms)
        if self._prepare_retry_at is not None:
            at = max(at, self._prepare_retry_at)
        return at

    def receive_key(
        self,
        user_id: str,
        device_id: str,
        member_id: str | None,
        index: int,
        key: bytes,
        now_ms: int,
    ) -> list[KeyAction]:
        """A key message from ``user_id``'s ``device_id`` (already authenticated and parsed)."""
        if not 0 <= index < INDEX_MODULUS or not key:
            log.warning("e2ee.bad_key", user=user_id, device=device_id, index=index)
            return []
        mid = member_id if member_id is not None else f"{user_id}:{device_id}"
        ring = key_ring_id(user_id, device_id, mid)
        latest = self._latest.get((ring, index))
        if latest is not None and latest > now_ms:
            if (suppressed := _NOISE.admit(user_id)) is not None:
                log.info("e2ee.outdated_key_dropped", ring=ring, index=index, suppressed=suppressed)
            return []
        self._latest.pop((ring, index), None)
        self._latest[(ring, index)] = now_ms
        while len(self._latest) > MAX_LATEST:
            del self._latest[next(iter(self._latest))]
        return self._add_remote(_EarlyKey(user_id, device_id, mid, index, bytes(key)))

    def leave(self) -> None:
        """We left the call: forget every key (a rejoin starts again at index 0)."""
        self._reset()

    # ------------------------------------------------------------------ queries
    @property
    def current_index(self) -> int | None:
        """Index of the key our media is encrypted with (None before the first key)."""
        return self._current

    @property
    def rollout_in_flight(self) -> bool:
        return self._rollout is not None

    @property
    def early_keys(self) -> int:
        return len(self._early)

    # ------------------------------------------------------------------ rollout
    def _ensure_distribution(self, now_ms: int) -> list[KeyAction]:
        if self._rollout is not None:
            self._again = True
            return []
        return self._start_rollout(now_ms)

    def _start_rollout(self, now_ms: int) -> list[KeyAction]:
        actions: list[KeyAction] = []
        if self._outbound is None:
            self._outbound = _Outbound(self._random(KEY_BYTES), 0, now_ms, in_use=True)
            self._current = 0
            actions.append(UseKey(self.own.identity, 0, self._outbound.key, now_ms))
        outbound = self._outbound
        present = [m.tuple for m in self._members]
        devices = {(u, d): ts for u, d, ts in present}
        # A shared-with device whose created_ts changed rejoined: not a leaver; it rejoins below.
        # (Filtered per rollout, not stored: should that device later leave without having
        # received the key again, its old tuple still makes it a leaver, as in matrix-js-sdk.)
        shared = [t for t in outbound.shared_with if devices.get((t[0], t[1]), t[2]) == t[2]]
        left = [t for t in shared if t not in present]
        joined = [t for t in present if t not in shared]
        prepared = self._next
        kind = _Kind.SHARE
        if left:
            self._next = None  # the leaver may hold it: skip its index too
            outbound, targets = self._new_outbound(now_ms, after=prepared), present
            log.info("e2ee.rotate_on_leave", index=outbound.index, left=len(left))
        elif joined:
            if now_ms - outbound.created_ms < self.grace_ms:
                targets = joined
            elif prepared is not None and prepared.sent_ms is not None:
                self._next = None
                self._outbound = outbound = prepared
                targets = [t for t in present if t not in prepared.shared_with]
                kind = _Kind.PROMOTE
                log.info("e2ee.use_prepared_key_on_join", index=outbound.index, joined=len(joined))
            else:
                self._next = None
                outbound, targets = self._new_outbound(now_ms), present
                log.info("e2ee.rotate_on_join", index=outbound.index, joined=len(joined))
        elif (at := self._prepare_at()) is not None and now_ms >= at:
            self._prepare_retry_at = None
            outbound = self._next = self._make_outbound(outbound.index, now_ms)
            targets, kind = present, _Kind.PREPARE
            log.info("e2ee.prepare_next_key", index=outbound.index)
        else:
            return actions
        self._rollout_ids += 1
        r = self._rollout = _Rollout(self._rollout_ids, outbound, targets, kind)
        to = tuple((u, d) for u, d, _ in targets if (u, d) != self.own.device)
        if not to:
            # Nobody else to send to (js-sdk: the transport returns at once): sent.
            return actions + self.send_result(r.id, True, now_ms)
        actions.append(SendKey(to, outbound.index, outbound.key, r.id))
        return actions

    def _new_outbound(self, now_ms: int, *, after: _Outbound | None = None) -> _Outbound:
        prev = after if after is not None else self._outbound
        self._outbound = self._make_outbound(prev.index if prev is not None else -1, now_ms)
        return self._outbound

    def _make_outbound(self, prev_index: int, now_ms: int) -> _Outbound:
        index = (prev_index + 1) % INDEX_MODULUS
        return _Outbound(self._random(KEY_BYTES), index, now_ms, in_use=False)

    def _finish(self, now_ms: int) -> list[KeyAction]:
        self._rollout = None
        if self._again:
            self._again = False
            return self._start_rollout(now_ms)
        return []

    # ------------------------------------------------------------------ remote keys
    def _add_remote(self, k: _EarlyKey) -> list[KeyAction]:
        member = next(
            (m for m in self._members if m.user_id == k.user_id and m.device_id == k.device_id),
            None,
        )
        if member is None:
            if len(self._early) >= MAX_EARLY_KEYS:
                self._early.pop(0)
            self._early.append(k)
            if (suppressed := _NOISE.admit(k.user_id)) is not None:
                log.info(
                    "e2ee.key_buffered_until_membership",
                    user=k.user_id,
                    device=k.device_id,
                    suppressed=suppressed,
                )
            return []
        ring = key_ring_id(k.user_id, k.device_id, k.member_id)
        if ring not in self.rings:
            while len(self.rings) >= MAX_RINGS:
                del self.rings[next(iter(self.rings))]
            self.rings[ring] = {}
        self.rings[ring][k.index] = k.key
        return [InstallRemoteKey(member.identity, k.index, k.key, ring)]

    def _recheck_early_keys(self) -> list[KeyAction]:
        early, self._early = self._early, []
        actions: list[KeyAction] = []
        for k in early:
            actions += self._add_remote(k)
        return actions
