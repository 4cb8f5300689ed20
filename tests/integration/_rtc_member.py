"""A call member as a separate process (so a test can SIGSTOP it): one LiveKit connection
plus a state-form call membership kept alive by an MSC4140 delayed leave it restarts.

Usage: python _rtc_member.py LK_URL JWT HS_URL ACCESS_TOKEN ROOM_ID USER DEVICE DELAY_MS
       [watch] [lag=MS]

Prints ``ready`` once connected and joined, ``disconnected`` when LiveKit drops it. Like
matrix-js-sdk, it publishes its membership again when its delayed leave turns out to have
fired (404 on restart, e.g. after a homeserver outage longer than the delay) and, with
``watch``, when its membership is gone from the room (seen after a Synapse restart: an
overdue delayed leave was persisted *after* the membership published once it was back).
``lag=MS``: a slow client, which publishes again only MS after noticing its membership gone.
Without a membership (DELAY_MS = 0) it only holds the LiveKit connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from urllib.parse import quote

import aiohttp
from livekit import rtc

CALL_MEMBER = "org.matrix.msc3401.call.member"
DELAY = "org.matrix.msc4140.delay"
DELAYED = "/_matrix/client/unstable/org.matrix.msc4140/delayed_events"


async def main() -> None:
    lk_url, jwt, hs, token, room_id, user, device, delay_ms = sys.argv[1:9]
    options = sys.argv[9:]
    watch_own = "watch" in options  # re-publish when the membership vanished
    lag = next((int(o[4:]) / 1000 for o in options if o.startswith("lag=")), 0.0)
    delay = int(delay_ms)
    room = rtc.Room()
    gone = asyncio.Event()
    room.on("disconnected", lambda *_a: gone.set())
    await room.connect(lk_url, jwt, rtc.RoomOptions(connect_timeout=10))
    headers = {"Authorization": f"Bearer {token}"}
    key = f"_{user}_{device}_m.call"
    path = (
        f"{hs}/_matrix/client/v3/rooms/{quote(room_id, safe='')}/state/"
        f"{quote(CALL_MEMBER, safe='')}/{quote(key, safe='')}"
    )
    async with aiohttp.ClientSession(headers=headers) as http:
        delay_id = ""

        async def put_join() -> None:
            async with http.put(path, json={**content, "created_ts": int(time.time() * 1000)}) as r:
                r.raise_for_status()

        async def publish() -> str:
            """Arm the delayed leave, then publish the membership (as js-sdk does)."""
            async with http.put(path, params={DELAY: str(delay)}, json={}) as r:
                new_id = str((await r.json())["delay_id"])
            await put_join()
            return new_id

        async def own_left() -> bool:
            """Whether our membership ended, by either of two views, each of which has been
            seen wrong: the newest event at our state key in stream order (what /sync shows
            everyone else; after a Synapse 1.163.2 restart an overdue delayed leave persisted
            after our re-published membership was the current state, while GET state kept
            answering with our membership), and the room's resolved current state (GET
            state; after a stall forked the DAG, state resolution kept our leave although our
            re-join was newest in stream order, and the controller removed us)."""
            flt = json.dumps({"types": [CALL_MEMBER], "senders": [user]})
            url = f"{hs}/_matrix/client/v3/rooms/{quote(room_id, safe='')}/messages"
            params = {"dir": "b", "limit": "20", "filter": flt}
            async with http.get(url, params=params) as r:
                body = await r.json()
            for ev in body.get("chunk", []):
                if ev.get("state_key") == key:
                    if ev.get("content") == {}:
                        return True
                    break
            async with http.get(path) as r:
                if r.status == 404:
                    return True
                resolved = await r.json() if r.status == 200 else None
            return resolved == {}

        if delay:
            content = {
                "application": "m.call",
                "call_id": "",
                "scope": "m.room",
                "device_id": device,
                "expires": 3_600_000,
                "created_ts": int(time.time() * 1000),
                "focus_active": {"type": "livekit", "focus_selection": "oldest_membership"},
                "foci_preferred": [
                    {
                        "type": "livekit",
                        "livekit_service_url": "http://127.0.0.1:1",
                        "livekit_alias": room_id,
                    }
                ],
            }
            delay_id = await publish()
        print("ready", room.local_participant.identity, flush=True)
        while not gone.is_set():
            if delay_id:
                try:
                    async with http.post(f"{hs}{DELAYED}/{delay_id}/restart") as r:
                        await r.read()
                        fired = r.status == 404  # e.g. a homeserver outage: join again
                    if fired:
                        await asyncio.sleep(lag)
                        delay_id = await publish()
                    elif watch_own and await own_left():  # overwritten by an overdue leave:
                        await asyncio.sleep(lag)
                        await put_join()  # join again; our delayed leave is alive (restarted)
                except (aiohttp.ClientError, ValueError, KeyError):
                    pass  # the homeserver may be restarting; the next beat retries
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gone.wait(), max(0.2, delay / 4000))
    print("disconnected", flush=True)


asyncio.run(main())
