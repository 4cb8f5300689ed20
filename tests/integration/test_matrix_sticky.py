"""What Synapse 1.163 delivers for MSC4354 sticky events, established against the real server.

Findings (asserted below, documented in matrixrtc/matrix/homeserver.py):
- a sticky event arrives in the room ``timeline`` with the top-level PDU field
  ``msc4354_sticky: {"duration_ms": N}`` and ``unsigned.msc4354_sticky_duration_ttl_ms``;
- on an initial sync whose timeline window does not reach it, a live sticky event arrives in
  ``rooms.join.<room>.msc4354_sticky.events`` instead;
- a delayed sticky event (MSC4140 + MSC4354) fires and is itself sticky;
- in an encrypted room the sticky event is Megolm-encrypted, and the outer sticky fields stay
  in clear on the encrypted PDU, so the adapter decrypts the content and keeps them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from matrixrtc.matrix import Homeserver, Login, RoomUpdate
from matrixrtc.matrix.rooms import Decrypt

pytestmark = pytest.mark.integration

RTC_MEMBER = "org.matrix.msc4143.rtc.member"


def _content(user_id: str, device_id: str, member_id: str) -> dict[str, Any]:
    return {
        "application": {"type": "m.call", "m.call.intent": "audio"},
        "slot_id": "m.call#ROOM",
        "rtc_transports": [],
        "member": {"user_id": user_id, "device_id": device_id, "id": member_id},
        "versions": [],
        "msc4354_sticky_key": member_id,
    }


async def _sticky(updates: Any, room: str, pred: Any, within: float = 5.0) -> dict[str, Any]:
    async def _loop() -> dict[str, Any]:
        while True:
            u: RoomUpdate = await updates.get()
            if u.room_id != room:
                continue
            for ev in u.sticky:
                if pred(ev):
                    return dict(ev)

    return await asyncio.wait_for(_loop(), within)


@pytest.mark.parametrize("encrypted", [False, True])
async def test_sticky_delivery_timeline_section_and_delayed_leave(
    synapse: Any, user_factory: Any, run_dir: Path, encrypted: bool
) -> None:
    alice = await user_factory("alice")
    bob = await user_factory("bob")
    room = await synapse.create_call_room(alice, invite=[bob], encrypted=encrypted)
    bob_dir = run_dir / f"sticky-bob-{encrypted}"
    async with (
        Homeserver(synapse.base_url, Login(alice.user_id, password=alice.password)) as a,
        Homeserver(
            synapse.base_url, Login(bob.user_id, password=bob.password), state_dir=bob_dir
        ) as b,
    ):
        assert a.is_encrypted(room) is encrypted
        with b.room_updates() as updates:
            content = _content(a.user_id, a.device_id, "m1")
            event_id = await a.send_sticky(room, RTC_MEMBER, content, 60_000)
            ev = await _sticky(updates, room, lambda e: e.get("event_id") == event_id)
        # In the timeline, with the sticky PDU field and the remaining time.
        assert ev["type"] == RTC_MEMBER
        assert ev["content"] == content
        assert ev["msc4354_sticky"] == {"duration_ms": 60_000}
        assert 0 < ev["unsigned"]["msc4354_sticky_duration_ttl_ms"] <= 60_000
        assert ev.get("decrypted", False) is encrypted

        for i in range(3):  # push the sticky event out of a 1-event timeline window
            await a.send_event(room, "m.room.message", {"msgtype": "m.text", "body": str(i)})

        # A delayed sticky leave (sent in clear) fires and is delivered as a sticky event too.
        with b.room_updates() as updates:
            await a.schedule_delayed_sticky(
                room, RTC_MEMBER, {"msc4354_sticky_key": "m2"}, 800, 60_000
            )
            leave = await _sticky(
                updates, room, lambda e: e.get("content") == {"msc4354_sticky_key": "m2"}
            )
        assert leave["msc4354_sticky"] == {"duration_ms": 60_000}
        assert leave["sender"] == a.user_id

    # bob's device again (same crypto store, so it holds the Megolm key), initial sync with
    # a 1-event timeline: only the msc4354_sticky section can carry the first sticky event.
    # That sync runs inside __aenter__, before anyone can subscribe: record it at dispatch.
    c = Homeserver(synapse.base_url, Login(bob.user_id), state_dir=bob_dir, timeline_limit=1)
    seen: list[RoomUpdate] = []
    orig = c._rooms.updates

    def record(raw: dict[str, Any], decrypt: Decrypt, initial: bool) -> Iterator[RoomUpdate]:
        section = raw.get("rooms", {}).get("join", {}).get(room)
        if section is not None:
            timeline_ids = [e["event_id"] for e in section["timeline"]["events"]]
            assert event_id not in timeline_ids
            assert event_id in [e["event_id"] for e in section["msc4354_sticky"]["events"]]
        for update in orig(raw, decrypt, initial):
            if update.room_id == room:
                seen.append(update)
            yield update

    c._rooms.updates = record  # type: ignore[method-assign,assignment]
    async with c:
        pass
    assert seen, "initial sync did not include the room"
    assert seen[0].initial
    first = next(e for e in seen[0].sticky if e["event_id"] == event_id)
    assert first["type"] == RTC_MEMBER
    assert first["content"] == content
