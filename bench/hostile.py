"""The token service under hostile load: 1 000 concurrent connections mixing valid and invalid
requests (issue 18).

Run inside the private network namespace (it starts its own Synapse)::

    ./scripts/in-netns .venv/bin/python bench/hostile.py [--json] [--seconds S] [--connections N]

``python -m sfu serve`` runs as deployed (rate limit, connection caps and deadlines at their
defaults, except 5 s header and body deadlines) with Synapse as the only homeserver; Synapse's users
are restricted (no LiveKit room is created), so a valid request is a full OpenID validation
and a signed token. A load process keeps ``connections`` connections busy from 500 loopback
addresses (2 each, as a botnet would, under the per-address caps), each sending, one after
another, a request drawn (fixed seed) from:

- ``forged``: a random OpenID access token for Synapse's server name;
- ``expired``: real OpenID tokens whose validity Synapse's database has set to the past;
- ``wrong_server``: a real token sent with another server name (unresolvable, or a claimed
  user of another server);
- ``ssrf``: server names that are, or resolve to, loopback, private, link-local or metadata
  addresses (``127.0.0.1:6379``, ``localhost``, ``169.254.169.254``, ``[::1]:8448``, …);
- ``oversized``: a 256 KiB body; ``malformed``: broken JSON of several kinds;
- ``slow_body``: complete headers, then the body a byte a second (slowloris);
- ``slow_header``: the headers a line a second.

Meanwhile 20 well-behaved clients (one address each) ask for a token with a valid OpenID
token every 0.25 s. Invariants: no invalid request gets a token (by the answers and by the
service's own ``tokens_issued_total``), no answer is a 5xx, every valid request gets its token,
the service's RSS stays bounded. Figures: valid p50/p99, answers per kind, RSS start/max/end.

:func:`scenario` is importable (bench/chaos.py): it takes a running Synapse and a directory,
starts and stops its own service, and returns one object in bench/chaos.py's shape
(``name``, ``transport``, ``invariants``, ``recovery_s``) plus the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import random
import secrets
import sqlite3
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

KINDS = (
    "forged",
    "expired",
    "wrong_server",
    "ssrf",
    "oversized",
    "malformed",
    "slow_body",
    "slow_header",
)
SSRF_NAMES = (
    "127.0.0.1:6379",
    "localhost",
    "localhost:8008",
    "169.254.169.254",
    "[::1]:8448",
    "10.0.0.1",
    "192.168.1.1:8448",
    "0.0.0.0",
    "metadata.google.internal",
    "2130706433",
)
MALFORMED = (
    b"{",
    b"[]",
    b"null",
    b'{"room_id": "!a:x", "room_id": "!b:x"}',
    b'{"ROOM_ID": "!a:x"}',
    b'{"room_id": "\\ud800"}',
    b'{"room_id": "\xff"}',
    b"{} {}",
    b'{"openid_token": {"access_token": 1}}',
    b"\x00" * 64,
)
SOURCES = 500  # attacker addresses: 127.0.{3,4,5}.x
VALID_CLIENTS = 20
VALID_INTERVAL = 0.25
BODY_TIMEOUT = 5.0
RSS_BOUND_MB = 400.0


def _source(i: int) -> str:
    return f"127.0.{3 + i // 250}.{1 + i % 250}"


def _http(path: str, body: bytes, extra: str = "") -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: sfu\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """(status, body, server closes); raises on a closed connection."""
    line = await reader.readline()
    if not line:
        raise ConnectionError("closed")
    status = int(line.split(b" ", 2)[1])
    length, closing = 0, False
    while True:
        h = await reader.readline()
        if h in (b"\r\n", b"\n", b""):
            break
        name, _, value = h.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value.strip())
        elif name.lower() == "connection" and value.strip().lower() == "close":
            closing = True
    body = await reader.readexactly(length) if length else b""
    return status, body, closing


class _Tally:
    def __init__(self) -> None:
        self.by_kind: dict[str, dict[str, int]] = {k: {} for k in KINDS}
        self.tokens = 0  # answers to invalid requests that carried a token
        self.errors: dict[str, int] = {}

    def add(self, kind: str, status: int | str, body: bytes = b"") -> None:
        key = str(status)
        self.by_kind[kind][key] = self.by_kind[kind].get(key, 0) + 1
        if b'"jwt"' in body:
            self.tokens += 1


async def _attacker(
    i: int, port: int, plan: dict[str, list[bytes]], stop_at: float, tally: _Tally
) -> None:
    rng = random.Random(i)
    source = _source(i % SOURCES)
    while time.monotonic() < stop_at:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), 10
            )
        except (OSError, TimeoutError) as exc:
            tally.errors[type(exc).__name__] = tally.errors.get(type(exc).__name__, 0) + 1
            await asyncio.sleep(0.5)
            continue
        try:
            while time.monotonic() < stop_at:
                kind = rng.choice(KINDS)
                if kind == "slow_header":
                    writer.write(b"POST /get_token HTTP/1.1\r\nHost: sfu\r\n")
                    status: int | str = "closed"
                    for _ in range(120):
                        try:
                            line = await asyncio.wait_for(reader.readline(), 1.0)
                        except TimeoutError:
                            writer.write(b"X-Slow: 1\r\n")
                            continue
                        if line.startswith(b"HTTP/1.1 "):
                            status = int(line.split(b" ", 2)[1])
                        break
                    tally.add(kind, status)
                    break  # the server closes after a header timeout
                if kind == "slow_body":
                    body = rng.choice(plan["forged"])
                    writer.write(_http("/get_token", body)[: -len(body)])  # headers only
                    status = "closed"
                    got = b""
                    for j in range(len(body)):
                        try:
                            status, got, _ = await asyncio.wait_for(_read_response(reader), 1.0)
                            break
                        except TimeoutError:
                            writer.write(body[j : j + 1])
                    tally.add(kind, status, got)
                    break
                body = rng.choice(plan[kind])
                writer.write(_http("/get_token", body))
                status, got, closing = await asyncio.wait_for(_read_response(reader), 30)
                tally.add(kind, status, got)
                if closing:
                    break
        except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError):
            tally.errors["reset"] = tally.errors.get("reset", 0) + 1
        except TimeoutError:
            tally.errors["timeout"] = tally.errors.get("timeout", 0) + 1
        finally:
            writer.close()


async def _attack(
    port: int, plan: dict[str, list[bytes]], seconds: float, connections: int
) -> dict[str, Any]:
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tally = _Tally()
    stop_at = time.monotonic() + seconds
    await asyncio.gather(*(_attacker(i, port, plan, stop_at, tally) for i in range(connections)))
    return {"by_kind": tally.by_kind, "tokens": tally.tokens, "client_errors": tally.errors}


def _attack_process(
    port: int, plan: dict[str, list[bytes]], seconds: float, connections: int
) -> dict[str, Any]:
    return asyncio.run(_attack(port, plan, seconds, connections))


def _body(room_id: str, user_id: str, device: str, token: dict[str, Any], **over: Any) -> bytes:
    return json.dumps(
        {
            "room_id": room_id,
            "slot_id": "m.call#ROOM",
            "openid_token": {**token, **over},
            "member": {"id": "m", "claimed_user_id": user_id, "claimed_device_id": device},
        }
    ).encode()


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


async def _metric(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        text = await r.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def scenario(
    hs: Any, run_dir: Path, *, seconds: float = 60.0, connections: int = 1000
) -> dict[str, Any]:
    """Start a token service in front of ``hs`` (a running devstack Synapse), put it under
    hostile load for ``seconds``, stop it; the report in bench/chaos.py's shape."""
    from matrixrtc.devstack._process import ManagedProcess, free_tcp_port

    users = [await hs.register(f"hostile-{secrets.token_hex(3)}") for _ in range(3)]
    room_id = await hs.create_call_room(users[0])
    valid = []
    for i in range(VALID_CLIENTS):
        user = users[i % len(users)]
        valid.append(_body(room_id, user.user_id, user.device_id, await hs.openid_token(user)))
    expired_tokens = [await hs.openid_token(users[1]) for _ in range(5)]
    db = sqlite3.connect(Path(hs.data_dir) / "homeserver.db", timeout=10)
    with db:
        for t in expired_tokens:
            db.execute(
                "UPDATE open_id_tokens SET ts_valid_until_ms = 1 WHERE token = ?",
                (t["access_token"],),
            )
    db.close()
    u0, u1 = users[0], users[1]
    real = await hs.openid_token(u0)
    plan: dict[str, list[bytes]] = {
        "forged": [
            _body(room_id, u0.user_id, "D", real, access_token=secrets.token_urlsafe(24))
            for _ in range(200)
        ],
        "expired": [_body(room_id, u1.user_id, "D", t) for t in expired_tokens],
        "wrong_server": [
            _body(room_id, u0.user_id, "D", real, matrix_server_name="evil.invalid"),
            _body(room_id, "@mallory:evil.invalid", "D", real),  # claims another user
            _body(room_id, u1.user_id, "D", real),  # u0's token claiming u1
        ],
        "ssrf": [
            _body(room_id, f"@a:{name}", "D", real, matrix_server_name=name) for name in SSRF_NAMES
        ],
        "oversized": [_body(room_id, u0.user_id, "D", real, pad="x" * 256 * 1024)],
        "malformed": list(MALFORMED),
    }
    port, metrics_port = free_tcp_port(), free_tcp_port()
    env = {
        **os.environ,
        "LIVEKIT_URL": "ws://127.0.0.1:9",
        "LIVEKIT_KEY": "hostilekey",
        "LIVEKIT_SECRET": "hostile-secret-" + secrets.token_hex(16),
        "LIVEKIT_FULL_ACCESS_HOMESERVERS": "nobody.invalid",
        "LIVEKIT_JWT_BIND": f"127.0.0.1:{port}",
        "MATRIXRTC_SFU_HOMESERVER_OVERRIDES": f"{hs.server_name}={hs.base_url}",
        "MATRIXRTC_SFU_BODY_TIMEOUT": str(BODY_TIMEOUT),
        "MATRIXRTC_SFU_HEADER_TIMEOUT": str(BODY_TIMEOUT),
        "MATRIXRTC_SFU_METRICS_BIND": f"127.0.0.1:{metrics_port}",
        "LIVEKIT_LOG_LEVEL": "warn",
    }
    name = f"sfu-hostile-{secrets.token_hex(2)}"
    proc = ManagedProcess(
        name=name,
        argv=[sys.executable, "-m", "sfu", "serve"],
        log_path=Path(run_dir) / name / "service.log",
        cwd=Path(run_dir),
        env=env,
    )
    url, metrics_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}"

    async def ready() -> bool:
        async with aiohttp.ClientSession() as s, s.get(url + "/healthz") as r:
            return r.status == 200

    await proc.start(ready, 30)
    pid = proc.pid
    assert pid is not None
    latencies: list[float] = []
    valid_fail: dict[str, int] = {}
    rss: list[float] = [_rss_mb(pid)]
    try:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
            attack = asyncio.wrap_future(
                pool.submit(_attack_process, port, plan, seconds, connections)
            )
            stop_at = time.monotonic() + seconds

            async def well_behaved(i: int) -> None:
                conn = aiohttp.TCPConnector(local_addr=(f"127.0.9.{i + 1}", 0))
                timeout = aiohttp.ClientTimeout(total=30)
                async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
                    while time.monotonic() < stop_at:
                        t0 = time.perf_counter()
                        try:
                            async with s.post(url + "/get_token", data=valid[i]) as r:
                                text = await r.text()
                                ok = r.status == 200 and '"jwt"' in text
                                key = "200" if ok else str(r.status)
                        except (aiohttp.ClientError, TimeoutError) as exc:
                            ok, key = False, type(exc).__name__
                        if ok:
                            latencies.append(time.perf_counter() - t0)
                        else:
                            valid_fail[key] = valid_fail.get(key, 0) + 1
                        await asyncio.sleep(VALID_INTERVAL)

            async def sample() -> None:
                while time.monotonic() < stop_at:
                    await asyncio.sleep(1.0)
                    rss.append(_rss_mb(pid))

            await asyncio.gather(*(well_behaved(i) for i in range(VALID_CLIENTS)), sample())
            hostile = await attack
        await asyncio.sleep(0.5)  # the attackers are done: their last slow requests ended
        rss.append(_rss_mb(pid))
        issued = await _metric(metrics_url, "matrixrtc_sfu_tokens_issued_total")
        five = await _metric_5xx(metrics_url)
        alive = proc.pid is not None and await ready()
    finally:
        await proc.stop()
    answers = sum(sum(v.values()) for v in hostile["by_kind"].values())
    hostile_5xx = sum(
        n for v in hostile["by_kind"].values() for k, n in v.items() if k.startswith("5")
    )
    invariants = {
        "no_token_for_invalid_requests": hostile["tokens"] == 0 and issued == len(latencies),
        "no_5xx": hostile_5xx == 0 and five == 0,
        "valid_requests_all_answered": not valid_fail and len(latencies) > 0,
        "rss_bounded": max(rss) < RSS_BOUND_MB,
        "service_alive": alive,
    }
    return {
        "name": "hostile_token_service",
        "transport": "token_service",
        "invariants": invariants,
        "recovery_s": None,
        "seconds": seconds,
        "connections": connections,
        "hostile_answers": answers,
        "hostile_by_kind": hostile["by_kind"],
        "hostile_client_errors": hostile["client_errors"],
        "valid_ok": len(latencies),
        "valid_failed": valid_fail,
        "valid_p50_ms": round(_pct(latencies, 0.50) * 1000, 1),
        "valid_p99_ms": round(_pct(latencies, 0.99) * 1000, 1),
        "valid_max_ms": round(max(latencies, default=0) * 1000, 1),
        "tokens_issued_by_service": issued,
        "service_5xx": five,
        "rss_mb": {"start": round(rss[0], 1), "max": round(max(rss), 1), "end": round(rss[-1], 1)},
    }


async def _metric_5xx(metrics_url: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(metrics_url + "/metrics") as r:
        text = await r.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("matrixrtc_sfu_requests_total{") and 'status="5' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _main(seconds: float, connections: int) -> dict[str, Any]:
    from matrixrtc.devstack import Synapse, new_run_dir

    run_dir = new_run_dir(prefix="bench-hostile")
    async with Synapse(run_dir) as hs:
        report = await scenario(hs, run_dir, seconds=seconds, connections=connections)
    report["run_dir"] = str(run_dir)
    return report


def _table(r: dict[str, Any]) -> str:
    lines = [
        f"hostile load: {r['connections']} connections for {r['seconds']:.0f} s, "
        f"{r['hostile_answers']} hostile answers",
        f"valid requests: {r['valid_ok']} ok, failed {r['valid_failed'] or 0}; "
        f"p50 {r['valid_p50_ms']} ms, p99 {r['valid_p99_ms']} ms, max {r['valid_max_ms']} ms",
        f"tokens issued by the service: {r['tokens_issued_by_service']:.0f}; "
        f"5xx: {r['service_5xx']:.0f}; RSS MB {r['rss_mb']}",
    ]
    for kind, counts in r["hostile_by_kind"].items():
        lines.append(f"  {kind:<13} {dict(sorted(counts.items()))}")
    lines.append(f"  client-side errors: {r['hostile_client_errors']}")
    for name, ok in r["invariants"].items():
        lines.append(f"  {'PASS' if ok else 'FAIL'} {name}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--connections", type=int, default=1000)
    args = parser.parse_args(argv)
    report = asyncio.run(_main(args.seconds, args.connections))
    print(json.dumps(report) if args.json else _table(report))
    return 0 if all(report["invariants"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
