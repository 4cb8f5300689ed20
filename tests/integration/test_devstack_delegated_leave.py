"""Delegated delayed leave on the devstack's authorization service, with no extra set-up.

``AuthService`` must point the service at its Synapse's client-server API and make LiveKit post
webhooks to the service: then ``/delegate_delayed_leave`` answers 200 on the first attempt, and
a participant that leaves LiveKit has its delayed leave sent at once (long before the delay and
before the service's 15 s presence check), which only the ``participant_left`` webhook can do.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest_asyncio

from matrixrtc.devstack import AuthService, LiveKit, Synapse
from matrixrtc.livekit import LiveKitConnection, MediaOptions, SfuCredentials
from matrixrtc.livekit.token import Endpoint
from matrixrtc.model.livekit_ids import livekit_identity, livekit_room_alias

CALL_MEMBER = "org.matrix.msc3401.call.member"
DELAY_MS = 60_000  # the homeserver's own timeout: far beyond anything this test waits for
LEAVE_WITHIN_S = 5.0  # webhook → send; the service's presence re-check would take 15 s


@pytest_asyncio.fixture(loop_scope="session")
async def service(synapse: Synapse, run_dir: Path) -> AsyncIterator[tuple[LiveKit, AuthService]]:
    # A LiveKit of its own that is already running, as tests and benches start them: the
    # service has to add its webhook to it.
    async with (
        LiveKit(run_dir, name="livekit-delegated") as lk,
        AuthService(run_dir, lk, synapse, name="sfu-delegated") as svc,
    ):
        yield lk, svc


async def post(svc: AuthService, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.post(svc.url + path, json=body) as r:
        return r.status, await r.json(content_type=None)


async def test_delegate_delayed_leave_works_out_of_the_box(
    synapse: Synapse, service: tuple[LiveKit, AuthService]
) -> None:
    lk, svc = service
    assert svc.webhook_url in lk.webhook_urls
    user = await synapse.register(f"dele-{secrets.token_hex(3)}")
    room_id = await synapse.create_call_room(user)
    key = f"_{user.user_id}_{user.device_id}_m.call"
    await synapse.put_state(
        user, room_id, CALL_MEMBER, key, {"application": "m.call", "call_id": ""}
    )
    scheduled = await synapse.put_state(
        user, room_id, CALL_MEMBER, key, {}, params={"org.matrix.msc4140.delay": str(DELAY_MS)}
    )
    body = {
        "room_id": room_id,
        "slot_id": "m.call#ROOM",
        "openid_token": await synapse.openid_token(user),
        "member": {
            "id": "m1",
            "claimed_user_id": user.user_id,
            "claimed_device_id": user.device_id,
        },
    }
    status, token = await post(svc, "/get_token", body)
    assert status == 200, token
    creds = SfuCredentials(
        url=token["url"],
        jwt=token["jwt"],
        identity=livekit_identity(user.user_id, user.device_id, "m1"),
        room=livekit_room_alias(room_id, "m.call#ROOM"),
        endpoint=Endpoint.GET_TOKEN,
    )
    conn = LiveKitConnection(creds, publish=False, media=MediaOptions(), e2ee=False)
    await conn.connect()
    try:
        delegated = {**body, "delay_id": scheduled["delay_id"], "delay_timeout": DELAY_MS}
        assert await post(svc, "/delegate_delayed_leave", delegated) == (200, {})
        await asyncio.sleep(1.0)  # the job sees the participant connected
        assert await synapse.get_state(user, room_id, CALL_MEMBER, key) != {}
    finally:
        await conn.aclose()
    left_at = time.monotonic()
    while await synapse.get_state(user, room_id, CALL_MEMBER, key) != {}:
        assert time.monotonic() - left_at < LEAVE_WITHIN_S, "the leave was not sent on leaving"
        await asyncio.sleep(0.1)
