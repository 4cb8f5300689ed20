"""Request decoding is as strict as lk-jwt-service's Rust port (serde_json), and never raises."""

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


def test_keys_in_another_case_are_unknown() -> None:
    """Go folds key case (and the project copied that); serde matches keys exactly."""
    assert decode_get_token(b'{"ROOM_ID": "!x:y", "room_id": "!r:example.org"}') is None
    assert decode_get_token(enc({**GOOD, "Slot_Id": "s"})) is None
    assert decode_get_token(enc({**GOOD, "member": {**MEMBER, "ID": "m"}})) is None
    assert decode_get_token(enc({**GOOD, "openid_token": {**TOKEN, "Expires_In": 1}})) is None
    assert decode_legacy(b'{"ROOM": "!r:x"}') is None
    assert decode_get_token('{"\u017flot_id": "s"}'.encode()) is None  # Go folds U+017F to "s"


def test_duplicate_keys_are_rejected() -> None:
    assert decode_get_token(b'{"room_id": "!a:x", "room_id": "!b:x"}') is None
    assert decode_get_token(b'{"member": {"id": "a", "id": "b"}}') is None
    assert decode_legacy(b'{"room": "!r:x", "device_id": "D", "device_id": "D"}') is None


def test_types_nulls_and_numbers() -> None:
    assert decode_get_token(enc({**GOOD, "room_id": 5})) is None
    assert decode_get_token(enc({**GOOD, "member": "x"})) is None
    assert decode_get_token(enc({**GOOD, "delay_timeout": 1.5})) is None
    assert decode_get_token(b'{"delay_timeout": 1e3}') is None
    assert decode_get_token(enc({**GOOD, "delay_timeout": 2**63})) is None
    assert decode_get_token(enc({**GOOD, "delay_timeout": True})) is None
    assert decode_get_token(b'{"delay_timeout": NaN}') is None
    # serde's #[serde(default)] covers absent fields only: null is the wrong type
    assert decode_get_token(enc({**GOOD, "room_id": None})) is None
    assert decode_get_token(enc({**GOOD, "member": None})) is None
    assert decode_get_token(enc({**GOOD, "delay_timeout": None})) is None
    assert decode_get_token(b"null") is None
    assert decode_get_token(b"{}") == SFURequest()
    assert decode_get_token(b" \r\n\t{}\n ") == SFURequest()
    assert decode_get_token(b"[]") is None
    assert decode_get_token(b"") is None
    assert decode_get_token(b"{") is None


def test_trailing_data_is_rejected() -> None:
    assert decode_get_token(enc(GOOD) + b" trailing garbage") is None
    assert decode_get_token(enc(GOOD) + enc(GOOD)) is None  # a second object
    assert decode_get_token(enc(GOOD) + b"\n{}") is None
    assert decode_get_token(enc(GOOD) + b"\x00") is None
    assert decode_get_token(enc(GOOD) + b"\x0c") is None  # form feed is not JSON whitespace
    assert decode_get_token(enc(GOOD) + b" \n\r\t") is not None


def test_lone_surrogates_and_invalid_utf8_are_rejected() -> None:
    assert decode_get_token(b'{"room_id": "a\\ud800b"}') is None
    assert decode_get_token(b'{"room_id": "a\\udc00"}') is None
    assert decode_get_token(b'{"room_id": "\\ud800\\ud800"}') is None
    req = decode_get_token(b'{"room_id": "\\ud83d\\ude00"}')  # a pair is one code point
    assert req is not None
    assert req.room_id == "\U0001f600"
    assert decode_get_token(b'{"room_id": "a\xffb"}') is None
    assert decode_get_token(b'{"room_id": "\xed\xa0\x80"}') is None  # UTF-8-encoded surrogate
    assert decode_get_token(b'{"room_id": "\xc0\xaf"}') is None  # overlong
    assert decode_get_token(b"\xef\xbb\xbf{}") is None  # BOM
    assert decode_get_token('{"room_id": "!r\u00e9:x"}'.encode()) is not None


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


# -- property tests over malformed bodies ------------------------------------------------------

_texts = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
_tokens = st.fixed_dictionaries(
    {},
    optional={
        "access_token": _texts,
        "token_type": _texts,
        "matrix_server_name": _texts,
        "expires_in": st.integers(-(2**63), 2**63 - 1),
    },
)
_members = st.fixed_dictionaries(
    {}, optional={"id": _texts, "claimed_user_id": _texts, "claimed_device_id": _texts}
)
valid_bodies = st.fixed_dictionaries(
    {},
    optional={
        "room_id": _texts,
        "slot_id": _texts,
        "openid_token": _tokens,
        "member": _members,
        "delay_id": _texts,
        "delay_timeout": st.integers(-(2**63), 2**63 - 1),
        "delay_cs_api_url": _texts,
    },
)
_ws = st.text(st.sampled_from(" \t\r\n"), max_size=3)


@settings(max_examples=200, deadline=None)
@given(valid_bodies, _ws, _ws, st.booleans())
def test_valid_bodies_decode(
    body: dict[str, object], before: str, after: str, ascii_: bool
) -> None:
    raw = before.encode() + json.dumps(body, ensure_ascii=ascii_).encode() + after.encode()
    req = decode_get_token(raw)
    assert req is not None
    assert req.room_id == body.get("room_id", "")
    assert req.member.id == body.get("member", {}).get("id", "")  # type: ignore[attr-defined]


def _paths(obj: dict[str, object], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for key, value in obj.items():
        out.append((*prefix, key))
        if isinstance(value, dict):
            out.extend(_paths(value, (*prefix, key)))
    return out


@st.composite
def malformed(draw: st.DrawFn) -> bytes:
    """A valid body with one defect the Rust port refuses."""
    body = draw(valid_bodies.filter(bool))
    text = json.dumps(body)
    kind = draw(
        st.sampled_from(["trailing", "second", "duplicate", "case", "surrogate", "utf8", "null"])
    )
    if kind == "trailing":
        junk = draw(st.text(min_size=1, max_size=5).filter(lambda t: t.strip(" \t\r\n")))
        return (text + draw(_ws) + junk).encode("utf-8", "surrogatepass")
    if kind == "second":
        return (text + draw(_ws) + json.dumps(draw(valid_bodies))).encode()
    path = draw(st.sampled_from(_paths(body)))
    parent: dict[str, object] = body
    for key in path[:-1]:
        parent = parent[key]  # type: ignore[assignment]
    leaf = path[-1]
    if kind == "duplicate":
        dup = json.dumps({leaf: parent[leaf]})[1:-1]
        inner = json.dumps(parent)
        patched = "{" + dup + ", " + inner[1:]
        return text.replace(inner, patched, 1).encode() if path[:-1] else patched.encode()
    if kind == "case":
        letters = [i for i, ch in enumerate(leaf) if ch.isalpha()]
        flip = draw(st.lists(st.sampled_from(letters), min_size=1, unique=True))
        other = "".join(ch.upper() if i in flip else ch for i, ch in enumerate(leaf))
        parent[other] = parent.pop(leaf)
        return json.dumps(body).encode()
    if kind == "null":
        parent[leaf] = None
        return json.dumps(body).encode()
    # a defect inside a string value
    strings = [p for p in _paths(body) if isinstance(_get(body, p), str)]
    if not strings:
        return (text + " x").encode()
    path = draw(st.sampled_from(strings))
    value = _get(body, path)
    assert isinstance(value, str)
    at = draw(st.integers(0, len(value)))
    marker = "\x00MARK\x00"
    _set(body, path, value[:at] + marker + value[at:])
    raw = json.dumps(body).encode()  # the marker is escaped as \u0000MARK\u0000
    esc = json.dumps(marker)[1:-1].encode()
    if kind == "surrogate":
        lone = draw(st.integers(0xD800, 0xDFFF))
        repl = f"\\u{lone:04x}".encode()
        if lone < 0xDC00:  # a high surrogate followed by anything but a low one
            repl += draw(st.sampled_from([b"", b"a", b"\\u0041", b"\\ud800"]))
        return raw.replace(esc, repl)
    bad = draw(st.sampled_from([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\x80"]))
    return raw.replace(esc, bad)


def _get(obj: dict[str, object], path: tuple[str, ...]) -> object:
    cur: object = obj
    for key in path:
        cur = cur[key]  # type: ignore[index]
    return cur


def _set(obj: dict[str, object], path: tuple[str, ...], value: object) -> None:
    parent = _get(obj, path[:-1])
    parent[path[-1]] = value  # type: ignore[index]


@settings(max_examples=400, deadline=None)
@given(malformed())
def test_malformed_bodies_are_not_json(raw: bytes) -> None:
    for decode in (decode_get_token, decode_delegate):
        assert decode(raw) is None, raw
