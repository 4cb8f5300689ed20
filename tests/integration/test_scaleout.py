"""Scale-out, proven: a two-node LiveKit cluster over Redis, two token-service replicas behind
one proxy, a controller inside each replica; one call per node; then one LiveKit node and one
token-service replica are SIGKILLed.

Topology (all on 127.0.0.1, inside ``scripts/in-netns``; docs/operators.md "Scale-out"):

    members ──> token proxy ──> sfu-1 | sfu-2  (python -m sfu serve, one Redis, controllers)
       │                          │ LIVEKIT_URL = the LiveKit proxy
       └──────> LiveKit proxy ──> livekit-1 | livekit-2  (one Redis: a cluster; same keys)
    both LiveKit nodes post webhooks to the token proxy.

Each proxy is a TCP forwarder that takes upstreams in turn and skips one that refuses the
connection (what a load balancer with connect failover does). Asserted: both rooms' media is
decrypted; after the node hosting one room is killed, every participant whose connection went
through it is connected again and receives decrypted media within ``NODE_RECOVERY_S``; while a
replica is killed, every join in a steady stream succeeds; a delegated delayed leave still fires
after the kill; exactly one controller leads before and after.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from matrixrtc.devstack import AuthService, LiveKit, Redis, Synapse, UserCreds
from matrixrtc.devstack._process import free_tcp_port
from matrixrtc.devstack._service import Service
from matrixrtc.livekit import Endpoint, LiveKitConnection, MediaOptions, SfuCredentials
from matrixrtc.model.livekit_ids import livekit_identity, livekit_room_alias
from tests.integration.test_livekit_transport import (
    FIRST_FRAME_TIMEOUT,
    KeyBus,
    Participant,
    close_all,
    conn,
    make_participant,
    now_ms,
    wait_until,
)
from tests.integration.test_sfu_controller import STATUS_TOKEN, leader_metric, register_admin

pytestmark = [pytest.mark.integration, pytest.mark.scaleout, pytest.mark.timeout(180)]

NODE_RECOVERY_S = 30.0  # node killed → every affected participant receives decrypted media
CALL_MEMBER = "org.matrix.msc3401.call.member"
DELAY_MS = 4000
LEAVE_WITHIN_S = 15.0


# ------------------------------------------------------------------------------- the proxies
@dataclass
class TcpProxy:
    """Forwards each connection to the next upstream in turn; an upstream that refuses the
    connection is skipped (connect failover)."""

    upstreams: list[tuple[str, int]]
    port: int = field(default_factory=free_tcp_port)
    server: asyncio.Server | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _turn: itertools.count[int] = field(default_factory=itertools.count)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def aclose(self) -> None:
        if self.server is not None:
            self.server.close()
        for w in list(self.writers):
            w.transport.abort()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        first = next(self._turn)
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        for i in range(len(self.upstreams)):
            host, port = self.upstreams[(first + i) % len(self.upstreams)]
            try:
                upstream = await asyncio.open_connection(host, port)
                break
            except OSError:
                continue
        if upstream is None:
            writer.transport.abort()
            self.writers.discard(writer)
            return
        ur, uw = upstream
        self.writers.add(uw)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                w.transport.abort()

        tasks = [asyncio.ensure_future(pipe(reader, uw)), asyncio.ensure_future(pipe(ur, writer))]
        self.tasks.update(tasks)
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self.tasks.difference_update(tasks)
            self.writers.discard(writer)
            self.writers.discard(uw)


# ------------------------------------------------------------------------------- the topology
@dataclass
class Cluster:
    hs: Synapse
    redis: Redis
    nodes: list[LiveKit]
    replicas: list[AuthService]
    lk_proxy: TcpProxy
    token_proxy: TcpProxy

    @property
    def service_url(self) -> str:
        return f"http://127.0.0.1:{self.token_proxy.port}"


async def sigkill(svc: Service) -> None:
    pid = svc._proc.pid
    assert pid is not None
    os.killpg(pid, signal.SIGKILL)
    await svc.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def cluster(synapse: Synapse, run_dir: Path) -> AsyncIterator[Cluster]:
    token_proxy = TcpProxy([])
    lk_proxy = TcpProxy([])
    webhook = f"http://127.0.0.1:{token_proxy.port}/sfu_webhook"
    async with Redis(run_dir, name="redis-scaleout") as redis:
        redis_cfg = {"redis": {"address": f"127.0.0.1:{redis.port}"}}
        nodes = [
            LiveKit(run_dir, [webhook], redis_cfg, name=f"livekit-scaleout-{i}") for i in (1, 2)
        ]
        nodes[1].api_key, nodes[1].api_secret = nodes[0].api_key, nodes[0].api_secret
        lk_proxy.upstreams = [("127.0.0.1", n.http_port) for n in nodes]
        admin = await register_admin(synapse, f"scaleadmin{secrets.token_hex(3)}")
        env = {
            "LIVEKIT_URL": f"ws://127.0.0.1:{lk_proxy.port}",
            "LIVEKIT_REDIS_URL": redis.url,
            "MATRIXRTC_SFU_METRICS_TOKEN": STATUS_TOKEN,
            "MATRIXRTC_SFU_CONTROLLER": "1",
            "MATRIXRTC_SFU_CONTROLLER_HOMESERVER_URL": synapse.base_url,
            "MATRIXRTC_SFU_CONTROLLER_ADMIN_TOKEN": admin.access_token,
            "MATRIXRTC_SFU_CONTROLLER_STATUS_TOKEN": STATUS_TOKEN,
        }
        replicas = [
            AuthService(run_dir, nodes[0], synapse, name=f"sfu-scaleout-{i}", extra_env=env)
            for i in (1, 2)
        ]
        token_proxy.upstreams = [("127.0.0.1", r.port) for r in replicas]
        await asyncio.gather(lk_proxy.start(), token_proxy.start())
        try:
            await asyncio.gather(*(n.start() for n in nodes))
            # Service.start, not AuthService.start: the webhook is in the config already.
            await asyncio.gather(*(Service.start(r) for r in replicas))
            yield Cluster(synapse, redis, nodes, replicas, lk_proxy, token_proxy)
        finally:
            await lk_proxy.aclose()
            await token_proxy.aclose()
            await asyncio.gather(*(r.stop() for r in replicas), return_exceptions=True)
            await asyncio.gather(*(n.stop() for n in nodes), return_exceptions=True)


async def room_nodes(c: Cluster) -> dict[str, str]:
    """LiveKit room name → node id, from the cluster's Redis (``room_node_map``)."""
    proc = await asyncio.create_subprocess_exec(
        "redis-cli",
        "-p",
        str(c.redis.port),
        "--raw",
        "HGETALL",
        "room_node_map",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    words = out.decode().split()
    return dict(zip(words[::2], words[1::2], strict=False))


def node_id(lk: LiveKit) -> str | None:
    for line in lk.log_path.read_text(errors="replace").splitlines():
        if "nodeID" in line:
            for part in line.replace('"', " ").replace(",", " ").split():
                if part.startswith("ND_"):
                    return part
    return None


async def leaders(c: Cluster) -> list[float | None]:
    return [await leader_metric(r.url) for r in c.replicas if r._proc.running]


async def post(url: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(url, json=body, timeout=aiohttp.ClientTimeout(total=10)) as r,
    ):
        return r.status, await r.json(content_type=None)


# ------------------------------------------------------------------------------- the test
async def _call(c: Cluster, users: list[UserCreds], room_id: str) -> list[Participant]:
    t0 = now_ms()
    ps = [
        make_participant(c.hs, u, room_id, c.service_url, sticky=False, created_ts=t0 + i)
        for i, u in enumerate(users)
    ]
    memberships = [p.membership for p in ps]
    await asyncio.gather(*(p.transport.update(memberships, p.membership) for p in ps))
    return ps


def all_connected(ps: list[Participant]) -> bool:
    return all(len(p.transport.connections) == 1 for p in ps)


def receiving_since(ps: list[Participant], since: float) -> bool:
    for rx in ps:
        for tx in ps:
            if rx is tx:
                continue
            stats = conn(rx).stats.get(conn(tx).identity)
            if stats is None or not stats.video_times or stats.video_times[-1] <= since:
                return False
    return True


async def time_until(cond: Callable[[], Awaitable[bool]], limit: float) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if await cond():
            return time.monotonic() - start
        await asyncio.sleep(0.1)
    return None


async def test_scaleout_node_and_replica_killed(
    cluster: Cluster, user_factory: Callable[..., Awaitable[UserCreds]]
) -> None:
    c = cluster
    t_start = time.monotonic()

    async def one_leader() -> bool:
        return sorted(x or 0.0 for x in await leaders(c)) == [0.0, 1.0]

    assert await time_until(one_leader, 20) is not None, await leaders(c)

    # One call per node: calls are added until both nodes host one (node choice is LiveKit's).
    users = [await user_factory(f"so{i}") for i in range(6)]
    calls: list[list[Participant]] = []
    bus = KeyBus()
    leave_conn: LiveKitConnection | None = None
    ids = {node_id(n): n for n in c.nodes}
    try:
        placed: dict[str, list[Participant]] = {}
        for k in range(3):
            pair = users[2 * k : 2 * k + 2]
            room_id = await c.hs.create_call_room(pair[0], invite=pair[1:])
            ps = await _call(c, pair, room_id)
            bus.update(ps, ps)
            calls.append(ps)
            alias = livekit_room_alias(room_id, "m.call#ROOM")
            await wait_until(partial(all_connected, ps), 20, "connections up")
            where = (await room_nodes(c)).get(alias)
            placed.setdefault(str(where), ps)
            if len(placed) == 2:
                break
        assert len(placed) == 2, f"every call on one node: {placed.keys()} ids {ids}"
        everyone = [p for ps in calls for p in ps]
        await wait_until(
            lambda: all(receiving_since(ps, 0) for ps in calls),
            FIRST_FRAME_TIMEOUT,
            "media on both nodes",
        )

        # Kill the node that hosts the first placed call.
        victim_id = next(iter(placed))
        assert victim_id in ids, f"room on an unknown node: {victim_id} not in {ids}"
        victim = ids[victim_id]
        before = {id(p): conn(p) for p in everyone}
        await sigkill(victim)
        killed = time.monotonic()
        await wait_until(
            lambda: any(conn(p) is not before[id(p)] for p in everyone if p.transport.connections),
            20,
            "a dropped connection",
        )

        def recovered() -> bool:
            if not all(len(p.transport.connections) == 1 for p in everyone):
                return False
            affected = [ps for ps in calls if any(conn(p) is not before[id(p)] for p in ps)]
            return bool(affected) and all(receiving_since(ps, killed) for ps in affected)

        await wait_until(recovered, NODE_RECOVERY_S, "media back after the node kill")
        recovery_s = time.monotonic() - killed
        moved = sum(conn(p) is not before[id(p)] for p in everyone)
        print(
            f"node kill: {moved}/{len(everyone)} participants reconnected; "
            f"media back in {recovery_s:.1f} s"
        )
        assert all(receiving_since(ps, killed) for ps in calls)

        # A delegated delayed leave for a member connected now, through the token proxy.
        leaver = await user_factory("soleave")
        room_id = await c.hs.create_call_room(leaver)
        key = f"_{leaver.user_id}_{leaver.device_id}_m.call"
        await c.hs.put_state(
            leaver, room_id, CALL_MEMBER, key, {"application": "m.call", "call_id": ""}
        )
        scheduled = await c.hs.put_state(
            leaver,
            room_id,
            CALL_MEMBER,
            key,
            {},
            params={"org.matrix.msc4140.delay": str(DELAY_MS)},
        )
        body: dict[str, object] = {
            "room_id": room_id,
            "slot_id": "m.call#ROOM",
            "openid_token": await c.hs.openid_token(leaver),
            "member": {
                "id": "m1",
                "claimed_user_id": leaver.user_id,
                "claimed_device_id": leaver.device_id,
            },
        }
        status, token = await post(c.service_url + "/get_token", body)
        assert status == 200, token
        leave_conn = LiveKitConnection(
            SfuCredentials(
                url=str(token["url"]),
                jwt=str(token["jwt"]),
                identity=livekit_identity(leaver.user_id, leaver.device_id, "m1"),
                room=livekit_room_alias(room_id, "m.call#ROOM"),
                endpoint=Endpoint.GET_TOKEN,
            ),
            publish=False,
            media=MediaOptions(),
            e2ee=False,
        )
        await leave_conn.connect()
        delegated = {**body, "delay_id": scheduled["delay_id"], "delay_timeout": DELAY_MS}
        assert await post(c.service_url + "/delegate_delayed_leave", delegated) == (200, {})

        # Kill one replica during a steady stream of joins through the token proxy.
        joiner = await user_factory("sojoin")
        join_room = await c.hs.create_call_room(joiner)
        results: list[int] = []

        async def joins(until: float) -> None:
            n = 0
            while time.monotonic() < until:
                n += 1
                b = {
                    **body,
                    "room_id": join_room,
                    "openid_token": await c.hs.openid_token(joiner),
                    "member": {
                        "id": f"j{n}",
                        "claimed_user_id": joiner.user_id,
                        "claimed_device_id": joiner.device_id,
                    },
                }
                try:
                    st, _ = await post(c.service_url + "/get_token", b)
                except (aiohttp.ClientError, TimeoutError):
                    st = -1
                results.append(st)
                await asyncio.sleep(0.05)

        stream = asyncio.ensure_future(joins(time.monotonic() + 6.0))
        await asyncio.sleep(2.0)
        # the leader's replica: the other controller must take over
        metrics = [await leader_metric(r.url) for r in c.replicas]
        dead = c.replicas[metrics.index(1.0)]
        await sigkill(dead)
        await stream
        failed = [s for s in results if s != 200]
        print(f"replica kill: {len(results)} joins, {len(failed)} failed")
        assert len(results) >= 10
        assert failed == []

        # The delegated leave fires through the surviving replica once the member leaves.
        # 4 s delay, connected for ~8 s: only the survivor's restarts kept the leave pending
        assert await c.hs.get_state(leaver, room_id, CALL_MEMBER, key) != {}, "leave fired early"
        await leave_conn.aclose()
        left = time.monotonic()
        while await c.hs.get_state(leaver, room_id, CALL_MEMBER, key) != {}:
            assert time.monotonic() - left < LEAVE_WITHIN_S, "the delegated leave did not fire"
            await asyncio.sleep(0.1)
        print(f"delegated leave fired {time.monotonic() - left:.1f} s after leaving")

        async def survivor_leads() -> bool:
            return [x or 0.0 for x in await leaders(c)] == [1.0]

        assert await time_until(survivor_leads, 20) is not None, await leaders(c)
        print(f"scale-out test body: {time.monotonic() - t_start:.0f} s")
    finally:
        await close_all(*(p for ps in calls for p in ps))
        if leave_conn is not None:
            with contextlib.suppress(Exception):
                await leave_conn.aclose()
