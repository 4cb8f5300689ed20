"""The call's participant list as a call client shows it (pure).

A call mixes membership forms: current-dialect memberships (state and sticky form, read by
:class:`~matrixrtc.session.rtc_session.RTCSession`) and devices listed in the room's 2022
MSC3401 call (read by :class:`~matrixrtc.session.legacy_call.LegacyCallSession`). This
module merges both into one ordered list of :class:`Participant`:

* every active current membership, in the session's order (oldest first), each with the
  transport it publishes on given the oldest member (§3.2);
* a device in both forms (an ``auto`` member that also lists itself in ``m.calls``) shows
  once: its current membership, marked with the 2022 call's ``conf_id``;
* then every device listed only in the 2022 call (Hydrogen, legacy js-sdk): dialect
  MSC3401_2022, its own session id, the mesh as its only transport, ordered by its member
  event's time.

:func:`participants_of` builds the list; :func:`participant_changes` compares two lists
(who joined, who left, whether the order or any event changed). Nothing here performs I/O
or reads a clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from matrixrtc.model import CallMembership, Dialect, Transport
from matrixrtc.model.livekit_ids import legacy_identity
from matrixrtc.model.transports import FullMeshTransport
from matrixrtc.session.legacy_call import LegacyMember
from matrixrtc.session.mesh_signalling import member_session_id
from matrixrtc.session.ring import RingState
from matrixrtc.session.transports import publish_transport

__all__ = [
    "Participant",
    "ParticipantChanges",
    "ParticipantsChanged",
    "participant_changes",
    "participants_of",
    "participants_table",
]

# (user id, device id): who "we" are.
Me = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Participant:
    """One active membership as a call client shows it."""

    user_id: str
    device_id: str
    member_id: str
    dialect: Dialect
    created_ts: int
    event_id: str
    intent: str | None
    transport: Transport | None  # where it publishes (§3.2, given the oldest member)
    rtc_backend_identity: str
    is_self: bool
    advertised: tuple[Transport, ...] = ()  # every transport it lists, in its order
    # 2022 dialect: the member's MSC2746 session id as its ``m.calls`` entry lists it (None:
    # derived from the membership, see ``session.mesh_signalling.member_session_id``).
    session_id: str | None = None
    # The conf_id of the room's 2022 call when this device is listed in it (also for a
    # member that writes a current dialect too): signalling with it uses that conf_id.
    legacy_conf_id: str | None = None

    @property
    def frame_e2ee(self) -> bool:
        """Whether this member takes part in MatrixRTC frame E2EE: every current-dialect
        member; not a 2022-only one (Hydrogen and legacy js-sdk send and expect plain
        DTLS-SRTP media)."""
        return self.dialect is not Dialect.MSC3401_2022

    @property
    def mesh_session_id(self) -> str:
        """The MSC2746 session id every member addresses this one with."""
        if self.session_id is not None:
            return self.session_id
        return member_session_id(self.member_id, self.created_ts)

    @staticmethod
    def of_legacy(m: LegacyMember, conf_id: str, me: Me) -> Participant:
        """A device listed only in the room's 2022 call (Hydrogen, legacy js-sdk): mesh only."""
        mesh = FullMeshTransport()
        return Participant(
            user_id=m.user_id,
            device_id=m.device_id,
            member_id=f"{m.user_id}:{m.device_id}",
            dialect=Dialect.MSC3401_2022,
            created_ts=m.origin_server_ts,
            event_id=m.event_id,
            intent=None,
            transport=mesh,
            rtc_backend_identity=legacy_identity(m.user_id, m.device_id),
            is_self=(m.user_id, m.device_id) == me,
            advertised=(mesh,),
            session_id=m.session_id,
            legacy_conf_id=conf_id,
        )

    @staticmethod
    def of(m: CallMembership, oldest: CallMembership | None, me: Me) -> Participant:
        return Participant(
            user_id=m.sender,
            device_id=m.device_id,
            member_id=m.member_id,
            dialect=m.dialect,
            created_ts=m.created_ts,
            event_id=m.event_id,
            intent=m.intent,
            transport=publish_transport(m, oldest),
            rtc_backend_identity=m.rtc_backend_identity,
            is_self=(m.sender, m.device_id) == me,
            advertised=m.transports,
        )


@dataclass(frozen=True, slots=True)
class ParticipantsChanged:
    """The participant list after a change, oldest first, with what changed."""

    participants: tuple[Participant, ...]
    joined: tuple[Participant, ...] = ()
    left: tuple[Participant, ...] = ()
    ring: RingState = RingState.IDLE

    @property
    def oldest(self) -> Participant | None:
        return self.participants[0] if self.participants else None


def participants_of(
    memberships: Sequence[CallMembership],
    legacy_devices: Iterable[LegacyMember],
    conf_id: str | None,
    me: Me,
) -> tuple[Participant, ...]:
    """The merged participant list (see the module doc). ``memberships``: the session's
    active memberships, oldest first; ``legacy_devices``: the devices listed in the room's
    2022 call ``conf_id`` (ignored when there is no call)."""
    oldest = memberships[0] if memberships else None
    listed = {(d.user_id, d.device_id): d for d in legacy_devices} if conf_id is not None else {}
    current = [Participant.of(m, oldest, me) for m in memberships]
    current = [
        replace(p, legacy_conf_id=conf_id) if (p.user_id, p.device_id) in listed else p
        for p in current
    ]
    if conf_id is None:
        return tuple(current)
    have = {(p.user_id, p.device_id) for p in current}
    extra = [
        Participant.of_legacy(d, conf_id, me)
        for key, d in sorted(listed.items(), key=lambda kv: (kv[1].origin_server_ts, kv[0]))
        if key not in have
    ]
    return (*current, *extra)


@dataclass(frozen=True, slots=True)
class ParticipantChanges:
    """What differs between two participant lists."""

    joined: tuple[Participant, ...]
    left: tuple[Participant, ...]
    # Anything a subscriber should hear of: someone joined or left, or the order or an
    # event id changed (a member re-sent its membership).
    changed: bool


def participant_changes(
    before: Sequence[Participant], after: Sequence[Participant]
) -> ParticipantChanges:
    """Who joined and left between ``before`` and ``after`` (by user, device and member id)."""
    prev = {(p.user_id, p.device_id, p.member_id): p for p in before}
    now = {(p.user_id, p.device_id, p.member_id): p for p in after}
    joined = tuple(p for k, p in now.items() if k not in prev)
    left = tuple(p for k, p in prev.items() if k not in now)
    reordered = [p.event_id for p in after] != [p.event_id for p in prev.values()]
    return ParticipantChanges(joined, left, bool(joined or left or reordered))


def participants_table(participants: Iterable[Participant]) -> str:
    """A fixed-width table of the participants, oldest first."""
    rows = [("#", "user", "device", "form", "created_ts", "transport", "")]
    for i, p in enumerate(participants):
        t = p.transport.to_json() if p.transport is not None else None
        where = "-"
        if t is not None:
            where = str(t.get("livekit_service_url") or t.get("type"))
        rows.append(
            (
                str(i),
                p.user_id,
                p.device_id,
                p.dialect.value,
                str(p.created_ts),
                where,
                "(you)" if p.is_self else "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )
