"""Broadcaster/Subscription: the stream type the sync loop, the agent and CallKeys publish on.

Pure (no homeserver); it sits with the adapter's tests because the type is the adapter's."""

from __future__ import annotations

import pytest

from matrixrtc.errors import RemoteError
from matrixrtc.matrix import Broadcaster


async def test_every_subscriber_gets_every_item_until_it_closes() -> None:
    b: Broadcaster[int] = Broadcaster()
    first, second = b.subscribe(), b.subscribe()
    b.publish(1)
    second.close()
    b.publish(2)
    assert b.subscribers == 1
    assert [await first.get(), await first.get()] == [1, 2]
    assert second.get_nowait() == 1
    assert second.get_nowait() is None  # closed: nothing after it left


async def test_end_delivers_what_is_queued_then_stops_or_raises() -> None:
    b: Broadcaster[str] = Broadcaster()
    with b.subscribe() as sub:
        b.publish("a")
        b.end()
        assert [item async for item in sub] == ["a"]
    failed: Broadcaster[str] = Broadcaster()
    sub = failed.subscribe()
    failed.end(RemoteError("sync loop died"))
    with pytest.raises(RemoteError, match="sync loop died"):
        await sub.get()
    with pytest.raises(RemoteError):  # and keeps failing the same way
        await sub.get()


async def test_a_subscriber_after_the_end_does_not_wait_forever() -> None:
    b: Broadcaster[int] = Broadcaster()
    b.end()
    late = b.subscribe()
    assert [item async for item in late] == []
    assert b.subscribers == 0
