"""After the SDK reconnects by itself (``reconnected``), a connection that subscribes only
once it holds a sender's key subscribes again to every keyed participant's tracks: a full
reconnect is a new session in which tracks already there are announced by no event."""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

from livekit import rtc

from matrixrtc.livekit import LiveKitConnection
from matrixrtc.livekit.connection import ConnectionState
from tests.unit.livekit_credentials import CREDS

BOB, CAROL = "@bob:hs:DEV", "@carol:hs:DEV"


class _Pub(rtc.RemoteTrackPublication):
    """A remote publication that records subscription requests instead of sending them."""

    def __init__(self) -> None:  # no FFI handle: nothing is sent
        self.asked: list[bool] = []

    def set_subscribed(self, subscribed: bool) -> None:
        self.asked.append(subscribed)


def _state(conn: LiveKitConnection) -> ConnectionState:
    return conn.state  # read afresh (mypy would keep the narrowing of an earlier assert)


def _participant(identity: str, **pubs: _Pub) -> Any:
    return SimpleNamespace(identity=identity, track_publications=dict(pubs))


async def test_reconnected_subscribes_again_to_what_no_event_announced() -> None:
    conn = LiveKitConnection(CREDS, publish=False, subscribe_when_keyed=True)
    remote: dict[str, Any] = conn.room._remote_participants
    try:
        conn.set_remote_key(BOB, 0, os.urandom(16))
        old = _Pub()
        remote[BOB] = _participant(BOB, TR_old=old)
        remote[CAROL] = _participant(CAROL, TR_c=_Pub())  # no key of carol's yet
        conn._on_track_published(old, remote[BOB])
        assert old.asked == [True]
        conn.room.emit("reconnecting")
        assert _state(conn) is ConnectionState.RECONNECTING
        # Bob is back in the new session with a republished track, and his old one (an SFU
        # that kept it) has lost our subscription: no track_published for either.
        new = _Pub()
        remote[BOB] = _participant(BOB, TR_old=old, TR_new=new)
        conn.room.emit("reconnected")
        assert _state(conn) is ConnectionState.CONNECTED
        assert new.asked == [True]
        assert old.asked == [True, True]
        assert remote[CAROL].track_publications["TR_c"].asked == []  # still no key of hers
    finally:
        remote.clear()
        await conn.aclose()
