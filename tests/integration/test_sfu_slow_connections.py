"""`python -m sfu serve` under 5 000 slow connections, started with a 1 024 soft file limit.

The service is started the way a service manager starts it (soft RLIMIT_NOFILE 1 024, a
higher hard limit). 2 500 connections trickle their headers and 2 500 send complete headers
and then trickle a body, from 100 loopback addresses (50 each, under the per-address cap);
200 more come from one address, beyond its cap. Meanwhile a client on another address asks
``/healthz`` and posts a body every 0.2 s: every one of those must be answered, the trickling
connections must be closed at their deadline (408), and the greedy address refused (503).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest_asyncio

from matrixrtc.devstack._process import free_tcp_port
from sfu.common.httpserve import LINGER_S

HEADER_TIMEOUT = 3.0
BODY_TIMEOUT = 3.0
PER_CLIENT = 64
ADDRESSES = 100
PER_ADDRESS = 50  # x 100 addresses = 5 000 slow connections
GREEDY = 200  # from one address, beyond PER_CLIENT


def _child_limits() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))


@dataclass
class Served:
    proc: asyncio.subprocess.Process
    url: str
    port: int
    log: Path


@pytest_asyncio.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    port = free_tcp_port()
    env = {
        **os.environ,
        "LIVEKIT_URL": "ws://127.0.0.1:9",
        "LIVEKIT_KEY": "testkey",
        "LIVEKIT_SECRET": "testsecret-testsecret-testsecret-0123",
        "LIVEKIT_FULL_ACCESS_HOMESERVERS": "full.invalid",
        "LIVEKIT_JWT_BIND": f"127.0.0.1:{port}",
        "MATRIXRTC_SFU_RATE_LIMIT": "0",
        "MATRIXRTC_SFU_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
        "MATRIXRTC_SFU_BODY_TIMEOUT": str(BODY_TIMEOUT),
        "MATRIXRTC_SFU_MAX_CONNS_PER_CLIENT": str(PER_CLIENT),
    }
    log = tmp_path / "service.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sfu",
            "serve",
            env=env,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            preexec_fn=_child_limits,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession() as s:
            while True:
                try:
                    async with s.get(url + "/healthz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert proc.returncode is None, log.read_text()
                assert time.monotonic() < deadline, "service did not start"
                await asyncio.sleep(0.1)
        yield Served(proc, url, port, log)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


@dataclass
class Slow(asyncio.Protocol):
    """One trickling connection; records what the server sent and when it closed."""

    trickle: bytes = b""
    opened: float = 0.0
    received: bytearray = field(default_factory=bytearray)
    closed_at: float | None = None
    transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.opened = time.monotonic()

    def data_received(self, data: bytes) -> None:
        self.received += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed_at = time.monotonic()
        self.transport = None

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    @property
    def status(self) -> int:
        head = bytes(self.received[:12])
        return int(head[9:12]) if head.startswith(b"HTTP/1.1 ") else 0


async def _open(port: int, source: str, first: bytes) -> Slow | None:
    loop = asyncio.get_running_loop()
    trickle = b"a" if first.endswith(b"{") else b"X-A: b\r\n"
    try:
        async with asyncio.timeout(5):  # a service that stopped accepting fails fast
            _t, proto = await loop.create_connection(
                lambda: Slow(trickle), "127.0.0.1", port, local_addr=(source, 0)
            )
    except (OSError, TimeoutError):
        return None
    proto.send(first)
    return proto


SLOW_HEADER = b"POST /get_token HTTP/1.1\r\nHost: x\r\n"
SLOW_BODY = (
    b"POST /get_token HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 1000\r\n\r\n{"
)
BAD_BODY = json.dumps({"room_id": "!r:x", "slot_id": ""}).encode()


async def test_slow_connections_do_not_take_the_service_off_the_air(served: Served) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this test holds 5 000+ sockets
    try:
        await _attack(served)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def _attack(served: Served) -> None:
    answered: list[float] = []
    failures: list[str] = []
    stop = asyncio.Event()

    async def probe() -> None:
        conn = aiohttp.TCPConnector(local_addr=("127.0.0.1", 0), force_close=True)
        timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    async with s.get(served.url + "/healthz") as r:
                        assert r.status == 200, r.status
                    async with s.post(served.url + "/get_token", data=BAD_BODY) as r:
                        assert r.status == 400, r.status
                        assert (await r.json())["errcode"] == "M_BAD_JSON"
                    answered.append(time.monotonic() - t0)
                except (aiohttp.ClientError, TimeoutError, AssertionError) as exc:
                    failures.append(f"{time.monotonic() - t0:.2f}s {exc!r}")
                await asyncio.sleep(0.2)

    prober = asyncio.create_task(probe())
    started = time.monotonic()
    conns: list[Slow] = []
    for i in range(ADDRESSES):
        source = f"127.0.1.{i + 1}"
        first = SLOW_HEADER if i % 2 == 0 else SLOW_BODY
        batch = await asyncio.gather(
            *(_open(served.port, source, first) for _ in range(PER_ADDRESS))
        )
        conns.extend(c for c in batch if c is not None)
    greedy = [
        c
        for c in await asyncio.gather(
            *(_open(served.port, "127.0.2.1", SLOW_HEADER) for _ in range(GREEDY))
        )
        if c is not None
    ]
    opened = time.monotonic() - started
    assert len(conns) == ADDRESSES * PER_ADDRESS, f"only {len(conns)} slow connections opened"

    # Trickle a byte per second per connection until the deadlines must have passed.
    # (a slow body's connection is read for LINGER_S more after its 408, then closed)
    until = time.monotonic() + max(HEADER_TIMEOUT, BODY_TIMEOUT) + LINGER_S + 2.0
    while time.monotonic() < until:
        for c in conns:
            c.send(c.trickle)
        await asyncio.sleep(1.0)
    stop.set()
    await prober

    still_open = sum(1 for c in conns if c.closed_at is None)
    statuses: dict[int, int] = {}
    for c in conns:
        statuses[c.status] = statuses.get(c.status, 0) + 1
    refused = sum(1 for c in greedy if c.status == 503)
    print(
        f"\n5000 slow connections opened in {opened:.1f}s; after the deadlines: "
        f"{still_open} still open, statuses {statuses}; greedy address: {refused}/{GREEDY} "
        f"refused with 503; probes answered {len(answered)}, failed {len(failures)}; "
        f"slowest probe {max(answered, default=0):.3f}s"
    )
    for c in conns + greedy:
        if c.transport is not None:
            c.transport.abort()

    log = served.log.read_text()
    assert '"soft_before": 1024' in log or "soft_before=1024" in log, log[:2000]
    assert "open-file limit raised" in log
    assert not failures, failures[:10]
    assert len(answered) >= 20
    assert still_open == 0
    assert statuses == {408: len(conns)}
    assert refused >= GREEDY - PER_CLIENT
    # Each refusal and timeout is logged once per address per minute, not once per connection.
    assert log.count("connection refused") == 1
    assert log.count("request headers not received in time") <= ADDRESSES + 1
