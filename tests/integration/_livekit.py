"""Helpers for tests that talk to the session's LiveKit server directly."""

from __future__ import annotations

from livekit import api

from matrixrtc.devstack import LiveKit


def join_token(lk: LiveKit, room: str, identity: str) -> str:
    """An access token that lets ``identity`` join ``room`` on ``lk``."""
    return (
        api.AccessToken(lk.api_key, lk.api_secret)
        .with_identity(identity)
        .with_grants(api.VideoGrants(room_join=True, room=room))
        .to_jwt()
    )
