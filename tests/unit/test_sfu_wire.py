"""Request decoding follows Go's encoding/json + DisallowUnknownFields, and never raises."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from sfu.auth.wire import (
    ClaimedMember,
    LegacySFURequest,
    OpenIDToken,
    SFURequest,
    decode_delegate,
    decode_get_token,
    decode_legacy,
    validate_delegate,
    validate_get_token,
    validate_legacy,
)

TOKEN = {
    "access_token": "tok",
    "token_type": "Bearer",
    "matrix_server_name": "example.org",
    "expires_in": 3600,
}
MEMBER = {"id": "m1", "claimed_user_id": "@a:example.org", "claimed_device_id": "DEV"}
GOOD = {
    "room_id": "!r:example.org",
    "slot_id": "m.call#ROOM",
    "openid_token": TOKEN,
    "member": MEMBER,
}


def enc(obj: object) -> bytes:
    return json.dumps(obj).encode()


def test_valid_body_decodes() -> None:
    req = decode_get_token(enc(GOOD))
    assert req == SFURequest(
        room_id="!r:example.org",
        slot_id="m.call#ROOM",
        openid_token=OpenIDToken("tok", "Bearer", "example.org", 3600),
        member=ClaimedMember("m1", "@a:example.org", "DEV"),
    )
    assert validate_get_token(req) is None


def test_unknown_fields_are_rejected_top_level_and_nested() -> None:
    assert decode_get_token(enc({**GOOD, "extra": 1})) is None
    assert decode_get_token(enc({**GOOD, "member": {**MEMBER, "x": "y"}})) is None
    assert decode_get_token(enc({**GOOD, "openid_token": {**TOKEN, "scope": ""}})) is None
    # the legacy body's fields are unknown to /get_token and vice versa
    assert decode_get_token(enc({**GOOD, "device_id": "D"})) is None
    assert decode_legacy(enc({**GOOD})) is None


def test_keys_match_case_insensitively_like_go() -> None:
    req = decode_get_token(b'{"ROOM_ID": "!x:y", "room_id": "!r:example.org"}')
    assert req is not None
    assert req.room_id == "!r:example.org"
    req = decode_get_token(b'{"room_id": "!r:example.org", "Room_ID": "!x:y"}')
    assert req is not None
    assert req.room_id == "!x:y"
    req = decode_get_token(enc({**GOOD, "Slot_Id": "s"}))
    assert req is not None
    assert req.slot_id == "s"


def test_types_nulls_and_numbers() -> None:
    assert decode_get_token(enc({**GOOD, "room_id": 5})) is None
    assert decode_get_token(enc({**GOOD, "member": "x"})) is None
    assert decode_get_token(enc({**GOOD, "delay_timeout": 1.5})) is None
    assert decode_get_token(b'{"delay_timeout": 1e3}') is None
    assert decode_get_token(enc({**GOOD, "delay_timeout": 2**63})) is None
    assert decode_get_token(enc({**GOOD, "delay_timeout": True})) is None
    assert decode_get_token(b'{"delay_timeout": NaN}') is None
    req = decode_get_token(enc({**GOOD, "room_id": None, "member": None}))
    assert req is not None
    assert req.room_id == ""
    assert req.member == ClaimedMember()
    assert decode_get_token(b"null") == SFURequest()
    assert decode_get_token(b"[]") is None
    assert decode_get_token(b"") is None
    assert decode_get_token(b"{") is None


def test_only_the_first_value_is_read() -> None:
    req = decode_get_token(enc(GOOD) + b" trailing garbage")
    assert req is not None
    assert req.room_id == "!r:example.org"


def test_lone_surrogates_become_replacement_characters() -> None:
    req = decode_get_token(b'{"room_id": "a\\ud800b"}')
    assert req is not None
    assert req.room_id == "a\ufffdb"


def test_validation_messages_match_lk_jwt_service() -> None:
    def v(body: dict[str, object]) -> tuple[int, str, str] | None:
        req = decode_get_token(enc(body))
        assert req is not None
        err = validate_get_token(req)
        return None if err is None else (err.status, err.errcode, err.error)

    assert v({**GOOD, "slot_id": ""}) == (
        400,
        "M_BAD_JSON",
        "The request body is missing `room_id` or `slot_id`",
    )
    for field in MEMBER:
        assert v({**GOOD, "member": {**MEMBER, field: ""}}) == (
            400,
            "M_BAD_JSON",
            "The request body `member` is missing a `id`, `claimed_user_id` or `claimed_device_id`",
        )
    for field in ("access_token", "matrix_server_name"):
        assert v({**GOOD, "openid_token": {**TOKEN, field: ""}}) == (
            400,
            "M_BAD_JSON",
            "The request body `openid_token` is missing a `access_token` or `matrix_server_name`",
        )
    delay_err = (400, "M_BAD_JSON", "The request body is missing `delay_id` or `delay_timeout`")
    assert v({**GOOD, "delay_id": "d"}) == delay_err
    assert v({**GOOD, "delay_timeout": 5}) == delay_err
    assert v({**GOOD, "delay_id": "d", "delay_timeout": 5}) is None


def test_delegate_requires_delay_and_legacy_messages() -> None:
    req = decode_delegate(enc(GOOD))
    assert req is not None
    err = validate_delegate(req)
    assert err is not None
    assert err.error == "The request body is missing `delay_id` or `delay_timeout`"
    legacy = decode_legacy(enc({"room": "", "openid_token": TOKEN, "device_id": "D"}))
    assert legacy is not None
    assert validate_legacy(legacy) is not None
    assert validate_legacy(LegacySFURequest(room="!r", openid_token=OpenIDToken())) is not None
    ok = LegacySFURequest(room="!r", openid_token=OpenIDToken("t", "", "hs", 0), device_id="D")
    assert validate_legacy(ok) is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [*GOOD, "room", "device_id", "delay_id", "x", "ROOM_ID", *TOKEN, *MEMBER]
            ),
            children,
            max_size=5,
        )
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=64)))
def test_decoders_never_raise(raw: bytes) -> None:
    for decode in (decode_get_token, decode_legacy, decode_delegate):
        decode(raw)
