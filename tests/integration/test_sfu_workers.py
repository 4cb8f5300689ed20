"""``--workers 2``: both processes serve the port, webhooks reach the job wherever it lives
(Redis fan-out), and ``/metrics`` adds up every worker."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
from pathlib import Path

import aiohttp
from google.protobuf.json_format import MessageToJson
from livekit import api as lkapi

from matrixrtc.devstack import LiveKit, Redis, Synapse
from matrixrtc.devstack._process import free_tcp_port
from matrixrtc.model.livekit_ids import livekit_identity, livekit_room_alias
from tests.integration.test_sfu_service import (
    get_token_body,
    join_with_delayed_leave,
    left,
    make_service,
)


def signed_webhook(lk: LiveKit, kind: str, room: str, identity: str) -> tuple[str, str]:
    event = lkapi.WebhookEvent(
        event=kind,
        id="EV_" + secrets.token_hex(6),
        room=lkapi.Room(name=room),
        participant=lkapi.ParticipantInfo(
            identity=identity, disconnect_reason=lkapi.DisconnectReason.CLIENT_INITIATED
        ),
    )
    body = MessageToJson(event)
    digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
    return body, lkapi.AccessToken(lk.api_key, lk.api_secret).with_sha256(digest).to_jwt()


async def post_webhook(url: str, lk: LiveKit, kind: str, room: str, identity: str) -> None:
    body, token = signed_webhook(lk, kind, room, identity)
    # a new connection each time, so the kernel picks a worker each time
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s,
        s.post(url + "/sfu_webhook", data=body, headers={"Authorization": token}) as r,
    ):
        assert r.status == 200


async def test_two_workers_share_jobs_and_metrics(
    synapse: Synapse, livekit: LiveKit, redis: Redis, run_dir: Path
) -> None:
    svc = make_service(
        run_dir,
        "sfu-workers",
        free_tcp_port(),
        livekit,
        synapse,
        LIVEKIT_FULL_ACCESS_HOMESERVERS=synapse.server_name,
        LIVEKIT_REDIS_URL=redis.url,
        # no presence checks: only webhooks can tell a job its participant left
        LIVEKIT_SANITY_CHECK_INTERVAL_SECONDS="0",
        MATRIXRTC_SFU_WORKERS="2",
    )
    await svc.start()
    try:
        members = [await join_with_delayed_leave(synapse, 60_000) for _ in range(6)]
        keys = []
        for m in members:
            body = get_token_body(
                m.room_id,
                m.user,
                await synapse.openid_token(m.user),
                delay_id=m.delay_id,
                delay_timeout=60_000,
            )
            status, resp = await svc.post("/get_token", body)
            assert status == 200, resp
            keys.append(
                (
                    livekit_room_alias(m.room_id),
                    livekit_identity(m.user.user_id, m.user.device_id, "m1"),
                )
            )
        for room, ident in keys:
            await post_webhook(svc.url, livekit, "participant_joined", room, ident)
        await asyncio.sleep(0.5)
        for room, ident in keys:
            await post_webhook(svc.url, livekit, "participant_left", room, ident)
        async with asyncio.timeout(5):
            while True:
                done = [await left(synapse, m) for m in members]
                if all(done):
                    break
                await asyncio.sleep(0.2)
        # 6 tokens + 12 webhooks were counted by two processes; /metrics shows them all
        total = await svc.metric("matrixrtc_sfu_requests_total")
        assert total >= 18
        assert await svc.metric("matrixrtc_sfu_tokens_issued_total") >= 6
        pids = worker_pids(svc.proc.pid)
        assert len(pids) == 2
    finally:
        await svc.stop()


def worker_pids(parent: int | None) -> list[int]:
    assert parent is not None
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(c) for c in children]


def test_signed_webhook_is_what_livekit_sends() -> None:
    # sanity of the helper itself: the service's verifier accepts it
    class _LK:
        api_key = "APIx"
        api_secret = "s" * 32

    body, token = signed_webhook(_LK(), "participant_left", "r", "i")  # type: ignore[arg-type]
    event = lkapi.WebhookReceiver(lkapi.TokenVerifier("APIx", "s" * 32)).receive(body, token)
    assert json.loads(body)["event"] == event.event == "participant_left"


async def test_redis_store_deletes_only_the_same_job(redis: Redis) -> None:
    from sfu.controller.store import JobParams, MemoryStore, RedisStore, StoredJob

    room, ident = "room-" + secrets.token_hex(4), "ident<&>"
    old = StoredJob(JobParams("hs", "d1", 5000, room, ident), 1_800_000_000.5, True)
    new = StoredJob(JobParams("hs", "d2", 5000, room, ident), 1_800_000_001.25, False)
    for store in (RedisStore(redis.url), MemoryStore()):
        try:
            await store.save(old)
            await store.save(new)  # a newer job for the same participant (maybe another worker)
            await store.delete((room, ident), "d1")  # the old job finishing must not remove it
            assert [j for j in await store.all() if j.params.room == room] == [new]
            await store.delete((room, ident), "d2")
            assert [j for j in await store.all() if j.params.room == room] == []
        finally:
            await store.close()
