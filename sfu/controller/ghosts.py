"""Who should not be in a LiveKit room, and since when (pure: no I/O, times passed in).

Each cycle the controller hands :meth:`GhostJudge.observe` one LiveKit room: its
participants, the grants the service recorded for it, what the homeserver shows of the
Matrix room (or None when it cannot see it) and the current wall time. The judge answers
with a :class:`Finding` per participant and remembers, per LiveKit session (``sid``), since
when a participant has been without a valid reason to be there. A participant is *due* for
removal once that has lasted ``grace`` seconds; a verdict that needs the member's own
client to act first (publish a membership) waits ``join_grace`` from its LiveKit join.

Rules, in order (the first that applies decides):

1. No grant for (room, identity):
   - joined before the registry existed → ``unknown`` (never removed: the token may predate
     the registry, e.g. minted by lk-jwt-service before an upgrade);
   - a non-standard participant kind (egress, ingress, SIP, agent) or an identity matching
     the operator's allow pattern → ``allowed``;
   - otherwise ``foreign_token``: the service never issued this identity.
2. Matrix room not visible → ``unknown`` unless a delayed-leave job reported the membership
   ended during this LiveKit session (``call_ended``).
3. The user's ``m.room.member`` is ``ban`` → ``banned``; ``leave`` sent by someone else →
   ``kicked``; ``leave`` by the user → ``left_room``; anything but ``join`` (never joined,
   invited, knocking) → ``not_in_room`` (waits ``join_grace``: federation may lag).
4. An active (unexpired) call membership of (user, device) in the Matrix room → ``ok``.
5. A membership for that device that ended (leave content ``{}``, or expired) *after* the
   participant joined LiveKit, or one this judge saw active before → ``call_ended``.
6. No membership at all → ``no_membership`` (waits ``join_grace``; only when memberships
   are required, and only where the user's MSC4354 sticky memberships are readable: the
   source shows sticky events (a joined account's /sync, not the admin room-state API) and
   the user has no live sticky event we cannot read (Megolm-encrypted). Otherwise a member
   publishing only a sticky membership would look memberless: ``unknown``, never removed.)

Burst patience: when ``burst_count`` or more LiveKit participants' call memberships ended
within ``burst_window`` seconds of each other (by the evidence's own time: the leave's
``origin_server_ts``, else when the judge first saw it), that is the signature of a stalled
or restarted homeserver firing every pending delayed leave at once, not of people hanging up
(they leave LiveKit too). Each of them then waits ``burst_grace`` from when the judge first
saw its membership end, time for honest clients to notice and publish again (including a
client whose re-join lost to its own leave in state resolution after the stall forked the
room's DAG). The ledger of endings is kept by time, not by session, so members who recover
fast do not shorten the patience of the others.

Memberships of both forms count: state-form ``org.matrix.msc3401.call.member`` from room
state, sticky ``org.matrix.msc4143.rtc.member`` from the sticky events the source holds
(per sender and sticky key the newest event is current; a join is active until its
stickiness runs out, a leave or the end of stickiness ends it for the device the key's
join named). Both are parsed by :mod:`matrixrtc.model.membership`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from matrixrtc.model.event_types import EventType
from matrixrtc.model.membership import CallMembership, MembershipLeft, parse_membership_event
from matrixrtc.model.msc4354 import sticky_expires_at
from sfu.controller.registry import Grant

__all__ = [
    "Finding",
    "GhostJudge",
    "Participant",
    "Reason",
    "RoomView",
    "Verdict",
    "room_view",
]

ROOM_MEMBER = "m.room.member"
ROOM_CREATE = "m.room.create"
ROOM_ENCRYPTED = "m.room.encrypted"


class Reason(StrEnum):
    OK = "ok"
    UNKNOWN = "unknown"
    ALLOWED = "allowed"
    FOREIGN_TOKEN = "foreign_token"
    BANNED = "banned"
    KICKED = "kicked"
    LEFT_ROOM = "left_room"
    NOT_IN_ROOM = "not_in_room"
    CALL_ENDED = "call_ended"
    NO_MEMBERSHIP = "no_membership"


# Reasons whose evidence needs no further action from the member: removal after `grace`.
_DEFINITE = frozenset(
    {Reason.FOREIGN_TOKEN, Reason.BANNED, Reason.KICKED, Reason.LEFT_ROOM, Reason.CALL_ENDED}
)
# Reasons the member's own client may still fix (join the room, publish a membership).
_PATIENT = frozenset({Reason.NOT_IN_ROOM, Reason.NO_MEMBERSHIP})


class Verdict(StrEnum):
    KEEP = "keep"
    WATCH = "watch"  # a ghost, not yet due
    REMOVE = "remove"


@dataclass(frozen=True, slots=True)
class Participant:
    """A LiveKit participant as ListParticipants shows it."""

    identity: str
    sid: str
    joined_at: float  # wall seconds
    standard: bool = True  # ParticipantInfo.kind == STANDARD


@dataclass(frozen=True, slots=True)
class _DeviceState:
    active: tuple[CallMembership, ...] = ()
    ended_at: float | None = None  # ms: newest leave/expiry seen for the device


@dataclass(frozen=True, slots=True)
class RoomView:
    """What the homeserver shows of one Matrix room, reduced to what the judge needs."""

    members: Mapping[str, tuple[str, str]]  # user → (membership, sender)
    # (user, device) → state. Any slot counts: a LiveKit room is derived from the slot, so a
    # device in another slot of the same Matrix room would hold another room's token, and
    # being lenient here can only keep someone, never remove them.
    devices: Mapping[tuple[str, str], _DeviceState]
    # False: the source cannot show sticky events at all (admin room-state API).
    sticky_visible: bool = False
    # Senders of live sticky events we cannot read (encrypted): their memberships are unknown.
    opaque_senders: frozenset[str] = frozenset()

    def sticky_readable(self, user: str) -> bool:
        """Whether every sticky membership ``user`` may hold here is readable to us."""
        return self.sticky_visible and user not in self.opaque_senders

    def member_state(self, user: str) -> tuple[str, str] | None:
        return self.members.get(user)

    def device(self, user: str, device: str) -> _DeviceState:
        return self.devices.get((user, device), _DeviceState())

    def active_members(self) -> int:
        """Unexpired call memberships of users joined to the room (a kicked or banned user's
        membership event stays in the state, but does not count)."""
        return sum(
            len(s.active)
            for (user, _device), s in self.devices.items()
            if self.members.get(user, ("",))[0] == "join"
        )


def room_view(
    events: Iterable[object],
    now_ms: int,
    *,
    sticky: Iterable[tuple[object, int]] | None = None,
) -> RoomView:
    """Reduce a room's current state events (client format) at wall time ``now_ms``.

    ``sticky``: the room's sticky events the source holds, each with the wall time (ms) it
    was received (their stickiness counts from then), or None when the source cannot see
    sticky events at all.
    """
    members: dict[str, tuple[str, str]] = {}
    room_version: str | None = None
    state_events: list[dict[str, object]] = []
    for ev in events:
        if not isinstance(ev, dict):
            continue
        etype = ev.get("type")
        content = ev.get("content")
        if not isinstance(content, dict):
            continue
        if etype == ROOM_MEMBER:
            key, sender = ev.get("state_key"), ev.get("sender")
            membership = content.get("membership")
            if isinstance(key, str) and isinstance(membership, str):
                members[key] = (membership, sender if isinstance(sender, str) else "")
        elif etype == ROOM_CREATE:
            rv = content.get("room_version")
            room_version = rv if isinstance(rv, str) else "1"
        else:
            state_events.append(ev)
    devices: dict[tuple[str, str], _DeviceState] = {}
    for ev in state_events:
        parsed = parse_membership_event(ev, room_version)
        if isinstance(parsed, CallMembership):
            key = (parsed.user_id, parsed.device_id)
            old = devices.get(key, _DeviceState())
            expires = parsed.expires_at
            if parsed.is_expired(now_ms):
                ended = max(old.ended_at or 0, float(expires or now_ms))
                devices[key] = _DeviceState(old.active, ended)
            else:
                devices[key] = _DeviceState((*old.active, parsed), old.ended_at)
        elif isinstance(parsed, MembershipLeft):
            user, device = _device_of_state_key(parsed.key.key, parsed.key.sender)
            if device is None:
                continue
            key = (user, device)
            old = devices.get(key, _DeviceState())
            devices[key] = _DeviceState((), max(old.ended_at or 0, float(parsed.origin_server_ts)))
    if sticky is None:
        return RoomView(members, devices)
    opaque = _add_sticky(devices, sticky, room_version, now_ms)
    return RoomView(members, devices, sticky_visible=True, opaque_senders=frozenset(opaque))


def _add_sticky(
    devices: dict[tuple[str, str], _DeviceState],
    sticky: Iterable[tuple[object, int]],
    room_version: str | None,
    now_ms: int,
) -> set[str]:
    """Fold sticky ``rtc.member`` events into ``devices``; the senders of unreadable ones."""
    opaque: set[str] = set()
    # (sender, sticky key) → [(rank, parsed, expires_at ms)]
    by_key: dict[
        tuple[str, str], list[tuple[tuple[int, str], CallMembership | MembershipLeft, int]]
    ] = {}
    for ev, received_ms in sticky:
        if not isinstance(ev, dict):
            continue
        etype, sender = ev.get("type"), ev.get("sender")
        if etype == ROOM_ENCRYPTED and isinstance(sender, str):
            expires = sticky_expires_at(ev, received_ms)
            if expires is not None and expires > now_ms:
                opaque.add(sender)
            continue
        if etype != EventType.RTC_MEMBER:
            continue
        expires = sticky_expires_at(ev, received_ms)
        parsed = parse_membership_event(ev, room_version)
        if expires is None or parsed is None:
            continue
        rank = (parsed.origin_server_ts, parsed.event_id)
        by_key.setdefault((parsed.key.sender, parsed.key.key), []).append((rank, parsed, expires))
    for (sender, _sticky_key), entries in by_key.items():
        entries.sort(key=lambda e: e[0])
        _rank, newest, expires = entries[-1]
        device = next(
            (p.device_id for _r, p, _e in reversed(entries) if isinstance(p, CallMembership)),
            None,
        )
        if device is None:
            continue  # a leave for a key whose join we never saw: no device to end
        key = (sender, device)
        old = devices.get(key, _DeviceState())
        if isinstance(newest, CallMembership) and expires > now_ms:
            devices[key] = _DeviceState((*old.active, newest), old.ended_at)
            continue
        ended = (
            float(newest.origin_server_ts)
            if isinstance(newest, MembershipLeft)
            else float(min(expires, now_ms))
        )
        devices[key] = _DeviceState(old.active, max(old.ended_at or 0.0, ended))
    return opaque


def _device_of_state_key(state_key: str, sender: str) -> tuple[str, str | None]:
    """The device a state-form key names: ``_@u:hs_DEV_m.call`` / ``@u:hs_DEV_m.call`` /
    ``_@u:hs_DEV``."""
    for prefix in (f"_{sender}_", f"{sender}_"):
        if state_key.startswith(prefix):
            rest = state_key[len(prefix) :]
            device, _sep, _app = rest.partition("_")
            return sender, device or None
    return sender, None


@dataclass(frozen=True, slots=True)
class Finding:
    """The judgement of one participant in one cycle."""

    participant: Participant
    reason: Reason
    verdict: Verdict
    grant: Grant | None
    bad_since: float | None = None  # wall seconds
    due_at: float | None = None  # wall seconds


@dataclass
class _Track:
    reason: Reason
    since: float
    burst: bool = False  # once judged part of a burst of endings, it stays so


@dataclass
class GhostJudge:
    """Per-sid memory across cycles; see the module docstring for the rules."""

    grace: float = 2.0
    join_grace: float = 30.0
    require_membership: bool = True
    allow_identities: re.Pattern[str] | None = None
    burst_count: int = 3  # 0 = no burst patience
    burst_window: float = 10.0
    burst_grace: float = 30.0
    _bad: dict[str, _Track] = field(default_factory=dict)
    _seen_active: set[str] = field(default_factory=set)
    # (sid, evidence time in wall s) of each call membership seen ending while in LiveKit
    _endings: list[tuple[str, float]] = field(default_factory=list)

    def observe(
        self,
        participants: Sequence[Participant],
        grants: Mapping[str, Grant],
        views: Mapping[str, RoomView | None],
        *,
        registry_since: float,
        ended_hints: Mapping[str, float],
        now: float,
        patient_until: float = 0.0,
    ) -> list[Finding]:
        """Judge one LiveKit room's participants at wall time ``now``.

        ``patient_until``: a call membership seen ending before this wall time is not removed
        before it either (the controller sets it after the homeserver was unreachable: the
        members' heartbeats could not reach it, their delayed leaves fired, and honest
        clients publish their membership again once they notice).
        """
        out = []
        self._prune_endings(now)
        for p in participants:
            grant = grants.get(p.identity)
            view = views.get(grant.matrix_room) if grant is not None else None
            hint = ended_hints.get(p.identity)
            reason = self._reason(p, grant, view, registry_since, hint)
            if reason is Reason.CALL_ENDED:
                self._note_ending(p, grant, view, hint, now)
            out.append(self._verdict(p, reason, grant, now, patient_until))
        return out

    def reason_now(
        self,
        p: Participant,
        grant: Grant | None,
        view: RoomView | None,
        *,
        registry_since: float,
        ended_hint: float | None = None,
    ) -> Reason:
        """The reason ``p`` would get from ``view`` (a fresh look just before a removal),
        without touching the grace bookkeeping."""
        return self._reason(p, grant, view, registry_since, ended_hint)

    def in_burst(self, sid: str) -> bool:
        track = self._bad.get(sid)
        return track is not None and track.burst

    def _note_ending(
        self,
        p: Participant,
        grant: Grant | None,
        view: RoomView | None,
        hint: float | None,
        now: float,
    ) -> None:
        track = self._bad.get(p.sid)
        if track is not None and track.reason is Reason.CALL_ENDED:
            return  # this ending is noted already
        evidence = now
        if view is not None and grant is not None:
            ended_ms = view.device(grant.user_id, grant.device_id).ended_at
            if ended_ms:
                evidence = min(now, ended_ms / 1000.0)
        elif hint is not None:
            evidence = min(now, hint)
        self._endings.append((p.sid, evidence))

    def _prune_endings(self, now: float) -> None:
        horizon = now - (self.burst_window + self.burst_grace + 60.0)
        self._endings = [(sid, t) for sid, t in self._endings if t >= horizon]

    def _is_burst(self, sid: str) -> bool:
        """Whether the newest ending of ``sid`` has ``burst_count`` - 1 endings of other
        sessions within ``burst_window`` of it."""
        mine = next((t for s, t in reversed(self._endings) if s == sid), None)
        if self.burst_count <= 0 or mine is None:
            return False
        near = {s for s, t in self._endings if abs(t - mine) <= self.burst_window}
        return len(near) >= self.burst_count

    def forget_except(self, live_sids: Iterable[str]) -> None:
        """Drop memory of sessions no longer in LiveKit."""
        live = set(live_sids)
        for sid in [s for s in self._bad if s not in live]:
            del self._bad[sid]
        self._seen_active &= live
        # _endings is kept by time (_prune_endings): departed sessions still mark a burst

    def _reason(
        self,
        p: Participant,
        grant: Grant | None,
        view: RoomView | None,
        registry_since: float,
        ended_hint: float | None,
    ) -> Reason:
        if grant is None:
            if p.joined_at < registry_since:
                return Reason.UNKNOWN
            if not p.standard or (
                self.allow_identities is not None and self.allow_identities.fullmatch(p.identity)
            ):
                return Reason.ALLOWED
            return Reason.FOREIGN_TOKEN
        hinted_end = ended_hint is not None and ended_hint >= p.joined_at
        if view is None:
            return Reason.CALL_ENDED if hinted_end else Reason.UNKNOWN
        member = view.member_state(grant.user_id)
        if member is None or member[0] != "join":
            if member is not None and member[0] == "ban":
                return Reason.BANNED
            if member is not None and member[0] == "leave":
                return Reason.LEFT_ROOM if member[1] == grant.user_id else Reason.KICKED
            return Reason.NOT_IN_ROOM
        dev = view.device(grant.user_id, grant.device_id)
        if dev.active:
            self._seen_active.add(p.sid)
            return Reason.OK
        ended_ms = dev.ended_at or 0.0
        if (
            p.sid in self._seen_active
            or hinted_end
            or (ended_ms and ended_ms / 1000.0 >= p.joined_at)
        ):
            return Reason.CALL_ENDED
        if self.require_membership and view.sticky_readable(grant.user_id):
            return Reason.NO_MEMBERSHIP
        return Reason.UNKNOWN  # it may hold a sticky membership we cannot read

    def _verdict(
        self, p: Participant, reason: Reason, grant: Grant | None, now: float, patient_until: float
    ) -> Finding:
        if reason not in _DEFINITE and reason not in _PATIENT:
            self._bad.pop(p.sid, None)
            return Finding(p, reason, Verdict.KEEP, grant)
        track = self._bad.get(p.sid)
        if track is None or track.reason is not reason:
            track = _Track(reason, now)
            self._bad[p.sid] = track
        if reason is Reason.FOREIGN_TOKEN:
            due = max(p.joined_at, 0.0) + self.grace
        elif reason in _PATIENT:
            due = max(track.since + self.grace, p.joined_at + self.join_grace)
        else:
            due = track.since + self.grace
            if reason is Reason.CALL_ENDED and track.since <= patient_until:
                due = max(due, patient_until)
            if reason is Reason.CALL_ENDED and (track.burst or self._is_burst(p.sid)):
                track.burst = True
                due = max(due, track.since + self.burst_grace)
        verdict = Verdict.REMOVE if now >= due else Verdict.WATCH
        return Finding(p, reason, verdict, grant, track.since, due)
