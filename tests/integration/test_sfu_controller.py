"""The SFU controller against the real stack: Synapse, LiveKit v1.13.5, Redis, the service.

The service runs with the controller inside (``MATRIXRTC_SFU_CONTROLLER=1``, grants in
Redis) in front of its own LiveKit (the controller judges every room of its LiveKit); it
reads Matrix through a controller account joined to every call room (its /sync: state and
sticky memberships, pushed). Each member is a separate process holding a LiveKit connection
and a state-form call membership kept alive by a 3 s MSC4140 delayed leave. Every cause of a
ghost is staged at once, each in its own Matrix room, next to honest members; each ghost
must be gone from LiveKit at most 5 s after the evidence reached the homeserver (interval 1
s), with an audit line and a metric, and no honest member may be touched (grace 1 s here,
for margin on a loaded machine; bench/controller.py measures the defaults).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest_asyncio
from livekit import api as lkapi

from matrixrtc.devstack import LiveKit, Redis, Synapse, UserCreds
from matrixrtc.devstack._process import ManagedProcess, free_tcp_port
from matrixrtc.model.livekit_ids import legacy_identity, livekit_room_alias

MEMBER_SCRIPT = Path(__file__).with_name("_rtc_member.py")
CALL_MEMBER = "org.matrix.msc3401.call.member"
LIMIT = 5.0  # seconds from evidence to removal
STATUS_TOKEN = "status-" + secrets.token_hex(8)


async def register_admin(hs: Synapse, name: str) -> UserCreds:
    """A server admin through Synapse's shared-secret registration."""
    secret = json.loads(hs.config_path.read_text())["registration_shared_secret"]
    nonce = (await hs.request("GET", "/_synapse/admin/v1/register"))["nonce"]
    password = secrets.token_urlsafe(12)
    mac = hmac.new(secret.encode(), digestmod=hashlib.sha1)
    mac.update(b"\x00".join([nonce.encode(), name.encode(), password.encode(), b"admin"]))
    body = await hs.request(
        "POST",
        "/_synapse/admin/v1/register",
        json_body={
            "nonce": nonce,
            "username": name,
            "password": password,
            "admin": True,
            "mac": mac.hexdigest(),
        },
    )
    return UserCreds(body["user_id"], password, body["access_token"], body["device_id"])


@dataclass
class Sfu:
    """``python -m sfu serve`` with the controller inside."""

    proc: ManagedProcess
    url: str
    log_path: Path

    @classmethod
    async def serve(
        cls, run_dir: Path, name: str, port: int, env: dict[str, str], *args: str
    ) -> Sfu:
        """``python -m sfu serve ARGS`` on 127.0.0.1:``port``, started; its log is
        ``run_dir/name/service.log``."""
        log_path = run_dir / name / "service.log"
        proc = ManagedProcess(
            name=name,
            argv=[sys.executable, "-m", "sfu", "serve", *args],
            log_path=log_path,
            cwd=run_dir,
            env=env,
        )
        sfu = cls(proc, f"http://127.0.0.1:{port}", log_path)
        await sfu.start()
        return sfu

    async def start(self) -> None:
        async def ready() -> bool:
            async with (
                aiohttp.ClientSession() as s,
                s.get(self.url + "/healthz", timeout=aiohttp.ClientTimeout(total=1)) as r,
            ):
                return r.status == 200

        await self.proc.start(ready, 30)

    async def post(self, path: str, body: object) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as s, s.post(self.url + path, json=body) as r:
            return r.status, await r.json(content_type=None)

    async def get(self, path: str, token: str = "") -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with aiohttp.ClientSession() as s, s.get(self.url + path, headers=headers) as r:
            text = await r.text()
            try:
                return r.status, json.loads(text)
            except ValueError:
                return r.status, text

    def audit(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if obj.get("event") in ("ghost removed", "room closed"):
                    out.append(obj)
        return out


def service_env(lk: LiveKit, redis: Redis, **extra: str) -> dict[str, str]:
    """The service's environment for this LiveKit and Redis, plus ``extra``."""
    return {
        **os.environ,
        "LIVEKIT_URL": lk.url,
        "LIVEKIT_KEY": lk.api_key,
        "LIVEKIT_SECRET": lk.api_secret,
        "LIVEKIT_REDIS_URL": redis.url,
        **extra,
    }


def controller_env(
    lk: LiveKit,
    hs: Synapse,
    redis: Redis,
    watcher: UserCreds,
    port: int,
    *,
    admin: bool = False,
    **extra: str,
) -> dict[str, str]:
    """The service on 127.0.0.1:``port``, full access for ``hs`` (no rate limit), with the
    controller inside. ``watcher``: a server admin (``admin=True``: Synapse admin API), else
    the controller account, which joins the call rooms it is invited to (its /sync)."""
    token = "ADMIN_TOKEN" if admin else "ACCESS_TOKEN"
    return {
        **service_env(lk, redis),
        "LIVEKIT_JWT_BIND": f"127.0.0.1:{port}",
        "LIVEKIT_FULL_ACCESS_HOMESERVERS": hs.server_name,
        "MATRIXRTC_SFU_HOMESERVER_OVERRIDES": f"{hs.server_name}={hs.base_url}",
        "MATRIXRTC_SFU_RATE_LIMIT": "0",
        "MATRIXRTC_SFU_CONTROLLER": "1",
        **({} if admin else {"MATRIXRTC_SFU_CONTROLLER_AUTO_JOIN": "1"}),
        "MATRIXRTC_SFU_CONTROLLER_HOMESERVER_URL": hs.base_url,
        f"MATRIXRTC_SFU_CONTROLLER_{token}": watcher.access_token,
        "MATRIXRTC_SFU_CONTROLLER_STATUS_TOKEN": STATUS_TOKEN,
        "MATRIXRTC_SFU_METRICS_TOKEN": STATUS_TOKEN,  # /metrics on the service's own port
        "MATRIXRTC_SFU_CONTROLLER_INTERVAL": "1",
        "MATRIXRTC_SFU_CONTROLLER_GRACE": "1",  # bench/controller.py measures the default 2 s
        "MATRIXRTC_SFU_CONTROLLER_JOIN_GRACE": "3",
        "MATRIXRTC_SFU_CONTROLLER_ROOM_GRACE": "3",
        **extra,
    }


@dataclass
class Stack:
    hs: Synapse
    lk: LiveKit
    redis: Redis
    sfu: Sfu
    admin: UserCreds  # the controller's homeserver account
    run_dir: Path
    watcher: UserCreds | None = None  # set: it must join every call room


async def call_room(st: Stack, owner: UserCreds, invite: Sequence[UserCreds] = ()) -> str:
    """A call room; the controller account (if the controller reads /sync) joins it too."""
    extra = [st.watcher] if st.watcher is not None else []
    return await st.hs.create_call_room(owner, invite=[*invite, *extra])


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(synapse: Synapse, run_dir: Path) -> AsyncIterator[Stack]:
    admin = await synapse.register(f"controller{secrets.token_hex(3)}")
    port = free_tcp_port()
    async with (
        LiveKit(run_dir, name="livekit-controller") as lk,
        Redis(run_dir, name="redis-controller") as redis,
    ):
        env = controller_env(lk, synapse, redis, admin, port)
        sfu = await Sfu.serve(run_dir, "sfu-controller", port, env)
        try:
            yield Stack(synapse, lk, redis, sfu, admin, run_dir, watcher=admin)
        finally:
            await sfu.proc.stop()


@dataclass
class Member:
    user: UserCreds
    room_id: str
    identity: str
    lk_room: str
    proc: asyncio.subprocess.Process | None = None
    lines: list[str] = field(default_factory=list)

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGCONT)
            os.killpg(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()


async def spawn_member(
    lk_url: str,
    jwt: str,
    hs: Synapse,
    user: UserCreds,
    room_id: str,
    delay_ms: int,
    *,
    watch: bool = False,
    lag_ms: int = 0,
) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(MEMBER_SCRIPT),
        lk_url,
        jwt,
        hs.base_url,
        user.access_token,
        room_id,
        user.user_id,
        user.device_id,
        str(delay_ms),
        *(["watch"] if watch else []),
        *([f"lag={lag_ms}"] if lag_ms else []),
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None
    async with asyncio.timeout(20):
        line = (await proc.stdout.readline()).decode()
    assert line.startswith("ready"), line
    return proc


async def join_call(
    st: Stack,
    owner: UserCreds,
    room_id: str | None = None,
    *,
    delay_ms: int = 3000,
    honest: bool = False,
    lag_ms: int = 0,
) -> Member:
    """A fresh user joins (a fresh room, unless given) and the call: token, LiveKit, state."""
    user = await st.hs.register(f"m{secrets.token_hex(4)}")
    if room_id is None:
        room_id = await call_room(st, owner, invite=[user])
    else:
        await st.hs.request(
            "POST",
            f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/invite",
            user=owner,
            json_body={"user_id": user.user_id},
        )
        await st.hs.join_room(user, room_id)
    token = await st.hs.openid_token(user)
    status, resp = await st.sfu.post(
        "/sfu/get", {"room": room_id, "openid_token": token, "device_id": user.device_id}
    )
    assert status == 200, resp
    m = Member(
        user, room_id, legacy_identity(user.user_id, user.device_id), livekit_room_alias(room_id)
    )
    m.proc = await spawn_member(
        resp["url"], resp["jwt"], st.hs, user, room_id, delay_ms, watch=honest, lag_ms=lag_ms
    )
    return m


async def present(lk: LiveKit, room: str) -> set[str]:
    async with lkapi.LiveKitAPI(lk.http_url, lk.api_key, lk.api_secret) as api:
        res = await api.room.list_participants(lkapi.ListParticipantsRequest(room=room))
    return {p.identity for p in res.participants}


async def time_until(check: Callable[[], Awaitable[bool]], limit: float) -> float | None:
    """Seconds until ``check()`` holds (polled every 0.1 s: remote servers have no events
    to wait on), or None after ``limit``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if await check():
            return time.monotonic() - t0
        await asyncio.sleep(0.1)
    return None


async def removal_after(st: Stack, m: Member, limit: float = 15.0) -> float | None:
    async def gone() -> bool:
        return m.identity not in await present(st.lk, m.lk_room)

    return await time_until(gone, limit)


async def membership_left(st: Stack, m: Member) -> bool:
    content = await st.hs.get_state(
        m.user, m.room_id, CALL_MEMBER, f"_{m.user.user_id}_{m.user.device_id}_m.call"
    )
    return content == {}


async def test_every_kind_of_ghost_is_removed_and_honest_members_stay(stack: Stack) -> None:
    st = stack
    owner = await st.hs.register(f"owner{secrets.token_hex(3)}")
    # Honest members share rooms with the ghosts, so a wrong verdict per room would show.
    left_room = await call_room(st, owner)
    banned_room = await call_room(st, owner)
    joins = {
        "expired": join_call(st, owner),
        "left": join_call(st, owner, left_room),
        "banned": join_call(st, owner, banned_room),
        "kicked": join_call(st, owner),
        "honest": join_call(st, owner, left_room, delay_ms=10_000, honest=True),
        "honest2": join_call(st, owner, banned_room, delay_ms=10_000, honest=True),
        # joins LiveKit with a service token but never publishes a membership
        "silent": join_call(st, owner, delay_ms=0),
    }
    results = await asyncio.gather(*joins.values(), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        await asyncio.gather(*(r.stop() for r in results if isinstance(r, Member)))
        raise failed[0]
    members = {k: r for k, r in zip(joins, results, strict=True) if isinstance(r, Member)}
    # A token minted with the API key, not by the service, into the honest member's room.
    foreign_id = "intruder-" + secrets.token_hex(3)
    jwt = (
        lkapi.AccessToken(st.lk.api_key, st.lk.api_secret)
        .with_identity(foreign_id)
        .with_grants(lkapi.VideoGrants(room_join=True, room=members["left"].lk_room))
        .to_jwt()
    )
    honest = members["honest"]
    foreign = Member(honest.user, honest.room_id, foreign_id, honest.lk_room)
    foreign.proc = await spawn_member(st.lk.url, jwt, st.hs, honest.user, honest.room_id, 0)
    t_foreign = time.monotonic()  # the evidence is the join itself
    members["foreign"] = foreign
    try:
        times: dict[str, float | None] = {}

        async def expired() -> None:
            m = members["expired"]
            assert m.proc is not None
            os.killpg(m.proc.pid, signal.SIGSTOP)  # heartbeat stops; the 3 s leave fires
            fired = await time_until(lambda: membership_left(st, m), 10)
            assert fired is not None, "the delayed leave did not fire"
            times["expired"] = await removal_after(st, m)

        async def left() -> None:
            m = members["left"]
            key = f"_{m.user.user_id}_{m.user.device_id}_m.call"
            await st.hs.put_state(m.user, m.room_id, CALL_MEMBER, key, {})
            times["left"] = await removal_after(st, m)

        async def banned() -> None:
            m = members["banned"]
            await st.hs.request(
                "POST",
                f"/_matrix/client/v3/rooms/{quote(m.room_id, safe='')}/ban",
                user=owner,
                json_body={"user_id": m.user.user_id, "reason": "test"},
            )
            times["banned"] = await removal_after(st, m)

        async def kicked() -> None:
            m = members["kicked"]
            await st.hs.request(
                "POST",
                f"/_matrix/client/v3/rooms/{quote(m.room_id, safe='')}/kick",
                user=owner,
                json_body={"user_id": m.user.user_id},
            )
            times["kicked"] = await removal_after(st, m)

        async def foreign_token() -> None:
            gone = await removal_after(st, foreign)
            times["foreign_token"] = None if gone is None else time.monotonic() - t_foreign

        async def silent() -> None:
            times["no_membership"] = await removal_after(st, members["silent"], 15)

        await asyncio.gather(expired(), left(), banned(), kicked(), foreign_token(), silent())
        print("ghost removal after evidence, s:", {k: v and round(v, 2) for k, v in times.items()})
        for cause in ("expired", "left", "banned", "kicked", "foreign_token"):
            got = times[cause]
            assert got is not None, cause
            assert got <= LIMIT, (cause, got)
        # never had a membership: removed after the 3 s join grace, not before
        assert times["no_membership"] is not None
        for m in (members["honest"], members["honest2"]):
            assert m.identity in await present(st.lk, m.lk_room)
        audit = {a["identity"]: a for a in st.sfu.audit() if a["event"] == "ghost removed"}
        assert audit[members["expired"].identity]["reason"] == "call_ended"
        assert audit[members["left"].identity]["reason"] == "call_ended"
        assert audit[members["banned"].identity]["reason"] == "banned"
        assert audit[members["kicked"].identity]["reason"] == "kicked"
        assert audit[foreign_id]["reason"] == "foreign_token"
        assert audit[members["silent"].identity]["reason"] == "no_membership"
        assert members["honest"].identity not in audit
        assert members["honest2"].identity not in audit
        status, text = await st.sfu.get("/metrics", STATUS_TOKEN)
        assert status == 200
        assert 'matrixrtc_sfu_controller_removals_total{reason="banned"} 1.0' in text
        # /status: bearer token required; lists the honest member with its Matrix state
        assert (await st.sfu.get("/status"))[0] == 401
        status, snap = await st.sfu.get("/status", STATUS_TOKEN)
        assert status == 200
        rows = {p["identity"]: p for r in snap["rooms"] for p in r["participants"]}
        assert rows[members["honest"].identity]["matrix_state"] == "ok"
        assert rows[members["honest"].identity]["user_id"] == members["honest"].user.user_id

        # Room lifecycle: the kicked member's LiveKit room has no Matrix call member left and
        # is closed once the room grace (3 s) has passed; rooms with honest members stay.
        async def closed() -> bool:
            async with lkapi.LiveKitAPI(st.lk.http_url, st.lk.api_key, st.lk.api_secret) as api:
                rooms = await api.room.list_rooms(lkapi.ListRoomsRequest())
            return members["kicked"].lk_room not in {r.name for r in rooms.rooms}

        assert await time_until(closed, 10) is not None
        closes = [a for a in st.sfu.audit() if a["event"] == "room closed"]
        assert members["kicked"].lk_room in {a["room"] for a in closes}
        assert members["honest"].lk_room not in {a["room"] for a in closes}
        assert members["honest"].identity in await present(st.lk, members["honest"].lk_room)
    finally:
        await asyncio.gather(*(m.stop() for m in members.values()))


async def leader_metric(url: str) -> float | None:
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.get(
                url + "/metrics",
                headers={"Authorization": f"Bearer {STATUS_TOKEN}"},
                timeout=aiohttp.ClientTimeout(total=1),
            ) as r,
        ):
            text = await r.text()
    except (aiohttp.ClientError, TimeoutError):
        return None
    for line in text.splitlines():
        if line.startswith("matrixrtc_sfu_controller_leader "):
            return float(line.split()[1])
    return None


async def test_two_controllers_one_leader_failover_and_one_removal_per_ghost(
    synapse: Synapse, run_dir: Path
) -> None:
    """Two stand-alone controllers on one Redis: only the leader acts; SIGKILL it and the
    other takes over within 10 s; every ghost is removed exactly once."""
    async with (
        LiveKit(run_dir, name="livekit-failover") as lk,
        Redis(run_dir, name="redis-failover") as redis,
    ):
        ctl: list[ManagedProcess] = []
        urls: list[str] = []
        for name in ("ctl-a", "ctl-b"):
            port = free_tcp_port()
            env = {
                **os.environ,
                "LIVEKIT_URL": lk.url,
                "LIVEKIT_KEY": lk.api_key,
                "LIVEKIT_SECRET": lk.api_secret,
                "LIVEKIT_REDIS_URL": redis.url,
                "MATRIXRTC_SFU_CONTROLLER_BIND": f"127.0.0.1:{port}",
                "MATRIXRTC_SFU_CONTROLLER_GRACE": "1",
                "MATRIXRTC_SFU_CONTROLLER_INTERVAL": "0.5",
            }
            ctl.append(
                ManagedProcess(
                    name=name,
                    argv=[sys.executable, "-m", "sfu", "controller"],
                    log_path=run_dir / name / "controller.log",
                    cwd=run_dir,
                    env=env,
                )
            )
            urls.append(f"http://127.0.0.1:{port}")
        async with lkapi.LiveKitAPI(lk.http_url, lk.api_key, lk.api_secret) as api:
            await api.room.create_room(lkapi.CreateRoomRequest(name="failover"))
        intruders: list[Member] = []
        try:
            for proc, url in zip(ctl, urls, strict=True):

                async def up(url: str = url) -> bool:
                    return await leader_metric(url) is not None

                await proc.start(up, 30)
                await asyncio.sleep(0.2)  # the first one takes the lock before the second starts
            leaders = [await leader_metric(u) for u in urls]
            assert leaders in ([1.0, 0.0], [0.0, 1.0]), leaders
            first = leaders.index(1.0)

            async def intrude(name: str) -> Member:
                jwt = (
                    lkapi.AccessToken(lk.api_key, lk.api_secret)
                    .with_identity(name)
                    .with_grants(lkapi.VideoGrants(room_join=True, room="failover"))
                    .to_jwt()
                )
                m = Member(UserCreds("", "", "", ""), "", name, "failover")
                m.proc = await spawn_member(lk.url, jwt, synapse, m.user, "", 0)
                intruders.append(m)
                return m

            async def gone(m: Member) -> float | None:
                async def check() -> bool:
                    return m.identity not in await present(lk, "failover")

                return await time_until(check, 10)

            assert await gone(await intrude("intruder-1")) is not None
            pid = ctl[first].pid
            assert pid is not None
            os.killpg(pid, signal.SIGKILL)
            t_kill = time.monotonic()
            other = urls[1 - first]

            async def took_over() -> bool:
                return await leader_metric(other) == 1.0

            failover = await time_until(took_over, 15)
            print(f"failover after SIGKILL of the leader: {failover} s")
            assert failover is not None
            assert failover <= 10.0
            assert time.monotonic() - t_kill <= 10.5
            assert await gone(await intrude("intruder-2")) is not None
            removals: list[str] = []
            for proc in ctl:
                for line in proc.log_path.read_text().splitlines():
                    with contextlib.suppress(ValueError):
                        obj = json.loads(line)
                        if obj.get("event") == "ghost removed":
                            removals.append(obj["identity"])
            assert sorted(removals) == ["intruder-1", "intruder-2"]
        finally:
            await asyncio.gather(*(m.stop() for m in intruders))
            await asyncio.gather(*(p.stop() for p in ctl))


async def test_limits_are_answered_at_token_time(synapse: Synapse, run_dir: Path) -> None:
    """At most 1 participant per call and 1 open call per homeserver: the next token request
    gets 403 M_RESOURCE_LIMIT_EXCEEDED; the member already in the call may reconnect."""
    port = free_tcp_port()
    async with (
        LiveKit(run_dir, name="livekit-limits") as lk,
        Redis(run_dir, name="redis-limits") as redis,
    ):
        env = service_env(
            lk,
            redis,
            LIVEKIT_JWT_BIND=f"127.0.0.1:{port}",
            LIVEKIT_FULL_ACCESS_HOMESERVERS=synapse.server_name,
            MATRIXRTC_SFU_HOMESERVER_OVERRIDES=f"{synapse.server_name}={synapse.base_url}",
            MATRIXRTC_SFU_RATE_LIMIT="0",
            MATRIXRTC_SFU_METRICS_TOKEN=STATUS_TOKEN,
            MATRIXRTC_SFU_MAX_ROOM_PARTICIPANTS="1",
            MATRIXRTC_SFU_MAX_HOMESERVER_ROOMS="1",
        )
        sfu = await Sfu.serve(run_dir, "sfu-limits", port, env)
        proc = sfu.proc
        member: Member | None = None
        try:
            alice, bob = await asyncio.gather(
                synapse.register(f"la{secrets.token_hex(3)}"),
                synapse.register(f"lb{secrets.token_hex(3)}"),
            )
            room1 = await synapse.create_call_room(alice, invite=[bob])
            room2 = await synapse.create_call_room(bob)

            async def token(user: UserCreds, room_id: str) -> tuple[int, Any]:
                oid = await synapse.openid_token(user)
                body = {"room": room_id, "openid_token": oid, "device_id": user.device_id}
                return await sfu.post("/sfu/get", body)

            status, resp = await token(alice, room1)
            assert status == 200, resp
            member = Member(
                alice,
                room1,
                legacy_identity(alice.user_id, alice.device_id),
                livekit_room_alias(room1),
            )
            member.proc = await spawn_member(lk.url, resp["jwt"], synapse, alice, room1, 0)
            status, resp = await token(bob, room1)
            assert (status, resp["errcode"]) == (403, "M_RESOURCE_LIMIT_EXCEEDED"), resp
            assert "full" in resp["error"]
            status, resp = await token(alice, room1)  # her own reconnect is not refused
            assert status == 200, resp
            status, resp = await token(bob, room2)  # a second open call from localhost
            assert (status, resp["errcode"]) == (403, "M_RESOURCE_LIMIT_EXCEEDED"), resp
            assert "Too many calls from localhost" in resp["error"]
            status, text = await sfu.get("/metrics", STATUS_TOKEN)
            assert 'matrixrtc_sfu_token_limits_total{limit="room_participants"} 1.0' in text
            assert 'matrixrtc_sfu_token_limits_total{limit="homeserver_rooms"} 1.0' in text
        finally:
            if member is not None:
                await member.stop()
            await proc.stop()


async def test_without_homeserver_access_it_says_so_and_acts_on_delegated_leaves(
    synapse: Synapse, run_dir: Path
) -> None:
    """No homeserver token: the start-up log names what the controller cannot see; a member
    who delegated its delayed leave and then sent it itself (a clean leave) is still removed,
    once the service's next restart of that delayed leave finds it gone."""
    port = free_tcp_port()
    async with (
        LiveKit(run_dir, name="livekit-nohs") as lk,
        Redis(run_dir, name="redis-nohs") as redis,
    ):
        env = service_env(
            lk,
            redis,
            LIVEKIT_JWT_BIND=f"127.0.0.1:{port}",
            LIVEKIT_FULL_ACCESS_HOMESERVERS=synapse.server_name,
            LIVEKIT_CS_API_URL_OVERRIDES=f"{synapse.server_name}={synapse.base_url}",
            MATRIXRTC_SFU_HOMESERVER_OVERRIDES=f"{synapse.server_name}={synapse.base_url}",
            MATRIXRTC_SFU_RATE_LIMIT="0",
            MATRIXRTC_SFU_CONTROLLER="1",
            MATRIXRTC_SFU_CONTROLLER_GRACE="1",
        )
        sfu = await Sfu.serve(run_dir, "sfu-nohs", port, env)
        proc = sfu.proc
        member: Member | None = None
        try:
            limits = [
                json.loads(line)["detail"]
                for line in proc.log_path.read_text().splitlines()
                if '"controller limitation"' in line
            ]
            assert any("no homeserver access" in x and "NOT removed" in x for x in limits), limits
            user = await synapse.register(f"nh{secrets.token_hex(3)}")
            room_id = await synapse.create_call_room(user)
            key = f"_{user.user_id}_{user.device_id}_m.call"
            delayed = await synapse.put_state(
                user, room_id, CALL_MEMBER, key, {}, params={"org.matrix.msc4140.delay": "4000"}
            )
            status, resp = await sfu.post(
                "/sfu/get",
                {
                    "room": room_id,
                    "openid_token": await synapse.openid_token(user),
                    "device_id": user.device_id,
                    "delay_id": delayed["delay_id"],
                    "delay_timeout": 4000,
                },
            )
            assert status == 200, resp
            member = Member(
                user,
                room_id,
                legacy_identity(user.user_id, user.device_id),
                livekit_room_alias(room_id),
            )
            member.proc = await spawn_member(lk.url, resp["jwt"], synapse, user, room_id, 0)
            await asyncio.sleep(5)  # connected, delayed leave restarted: nobody is removed
            assert member.identity in await present(lk, member.lk_room)
            # the client leaves cleanly: it sends its delayed leave itself
            await synapse.request(
                "POST",
                "/_matrix/client/unstable/org.matrix.msc4140/delayed_events/"
                f"{delayed['delay_id']}/send",
                user=user,
                json_body={},
            )
            # the next restart (every 3.2 s) finds it gone; then grace 1 s, interval 1 s
            st = Stack(synapse, lk, redis, sfu, user, run_dir)
            assert await removal_after(st, member, 10) is not None
            [audit] = [a for a in sfu.audit() if a["event"] == "ghost removed"]
            assert audit["reason"] == "call_ended"
            assert audit["identity"] == member.identity
        finally:
            if member is not None:
                await member.stop()
            await proc.stop()


async def test_inside_serve_with_workers_one_worker_leads(synapse: Synapse, run_dir: Path) -> None:
    """``serve --workers 2`` with the controller inside and Redis: both workers stand for
    election, exactly one leads (the aggregated gauge is 1), and a ghost is removed once."""
    port = free_tcp_port()
    async with (
        LiveKit(run_dir, name="livekit-workers") as lk,
        Redis(run_dir, name="redis-workers") as redis,
    ):
        env = service_env(
            lk,
            redis,
            LIVEKIT_JWT_BIND=f"127.0.0.1:{port}",
            LIVEKIT_FULL_ACCESS_HOMESERVERS=synapse.server_name,
            MATRIXRTC_SFU_METRICS_TOKEN=STATUS_TOKEN,
            MATRIXRTC_SFU_RATE_LIMIT="0",
            MATRIXRTC_SFU_CONTROLLER="1",
            MATRIXRTC_SFU_CONTROLLER_GRACE="1",
            MATRIXRTC_SFU_CONTROLLER_STATUS_TOKEN=STATUS_TOKEN,
        )
        sfu = await Sfu.serve(run_dir, "sfu-workers", port, env, "--workers", "2")
        proc = sfu.proc
        intruder: Member | None = None
        try:

            async def one_leader() -> bool:
                return await leader_metric(sfu.url) == 1.0

            assert await time_until(one_leader, 15) is not None
            async with lkapi.LiveKitAPI(lk.http_url, lk.api_key, lk.api_secret) as api:
                await api.room.create_room(lkapi.CreateRoomRequest(name="workers"))
            jwt = (
                lkapi.AccessToken(lk.api_key, lk.api_secret)
                .with_identity("intruder-w")
                .with_grants(lkapi.VideoGrants(room_join=True, room="workers"))
                .to_jwt()
            )
            intruder = Member(UserCreds("", "", "", ""), "", "intruder-w", "workers")
            intruder.proc = await spawn_member(lk.url, jwt, synapse, intruder.user, "", 0)

            async def gone() -> bool:
                return "intruder-w" not in await present(lk, "workers")

            assert await time_until(gone, 10) is not None
            await asyncio.sleep(2)  # a second removal would have happened by now
            removals = [a for a in sfu.audit() if a["event"] == "ghost removed"]
            assert [a["identity"] for a in removals] == ["intruder-w"]
            # any worker answers /status with the leader's snapshot
            for _ in range(4):
                status, snap = await sfu.get("/status", STATUS_TOKEN)
                assert status == 200
                assert snap["rooms"] is not None
            assert await leader_metric(sfu.url) == 1.0
        finally:
            if intruder is not None:
                await intruder.stop()
            await proc.stop()


async def spawn_sticky_member(
    st: Stack, user: UserCreds, room_id: str, logs: Path, delayed_leave_ms: int
) -> asyncio.subprocess.Process:
    """``python -m matrixrtc join --dialect sticky`` in the SFU call of ``room_id`` (no
    media published, unencrypted): an MSC4354 sticky membership only, as Element Call's
    matrix_2_0 mode publishes, kept alive by a delayed sticky leave. ``logs`` must exist."""
    with (logs / f"{user.user_id}.log").open("ab") as log:
        return await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "matrixrtc", "--log-level", "info", "join"),
            *("--homeserver", st.hs.base_url, "--user", user.user_id, "--room", room_id),
            *("--state-dir", str(logs / user.user_id), "--output", "json"),
            *("--dialect", "sticky", "--media", "sfu", "--e2ee", "off"),
            *("--publish", "none", "--livekit-service-url", st.sfu.url),
            *("--delayed-leave-ms", str(delayed_leave_ms)),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log,
            env={**os.environ, "MATRIXRTC_PASSWORD": user.password},
            start_new_session=True,
        )


async def sticky_events(st: Stack, room_id: str, sender: str) -> list[dict[str, Any]]:
    """The ``rtc.member`` events ``sender`` sent to the room, newest first (as the watcher)."""
    assert st.watcher is not None
    flt = json.dumps({"types": ["org.matrix.msc4143.rtc.member"], "senders": [sender]})
    body = await st.hs.request(
        "GET",
        f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/messages",
        user=st.watcher,
        params={"dir": "b", "limit": "20", "filter": flt},
    )
    return list(body.get("chunk", []))


async def test_a_sticky_member_is_kept_and_its_ended_membership_removed(
    stack: Stack, run_dir: Path
) -> None:
    """Two ``python -m matrixrtc join --dialect sticky`` members (MSC4354 sticky memberships
    only, like Element Call in matrix_2_0 mode) in an SFU call with the controller requiring
    memberships: neither is removed for lacking one, though the join grace (3 s) passes; when
    one stops (SIGSTOP) its delayed sticky leave fires, and the controller removes it as
    ``call_ended`` at most 5 s after that leave reached the homeserver."""
    st = stack
    tag = secrets.token_hex(2)
    owner = await st.hs.register(f"sto{tag}")
    ann, bob = await st.hs.register(f"sta{tag}"), await st.hs.register(f"stb{tag}")
    room_id = await st.hs.create_call_room(owner, invite=[ann, bob])
    # only invited: the controller account joins by itself (MATRIXRTC_SFU_CONTROLLER_AUTO_JOIN)
    assert st.watcher is not None
    await st.hs.request(
        "POST",
        f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/invite",
        user=owner,
        json_body={"user_id": st.watcher.user_id},
    )

    async def watcher_joined() -> bool:
        body = await st.hs.request(
            "GET", f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/joined_members", user=owner
        )
        return st.watcher is not None and st.watcher.user_id in body.get("joined", {})

    assert await time_until(watcher_joined, 30) is not None, "the controller did not join"
    procs: dict[str, asyncio.subprocess.Process] = {}
    logs = run_dir / f"sticky-members-{tag}"
    logs.mkdir(parents=True, exist_ok=True)
    try:
        for u in (ann, bob):
            procs[u.user_id] = await spawn_sticky_member(st, u, room_id, logs, 3000)

        async def rows() -> dict[str, dict[str, Any]]:
            status, snap = await st.sfu.get("/status", STATUS_TOKEN)
            assert status == 200, snap
            return {
                p["user_id"]: {**p, "room": r["room"]}
                for r in snap.get("rooms") or []
                for p in r["participants"]
                if p["user_id"] in (ann.user_id, bob.user_id)
            }

        async def both_ok() -> bool:
            got = await rows()
            return len(got) == 2 and all(p["matrix_state"] == "ok" for p in got.values())

        assert await time_until(both_ok, 60) is not None, await rows()
        seen = await rows()
        # join grace 3 s, grace 1 s: a member judged memberless would be gone by now
        await asyncio.sleep(6)
        for user in (ann.user_id, bob.user_id):
            p = seen[user]
            assert p["identity"] in await present(st.lk, p["room"]), user
            assert (await rows())[user]["matrix_state"] == "ok"
        assert not [a for a in st.sfu.audit() if a.get("user_id") in seen]

        os.killpg(procs[bob.user_id].pid, signal.SIGSTOP)  # heartbeats stop: leave fires

        async def leave_sent() -> bool:
            newest = (await sticky_events(st, room_id, bob.user_id))[:1]
            return bool(newest) and "member" not in newest[0]["content"]

        assert await time_until(leave_sent, 20) is not None, "the delayed sticky leave never fired"
        leave_ts = (await sticky_events(st, room_id, bob.user_id))[0]["origin_server_ts"] / 1000
        b = seen[bob.user_id]

        async def bob_gone() -> bool:
            return b["identity"] not in await present(st.lk, b["room"])

        assert await time_until(bob_gone, 15) is not None
        after = time.time() - leave_ts
        print(f"sticky member removed {after:.2f} s after its leave reached the homeserver")
        assert after <= LIMIT
        [audit] = [a for a in st.sfu.audit() if a.get("user_id") == bob.user_id]
        assert audit["reason"] == "call_ended"
        a = seen[ann.user_id]
        assert a["identity"] in await present(st.lk, a["room"])
        assert not [x for x in st.sfu.audit() if x.get("user_id") == ann.user_id]
    finally:
        for proc in procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGCONT)
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


async def test_with_the_admin_api_only_nobody_is_removed_for_lacking_a_membership(
    synapse: Synapse, run_dir: Path
) -> None:
    """The Synapse admin room-state API cannot see sticky memberships: the controller says so
    at start-up and never removes a participant for having no membership (it may hold a
    sticky one), while state-based evidence (a ban) is still acted on."""
    admin = await register_admin(synapse, f"ctlad{secrets.token_hex(3)}")
    port = free_tcp_port()
    async with (
        LiveKit(run_dir, name="livekit-adminonly") as lk,
        Redis(run_dir, name="redis-adminonly") as redis,
    ):
        env = controller_env(lk, synapse, redis, admin, port, admin=True)
        sfu = await Sfu.serve(run_dir, "sfu-adminonly", port, env)
        proc, log_path = sfu.proc, sfu.log_path
        st = Stack(synapse, lk, redis, sfu, admin, run_dir)
        members: list[Member] = []
        try:
            limits = [
                json.loads(line)["detail"]
                for line in log_path.read_text().splitlines()
                if '"controller limitation"' in line
            ]
            assert any("cannot see MSC4354 sticky memberships" in x for x in limits), limits
            owner = await synapse.register(f"ado{secrets.token_hex(3)}")
            # no membership published (as a sticky-only client looks through room state)
            silent = await join_call(st, owner, delay_ms=0)
            members.append(silent)
            banned = await join_call(st, owner, silent.room_id, delay_ms=0)
            members.append(banned)
            await asyncio.sleep(6)  # join grace 3 s + grace 1 s, with margin
            assert silent.identity in await present(lk, silent.lk_room)
            assert banned.identity in await present(lk, banned.lk_room)
            await synapse.request(
                "POST",
                f"/_matrix/client/v3/rooms/{quote(banned.room_id, safe='')}/ban",
                user=owner,
                json_body={"user_id": banned.user.user_id},
            )
            assert await removal_after(st, banned, 10) is not None
            await asyncio.sleep(1)
            assert silent.identity in await present(lk, silent.lk_room)
            removed = [a for a in sfu.audit() if a["event"] == "ghost removed"]
            assert [(a["identity"], a["reason"]) for a in removed] == [(banned.identity, "banned")]
            # an empty call whose members could hold unseen sticky memberships stays open
            # (room grace 3 s here); LiveKit's own empty timeout closes it later
            await silent.stop()
            await asyncio.sleep(6)
            assert not [a for a in sfu.audit() if a["event"] == "room closed"]
        finally:
            await asyncio.gather(*(m.stop() for m in members))
            await proc.stop()
