"""RTCSession: the js-sdk receive pipeline with our tie-break and hardening."""

from __future__ import annotations

import itertools
from typing import Any

from matrixrtc.model import CallMembership, Dialect, LivekitTransport, SessionMembershipData
from matrixrtc.model.membership import RtcMemberData
from matrixrtc.session import MembershipChanges, RTCSession

ROOM = "!room:example.org"
ALICE = "@alice:example.org"
BOB = "@bob:example.org"
CAROL = "@carol:example.org"
LK = LivekitTransport(livekit_service_url="https://rtc.example.org/livekit/jwt")
NOW = 1_753_000_000_000
_ids = itertools.count()


def state_ev(
    user: str,
    device: str,
    *,
    ts: int = NOW,
    created_ts: int | None = None,
    expires: int | None = None,
    sender: str | None = None,
    state_key: str | None = None,
    content: dict[str, Any] | None = None,
    call_id: str = "",
) -> dict[str, Any]:
    if content is None:
        content = SessionMembershipData.for_join(
            user_id=user, device_id=device, transports=[LK], created_ts=created_ts, call_id=call_id
        ).to_json()
        if expires is None:
            del content["expires"]
        else:
            content["expires"] = expires
    return {
        "type": "org.matrix.msc3401.call.member",
        "state_key": state_key if state_key is not None else f"_{user}_{device}_m.call",
        "sender": sender or user,
        "event_id": f"$s{next(_ids)}",
        "origin_server_ts": ts,
        "content": content,
    }


def sticky_ev(
    user: str,
    device: str,
    member_id: str,
    *,
    ts: int = NOW,
    duration_ms: int = 3_600_000,
    content: dict[str, Any] | None = None,
) -> dict[str, Any]:
    if content is None:
        content = RtcMemberData.for_join(
            user_id=user, device_id=device, member_id=member_id, transports=[LK]
        ).to_json()
    return {
        "type": "org.matrix.msc4143.rtc.member",
        "sender": user,
        "event_id": f"$k{next(_ids)}",
        "origin_server_ts": ts,
        "content": content,
        "msc4354_sticky": {"duration_ms": duration_ms},
    }


def session(*joined: str) -> RTCSession:
    s = RTCSession(ROOM)
    s.set_joined_members(joined or (ALICE, BOB, CAROL))
    return s


def who(s: RTCSession | MembershipChanges) -> list[tuple[str, str]]:
    return [(m.sender, m.device_id) for m in s.memberships]


def test_ordering_by_created_ts_with_deterministic_tie_break() -> None:
    s = session()
    s.receive_state_event(state_ev(CAROL, "C1", ts=NOW + 5))
    s.receive_state_event(state_ev(BOB, "B2", ts=NOW + 9, created_ts=NOW))  # carried created_ts
    s.receive_state_event(state_ev(BOB, "B1", ts=NOW))
    s.receive_state_event(state_ev(ALICE, "A1", ts=NOW))
    changes = s.update(NOW + 10)
    assert changes is not None
    # Ties at NOW: sender then device decide; CAROL's later join is last.
    assert who(s) == [(ALICE, "A1"), (BOB, "B1"), (BOB, "B2"), (CAROL, "C1")]
    assert s.oldest is not None
    assert s.oldest.sender == ALICE
    # Feeding the same events in another order gives the same answer.
    s2 = session()
    for ev in reversed([state_ev(ALICE, "A1"), state_ev(BOB, "B1"), state_ev(BOB, "B2")]):
        s2.receive_state_event(ev)
    s2.update(NOW + 10)
    assert who(s2) == [(ALICE, "A1"), (BOB, "B1"), (BOB, "B2")]


def test_changes_only_on_real_change() -> None:
    s = session()
    ev = state_ev(ALICE, "A1")
    s.receive_state_event(ev)
    first = s.update(NOW)
    assert first is not None
    assert [m.sender for m in first.joined] == [ALICE]
    assert first.session_started
    assert s.update(NOW + 1) is None
    s.receive_state_event(ev)  # the same event again (e.g. from a second sync section)
    assert s.update(NOW + 2) is None
    s.set_joined_members([ALICE, BOB, CAROL, "@dave:example.org"])  # irrelevant change
    assert s.update(NOW + 3) is None
    # A refresh (new event, same created_ts, longer expires) is an update, not a join.
    refresh = state_ev(ALICE, "A1", ts=NOW + 100, created_ts=NOW, expires=28_800_000)
    s.receive_state_event(refresh)
    changed = s.update(NOW + 4)
    assert changed is not None
    assert changed.joined == ()
    assert changed.left == ()
    assert [(old.event_id, new.event_id) for old, new in changed.updated] == [
        (ev["event_id"], refresh["event_id"])
    ]
    assert not changed.order_changed
    assert changed.rejoined == ()
    # A re-join at the same key (no created_ts carried) is flagged for key rotation.
    rejoin = state_ev(ALICE, "A1", ts=NOW + 200)
    s.receive_state_event(rejoin)
    again = s.update(NOW + 5)
    assert again is not None
    assert [m.event_id for m in again.rejoined] == [rejoin["event_id"]]


def test_leave_detection_and_session_end() -> None:
    s = session()
    s.receive_state_event(state_ev(ALICE, "A1"))
    s.receive_state_event(state_ev(BOB, "B1"))
    s.update(NOW)
    s.receive_state_event(state_ev(BOB, "B1", content={}))
    changes = s.update(NOW + 1)
    assert changes is not None
    assert [m.sender for m in changes.left] == [BOB]
    assert who(s) == [(ALICE, "A1")]
    s.receive_state_event(state_ev(ALICE, "A1", content={}))
    end = s.update(NOW + 2)
    assert end is not None
    assert end.session_ended
    assert s.memberships == ()


def test_expiry_against_injected_clock_and_wakeup() -> None:
    s = session()
    s.receive_state_event(state_ev(ALICE, "A1", ts=NOW, expires=60_000))
    s.receive_state_event(state_ev(BOB, "B1", ts=NOW))  # default 4 h
    s.update(NOW)
    assert s.next_wakeup_ms() == NOW + 60_000
    assert s.update(NOW + 59_999) is None
    changes = s.update(NOW + 60_000)
    assert changes is not None
    assert [m.sender for m in changes.left] == [ALICE]
    # Already-expired memberships never show up, even the first time.
    s2 = session()
    s2.receive_state_event(state_ev(ALICE, "A1", ts=NOW - 14_400_000))
    assert s2.update(NOW) is None
    assert s2.memberships == ()


def test_expiry_uses_carried_created_ts() -> None:
    s = session()
    # Refreshed an hour ago with expires 8 h, created 5 h ago: alive for 3 more hours.
    start = NOW - 5 * 3_600_000
    s.receive_state_event(
        state_ev(ALICE, "A1", ts=NOW - 3_600_000, created_ts=start, expires=28_800_000)
    )
    s.update(NOW)
    assert who(s) == [(ALICE, "A1")]
    assert s.next_wakeup_ms() == start + 28_800_000


def test_sender_must_be_joined() -> None:
    s = session(ALICE)
    s.receive_state_event(state_ev(BOB, "B1"))
    assert s.update(NOW) is None
    s.receive_member_event(
        {
            "type": "m.room.member",
            "state_key": BOB,
            "sender": BOB,
            "content": {"membership": "join"},
        }
    )
    changes = s.update(NOW)
    assert changes is not None
    assert [m.sender for m in changes.joined] == [BOB]
    s.receive_member_event(
        {
            "type": "m.room.member",
            "state_key": BOB,
            "sender": BOB,
            "content": {"membership": "leave"},
        }
    )
    gone = s.update(NOW)
    assert gone is not None
    assert [m.sender for m in gone.left] == [BOB]


def test_forged_state_keys_are_ignored() -> None:
    s = session()
    # Bob writes a membership into Alice's key (Synapse allows it for `_@…` keys).
    s.receive_state_event(state_ev(ALICE, "A1", sender=BOB))
    # Bob claims a device that his key does not name.
    s.receive_state_event(state_ev(BOB, "EVIL", state_key=f"_{BOB}_B1_m.call"))
    assert s.update(NOW) is None
    assert s.memberships == ()


def test_forged_overwrite_removes_the_victims_membership_until_reasserted() -> None:
    s = session()
    s.receive_state_event(state_ev(ALICE, "A1"))
    s.update(NOW)
    s.receive_state_event(state_ev(ALICE, "A1", sender=BOB))  # overwrite at Alice's key
    changes = s.update(NOW + 1)
    assert changes is not None
    assert [m.sender for m in changes.left] == [ALICE]
    assert s.own_membership(ALICE, "A1") is None  # her machine will re-join
    s.receive_state_event(state_ev(ALICE, "A1", ts=NOW + 2))
    s.update(NOW + 3)
    assert s.own_membership(ALICE, "A1") is not None


def test_slot_mismatch_and_legacy_array_ignored() -> None:
    s = session()
    s.receive_state_event(state_ev(ALICE, "A1", call_id="other"))
    legacy = state_ev(
        BOB,
        "B1",
        state_key=BOB,
        content={"memberships": [{"application": "m.call", "call_id": "", "device_id": "B1"}]},
    )
    s.receive_state_event(legacy)
    assert s.update(NOW) is None
    other = RTCSession(ROOM, slot_id="m.call#other")
    other.set_joined_members([ALICE])
    other.receive_state_event(state_ev(ALICE, "A1", call_id="other"))
    other.update(NOW)
    assert who(other) == [(ALICE, "A1")]


def test_slot_match_compares_the_id_part_only_like_js_sdk() -> None:
    s = session()
    content = RtcMemberData.for_join(
        user_id=BOB, device_id="B1", member_id="uuid-b", transports=[LK], slot_id="m.other#ROOM"
    ).to_json()
    s.receive_sticky_event(sticky_ev(BOB, "B1", "uuid-b", content=content), NOW)
    s.receive_state_event(state_ev(ALICE, "A1", call_id="x#y"))  # malformed slot: dropped
    s.receive_state_event(state_ev(CAROL, "C1", call_id="ROOM"))  # "m.call#ROOM" as well
    s.update(NOW)
    assert who(s) == [(BOB, "B1"), (CAROL, "C1")]


def test_sticky_and_state_members_together() -> None:
    s = session()
    s.receive_state_event(state_ev(ALICE, "A1", ts=NOW))
    s.receive_sticky_event(sticky_ev(BOB, "B1", "uuid-b", ts=NOW + 1), NOW + 1)
    s.update(NOW + 2)
    assert [(m.sender, m.dialect) for m in s.memberships] == [
        (ALICE, Dialect.STATE),
        (BOB, Dialect.STICKY),
    ]
    bob = s.memberships[1]
    assert bob.rtc_backend_identity != f"{BOB}:B1"  # hashed identity for the sticky form
    assert s.memberships[0].rtc_backend_identity == f"{ALICE}:A1"


def test_sticky_expiry_leave_replacement_and_redaction() -> None:
    s = session()
    first = sticky_ev(BOB, "B1", "uuid-b", ts=NOW, duration_ms=60_000)
    s.receive_sticky_event(first, NOW)
    s.update(NOW)
    assert who(s) == [(BOB, "B1")]
    assert s.next_wakeup_ms() == NOW + 60_000
    # A newer event with the same sticky key replaces it (an update).
    second = sticky_ev(BOB, "B1", "uuid-b", ts=NOW + 30_000, duration_ms=60_000)
    s.receive_sticky_event(second, NOW + 30_000)
    changes = s.update(NOW + 30_000)
    assert changes is not None
    assert len(changes.updated) == 1
    # An older one arriving late does not win.
    late = sticky_ev(BOB, "B1", "uuid-b", ts=NOW + 10_000, duration_ms=60_000)
    s.receive_sticky_event(late, NOW + 31_000)
    assert s.update(NOW + 31_000) is None
    # Redacting the current event reverts to the previous one still sticky.
    s.receive_redaction(second["event_id"])
    reverted = s.update(NOW + 32_000)
    assert reverted is not None
    assert s.memberships[0].event_id == late["event_id"]
    # Expiry of stickiness removes the member.
    gone = s.update(NOW + 70_000)
    assert gone is not None
    assert s.memberships == ()


def test_invalid_newer_sticky_event_hides_the_older_valid_one() -> None:
    s = session()
    s.receive_sticky_event(sticky_ev(BOB, "B1", "uuid-b", ts=NOW), NOW)
    s.update(NOW)
    junk = sticky_ev(BOB, "B1", "uuid-b", ts=NOW + 5)
    junk["content"]["slot_id"] = "m.call"  # invalid: no '#'
    s.receive_sticky_event(junk, NOW + 5)
    changes = s.update(NOW + 5)
    assert changes is not None
    assert [m.sender for m in changes.left] == [BOB]


def test_sticky_leave_content() -> None:
    s = session()
    s.receive_sticky_event(sticky_ev(BOB, "B1", "uuid-b"), NOW)
    s.update(NOW)
    leave = sticky_ev(BOB, "B1", "uuid-b", ts=NOW + 5, content={"msc4354_sticky_key": "uuid-b"})
    s.receive_sticky_event(leave, NOW + 5)
    changes = s.update(NOW + 5)
    assert changes is not None
    assert [m.sender for m in changes.left] == [BOB]


def test_sticky_ttl_and_missing_duration() -> None:
    s = session()
    ev = sticky_ev(BOB, "B1", "uuid-b", ts=NOW - 50_000)
    ev["unsigned"] = {"msc4354_sticky_duration_ttl_ms": 10_000}
    s.receive_sticky_event(ev, NOW)
    s.update(NOW)
    assert s.next_wakeup_ms() == NOW + 10_000
    no_duration = sticky_ev(CAROL, "C1", "uuid-c")
    del no_duration["msc4354_sticky"]
    s.receive_sticky_event(no_duration, NOW)  # js-sdk drops it; so do we
    no_duration["unsigned"] = {"msc4354_sticky_duration_ttl_ms": 10_000}
    s.receive_sticky_event(no_duration, NOW)  # a TTL alone does not make it sticky
    zero = sticky_ev(CAROL, "C1", "uuid-c", duration_ms=0)
    s.receive_sticky_event(zero, NOW)
    assert s.update(NOW) is None
    # Stickiness is capped at one hour.
    long = sticky_ev(CAROL, "C1", "uuid-c", duration_ms=10 * 3_600_000)
    s.receive_sticky_event(long, NOW)
    s.update(NOW)
    assert s.update(NOW + 3_600_000) is not None
    assert who(s) == []


def test_sticky_key_shadows_state_event_with_same_key() -> None:
    # js-sdk: state events whose state_key equals a sticky event's msc4354_sticky_key are
    # dropped. (A sticky member id shaped like a state key makes the rule observable.)
    s = session()
    key = f"_{ALICE}_A1_m.call"
    s.receive_state_event(state_ev(ALICE, "A1"))
    s.receive_sticky_event(sticky_ev(ALICE, "A2", key), NOW)
    s.update(NOW)
    assert [(m.device_id, m.dialect) for m in s.memberships] == [("A2", Dialect.STICKY)]


def test_room_version_decides_at_keys() -> None:
    s = RTCSession(ROOM, room_version="12")
    s.set_joined_members([ALICE])
    s.receive_state_event(state_ev(ALICE, "A1", state_key=f"{ALICE}_A1_m.call"))
    assert s.update(NOW) is None
    s.set_room_version("org.matrix.msc3757.11")
    assert s.update(NOW) is not None
    assert who(s) == [(ALICE, "A1")]


def test_garbage_input_is_ignored() -> None:
    s = session()
    junks: list[object] = [None, [], "x", {"type": "org.matrix.msc3401.call.member"}, {"type": 5}]
    for junk in junks:
        s.receive_state_event(junk)
        s.receive_sticky_event(junk, NOW)
        s.receive_member_event(junk)
    assert s.update(NOW) is None


def test_membership_accessors() -> None:
    s = session()
    s.receive_state_event(state_ev(ALICE, "A1"))
    s.update(NOW)
    m = s.own_membership(ALICE, "A1")
    assert isinstance(m, CallMembership)
    assert s.own_membership(ALICE, "A2") is None
    assert s.joined_members == frozenset({ALICE, BOB, CAROL})


# --------------------------------------------------------------- receive_room_update routing


def member_ev(user: str, membership: str = "join") -> dict[str, Any]:
    return {
        "type": "m.room.member",
        "state_key": user,
        "sender": user,
        "event_id": f"$m{next(_ids)}",
        "content": {"membership": membership},
    }


def create_ev(version: str) -> dict[str, Any]:
    return {"type": "m.room.create", "state_key": "", "content": {"room_version": version}}


def redaction(event_id: str, *, v11: bool) -> dict[str, Any]:
    ev: dict[str, Any] = {"type": "m.room.redaction", "event_id": f"$r{next(_ids)}"}
    if v11:
        ev["content"] = {"redacts": event_id}
    else:
        ev["redacts"] = event_id
        ev["content"] = {}
    return ev


def test_a_room_update_routes_state_sticky_and_member_events() -> None:
    s = RTCSession(ROOM)
    rest = s.receive_room_update(
        state=[member_ev(ALICE), member_ev(BOB), state_ev(ALICE, "A1")],
        sticky=[sticky_ev(BOB, "B1", "uuid-b"), {"type": "m.room.message"}],
        now_ms=NOW,
    )
    assert rest == ()
    s.update(NOW)
    assert who(s) == [(ALICE, "A1"), (BOB, "B1")]
    # Bob leaves the room: his membership no longer counts.
    s.receive_room_update(state=[member_ev(BOB, "leave")], now_ms=NOW + 1)
    s.update(NOW + 1)
    assert who(s) == [(ALICE, "A1")]


def test_the_create_event_sets_the_version_before_the_state_it_comes_with() -> None:
    s = RTCSession(ROOM, room_version="12")
    owned_key = state_ev(ALICE, "A1", state_key=f"{ALICE}_A1_m.call")
    # The create event comes after the membership in the list, and still decides its parse.
    s.receive_room_update(
        state=[member_ev(ALICE), owned_key, create_ev("org.matrix.msc3757.11")], now_ms=NOW
    )
    s.update(NOW)
    assert who(s) == [(ALICE, "A1")]
    assert s.room_version == "org.matrix.msc3757.11"


def test_redactions_in_either_form_reach_the_session_and_other_events_are_handed_back() -> None:
    s = session()
    first = sticky_ev(BOB, "B1", "uuid-b", ts=NOW)
    second = sticky_ev(BOB, "B1", "uuid-b", ts=NOW + 10)
    carol = state_ev(CAROL, "C1")
    s.receive_room_update(sticky=[first, second], state=[carol], now_ms=NOW)
    s.update(NOW)

    def bobs() -> str:
        return next(m.event_id for m in s.memberships if m.sender == BOB)

    assert bobs() == second["event_id"]
    decline = {"type": "org.matrix.msc4310.rtc.decline", "content": {}}
    rest = s.receive_room_update(
        timeline=[redaction(second["event_id"], v11=False), decline, "junk"], now_ms=NOW + 20
    )
    assert rest == (decline,)
    s.update(NOW + 20)
    assert bobs() == first["event_id"]  # reverted to the older event
    s.receive_room_update(timeline=[redaction(carol["event_id"], v11=True)], now_ms=NOW + 30)
    s.update(NOW + 30)
    assert who(s) == [(BOB, "B1")]


def test_a_redaction_naming_no_event_is_ignored() -> None:
    s = session()
    s.receive_room_update(state=[state_ev(ALICE, "A1")], now_ms=NOW)
    s.update(NOW)
    for bad in ({"type": "m.room.redaction"}, {"type": "m.room.redaction", "redacts": 5}):
        assert s.receive_room_update(timeline=[bad], now_ms=NOW) == ()
    assert s.update(NOW) is None
    assert who(s) == [(ALICE, "A1")]


def test_leaving_the_room_means_nobody_counts_as_joined() -> None:
    s = session()
    s.receive_room_update(state=[state_ev(ALICE, "A1")], now_ms=NOW)
    s.update(NOW)
    s.receive_room_update(left=True, now_ms=NOW + 1)
    s.update(NOW + 1)
    assert s.memberships == ()
