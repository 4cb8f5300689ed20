"""The 2022 MSC3401 dialect (Hydrogen, legacy js-sdk GroupCall): wire model, the room's call
and devices, our own membership's read-modify-write, renewal, expiry and dialect choice."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from matrixrtc.model.membership import parse_membership_event
from matrixrtc.model.msc3401_2022 import (
    DEVICE_TIMEOUT_MS,
    GROUP_CALL_EVENT,
    MEMBER_EVENT,
    RENEW_AFTER_MS,
    GroupCallIntent,
    GroupCallType,
    LegacyDevice,
    parse_group_call_event,
    parse_member_event,
    update_member_content,
)
from matrixrtc.session.legacy_call import (
    LegacyCallSession,
    LegacyMembership,
    LegacyMembershipState,
    WriteDialect,
    WritePlan,
    choose_write_dialect,
    needs_legacy_entry,
    plan_write,
)

NOW = 1_700_000_000_000
ROOM = "!room:hs"


def call_event(
    conf_id: str = "conf1", ts: int = NOW - 5000, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"m.intent": "m.room", "m.type": "m.video"} | (extra or {})
    return {
        "type": GROUP_CALL_EVENT,
        "state_key": conf_id,
        "sender": "@bob:hs",
        "event_id": f"$call-{conf_id}-{ts}",
        "origin_server_ts": ts,
        "content": {k: v for k, v in body.items() if v is not None},
    }


def device(device_id: str, session_id: str = "sess", expires: int = NOW + 60_000) -> dict[str, Any]:
    return {
        "device_id": device_id,
        "session_id": session_id,
        "expires_ts": expires,
        "feeds": [{"purpose": "m.usermedia"}],
    }


def member_event(user: str, calls: list[Any], sender: str | None = None) -> dict[str, Any]:
    return {
        "type": MEMBER_EVENT,
        "state_key": user,
        "sender": sender or user,
        "event_id": f"$m-{user}",
        "origin_server_ts": NOW - 1000,
        "content": {"m.calls": calls},
    }


# -- the call event --------------------------------------------------------------------------


def test_call_event_is_read_as_js_sdk_reads_it() -> None:
    call = parse_group_call_event(call_event(extra={"m.name": "Standup", "m.intent": "m.prompt"}))
    assert call is not None
    assert (call.conf_id, call.intent, call.call_type, call.name) == (
        "conf1",
        GroupCallIntent.PROMPT,
        GroupCallType.VIDEO,
        "Standup",
    )
    assert call.live
    # js-sdk drops a call with an unknown type or intent
    assert parse_group_call_event(call_event(extra={"m.type": "m.hologram"})) is None
    assert parse_group_call_event(call_event(extra={"m.intent": None})) is None
    ended = parse_group_call_event(call_event(extra={"m.terminated": "call_ended"}))
    assert ended is not None
    assert not ended.live


def test_the_room_call_is_the_latest_live_one() -> None:
    s = LegacyCallSession(ROOM)
    s.receive_state_event(call_event("old", ts=NOW - 9000))
    s.receive_state_event(call_event("new", ts=NOW - 1000))
    s.receive_state_event(call_event("ended", ts=NOW, extra={"m.terminated": "call_ended"}))
    assert s.conf_id == "new"
    # A later invalid event at a key removes that call.
    s.receive_state_event(call_event("new", ts=NOW, extra={"m.type": 5}))
    assert s.conf_id == "old"


# -- member events ---------------------------------------------------------------------------


def test_devices_are_filtered_like_js_sdk() -> None:
    calls = [
        {
            "m.call_id": "conf1",
            "m.devices": [
                device("OK"),
                device("EXPIRED", expires=NOW),
                {"device_id": "NOFEEDS", "session_id": "s", "expires_ts": NOW + 1},
                {"device_id": "STRTS", "session_id": "s", "expires_ts": "later", "feeds": []},
                "garbage",
            ],
        },
        {"m.call_id": "other", "m.devices": [device("ELSEWHERE")]},
    ]
    ev = parse_member_event(member_event("@bob:hs", calls))
    assert ev is not None
    assert [d.device_id for d in ev.devices_in("conf1", NOW)] == ["OK"]
    assert [d.device_id for d in ev.devices_in("other", NOW)] == ["ELSEWHERE"]


def test_a_member_event_at_someone_elses_key_is_refused() -> None:
    assert parse_member_event(member_event("@bob:hs", [], sender="@mallory:hs")) is None
    s = LegacyCallSession(ROOM)
    s.receive_state_event(call_event())
    forged = member_event("@bob:hs", [{"m.call_id": "conf1", "m.devices": [device("B")]}])
    forged["sender"] = "@mallory:hs"
    s.receive_state_event(forged)
    assert s.devices(NOW) == ()


def test_the_current_state_form_parser_leaves_2022_content_alone() -> None:
    ev = member_event("@bob:hs", [{"m.call_id": "conf1", "m.devices": [device("B")]}])
    assert parse_membership_event(ev) is None  # not a state-form membership, quietly


def test_session_lists_joined_users_devices_in_the_room_call() -> None:
    s = LegacyCallSession(ROOM)
    s.receive_state_event(call_event())
    s.receive_state_event(
        member_event("@bob:hs", [{"m.call_id": "conf1", "m.devices": [device("B1", "sb")]}])
    )
    s.receive_state_event(
        member_event(
            "@carol:hs", [{"m.call_id": "conf1", "m.devices": [device("C1", "sc", NOW + 10)]}]
        )
    )
    assert [(m.user_id, m.device_id, m.session_id) for m in s.devices(NOW)] == [
        ("@bob:hs", "B1", "sb"),
        ("@carol:hs", "C1", "sc"),
    ]
    assert s.next_wakeup_ms(NOW) == NOW + 10
    assert [m.device_id for m in s.devices(NOW + 10)] == ["B1"]  # carol's entry expired
    s.set_joined_members(["@carol:hs"])
    assert [m.device_id for m in s.devices(NOW)] == ["C1"]  # bob left the room


# -- read-modify-write -------------------------------------------------------------------------


def test_read_modify_write_keeps_other_devices_and_calls() -> None:
    other_device = device("PHONE", "sp") | {"m.foci.active": [{"user_id": "@x:hs"}]}
    current = {
        "m.calls": [
            {"m.call_id": "elsewhere", "m.devices": [device("LAPTOP")]},
            {
                "m.call_id": "conf1",
                "m.foci": ["x"],
                "m.devices": [
                    other_device,
                    device("OURS", "stale-session"),
                    device("OLD", "s", NOW),
                ],
            },
        ],
        "unrelated": True,
    }
    before = copy.deepcopy(current)
    own = LegacyDevice(device_id="OURS", session_id="new", expires_ts=NOW + DEVICE_TIMEOUT_MS)
    out: Any = update_member_content(
        current, conf_id="conf1", device_id="OURS", own=own, now_ms=NOW
    )
    assert current == before  # the input is not mutated
    calls = {c["m.call_id"]: c for c in out["m.calls"]}
    assert calls["elsewhere"] == before["m.calls"][0]  # type: ignore[index]
    conf = calls["conf1"]
    assert conf["m.foci"] == ["x"]
    # the other device exactly as it was; the expired one gone; ours replaced
    assert conf["m.devices"] == [other_device, own.to_json()]
    # leaving drops only our entry, and a call left empty disappears
    out = update_member_content(out, conf_id="conf1", device_id="OURS", own=None, now_ms=NOW)
    assert [d["device_id"] for d in calls_of(out, "conf1")] == ["PHONE"]
    out = update_member_content(out, conf_id="conf1", device_id="PHONE", own=None, now_ms=NOW)
    assert [c["m.call_id"] for c in out["m.calls"]] == ["elsewhere"]


def calls_of(content: dict[str, Any], conf_id: str) -> list[dict[str, Any]]:
    for c in content["m.calls"]:
        if c["m.call_id"] == conf_id:
            return list(c["m.devices"])
    return []


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
device_like = st.fixed_dictionaries(
    {},
    optional={
        "device_id": st.sampled_from(["OURS", "A", "B"]) | json_values,
        "session_id": st.text(max_size=4) | json_values,
        "expires_ts": st.integers(NOW - 10, NOW + 10) | json_values,
        "feeds": st.lists(st.fixed_dictionaries({"purpose": st.text(max_size=4)}), max_size=2)
        | json_values,
    },
)
content_like = st.fixed_dictionaries(
    {},
    optional={
        "m.calls": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "m.call_id": st.sampled_from(["conf1", "conf2"]) | json_values,
                    "m.devices": st.lists(device_like, max_size=4) | json_values,
                },
            )
            | json_values,
            max_size=3,
        )
        | json_values
    },
)


@settings(max_examples=300, deadline=None)
@given(content=content_like, join=st.booleans())
def test_read_modify_write_never_fails_and_keeps_every_other_valid_device(
    content: dict[str, Any], join: bool
) -> None:
    own = LegacyDevice(device_id="OURS", session_id="s", expires_ts=NOW + DEVICE_TIMEOUT_MS)
    out = update_member_content(
        content, conf_id="conf1", device_id="OURS", own=own if join else None, now_ms=NOW
    )
    event = member_event("@me:hs", out["m.calls"])  # type: ignore[arg-type]
    parsed_out = parse_member_event(event)
    parsed_in = parse_member_event(member_event("@me:hs", content.get("m.calls")))  # type: ignore[arg-type]
    assert parsed_out is not None
    assert parsed_in is not None
    ours = [d for d in parsed_out.devices_in("conf1", NOW) if d.device_id == "OURS"]
    assert ours == ([own] if join else [])
    before = {d.device_id for d in parsed_in.devices_in("conf1", NOW) if d.device_id != "OURS"}
    after = {d.device_id for d in parsed_out.devices_in("conf1", NOW) if d.device_id != "OURS"}
    assert after == before
    assert parsed_out.calls.keys() - {"conf1"} == parsed_in.calls.keys() - {"conf1"}


@settings(max_examples=300, deadline=None)
@given(
    event=st.fixed_dictionaries(
        {"type": st.sampled_from([MEMBER_EVENT, GROUP_CALL_EVENT])},
        optional={
            "state_key": st.sampled_from(["@me:hs", "conf1"]) | json_values,
            "sender": st.sampled_from(["@me:hs"]) | json_values,
            "event_id": json_values,
            "origin_server_ts": st.integers(0, NOW) | json_values,
            "content": content_like | json_values,
        },
    )
    | json_values
)
def test_parsers_and_session_never_raise(event: Any) -> None:
    parse_member_event(event)
    parse_group_call_event(event)
    s = LegacyCallSession(ROOM)
    s.receive_state_event(event)
    s.devices(NOW)


# -- our membership ----------------------------------------------------------------------------


def echo(session: LegacyCallSession, actions: list[Any], user: str = "@me:hs") -> None:
    """The homeserver accepted our puts: they come back as state."""
    for a in actions:
        session.receive_state_event(
            {
                "type": a.event_type,
                "state_key": a.state_key,
                "sender": user,
                "event_id": f"$echo{id(a)}",
                "origin_server_ts": NOW,
                "content": a.content,
            }
        )


def test_join_uses_the_rooms_conf_id_and_keeps_our_other_devices() -> None:
    s = LegacyCallSession(ROOM)
    s.receive_state_event(call_event("roomcall"))
    s.receive_state_event(
        member_event("@me:hs", [{"m.call_id": "roomcall", "m.devices": [device("PHONE", "sp")]}])
    )
    me = LegacyMembership(s, user_id="@me:hs", device_id="BOT", session_id="sbot")
    actions = me.join(NOW)
    assert [(a.event_type, a.state_key) for a in actions] == [(MEMBER_EVENT, "@me:hs")]
    assert me.conf_id == "roomcall"
    entries = calls_of(actions[0].content, "roomcall")
    assert [(d["device_id"], d["session_id"]) for d in entries] == [
        ("PHONE", "sp"),
        ("BOT", "sbot"),
    ]
    assert entries[1]["expires_ts"] == NOW + DEVICE_TIMEOUT_MS
    assert entries[1]["feeds"] == [{"purpose": "m.usermedia"}]
    assert me.join(NOW) == []  # only once


def test_join_creates_a_call_when_the_room_has_none() -> None:
    s = LegacyCallSession(ROOM)
    me = LegacyMembership(s, user_id="@me:hs", device_id="BOT", session_id="s", new_conf_id="c9")
    actions = me.join(NOW)
    assert [(a.event_type, a.state_key) for a in actions] == [
        (GROUP_CALL_EVENT, "c9"),
        (MEMBER_EVENT, "@me:hs"),
    ]
    assert actions[0].content == {"m.intent": "m.room", "m.type": "m.video"}
    echo(s, actions)
    assert s.conf_id == "c9"
    assert [m.device_id for m in s.devices(NOW)] == ["BOT"]


def test_renewal_every_45_minutes_and_repair_and_leave() -> None:
    s = LegacyCallSession(ROOM)
    s.receive_state_event(call_event("roomcall"))
    me = LegacyMembership(s, user_id="@me:hs", device_id="BOT", session_id="s")
    echo(s, me.join(NOW))
    assert me.next_wakeup_ms() == NOW + RENEW_AFTER_MS
    assert me.tick(NOW + RENEW_AFTER_MS - 1) == []
    renew = me.tick(NOW + RENEW_AFTER_MS)
    assert calls_of(renew[0].content, "roomcall")[0]["expires_ts"] == (
        NOW + RENEW_AFTER_MS + DEVICE_TIMEOUT_MS
    )
    echo(s, renew)
    assert me.observe(NOW + RENEW_AFTER_MS) == []
    # another client of ours rewrote the event without our entry: we put it back
    echo(s, [type(renew[0])(event_type=MEMBER_EVENT, state_key="@me:hs", content={"m.calls": []})])
    repair = me.observe(NOW + RENEW_AFTER_MS + 5)
    assert [d["device_id"] for d in calls_of(repair[0].content, "roomcall")] == ["BOT"]
    echo(s, repair)
    leave = me.leave(NOW + RENEW_AFTER_MS + 10)
    assert leave[0].content == {"m.calls": []}
    assert me.state is LegacyMembershipState.LEFT
    assert me.tick(NOW + 10 * RENEW_AFTER_MS) == []


def test_dialect_choice() -> None:
    assert choose_write_dialect(WriteDialect.STICKY, ["msc3401_2022"]) is WriteDialect.STICKY
    assert choose_write_dialect(WriteDialect.AUTO, []) is WriteDialect.STATE
    assert (
        choose_write_dialect(WriteDialect.AUTO, ["msc3401_2022", "msc3401_2022", "state"])
        is WriteDialect.MSC3401_2022
    )
    assert (
        choose_write_dialect(WriteDialect.AUTO, ["sticky", "msc3401_2022"]) is WriteDialect.STICKY
    )
    assert choose_write_dialect(WriteDialect.AUTO, ["state", "sticky"]) is WriteDialect.STATE


def test_write_plan_per_dialect_choice() -> None:
    assert plan_write(WriteDialect.STATE, ["msc3401_2022"]) == WritePlan(WriteDialect.STATE, False)
    assert plan_write(WriteDialect.MSC3401_2022, []) == WritePlan(None, True)
    # AUTO: alone -> state; only 2022 members -> 2022 only; mixed -> current plus 2022 entry.
    assert plan_write(WriteDialect.AUTO, []) == WritePlan(WriteDialect.STATE, False)
    assert plan_write(WriteDialect.AUTO, ["msc3401_2022"]) == WritePlan(None, True)
    assert plan_write(WriteDialect.AUTO, ["sticky", "msc3401_2022", "msc3401_2022"]) == WritePlan(
        WriteDialect.STICKY, True
    )
    assert plan_write(WriteDialect.AUTO, ["state", "sticky"]) == WritePlan(
        WriteDialect.STATE, False
    )
    assert needs_legacy_entry(["state", "msc3401_2022"])
    assert not needs_legacy_entry(["state", "sticky"])


def test_no_repair_storm_when_our_call_is_not_the_rooms() -> None:
    """Creating the call can fail (power level): our entry names a conf_id the room does not
    have, so re-putting it would only loop. observe() then does nothing."""
    alice = "@alice:hs"
    s = LegacyCallSession(ROOM)
    me = LegacyMembership(s, user_id=alice, device_id="AAA", session_id="sa", new_conf_id="gone")
    puts = me.join(NOW)
    member_put = puts[-1]
    s.receive_state_event(
        {
            "type": MEMBER_EVENT,
            "state_key": alice,
            "sender": alice,
            "event_id": "$m",
            "origin_server_ts": NOW,
            "content": member_put.content,
        }
    )  # the member event came back, the call event (403) never did
    assert me.observe(NOW + 5) == []
    # A new session id for a dual writer is written at once.
    again = me.set_session_id("sb", NOW + 6)
    assert calls_of(again[0].content, "gone")[0]["session_id"] == "sb"
