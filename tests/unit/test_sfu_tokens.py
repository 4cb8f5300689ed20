"""Join tokens: the fast signer produces livekit-api AccessToken's claims, verifiably signed."""

from __future__ import annotations

import time
from datetime import timedelta

import jwt
import pytest
from livekit import api as lkapi

from sfu.auth.livekit import TOKEN_TTL_SECONDS, JoinTokenSigner

KEY, SECRET = "APIkey", "a-secret-of-sufficient-length-0123456789"


def reference(room: str, identity: str) -> str:
    grants = lkapi.VideoGrants(
        room_join=True,
        room_create=False,
        room=room,
        can_publish=True,
        can_subscribe=True,
        can_update_own_metadata=True,
    )
    return (
        lkapi.AccessToken(KEY, SECRET)
        .with_identity(identity)
        .with_grants(grants)
        .with_ttl(timedelta(hours=1))
        .to_jwt()
    )


def test_claims_equal_access_token_and_verify() -> None:
    now = int(time.time())
    signer = JoinTokenSigner(KEY, SECRET, clock=lambda: now)
    room, identity = "RL0NAaBlbtNXUrJjOBJGuyvSwjBrnisJ4VKWofgtY/k", "@a<b>:hs:DÉV"
    ours = signer.sign(room, identity)
    theirs = reference(room, identity)
    mine = jwt.decode(ours, options={"verify_signature": False})
    ref = jwt.decode(theirs, options={"verify_signature": False})
    assert abs(ref["nbf"] - mine["nbf"]) <= 2
    for claims in (mine, ref):
        claims.pop("nbf")
        claims["ttl"] = claims.pop("exp") - now
    assert mine == ref
    assert mine["ttl"] == TOKEN_TTL_SECONDS
    assert mine["video"]["room"] == room
    assert mine["sub"] == identity
    assert mine["video"]["roomCreate"] is False
    verified = lkapi.TokenVerifier(KEY, SECRET).verify(ours)
    assert verified.identity == identity
    assert verified.video is not None
    assert verified.video.room_join
    assert verified.video.room == room
    assert jwt.get_unverified_header(ours) == {"alg": "HS256", "typ": "JWT"}


def test_wrong_secret_does_not_verify() -> None:
    token = JoinTokenSigner(KEY, "another-secret-of-sufficient-length-000").sign("r", "i")
    with pytest.raises(jwt.InvalidSignatureError):
        lkapi.TokenVerifier(KEY, SECRET).verify(token)
