"""LiveKit key table: one source of truth for a transport's keys, attached to every connection
from the moment it is created (before it connects) until it is closed. These run without a
server: a connection that has not connected keeps its keys for the end of ``connect()``."""

from __future__ import annotations

import os

from matrixrtc.livekit import KeyTable, LiveKitConnection
from tests.unit.livekit_credentials import CREDS


async def test_connection_created_before_a_key_holds_it_until_closed() -> None:
    table = KeyTable()
    early, late, own = os.urandom(16), os.urandom(16), os.urandom(16)
    table.set_remote_key("@bob:hs:DEV", 0, early)
    conn = LiveKitConnection(CREDS, publish=True, keys=table)
    # Keys that arrive while the connection is opening (not yet connected).
    table.set_remote_key("@bob:hs:DEV", 1, late)
    table.use_own_key(3, own)
    assert conn.keys is table
    assert table.attached == [conn]
    assert dict(conn.keys.remote_keys) == {("@bob:hs:DEV", 0): early, ("@bob:hs:DEV", 1): late}
    assert conn.keys.own_key == (3, own)
    # Setting through a connection is setting on the shared table.
    other = LiveKitConnection(CREDS, publish=False, keys=table)
    other.set_remote_key("@carol:hs:DEV", 0, early)
    assert ("@carol:hs:DEV", 0) in conn.keys.remote_keys
    await conn.aclose()
    assert table.attached == [other]
    await other.aclose()
    assert table.attached == []


async def test_connections_without_a_table_do_not_share_keys() -> None:
    a = LiveKitConnection(CREDS, publish=False)
    b = LiveKitConnection(CREDS, publish=False)
    a.set_remote_key("@bob:hs:DEV", 0, os.urandom(16))
    a.use_own_key(1, os.urandom(16))
    assert b.keys.remote_keys == {}
    assert b.keys.own_key is None
    await a.aclose()
    await b.aclose()
