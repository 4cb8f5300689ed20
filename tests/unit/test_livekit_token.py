"""LiveKit transport, pure parts: token-response and JWT parsers, URL check, request bodies,
and which SFUs a membership list makes us connect to (oldest_membership / multi_sfu)."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from livekit import api as lkapi

from matrixrtc.livekit.token import (
    Endpoint,
    get_token_body,
    jwt_claims,
    parse_credentials,
    sfu_get_body,
    valid_sfu_url,
)
from matrixrtc.livekit.transport import plan_connections
from matrixrtc.matrix.homeserver import OpenIdToken
from matrixrtc.model.membership import (
    CallMembership,
    Dialect,
    RtcMemberData,
    SessionMembershipData,
)
from matrixrtc.model.transports import LivekitTransport

OPENID = OpenIdToken("tok", "Bearer", "example.org", 3600)


def real_jwt(identity: str = "@a:hs:DEV", room: str = "roomalias") -> str:
    return (
        lkapi.AccessToken("key", "secret-" + "x" * 32)
        .with_identity(identity)
        .with_grants(lkapi.VideoGrants(room_join=True, room=room))
        .with_ttl(timedelta(hours=1))
        .to_jwt()
    )


def b64url(obj: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")


# ---------------------------------------------------------------------------------- parsers
def test_claims_of_a_livekit_api_token() -> None:
    claims = jwt_claims(real_jwt("ident+/=", "r+/oom"))
    assert claims is not None
    assert (claims.identity, claims.room) == ("ident+/=", "r+/oom")


def test_credentials_parse_and_reject() -> None:
    jwt = real_jwt()
    ok = parse_credentials({"url": "wss://sfu.example.org", "jwt": jwt, "x": 1}, Endpoint.SFU_GET)
    assert ok is not None
    assert (ok.url, ok.identity, ok.room, ok.endpoint) == (
        "wss://sfu.example.org",
        "@a:hs:DEV",
        "roomalias",
        Endpoint.SFU_GET,
    )
    assert jwt not in repr(ok)  # the token never shows in logs
    for url in (
        "file:///etc/passwd",
        "javascript:alert(1)",
        "wss://",
        "wss://user:pw@sfu.example.org",
        "wss://sfu.example.org:99999",
        "wss://sfu.example.org/\nx",
        "",
        7,
    ):
        assert parse_credentials({"url": url, "jwt": jwt}, Endpoint.AUTO) is None, url
    assert parse_credentials({"url": "ws://127.0.0.1:7880"}, Endpoint.AUTO) is None
    assert parse_credentials(["ws://x", jwt], Endpoint.AUTO) is None
    for bad in (
        "a.b",
        "a.b.c.d",
        f"h.{b64url({'sub': 'x'})}.s",  # no video.room
        f"h.{b64url({'video': {'room': 'r'}})}.s",  # no sub
        f"h.{b64url({'sub': 1, 'video': {'room': 'r'}})}.s",
        f"h.{b64url(['sub'])}.s",
        "h.!!!.s",
        "h..s",
    ):
        assert jwt_claims(bad) is None, bad


@settings(max_examples=300)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
        max_leaves=20,
    )
)
def test_parsers_never_raise(obj: object) -> None:
    parse_credentials(obj, Endpoint.AUTO)
    parse_credentials({"url": "wss://x.example", "jwt": obj}, Endpoint.AUTO)
    jwt_claims(obj)
    jwt_claims(f"h.{b64url(obj)}.s")
    if isinstance(obj, str):
        valid_sfu_url(obj)
        jwt_claims(obj)


@given(st.text(max_size=60))
def test_only_websocket_and_http_urls_with_a_host(url: str) -> None:
    if valid_sfu_url(url):
        scheme, _, rest = url.partition("://")
        assert scheme.lower() in {"ws", "wss", "http", "https"}
        assert rest
        assert not any(c.isspace() for c in url)


@given(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40))
def test_claims_round_trip(identity: str, room: str) -> None:
    claims = jwt_claims(real_jwt(identity, room))
    assert claims is not None
    assert (claims.identity, claims.room) == (identity, room)


def test_request_bodies() -> None:
    body = get_token_body(
        room_id="!r:hs", user_id="@a:hs", device_id="DEV", member_id="m", openid=OPENID
    )
    assert body == {
        "room_id": "!r:hs",
        "slot_id": "m.call#ROOM",
        "openid_token": {
            "access_token": "tok",
            "token_type": "Bearer",
            "matrix_server_name": "example.org",
            "expires_in": 3600,
        },
        "member": {"id": "m", "claimed_user_id": "@a:hs", "claimed_device_id": "DEV"},
    }
    legacy = sfu_get_body(
        room_id="!r:hs", device_id="DEV", openid=OPENID, delay_id="d", delay_timeout_ms=8000
    )
    assert legacy == {
        "room": "!r:hs",
        "openid_token": body["openid_token"],
        "device_id": "DEV",
        "delay_id": "d",
        "delay_timeout": 8000,
    }


# ---------------------------------------------------------------------------------- plans
A, B, C = (LivekitTransport(livekit_service_url=f"https://{n}.example/jwt") for n in "abc")


def state(user: str, ts: int, sfu: LivekitTransport, *, multi: bool = True) -> CallMembership:
    return CallMembership(
        dialect=Dialect.STATE,
        event_id=f"$s{user}",
        sender=f"@{user}:hs",
        origin_server_ts=ts,
        data=SessionMembershipData.for_join(
            user_id=f"@{user}:hs", device_id="D", transports=[sfu], multi_sfu=multi, created_ts=ts
        ),
        state_key=f"_@{user}:hs_D_m.call",
    )


def sticky(user: str, ts: int, sfu: LivekitTransport) -> CallMembership:
    return CallMembership(
        dialect=Dialect.STICKY,
        event_id=f"$k{user}",
        sender=f"@{user}:hs",
        origin_server_ts=ts,
        data=RtcMemberData.for_join(
            user_id=f"@{user}:hs", device_id="D", member_id=f"m-{user}", transports=[sfu]
        ),
    )


def test_multi_sfu_publishes_on_own_and_subscribes_to_every_other_sfu() -> None:
    ms = [state("x", 1, A), state("y", 2, B), sticky("z", 3, C), state("w", 4, B)]
    plan = plan_connections(ms, ms[1])
    assert dict(plan.connections) == {B: True, A: False, C: False}
    assert plan.publish_on == B


def test_oldest_membership_is_one_connection_on_the_oldest_sfu() -> None:
    ms = [state("x", 1, A, multi=False), state("y", 2, B, multi=False)]
    assert dict(plan_connections(ms, ms[1]).connections) == {A: True}
    assert dict(plan_connections(ms, ms[0]).connections) == {A: True}


def test_alias_and_trailing_slash_do_not_split_an_sfu() -> None:
    aliased = LivekitTransport(livekit_service_url=A.livekit_service_url + "/", livekit_alias="!r")
    ms = [state("x", 1, aliased), state("y", 2, A)]
    assert dict(plan_connections(ms, ms[1]).connections) == {A: True}


def test_not_in_the_call_yet_subscribes_only() -> None:
    ms = [state("x", 1, A), sticky("z", 2, C)]
    plan = plan_connections(ms, None)
    assert dict(plan.connections) == {A: False, C: False}
    assert plan.publish_on is None
