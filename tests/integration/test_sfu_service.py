"""The authorization service against the real stack: Synapse (OpenID), LiveKit, Redis.

The service runs as ``python -m sfu serve``, configured only through lk-jwt-service's
environment variables plus our server-name override (``localhost`` resolves nowhere, so
``MATRIXRTC_SFU_HOMESERVER_OVERRIDES`` points it at Synapse's plain-HTTP listener).
Two instances share one LiveKit (auto_create off, webhooks to instance A):
A treats ``localhost`` as full-access, B treats it as restricted.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import pytest_asyncio
from livekit import api as lkapi
from livekit import rtc

from matrixrtc.devstack import LiveKit, Redis, Synapse, UserCreds
from matrixrtc.devstack._process import ManagedProcess, free_tcp_port
from matrixrtc.model.livekit_ids import legacy_identity, livekit_identity, livekit_room_alias

CALL_MEMBER = "org.matrix.msc3401.call.member"
METRICS_TOKEN = "metrics-" + secrets.token_hex(8)

PARTICIPANT = """
import asyncio, sys
from livekit import rtc

async def main() -> None:
    room = rtc.Room()
    await room.connect(sys.argv[1], sys.argv[2], rtc.RoomOptions(connect_timeout=10))
    print("connected", room.local_participant.identity, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@dataclass
class Service:
    """``python -m sfu serve`` as a managed process."""

    proc: ManagedProcess
    url: str

    @classmethod
    def on_port(cls, run_dir: Path, name: str, port: int, env: dict[str, str]) -> Service:
        """``python -m sfu serve`` with ``env`` (its bind on 127.0.0.1:``port``), not started;
        its log is ``run_dir/name/service.log``."""
        proc = ManagedProcess(
            name=name,
            argv=[sys.executable, "-m", "sfu", "serve"],
            log_path=run_dir / name / "service.log",
            cwd=run_dir,
            env=env,
        )
        return cls(proc, f"http://127.0.0.1:{port}")

    async def start(self) -> None:
        async def ready() -> bool:
            async with (
                aiohttp.ClientSession() as s,
                s.get(self.url + "/healthz", timeout=aiohttp.ClientTimeout(total=1)) as r,
            ):
                return r.status == 200

        await self.proc.start(ready, 30)

    async def stop(self) -> None:
        await self.proc.stop()

    async def post(self, path: str, body: object) -> tuple[int, Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with aiohttp.ClientSession() as s, s.post(self.url + path, data=data) as r:
            text = await r.text()
            return r.status, (json.loads(text) if text.strip() else None)

    async def metric(self, name: str, **labels: str) -> float:
        auth = {"Authorization": f"Bearer {METRICS_TOKEN}"}
        async with aiohttp.ClientSession() as s, s.get(self.url + "/metrics", headers=auth) as r:
            assert r.status == 200, r.status
            text = await r.text()
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name):
                continue
            key, _, value = line.rpartition(" ")
            got = key[len(name) :].strip("{}")
            if all(part in got.split(",") for part in want.split(",") if part):
                total += float(value)
        return total

    async def wait_metric(self, value: float, name: str, **labels: str) -> None:
        """The state change is visible at the homeserver a moment before its reply reaches
        the service, which counts it; allow for that."""
        got = 0.0
        for _ in range(40):
            got = await self.metric(name, **labels)
            if got == value:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{name}{labels} is {got}, expected {value}")


def make_service(
    run_dir: Path, name: str, port: int, lk: LiveKit, hs: Synapse, **extra: str
) -> Service:
    env = {
        **os.environ,
        "LIVEKIT_URL": lk.url,
        "LIVEKIT_KEY": lk.api_key,
        "LIVEKIT_SECRET": lk.api_secret,
        "LIVEKIT_JWT_BIND": f"127.0.0.1:{port}",
        "MATRIXRTC_SFU_HOMESERVER_OVERRIDES": f"{hs.server_name}={hs.base_url},"
        f"other.localhost={hs.base_url}",
        "LIVEKIT_CS_API_URL_OVERRIDES": f"{hs.server_name}={hs.base_url}",
        "MATRIXRTC_SFU_RATE_LIMIT": "0",
        "MATRIXRTC_SFU_METRICS_TOKEN": METRICS_TOKEN,
        "MATRIXRTC_SFU_METRICS_BIND": "off",
        "LIVEKIT_LOG_LEVEL": "debug",
        **extra,
    }
    return Service.on_port(run_dir, name, port, env)


@dataclass
class Stack:
    hs: Synapse
    lk: LiveKit
    redis: Redis
    full: Service  # localhost is full-access; receives LiveKit's webhooks; jobs in Redis
    restricted: Service  # localhost is restricted


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(synapse: Synapse, redis: Redis, run_dir: Path) -> AsyncIterator[Stack]:
    port_a, port_b = free_tcp_port(), free_tcp_port()
    lk = LiveKit(
        run_dir, webhook_urls=[f"http://127.0.0.1:{port_a}/sfu_webhook"], name="livekit-sfu"
    )
    async with lk:
        full = make_service(
            run_dir,
            "sfu-full",
            port_a,
            lk,
            synapse,
            LIVEKIT_FULL_ACCESS_HOMESERVERS=synapse.server_name,
            LIVEKIT_REDIS_URL=redis.url,
            LIVEKIT_SANITY_CHECK_INTERVAL_SECONDS="1",
        )
        restricted = make_service(
            run_dir,
            "sfu-restricted",
            port_b,
            lk,
            synapse,
            LIVEKIT_FULL_ACCESS_HOMESERVERS="elsewhere.example",
        )
        await asyncio.gather(full.start(), restricted.start())
        try:
            yield Stack(synapse, lk, redis, full, restricted)
        finally:
            await asyncio.gather(full.stop(), restricted.stop())


def get_token_body(
    room_id: str, user: UserCreds, token: Mapping[str, Any], member_id: str = "m1", **extra: object
) -> dict[str, Any]:
    return {
        "room_id": room_id,
        "slot_id": "m.call#ROOM",
        "openid_token": dict(token),
        "member": {
            "id": member_id,
            "claimed_user_id": user.user_id,
            "claimed_device_id": user.device_id,
        },
        **extra,
    }


async def room_names(lk: LiveKit) -> set[str]:
    async with lkapi.LiveKitAPI(lk.http_url, lk.api_key, lk.api_secret) as api:
        rooms = await api.room.list_rooms(lkapi.ListRoomsRequest())
    return {r.name for r in rooms.rooms}


async def identities(lk: LiveKit, room: str) -> set[str]:
    async with lkapi.LiveKitAPI(lk.http_url, lk.api_key, lk.api_secret) as api:
        res = await api.room.list_participants(lkapi.ListParticipantsRequest(room=room))
    return {p.identity for p in res.participants}


async def test_token_connects_under_the_expected_identity(stack: Stack) -> None:
    alice = await stack.hs.register(f"alice-{secrets.token_hex(3)}")
    room_id = await stack.hs.create_call_room(alice)
    token = await stack.hs.openid_token(alice)
    status, resp = await stack.full.post("/get_token", get_token_body(room_id, alice, token))
    assert status == 200, resp
    assert resp["url"] == stack.lk.url
    alias = livekit_room_alias(room_id, "m.call#ROOM")
    identity = livekit_identity(alice.user_id, alice.device_id, "m1")
    claims = jwt.decode(resp["jwt"], options={"verify_signature": False})
    assert claims["video"]["room"] == alias
    assert claims["sub"] == identity
    assert claims["exp"] - claims["nbf"] == 3600
    assert alias in await room_names(stack.lk)  # full access: the service created the room

    room = rtc.Room()
    await room.connect(resp["url"], resp["jwt"], rtc.RoomOptions(connect_timeout=10))
    try:
        assert room.local_participant.identity == identity
        assert identity in await identities(stack.lk, alias)
        # the legacy endpoint: identity "<mxid>:<device>", same room alias
        legacy = {"room": room_id, "openid_token": token, "device_id": alice.device_id}
        status, resp2 = await stack.full.post("/sfu/get", legacy)
        assert status == 200, resp2
        claims = jwt.decode(resp2["jwt"], options={"verify_signature": False})
        assert claims["sub"] == legacy_identity(alice.user_id, alice.device_id)
        assert claims["video"]["room"] == alias
    finally:
        await room.disconnect()
    # the second request was served from the OpenID cache, not by Synapse
    assert await stack.full.metric("matrixrtc_sfu_openid_cache_total", result="hit") >= 1


async def test_restricted_user_gets_no_room(stack: Stack) -> None:
    bob = await stack.hs.register(f"bob-{secrets.token_hex(3)}")
    room_id = await stack.hs.create_call_room(bob)
    alias = livekit_room_alias(room_id, "m.call#ROOM")
    body = get_token_body(room_id, bob, await stack.hs.openid_token(bob))
    status, resp = await stack.restricted.post("/get_token", body)
    assert status == 200, resp
    assert alias not in await room_names(stack.lk)
    room = rtc.Room()
    with pytest.raises(rtc.ConnectError):
        await room.connect(resp["url"], resp["jwt"], rtc.RoomOptions(connect_timeout=5))
    # restricted users cannot delegate a delayed leave
    status, err = await stack.restricted.post(
        "/get_token", {**body, "delay_id": "d", "delay_timeout": 5000}
    )
    assert (status, err["errcode"]) == (400, "M_BAD_JSON")
    status, err = await stack.restricted.post(
        "/delegate_delayed_leave", {**body, "delay_id": "d", "delay_timeout": 5000}
    )
    assert (status, err["errcode"]) == (403, "M_FORBIDDEN")
    # once a full-access user has asked, the room exists and the restricted token works
    alice = await stack.hs.register(f"alice-{secrets.token_hex(3)}")
    full_body = get_token_body(room_id, alice, await stack.hs.openid_token(alice))
    status, _ = await stack.full.post("/get_token", full_body)
    assert status == 200
    assert alias in await room_names(stack.lk)
    room = rtc.Room()
    await room.connect(resp["url"], resp["jwt"], rtc.RoomOptions(connect_timeout=10))
    await room.disconnect()


def expire_openid_token(hs: Synapse, token: str) -> None:
    db = sqlite3.connect(hs.data_dir / "homeserver.db", timeout=10)
    with db:
        db.execute("UPDATE open_id_tokens SET ts_valid_until_ms = 1 WHERE token = ?", (token,))
    db.close()


async def test_error_rows(stack: Stack) -> None:
    carol = await stack.hs.register(f"carol-{secrets.token_hex(3)}")
    room_id = await stack.hs.create_call_room(carol)
    svc = stack.full

    async def expect(path: str, body: object, status: int, errcode: str | None) -> None:
        got, resp = await svc.post(path, body)
        assert got == status, (path, body, resp)
        if errcode is not None:
            assert resp["errcode"] == errcode, resp

    token = await stack.hs.openid_token(carol)
    good = get_token_body(room_id, carol, token)
    await expect("/get_token", b"{not json", 400, "M_NOT_JSON")
    await expect("/get_token", {**good, "unknown": 1}, 400, "M_NOT_JSON")
    for field in ("room_id", "slot_id"):
        await expect("/get_token", {k: v for k, v in good.items() if k != field}, 400, "M_BAD_JSON")
    for field in ("id", "claimed_user_id", "claimed_device_id"):
        member = {k: v for k, v in good["member"].items() if k != field}
        await expect("/get_token", {**good, "member": member}, 400, "M_BAD_JSON")
    for field in ("access_token", "matrix_server_name"):
        tok = {k: v for k, v in token.items() if k != field}
        await expect("/get_token", {**good, "openid_token": tok}, 400, "M_BAD_JSON")
    forged = {**token, "access_token": secrets.token_urlsafe(18)}
    await expect("/get_token", {**good, "openid_token": forged}, 401, "M_UNAUTHORIZED")
    legacy_forged = {"room": room_id, "openid_token": forged, "device_id": "D"}
    await expect("/sfu/get", legacy_forged, 401, "M_UNAUTHORIZED")
    # claimed_user_id is not the token's subject
    other = {**good["member"], "claimed_user_id": "@mallory:localhost"}
    await expect("/get_token", {**good, "member": other}, 401, "M_UNAUTHORIZED")
    # the token's subject does not belong to matrix_server_name
    wrong_server = {**token, "matrix_server_name": "other.localhost"}
    await expect("/get_token", {**good, "openid_token": wrong_server}, 401, "M_UNAUTHORIZED")
    # an expired token (Synapse keeps its expiry in open_id_tokens)
    expired = await stack.hs.openid_token(carol)
    await asyncio.to_thread(expire_openid_token, stack.hs, expired["access_token"])
    await expect("/get_token", get_token_body(room_id, carol, expired), 401, "M_UNAUTHORIZED")
    for method in ("GET", "PUT", "DELETE"):
        async with aiohttp.ClientSession() as s, s.request(method, svc.url + "/get_token") as r:
            assert r.status == 405
    # the valid token still works after all that
    await expect("/get_token", good, 200, None)
    await assert_not_logged(
        svc, token["access_token"], forged["access_token"], expired["access_token"]
    )


async def test_sfu_and_homeserver_failure_rows(stack: Stack, run_dir: Path) -> None:
    """CreateRoom failing → 500; client-server API unknown → 400 (before any room is made)."""
    eve = await stack.hs.register(f"eve-{secrets.token_hex(3)}")
    room_id = await stack.hs.create_call_room(eve)
    svc = make_service(
        run_dir,
        "sfu-broken",
        free_tcp_port(),
        stack.lk,
        stack.hs,
        LIVEKIT_URL=f"ws://127.0.0.1:{free_tcp_port()}",  # nothing listens: CreateRoom fails
        LIVEKIT_FULL_ACCESS_HOMESERVERS=stack.hs.server_name,
        LIVEKIT_CS_API_URL_OVERRIDES="",  # "localhost" has no usable .well-known/matrix/client
    )
    await svc.start()
    try:
        body = get_token_body(room_id, eve, await stack.hs.openid_token(eve))
        status, err = await svc.post("/get_token", body)
        assert (status, err) == (
            500,
            {"errcode": "M_UNKNOWN", "error": "Unable to create room on SFU"},
        )
        unresolvable = {"errcode": "M_BAD_JSON", "error": "Unable to resolve client-server API"}
        delayed = {**body, "delay_id": "d", "delay_timeout": 5000}
        assert await svc.post("/get_token", delayed) == (400, unresolvable)
        assert await svc.post("/delegate_delayed_leave", delayed) == (400, unresolvable)
    finally:
        await svc.stop()


@dataclass
class Member:
    user: UserCreds
    room_id: str
    state_key: str
    delay_id: str


async def join_with_delayed_leave(hs: Synapse, delay_ms: int) -> Member:
    user = await hs.register(f"dora-{secrets.token_hex(3)}")
    room_id = await hs.create_call_room(user)
    key = f"_{user.user_id}_{user.device_id}_m.call"
    await hs.put_state(user, room_id, CALL_MEMBER, key, {"application": "m.call", "call_id": ""})
    res = await hs.put_state(
        user, room_id, CALL_MEMBER, key, {}, params={"org.matrix.msc4140.delay": str(delay_ms)}
    )
    return Member(user, room_id, key, str(res["delay_id"]))


async def left(hs: Synapse, m: Member) -> bool:
    return await hs.get_state(m.user, m.room_id, CALL_MEMBER, m.state_key) == {}


async def start_participant(
    run_dir: Path, lk: LiveKit, token: str, alias: str, ident: str
) -> ManagedProcess:
    proc = ManagedProcess(
        name="sfu-participant",
        argv=[sys.executable, "-c", PARTICIPANT, lk.url, token],
        log_path=run_dir / "sfu-participant" / f"{ident[:8].replace('/', '_')}.log",
        cwd=run_dir,
    )

    async def ready() -> bool:
        return ident in await identities(lk, alias)

    await proc.start(ready, 20)
    return proc


def sigkill(proc: ManagedProcess) -> None:
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGKILL)


async def departure(hs: Synapse, lk: LiveKit, m: Member, alias: str, ident: str) -> Departure:
    """Times from now until LiveKit drops the participant and until the leave is in the room."""
    t0 = time.monotonic()

    async def gone() -> float:
        while True:  # polling a remote server: there is no event to wait on
            if ident not in await identities(lk, alias):
                return time.monotonic() - t0
            await asyncio.sleep(0.1)

    async def sent() -> float:
        while True:
            if await left(hs, m):
                return time.monotonic() - t0
            await asyncio.sleep(0.1)

    try:
        async with asyncio.timeout(LIVEKIT_DETECTION_LIMIT + 2):
            t_gone, t_sent = await asyncio.gather(gone(), sent())
    except TimeoutError:
        raise AssertionError("the delayed leave was not sent in time") from None
    return Departure(t_gone, t_sent)


@dataclass
class Departure:
    gone: float  # LiveKit no longer lists the participant
    sent: float  # the member's state is the empty (left) content

    def check(self) -> None:
        # LiveKit itself needs about 20 s to declare a SIGKILLed participant gone (its
        # departure detection); the service must add at most 2 s on top of that.
        assert self.sent - self.gone <= 2.0, self
        print(
            f"LiveKit dropped the participant after {self.gone:.1f} s; "
            f"the leave was in the room at {self.sent:.1f} s"
        )


LIVEKIT_DETECTION_LIMIT = 30.0  # measured ~20-21 s for LiveKit v1.13.5


async def test_delegated_leave_restarts_then_sends_on_kill(stack: Stack, run_dir: Path) -> None:
    # A 10 s delayed leave would fire by itself after 10 s: the service must keep restarting
    # it (at 8 s) while the participant is connected, and send it once the process dies.
    m = await join_with_delayed_leave(stack.hs, 10_000)
    token = await stack.hs.openid_token(m.user)
    body = get_token_body(m.room_id, m.user, token, delay_id=m.delay_id, delay_timeout=10_000)
    status, resp = await stack.full.post("/get_token", body)
    assert status == 200, resp
    alias = livekit_room_alias(m.room_id, "m.call#ROOM")
    ident = livekit_identity(m.user.user_id, m.user.device_id, "m1")
    sends_before = await stack.full.metric(
        "matrixrtc_sfu_delayed_leave_actions_total", action="send", result="ok"
    )
    proc = await start_participant(run_dir, stack.lk, resp["jwt"], alias, ident)
    try:
        # a forged participant_left webhook is refused and changes nothing
        forged = forged_webhook(alias, ident)
        async with (
            aiohttp.ClientSession() as s,
            s.post(stack.full.url + "/sfu_webhook", data=forged[0], headers=forged[1]) as r,
        ):
            assert r.status == 401
        await asyncio.sleep(11.0)
        assert not await left(stack.hs, m), "the delayed leave fired while connected"
        restarts = await stack.full.metric(
            "matrixrtc_sfu_delayed_leave_actions_total", action="restart", result="ok"
        )
        assert restarts >= 2
        sigkill(proc)
        timing = await departure(stack.hs, stack.lk, m, alias, ident)
    finally:
        await proc.stop()
    # we sent it (not the homeserver's own timeout)
    await stack.full.wait_metric(
        sends_before + 1, "matrixrtc_sfu_delayed_leave_actions_total", action="send", result="ok"
    )
    timing.check()
    await assert_not_logged(stack.full, token["access_token"], resp["jwt"], m.delay_id)


def forged_webhook(room: str, identity: str) -> tuple[str, dict[str, str]]:
    import hashlib

    from google.protobuf.json_format import MessageToJson

    event = lkapi.WebhookEvent(
        event="participant_left",
        room=lkapi.Room(name=room),
        participant=lkapi.ParticipantInfo(
            identity=identity, disconnect_reason=lkapi.DisconnectReason.CLIENT_INITIATED
        ),
    )
    payload = MessageToJson(event)
    digest = base64.b64encode(hashlib.sha256(payload.encode()).digest()).decode()
    token = lkapi.AccessToken("APIforged", "not-the-secret-not-the-secret-0000")
    return payload, {"Authorization": token.with_sha256(digest).to_jwt()}


async def test_delegated_leave_survives_a_service_restart(stack: Stack, run_dir: Path) -> None:
    # 60 s: if the leave shows up within departure timeout + 2 s, the service sent it.
    m = await join_with_delayed_leave(stack.hs, 60_000)
    token = await stack.hs.openid_token(m.user)
    body = get_token_body(m.room_id, m.user, token)
    status, resp = await stack.full.post("/get_token", body)
    assert status == 200, resp
    alias = livekit_room_alias(m.room_id, "m.call#ROOM")
    ident = livekit_identity(m.user.user_id, m.user.device_id, "m1")
    proc = await start_participant(run_dir, stack.lk, resp["jwt"], alias, ident)
    try:
        # the MSC4140-era endpoint: delegate after connecting
        status, resp = await stack.full.post(
            "/delegate_delayed_leave", {**body, "delay_id": m.delay_id, "delay_timeout": 60_000}
        )
        assert (status, resp) == (200, {})
        await wait_seen_connected(stack.redis, alias, ident)
        await stack.full.stop()
        sigkill(proc)
        watch = asyncio.create_task(departure(stack.hs, stack.lk, m, alias, ident))
        await stack.full.start()
        timing = await watch
    finally:
        await proc.stop()
        if not stack.full.proc.running:
            await stack.full.start()
    # sent by the restarted process
    await stack.full.wait_metric(
        1, "matrixrtc_sfu_delayed_leave_actions_total", action="send", result="ok"
    )
    timing.check()


async def assert_not_logged(svc: Service, *secrets_: str) -> None:
    """The service logs (at debug level here) never contain tokens, JWTs or delay ids."""
    await asyncio.sleep(0.5)  # log lines are written in batches
    text = await asyncio.to_thread(svc.proc.log_path.read_text)
    assert '"event": "token issued"' in text  # the log is there and is JSON
    for secret in secrets_:
        assert secret not in text


async def wait_seen_connected(redis: Redis, alias: str, ident: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis.url)
    field = json.dumps([alias, ident], separators=(",", ":"))
    try:
        for _ in range(100):
            raw = await client.hget("lk-jwt:jobs", field)
            if raw is not None and json.loads(raw).get("SeenConnected") is True:
                return
            await asyncio.sleep(0.1)
    finally:
        await client.aclose()
    raise AssertionError("the job was never stored as connected")
