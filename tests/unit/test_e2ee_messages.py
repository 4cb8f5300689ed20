"""Key messages: io.element.call.encryption_keys (read/write) and the MSC4143 draft (read)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from matrixrtc.e2ee.messages import (
    ELEMENT_CALL_KEYS_TYPE,
    ElementCallKeys,
    decode_key,
    encode_key,
    parse_key_message,
)

ROOM = "!room:example.org"
KEY = bytes.fromhex("abcdef0123456789abcdef0123456789")

# As matrix-js-sdk's ToDeviceKeyTransport.sendKey builds it (spec/matrixrtc.md §4.2).
JS_CONTENT: dict[str, Any] = {
    "keys": {"index": 0, "key": "q83vEjRWeJq8zN7vASNFZw=="},
    "room_id": ROOM,
    "member": {"claimed_device_id": "ABCDEFGH", "id": "c0ffee-uuid"},
    "session": {"call_id": "", "application": "m.call", "scope": "m.room"},
    "sent_ts": 1753000000000,
}


def test_js_sdk_content_parses() -> None:
    ec = ElementCallKeys.from_json(JS_CONTENT, room_id=ROOM)
    assert ec is not None
    assert ec.index == 0
    assert ec.key == base64.b64decode("q83vEjRWeJq8zN7vASNFZw==")
    assert (ec.claimed_device_id, ec.member_id, ec.sent_ts) == (
        "ABCDEFGH",
        "c0ffee-uuid",
        1753000000000,
    )


def test_serialise_matches_js_shape_and_round_trips() -> None:
    ec = ElementCallKeys(
        room_id=ROOM, index=7, key=KEY, claimed_device_id="DEV", member_id="m1", sent_ts=5
    )
    content = ec.to_json()
    assert json.loads(json.dumps(content)) == {
        "keys": {"index": 7, "key": "q83vASNFZ4mrze8BI0VniQ=="},
        "room_id": ROOM,
        "member": {"claimed_device_id": "DEV", "id": "m1"},
        "session": {"call_id": "", "application": "m.call", "scope": "m.room"},
        "sent_ts": 5,
    }
    assert ElementCallKeys.from_json(content) == ec
    rk = parse_key_message(ELEMENT_CALL_KEYS_TYPE, content, room_id=ROOM)
    assert rk is not None
    assert (rk.index, rk.key, rk.member_id, rk.claimed_device_id) == (7, KEY, "m1", "DEV")


def test_missing_member_id_falls_back_to_sender_and_device() -> None:
    content = {**JS_CONTENT, "member": {"claimed_device_id": "DEV"}}
    rk = parse_key_message(ELEMENT_CALL_KEYS_TYPE, content)
    assert rk is not None
    assert rk.member_id is None
    assert rk.member_id_for("@a:hs", "DEV") == "@a:hs:DEV"


@pytest.mark.parametrize(
    "change",
    [
        {"room_id": "!other:example.org"},
        {"room_id": None},
        {"keys": [{"index": 0, "key": "q83vEjRWeJq8zN7vASNFZw=="}]},  # the removed room-event form
        {"keys": {"index": "0", "key": "q83vEjRWeJq8zN7vASNFZw=="}},
        {"keys": {"index": 256, "key": "q83vEjRWeJq8zN7vASNFZw=="}},
        {"keys": {"index": 1.5, "key": "q83vEjRWeJq8zN7vASNFZw=="}},
        {"keys": {"index": True, "key": "q83vEjRWeJq8zN7vASNFZw=="}},
        {"keys": {"index": 0, "key": ""}},
        {"keys": {"index": 0, "key": "not base64!"}},
        {"keys": {"index": 0, "key": encode_key(bytes(65))}},
        {"member": {"id": "x"}},
        {"member": "DEV"},
    ],
)
def test_invalid_element_call_keys_are_dropped(change: dict[str, Any]) -> None:
    assert ElementCallKeys.from_json({**JS_CONTENT, **change}, room_id=ROOM) is None


def test_session_is_not_checked_on_receive() -> None:
    ec = ElementCallKeys.from_json({**JS_CONTENT, "session": "whatever"})
    assert ec is not None
    assert (ec.call_id, ec.application, ec.scope) == ("", "m.call", "m.room")


_JS_KEY = base64.b64decode("q83vEjRWeJq8zN7vASNFZw==")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("q83vEjRWeJq8zN7vASNFZw==", _JS_KEY),
        ("q83vEjRWeJq8zN7vASNFZw", _JS_KEY),  # unpadded
        ("q83vEjRWeJq8zN7vASNFZw=", _JS_KEY),  # short padding
        ("-_-_", base64.b64decode("+/+/")),  # URL-safe alphabet
        ("", None),
        ("====", None),
        ("a", None),
        ("a$bc", None),
    ],
)
def test_decode_key_is_lenient_like_js(text: str, expected: bytes | None) -> None:
    assert decode_key(text) == expected


@pytest.mark.parametrize(
    "member",
    [{"member_id": "mid"}, {"member.id": "mid"}, {"member": {"id": "mid"}}],
)
@pytest.mark.parametrize("etype", ["m.rtc.encryption_key", "org.matrix.msc4143.rtc.encryption_key"])
def test_draft_key_message(member: dict[str, Any], etype: str) -> None:
    key32 = bytes(range(32))
    content = {
        "room_id": ROOM,
        "slot_id": "m.call#ROOM",
        "media_key": {
            "index": 10,
            "key": base64.b64encode(key32).decode().rstrip("="),
            "format": 0,
        },
        **member,
    }
    rk = parse_key_message(etype, content, room_id=ROOM)
    assert rk is not None
    assert (rk.index, rk.key, rk.member_id, rk.claimed_device_id, rk.dialect) == (
        10,
        key32,
        "mid",
        None,
        etype,
    )
    assert (
        parse_key_message(etype, {**content, "media_key": {**content["media_key"], "format": 1}})
        is None
    )
    assert parse_key_message(etype, {**content, "room_id": "!x:y"}, room_id=ROOM) is None


def test_other_types_are_not_key_messages() -> None:
    assert parse_key_message("m.room_key", JS_CONTENT) is None


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**60), 2**60) | st.floats() | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=20,
)


@settings(deadline=None)
@given(
    st.sampled_from([ELEMENT_CALL_KEYS_TYPE, "m.rtc.encryption_key"]),
    _json
    | st.fixed_dictionaries({"keys": _json, "room_id": _json, "member": _json, "media_key": _json}),
)
def test_parsers_never_raise(etype: str, content: Any) -> None:
    rk = parse_key_message(etype, content)
    if rk is not None:
        assert 0 <= rk.index <= 255
        assert 0 < len(rk.key) <= 64
