"""Membership wire models: exact shapes, round trips, js-sdk validation and hardening."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from structlog.testing import capture_logs

from matrixrtc.model import (
    DEFAULT_SLOT_ID,
    CallMembership,
    ContentKind,
    Dialect,
    EventType,
    FocusActive,
    FocusSelection,
    FullMeshTransport,
    LivekitTransport,
    MembershipKey,
    MembershipLeft,
    RtcMemberData,
    SessionMembershipData,
    UnknownTransport,
    classify_content,
    parse_membership_event,
    parse_transport,
    state_key_for,
    sticky_leave_content,
)
from matrixrtc.model.livekit_ids import livekit_identity
from matrixrtc.model.membership import TransportsShape
from matrixrtc.model.rejections import RejectionLog

ALICE = "@alice:example.org"
BOB = "@bob:example.org"
DEV = "ABCDEFGH"
LK = LivekitTransport(
    livekit_service_url="https://rtc.example.org/livekit/jwt", livekit_alias="!room:example.org"
)

# The join content of spec §1.1, verbatim.
SPEC_STATE_CONTENT: dict[str, Any] = {
    "application": "m.call",
    "call_id": "",
    "scope": "m.room",
    "device_id": "ABCDEFGH",
    "membershipID": "@alice:example.org:ABCDEFGH",
    "expires": 14400000,
    "m.call.intent": "video",
    "focus_active": {"type": "livekit", "focus_selection": "multi_sfu"},
    "foci_preferred": [
        {
            "livekit_alias": "!room:example.org",
            "type": "livekit",
            "livekit_service_url": "https://rtc.example.org/livekit/jwt",
        }
    ],
    "created_ts": 1753000000000,
}

# The sticky content js-sdk 43's makeMyMembership + StickyEventMembershipManager send (spec
# §1.2 correction), in its key order, with the relation under the name the validator reads.
SPEC_STICKY_CONTENT: dict[str, Any] = {
    "slot_id": "m.call#ROOM",
    "application": {"type": "m.call", "m.call.intent": "video"},
    "transports": {
        "published": [
            {"type": "livekit", "livekit_service_url": "https://rtc.example.org/livekit/jwt"}
        ],
        "can_subscribe": ["livekit"],
    },
    "member": {"device_id": DEV, "user_id": ALICE, "id": "6f1c0b6e-uuid"},
    "versions": [],
    "m.relates_to": {"rel_type": "m.reference", "event_id": "$prev"},
    "msc4354_sticky_key": "6f1c0b6e-uuid",
}
# The same membership in the shape before js-sdk 42.2 (and this project before issue 12).
OLD_STICKY_CONTENT: dict[str, Any] = {
    "application": {"type": "m.call", "m.call.intent": "video"},
    "slot_id": "m.call#ROOM",
    "rtc_transports": [
        {"type": "livekit", "livekit_service_url": "https://rtc.example.org/livekit/jwt"}
    ],
    "member": {"device_id": DEV, "user_id": ALICE, "id": "6f1c0b6e-uuid"},
    "versions": [],
    "msc4354_sticky_key": "6f1c0b6e-uuid",
}


def state_event(
    content: dict[str, Any], *, sender: str = ALICE, state_key: str | None = None
) -> dict[str, Any]:
    return {
        "type": EventType.CALL_MEMBER.value,
        "state_key": state_key if state_key is not None else f"_{sender}_{DEV}_m.call",
        "sender": sender,
        "event_id": "$e1",
        "origin_server_ts": 1753000001000,
        "content": content,
    }


def sticky_event(content: dict[str, Any], *, sender: str = ALICE) -> dict[str, Any]:
    return {
        "type": EventType.RTC_MEMBER.value,
        "sender": sender,
        "event_id": "$s1",
        "origin_server_ts": 1753000002000,
        "content": content,
        "msc4354_sticky": {"duration_ms": 3600000},
    }


# ------------------------------------------------------------------------- state form


def test_for_join_is_exactly_element_call_content() -> None:
    data = SessionMembershipData.for_join(
        user_id=ALICE, device_id=DEV, transports=[LK], intent="video", created_ts=1753000000000
    )
    assert data.to_json() == SPEC_STATE_CONTENT
    assert list(data.to_json()) == list(SPEC_STATE_CONTENT)  # same key order as EC


def test_first_join_omits_created_ts_and_intent_when_unset() -> None:
    data = SessionMembershipData.for_join(user_id=ALICE, device_id=DEV, transports=[LK])
    out = data.to_json()
    assert "created_ts" not in out
    assert "m.call.intent" not in out
    assert out["foci_preferred"] == [LK.to_json()]


def test_oldest_membership_selection() -> None:
    data = SessionMembershipData.for_join(
        user_id=ALICE, device_id=DEV, transports=[LK], multi_sfu=False
    )
    assert data.to_json()["focus_active"] == {
        "type": "livekit",
        "focus_selection": "oldest_membership",
    }


def test_state_round_trip() -> None:
    data = SessionMembershipData.from_json(SPEC_STATE_CONTENT)
    assert data is not None
    assert data.slot_id == DEFAULT_SLOT_ID
    assert data.focus_active == FocusActive(focus_selection=FocusSelection.MULTI_SFU)
    assert data.foci_preferred == (LK,)
    assert data.to_json() == SPEC_STATE_CONTENT
    refreshed = data.with_refresh(expires=28800000, created_ts=1753000000000)
    assert refreshed.to_json() == {**SPEC_STATE_CONTENT, "expires": 28800000}


def test_state_key_forms() -> None:
    assert state_key_for(ALICE, DEV) == "_@alice:example.org_ABCDEFGH_m.call"
    assert state_key_for(ALICE, DEV, "12") == "_@alice:example.org_ABCDEFGH_m.call"
    assert (
        state_key_for(ALICE, DEV, "org.matrix.msc3757.11") == "@alice:example.org_ABCDEFGH_m.call"
    )
    assert state_key_for(ALICE, DEV, "org.matrix.msc3779.1") == "@alice:example.org_ABCDEFGH_m.call"
    assert state_key_for(ALICE, DEV, "org.matrix.msc37570") == "_@alice:example.org_ABCDEFGH_m.call"


def test_parse_state_event_join() -> None:
    m = parse_membership_event(state_event(SPEC_STATE_CONTENT))
    assert isinstance(m, CallMembership)
    assert m.dialect is Dialect.STATE
    assert m.key == MembershipKey(Dialect.STATE, ALICE, f"_{ALICE}_{DEV}_m.call")
    assert (m.user_id, m.device_id, m.slot_id) == (ALICE, DEV, DEFAULT_SLOT_ID)
    assert m.created_ts == 1753000000000  # carried created_ts, not origin_server_ts
    assert m.expires_at == 1753000000000 + 14400000
    assert m.rtc_backend_identity == f"{ALICE}:{DEV}"
    assert m.member_id == f"{ALICE}:{DEV}"
    assert m.transports == (LK,)
    assert m.intent == "video"


def test_created_ts_defaults_to_origin_server_ts_and_expiry_to_4h() -> None:
    content = {k: v for k, v in SPEC_STATE_CONTENT.items() if k not in ("created_ts", "expires")}
    m = parse_membership_event(state_event(content))
    assert isinstance(m, CallMembership)
    assert m.created_ts == 1753000001000
    assert m.expires_at == 1753000001000 + 14400000
    assert not m.is_expired(1753000001000 + 14400000 - 1)
    assert m.is_expired(1753000001000 + 14400000)


def test_state_leave_and_legacy_array() -> None:
    left = parse_membership_event(state_event({}))
    assert left == MembershipLeft(
        key=MembershipKey(Dialect.STATE, ALICE, f"_{ALICE}_{DEV}_m.call"),
        event_id="$e1",
        origin_server_ts=1753000001000,
    )
    legacy = {"memberships": [{"application": "m.call", "call_id": "", "device_id": DEV}]}
    assert classify_content(legacy) is ContentKind.LEGACY_ARRAY
    assert parse_membership_event(state_event(legacy, state_key=ALICE)) is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("device_id", 5),
        ("device_id", None),
        ("call_id", None),
        ("application", ["m.call"]),
        ("focus_active", None),
        ("focus_active", {"focus_selection": "multi_sfu"}),
        ("foci_preferred", [{"livekit_service_url": "x"}]),
        ("foci_preferred", {"type": "livekit"}),
        ("created_ts", "1753000000000"),
        ("scope", 1),
        ("m.call.intent", 1),
        ("m.call.intent", "NULL"),
        ("scope", "NULL"),
        ("created_ts", "NULL"),
        ("created_ts", True),
    ],
)
def test_state_validation_rejects(field: str, value: Any) -> None:
    content = copy.deepcopy(SPEC_STATE_CONTENT)
    if value is None:
        del content[field]
    else:
        content[field] = None if value == "NULL" else value
    assert parse_membership_event(state_event(content)) is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        # js-sdk 43 never type-checks these: a wrong type is not a rejection.
        ("expires", "long"),
        ("expires", None),
        ("expires", -5),
        ("membershipID", 7),
        ("focus_active", {"type": "livekit", "focus_selection": 3}),
        ("focus_active", {"type": "livekit"}),
        # checkSessionsMembershipData wants strings, empty ones included.
        ("device_id", ""),
        ("created_ts", 1753000000000.5),
        ("created_ts", 2**60),
    ],
)
def test_state_validation_accepts_what_js_sdk_accepts(field: str, value: Any) -> None:
    content = copy.deepcopy(SPEC_STATE_CONTENT)
    content[field] = value
    key = f"_{ALICE}_{content['device_id']}_m.call"
    m = parse_membership_event(state_event(content, state_key=key))
    assert isinstance(m, CallMembership), (field, value)


def test_state_for_join_sets_the_room_id_as_livekit_alias() -> None:
    bare = LivekitTransport(livekit_service_url="https://rtc.example.org/livekit/jwt")
    data = SessionMembershipData.for_join(
        user_id=ALICE, device_id=DEV, transports=[bare], room_id="!room:example.org"
    )
    assert data.to_json()["foci_preferred"] == [
        {
            "type": "livekit",
            "livekit_service_url": "https://rtc.example.org/livekit/jwt",
            "livekit_alias": "!room:example.org",
        }
    ]


def test_state_leave_with_only_a_slot_id_is_a_leave() -> None:
    # js-sdk 43 isLeftMembershipContent: nothing but slot_id / msc4354_sticky_key.
    left = parse_membership_event(state_event({"slot_id": "m.call#ROOM"}))
    assert isinstance(left, MembershipLeft)


def test_state_quick_filter_needs_application_and_two_keys() -> None:
    assert classify_content({"application": "m.call"}) is ContentKind.INVALID
    assert classify_content({"device_id": DEV, "call_id": ""}) is ContentKind.INVALID
    no_app = {k: v for k, v in SPEC_STATE_CONTENT.items() if k != "application"}
    assert parse_membership_event(state_event(no_app)) is None


@pytest.mark.parametrize(
    ("sender", "state_key", "room_version", "ok"),
    [
        (ALICE, f"_{ALICE}_{DEV}_m.call", None, True),
        (ALICE, f"_{ALICE}_{DEV}", None, True),  # older EC key without the application
        (ALICE, f"{ALICE}_{DEV}_m.call", "org.matrix.msc3757.11", True),
        (ALICE, f"{ALICE}_{DEV}_m.call", None, True),  # homeserver auth already checked it
        (ALICE, f"{ALICE}_{DEV}_m.call", "12", False),
        (BOB, f"_{ALICE}_{DEV}_m.call", None, False),  # bob overwrote alice's key
        (ALICE, f"_{ALICE}_OTHERDEV_m.call", None, False),  # key names another device
        (ALICE, f"_{ALICE}_{DEV}X_m.call", None, False),
        (ALICE, f"_{ALICE}:evil_{DEV}_m.call", None, False),
        (ALICE, "", None, False),
    ],
)
def test_state_key_must_belong_to_sender_and_device(
    sender: str, state_key: str, room_version: str | None, ok: bool
) -> None:
    content = copy.deepcopy(SPEC_STATE_CONTENT)
    m = parse_membership_event(
        state_event(content, sender=sender, state_key=state_key), room_version
    )
    assert isinstance(m, CallMembership) is ok


def test_bad_event_envelopes() -> None:
    good = state_event(SPEC_STATE_CONTENT)
    cases: list[tuple[str, Any]] = [
        ("sender", "alice"),
        ("sender", None),
        ("event_id", 1),
        ("origin_server_ts", "now"),
        ("origin_server_ts", True),
        ("content", []),
        ("state_key", None),
        ("type", "m.room.message"),
    ]
    for field, value in cases:
        ev = dict(good)
        ev[field] = value
        assert parse_membership_event(ev) is None, field
    assert parse_membership_event([good]) is None
    assert parse_membership_event(None) is None


# ------------------------------------------------------------------------- sticky form


def test_sticky_for_join_and_round_trip() -> None:
    data = RtcMemberData.for_join(
        user_id=ALICE,
        device_id=DEV,
        member_id="6f1c0b6e-uuid",
        transports=[LivekitTransport(livekit_service_url="https://rtc.example.org/livekit/jwt")],
        intent="video",
        previous_event_id="$prev",
    )
    assert data.to_json() == SPEC_STICKY_CONTENT
    assert list(data.to_json()) == list(SPEC_STICKY_CONTENT)  # js-sdk's key order
    assert RtcMemberData.from_json(SPEC_STICKY_CONTENT) == data
    assert sticky_leave_content("6f1c0b6e-uuid") == {
        "slot_id": "m.call#ROOM",
        "msc4354_sticky_key": "6f1c0b6e-uuid",
    }


def test_sticky_for_join_advertises_mesh_in_can_subscribe() -> None:
    lk = LivekitTransport(livekit_service_url="https://rtc.example.org/livekit/jwt")
    data = RtcMemberData.for_join(
        user_id=ALICE, device_id=DEV, member_id="m", transports=[lk, FullMeshTransport()]
    )
    assert data.to_json()["transports"] == {
        "published": [lk.to_json(), {"type": "org.matrix.msc3401.full_mesh"}],
        "can_subscribe": ["livekit", "org.matrix.msc3401.full_mesh"],
    }


def test_old_rtc_transports_shape_is_still_read() -> None:
    m = parse_membership_event(sticky_event(copy.deepcopy(OLD_STICKY_CONTENT)))
    assert isinstance(m, CallMembership)
    assert isinstance(m.data, RtcMemberData)
    assert m.data.transports.shape is TransportsShape.RTC_TRANSPORTS
    assert m.transports == (
        LivekitTransport(livekit_service_url="https://rtc.example.org/livekit/jwt"),
    )
    # An explicit (even null) `transports` is judged by the current rules only.
    broken = {**OLD_STICKY_CONTENT, "transports": None}
    assert parse_membership_event(sticky_event(broken)) is None


def test_parse_sticky_event() -> None:
    m = parse_membership_event(sticky_event(SPEC_STICKY_CONTENT))
    assert isinstance(m, CallMembership)
    assert m.dialect is Dialect.STICKY
    assert m.key == MembershipKey(Dialect.STICKY, ALICE, "6f1c0b6e-uuid")
    assert m.created_ts == 1753000002000
    assert m.expires_at is None
    assert m.member_id == "6f1c0b6e-uuid"
    assert m.rtc_backend_identity == livekit_identity(ALICE, DEV, "6f1c0b6e-uuid")
    assert m.focus_active is None


def test_sticky_leave() -> None:
    left = parse_membership_event(sticky_event({"msc4354_sticky_key": "k"}))
    assert left == MembershipLeft(
        key=MembershipKey(Dialect.STICKY, ALICE, "k"),
        event_id="$s1",
        origin_server_ts=1753000002000,
    )


def test_sticky_member_must_be_sender() -> None:
    assert parse_membership_event(sticky_event(SPEC_STICKY_CONTENT, sender=BOB)) is None


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c.update(slot_id="m.call"),
        lambda c: c.update(slot_id="m.call#ROOM#2"),
        lambda c: c.update(slot_id="other#ROOM"),
        lambda c: c["application"].update(type="m.call#x"),
        lambda c: c["application"].update(type=3),
        lambda c: c["member"].update(user_id="alice"),
        lambda c: c["member"].update(device_id=None),
        lambda c: c["member"].pop("id"),
        lambda c: c["transports"].update(published=[{"url": "x"}]),
        lambda c: c["transports"].update(published={"type": "livekit"}),
        lambda c: c["transports"].pop("published"),
        lambda c: c["transports"].pop("can_subscribe"),
        lambda c: c["transports"].update(can_subscribe=[1]),
        lambda c: c["transports"].update(can_subscribe="livekit"),
        lambda c: c.update(transports=[]),
        lambda c: c.pop("transports"),
        lambda c: c.update(sticky_key=None),
        lambda c: c.update(msc4354_sticky_key=None),
        lambda c: c["member"].update(user_id="@bob:example.org"),
        lambda c: c.update(versions=[1]),
        lambda c: c.pop("versions"),
        lambda c: c.pop("msc4354_sticky_key"),
        lambda c: c.update(sticky_key="other"),
        lambda c: c.update({"m.relates_to": {"rel_type": "m.thread", "event_id": "$x"}}),
        lambda c: c.update({"m.relates_to": {"rel_type": "m.reference"}}),
    ],
)
def test_sticky_validation_rejects(mutate: Any) -> None:
    content = copy.deepcopy(SPEC_STICKY_CONTENT)
    mutate(content)
    assert parse_membership_event(sticky_event(content)) is None


def test_sticky_accepts_stable_key_equal_to_unstable() -> None:
    content = {**SPEC_STICKY_CONTENT, "sticky_key": "6f1c0b6e-uuid"}
    assert isinstance(parse_membership_event(sticky_event(content)), CallMembership)


# ---------------------------------------------------------------------------- transports


def test_transports_parse() -> None:
    assert parse_transport({"type": "livekit", "livekit_service_url": "u"}) == LivekitTransport(
        livekit_service_url="u"
    )
    assert parse_transport({"type": "org.matrix.msc3401.full_mesh"}) == FullMeshTransport()
    odd = {"type": "com.example.sfu", "url": "x", "n": [1, 2]}
    t = parse_transport(odd)
    assert isinstance(t, UnknownTransport)
    assert t.type == "com.example.sfu"
    assert t.to_json() == odd
    assert parse_transport({"type": "com.example.sfu", "n": [1, 2], "url": "x"}) == t
    # A livekit entry without a usable URL is kept verbatim, not promoted to LivekitTransport.
    assert isinstance(parse_transport({"type": "livekit"}), UnknownTransport)
    assert parse_transport({"type": 1}) is None
    assert parse_transport("livekit") is None
    same = LivekitTransport(
        livekit_service_url=LK.livekit_service_url, livekit_alias="!room:example.org"
    )
    assert len({LK, same}) == 1


def test_rejections_are_logged_with_reasons() -> None:
    log = RejectionLog()
    with capture_logs() as logs:
        forged = state_event(
            copy.deepcopy(SPEC_STATE_CONTENT), sender=BOB, state_key=f"_{ALICE}_{DEV}_m.call"
        )
        assert parse_membership_event(forged, rejections=log) is None
        invalid = state_event({"application": "m.call"})
        assert parse_membership_event(invalid, rejections=log) is None
    levels = {(e["log_level"], e["reason"]) for e in logs if e["event"] == "membership_rejected"}
    # Every rejected membership is logged at info (issue 12), with sender and field.
    assert all(e["sender"] for e in logs if e["event"] == "membership_rejected")
    assert ("info", "state key does not belong to the sender") in levels
    assert ("info", "content is invalid") in levels


def test_rejection_names_sender_field_and_reason() -> None:
    content = copy.deepcopy(SPEC_STICKY_CONTENT)
    content["transports"]["can_subscribe"] = [1]
    with capture_logs() as logs:
        assert parse_membership_event(sticky_event(content), rejections=RejectionLog()) is None
    [line] = [e for e in logs if e["event"] == "membership_rejected"]
    assert line["log_level"] == "info"
    assert line["sender"] == ALICE
    assert line["field"] == "transports.can_subscribe"
    assert line["reason"] == "transports.can_subscribe is not an array of strings"
    assert line["event_id"] == "$s1"
    assert line["kind"] == "org.matrix.msc4143.rtc.member"


def test_rejections_are_rate_limited_per_sender() -> None:
    now = [0.0]
    log = RejectionLog(interval_s=60.0, burst=2, clock=lambda: now[0])
    bad = copy.deepcopy(SPEC_STICKY_CONTENT)
    bad["versions"] = [1]
    bob_bad = copy.deepcopy(bad)
    bob_bad["member"]["user_id"] = BOB
    with capture_logs() as logs:
        for _ in range(10):
            parse_membership_event(sticky_event(bad), rejections=log)
        parse_membership_event(sticky_event(bob_bad, sender=BOB), rejections=log)
        now[0] = 61.0
        parse_membership_event(sticky_event(bad), rejections=log)
    lines = [e for e in logs if e["event"] == "membership_rejected"]
    assert [e["sender"] for e in lines] == [ALICE, ALICE, BOB, ALICE]
    assert lines[-1]["suppressed_before"] == 8
