"""Our device's entry in the room's 2022 call (session.legacy_entry) and the merged
participant list (session.participants): the rules the agent used to hold, driven here with
an injected time and no homeserver."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from matrixrtc.model import CallMembership, Dialect, LivekitTransport, SessionMembershipData
from matrixrtc.model.membership import parse_membership_event
from matrixrtc.model.msc3401_2022 import GROUP_CALL_EVENT, MEMBER_EVENT, RENEW_AFTER_MS
from matrixrtc.model.transports import FullMeshTransport
from matrixrtc.session.legacy_call import LegacyMember, PutState
from matrixrtc.session.legacy_entry import OwnLegacyEntry, dialect_choice
from matrixrtc.session.participants import (
    Participant,
    ParticipantsChanged,
    participant_changes,
    participants_of,
    participants_table,
)
from matrixrtc.session.ring import RingState

ROOM = "!room:hs"
ME, BOB, HYDRO = "@me:hs", "@bob:hs", "@hydro:hs"
NOW = 1_700_000_000_000
LK = LivekitTransport(livekit_service_url="https://rtc.example.org/livekit/jwt")


def call_event(conf_id: str) -> dict[str, Any]:
    return {
        "type": GROUP_CALL_EVENT,
        "state_key": conf_id,
        "sender": BOB,
        "event_id": f"$call-{conf_id}",
        "origin_server_ts": NOW - 5000,
        "content": {"m.intent": "m.room", "m.type": "m.video"},
    }


def calls_event(
    user: str, conf_id: str, *devices: tuple[str, str], ts: int = NOW
) -> dict[str, Any]:
    return {
        "type": MEMBER_EVENT,
        "state_key": user,
        "sender": user,
        "event_id": f"$m-{user}-{ts}",
        "origin_server_ts": ts,
        "content": {
            "m.calls": [
                {
                    "m.call_id": conf_id,
                    "m.devices": [
                        {
                            "device_id": d,
                            "session_id": s,
                            "expires_ts": ts + 3_600_000,
                            "feeds": [{"purpose": "m.usermedia"}],
                        }
                        for d, s in devices
                    ],
                }
            ]
        },
    }


def state_membership(user: str, device: str, created_ts: int = NOW) -> CallMembership:
    content = SessionMembershipData.for_join(
        user_id=user, device_id=device, transports=[LK], created_ts=created_ts
    ).to_json()
    m = parse_membership_event(
        {
            "type": "org.matrix.msc3401.call.member",
            "state_key": f"_{user}_{device}_m.call",
            "sender": user,
            "event_id": f"$s-{user}-{device}",
            "origin_server_ts": created_ts,
            "content": content,
        }
    )
    assert isinstance(m, CallMembership)
    return m


def echo(entry: OwnLegacyEntry, puts: list[PutState], user: str = ME, ts: int = NOW) -> None:
    """The homeserver's answer: our puts come back as state events."""
    entry.receive_state(
        (
            {
                "type": p.event_type,
                "state_key": p.state_key,
                "sender": user,
                "event_id": f"$echo-{p.state_key}-{ts}",
                "origin_server_ts": ts,
                "content": p.content,
            }
            for p in puts
        ),
        (ME, BOB, HYDRO),
    )


def devices_listed(put: PutState) -> list[tuple[str, str]]:
    content: dict[str, Any] = put.content
    return [(d["device_id"], d["session_id"]) for c in content["m.calls"] for d in c["m.devices"]]


# -- dialect choice ---------------------------------------------------------------------------


def test_dialect_choice_maps_the_cli_words() -> None:
    assert dialect_choice("auto") == (Dialect.STATE, True)
    assert dialect_choice("sticky") == (Dialect.STICKY, False)
    assert dialect_choice(Dialect.MSC3401_2022) == (Dialect.MSC3401_2022, False)


def test_auto_plan_follows_the_others() -> None:
    entry = OwnLegacyEntry(ROOM, ME, "BOT")
    assert entry.plan(["msc3401_2022", "msc3401_2022"]) is Dialect.MSC3401_2022
    assert not entry.when_needed
    assert entry.plan(["sticky", "msc3401_2022"]) is Dialect.STICKY
    assert entry.when_needed
    assert entry.plan([]) is Dialect.STATE
    assert entry.when_needed  # an entry is added later, if a 2022-only member comes


# -- the 2022-only writer ----------------------------------------------------------------------


def test_2022_writer_joins_the_rooms_call_is_present_renews_and_leaves() -> None:
    entry = OwnLegacyEntry(ROOM, ME, "BOT")
    entry.receive_state([call_event("roomcall")], (ME, BOB))
    puts = entry.join_2022(NOW, intent="audio", session_id="sbot")
    assert [(p.event_type, p.state_key) for p in puts] == [(MEMBER_EVENT, ME)]
    assert entry.written_conf_id == "roomcall"
    assert not entry.present(NOW)  # not yet back from the homeserver
    echo(entry, puts)
    assert entry.present(NOW)
    assert entry.refresh_devices(NOW)
    assert not entry.refresh_devices(NOW)
    assert [d.device_id for d in entry.devices] == ["BOT"]
    assert entry.next_renewal_ms() == NOW + RENEW_AFTER_MS
    assert entry.tick(NOW + RENEW_AFTER_MS - 1) == []
    assert len(entry.tick(NOW + RENEW_AFTER_MS)) == 1
    # Writers of no entry have no renewal and nothing to leave.
    bystander = OwnLegacyEntry(ROOM, BOB, "B")
    assert bystander.next_renewal_ms() is None
    assert bystander.tick(NOW + RENEW_AFTER_MS) == []
    assert bystander.leave(NOW) == []
    assert bystander.after_change(NOW, writes_current=True, own=None, others=[]) == []
    left = entry.leave(NOW + 10)
    assert devices_listed(left[0]) == []


def test_2022_writer_creates_a_call_as_voice_for_audio() -> None:
    entry = OwnLegacyEntry(ROOM, ME, "BOT")
    entry.receive_state([], (ME,))
    puts = entry.join_2022(NOW, intent="audio")
    assert puts[0].event_type == GROUP_CALL_EVENT
    assert puts[0].content["m.type"] == "m.voice"
    video = OwnLegacyEntry(ROOM, ME, "BOT").join_2022(NOW, intent=None)
    assert video[0].content["m.type"] == "m.video"


def test_a_lost_entry_is_put_back_and_not_when_the_call_is_not_the_rooms() -> None:
    entry = OwnLegacyEntry(ROOM, ME, "BOT")
    entry.receive_state([call_event("roomcall")], (ME, BOB))
    echo(entry, entry.join_2022(NOW, intent=None, session_id="s1"))
    assert entry.after_change(NOW, writes_current=False, own=None, others=[]) == []
    # Another client of ours rewrote our user's event without us: put back.
    entry.receive_state([calls_event(ME, "roomcall", ("PHONE", "sp"), ts=NOW + 1)], (ME, BOB))
    repair = entry.after_change(NOW + 2, writes_current=False, own=None, others=[])
    assert devices_listed(repair[0]) == [("PHONE", "sp"), ("BOT", "s1")]
    # The repair guard: creating the call failed, the room has no call of that id.
    lone = OwnLegacyEntry(ROOM, ME, "BOT")
    lone.receive_state([], (ME,))
    puts = lone.join_2022(NOW, intent=None)
    echo(lone, puts[1:])  # the member event came back, the call event (403) never did
    assert lone.after_change(NOW + 5, writes_current=False, own=None, others=[]) == []


# -- the AUTO dual writer ------------------------------------------------------------------------


def test_auto_dual_writer_adds_an_entry_only_once_a_2022_member_is_there() -> None:
    entry = OwnLegacyEntry(ROOM, ME, "BOT")
    entry.receive_state([call_event("roomcall")], (ME, BOB, HYDRO))
    assert entry.plan(["state"]) is Dialect.STATE
    own = state_membership(ME, "BOT", created_ts=NOW - 10)
    # Our membership not yet shown by the room: nothing.
    assert entry.after_change(NOW, writes_current=True, own=None, others=["msc3401_2022"]) == []
    # Only current-dialect others: no entry.
    assert entry.after_change(NOW, writes_current=True, own=own, others=["state"]) == []
    assert entry.write is None
    # A 2022-only member is there: an entry under our membership's mesh session id.
    puts = entry.after_change(NOW, writes_current=True, own=own, others=["msc3401_2022"])
    session_id = f"{own.member_id}.{own.created_ts}"
    assert devices_listed(puts[-1]) == [("BOT", session_id)]
    echo(entry, puts)
    assert entry.after_change(NOW + 1, writes_current=True, own=own, others=["msc3401_2022"]) == []
    # Our membership was re-sent (new created_ts): the entry follows the new session id.
    again = state_membership(ME, "BOT", created_ts=NOW + 100)
    moved = entry.after_change(NOW + 101, writes_current=True, own=again, others=[])
    assert devices_listed(moved[0]) == [("BOT", f"{again.member_id}.{again.created_ts}")]


def test_fixed_current_dialect_never_writes_an_entry() -> None:
    entry = OwnLegacyEntry(ROOM, ME, "BOT")
    entry.receive_state([call_event("roomcall")], (ME, HYDRO))
    own = state_membership(ME, "BOT")
    assert entry.after_change(NOW, writes_current=True, own=own, others=["msc3401_2022"]) == []
    assert entry.write is None
    assert entry.written_conf_id is None


# -- the merged participant list ---------------------------------------------------------------


def test_participants_merge_both_forms_once_each_2022_only_devices_last() -> None:
    entry = OwnLegacyEntry(ROOM, ME, "BOT")
    entry.receive_state(
        [
            call_event("roomcall"),
            calls_event(HYDRO, "roomcall", ("H1", "sh"), ts=NOW - 50),
            calls_event(ME, "roomcall", ("BOT", "sbot"), ts=NOW - 40),
        ],
        (ME, BOB, HYDRO),
    )
    assert entry.refresh_devices(NOW)
    assert entry.next_expiry_ms(NOW) == NOW - 50 + 3_600_000
    bob = state_membership(BOB, "B", created_ts=NOW - 100)
    me = state_membership(ME, "BOT", created_ts=NOW - 90)
    parts = participants_of([bob, me], entry.devices, entry.conf_id, (ME, "BOT"))
    assert [(p.user_id, p.dialect) for p in parts] == [
        (BOB, Dialect.STATE),
        (ME, Dialect.STATE),
        (HYDRO, Dialect.MSC3401_2022),
    ]
    # We are in both forms: shown once, marked as listed in the 2022 call.
    assert parts[1].is_self
    assert parts[1].legacy_conf_id == "roomcall"
    assert parts[0].legacy_conf_id is None
    hydro = parts[2]
    assert hydro.mesh_session_id == "sh"
    assert not hydro.frame_e2ee
    assert isinstance(hydro.transport, FullMeshTransport)
    assert hydro.advertised == (hydro.transport,)
    assert hydro.rtc_backend_identity == f"{HYDRO}:H1"
    assert parts[0].mesh_session_id == f"{bob.member_id}.{bob.created_ts}"
    # No 2022 call: the listed devices are ignored.
    assert participants_of([bob], entry.devices, None, (ME, "BOT"))[0].legacy_conf_id is None
    assert participants_of([], (), None, (ME, "BOT")) == ()
    table = participants_table(parts)
    assert "(you)" in table
    assert "msc3401_2022" in table


def test_participant_changes_name_who_joined_and_left_and_reorders() -> None:
    bob = Participant.of(state_membership(BOB, "B", NOW - 100), None, (ME, "BOT"))
    me = Participant.of(state_membership(ME, "BOT", NOW - 90), None, (ME, "BOT"))
    hydro = Participant.of_legacy(
        LegacyMember(user_id=HYDRO, device_id="H1", session_id="sh", expires_ts=NOW + 1, feeds=()),
        "roomcall",
        (ME, "BOT"),
    )
    first = participant_changes((), (bob, me))
    assert first.joined == (bob, me)
    assert first.left == ()
    assert first.changed
    same = participant_changes((bob, me), (bob, me))
    assert not same.changed
    swapped = participant_changes((bob, me), (me, bob))
    assert swapped.changed
    assert swapped.joined == ()
    assert swapped.left == ()
    gone = participant_changes((bob, me, hydro), (bob, me))
    assert gone.left == (hydro,)
    assert gone.changed
    # A member re-sent its membership (new event id, same member): subscribers hear of it.
    resent = replace(bob, event_id="$again")
    again = participant_changes((bob, me), (resent, me))
    assert again.changed
    assert again.joined == ()
    assert again.left == ()
    assert ParticipantsChanged((bob, me), ring=RingState.RINGING).oldest == bob
    assert ParticipantsChanged(()).oldest is None
