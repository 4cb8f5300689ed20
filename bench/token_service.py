"""Benchmark of ``POST /get_token`` against the real local stack.

Run inside the private network namespace (it starts its own Synapse and LiveKit)::

    ./scripts/in-netns .venv/bin/python bench/token_service.py [--json]

For each mode × workers × concurrency it starts ``python -m sfu serve --workers N`` and drives
it from a separate load-generator process: ``concurrency`` keep-alive HTTP/1.1 connections on
raw asyncio streams, each sending its next request as soon as the previous answer arrived.

- ``cold``: the OpenID cache is off and every connection has its own OpenID token, so every
  request is validated at Synapse (``/_matrix/federation/v1/openid/userinfo``);
- ``warm``: the cache is on; after one lookup every request is a cache hit.

The user is full-access, so each request also ensures the LiveKit room (CreateRoom, shared by
concurrent requests for the same room). Rate limiting is off; logs are at the default level.
The load generator shares the machine's cores with the service, Synapse and LiveKit, so the
figures are a lower bound of what the service could do on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

MODES = ("cold", "warm")
WORKERS = (1, 2)
CONCURRENCY = (1, 16, 64)


def _request(body: bytes) -> bytes:
    head = (
        "POST /get_token HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _connection(
    host: str, port: int, req: bytes, stop_at: float, lat: list[float], errors: list[int]
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            writer.write(req)
            status_line = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            lat.append(time.perf_counter() - t0)
            if not status_line.startswith(b"HTTP/1.1 200"):
                errors[0] += 1
    finally:
        writer.close()


async def _load(host: str, port: int, bodies: Sequence[bytes], duration: float) -> dict[str, Any]:
    reqs = [_request(b) for b in bodies]
    # warm-up: one request per connection's body, not measured
    warm_lat: list[float] = []
    await asyncio.gather(
        *(_connection(host, port, r, time.perf_counter() + 0.3, warm_lat, [0]) for r in reqs)
    )
    lat: list[float] = []
    errors = [0]
    t0 = time.perf_counter()
    stop_at = t0 + duration
    await asyncio.gather(*(_connection(host, port, r, stop_at, lat, errors) for r in reqs))
    elapsed = time.perf_counter() - t0
    lat.sort()

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 2) if lat else 0.0

    return {
        "rps": round(len(lat) / elapsed, 1),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "errors": errors[0],
    }


def _load_process(host: str, port: int, bodies: Sequence[bytes], duration: float) -> dict[str, Any]:
    return asyncio.run(_load(host, port, bodies, duration))


async def run(duration: float) -> dict[str, Any]:
    from matrixrtc.devstack import LiveKit, Synapse, new_run_dir
    from matrixrtc.devstack._process import ManagedProcess, free_tcp_port

    run_dir = new_run_dir(prefix="bench-token")
    results: list[dict[str, Any]] = []
    ctx = multiprocessing.get_context("spawn")
    async with Synapse(run_dir) as hs, LiveKit(run_dir) as lk:
        user = await hs.register("bench")
        room_id = await hs.create_call_room(user)
        tokens = [await hs.openid_token(user) for _ in range(max(CONCURRENCY))]

        def body(token: dict[str, Any]) -> bytes:
            return json.dumps(
                {
                    "room_id": room_id,
                    "slot_id": "m.call#ROOM",
                    "openid_token": token,
                    "member": {
                        "id": "bench",
                        "claimed_user_id": user.user_id,
                        "claimed_device_id": user.device_id,
                    },
                }
            ).encode()

        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
            for mode in MODES:
                for workers in WORKERS:
                    port = free_tcp_port()
                    env = {
                        **os.environ,
                        "LIVEKIT_URL": lk.url,
                        "LIVEKIT_KEY": lk.api_key,
                        "LIVEKIT_SECRET": lk.api_secret,
                        "LIVEKIT_FULL_ACCESS_HOMESERVERS": hs.server_name,
                        "LIVEKIT_JWT_BIND": f"127.0.0.1:{port}",
                        "MATRIXRTC_SFU_HOMESERVER_OVERRIDES": f"{hs.server_name}={hs.base_url}",
                        "MATRIXRTC_SFU_RATE_LIMIT": "0",
                        "MATRIXRTC_SFU_OPENID_CACHE_SIZE": "0" if mode == "cold" else "10000",
                    }
                    name = f"sfu-{mode}-{workers}"
                    proc = ManagedProcess(
                        name=name,
                        argv=[sys.executable, "-m", "sfu", "serve", "--workers", str(workers)],
                        log_path=run_dir / name / "service.log",
                        cwd=run_dir,
                        env=env,
                    )

                    async def ready(port: int = port) -> bool:
                        async with (
                            aiohttp.ClientSession() as s,
                            s.get(f"http://127.0.0.1:{port}/healthz") as r,
                        ):
                            return r.status == 200

                    await proc.start(ready, 30)
                    await asyncio.sleep(0.5 if workers > 1 else 0.0)  # let every worker bind
                    try:
                        for conc in CONCURRENCY:
                            bodies = [
                                body(tokens[i] if mode == "cold" else tokens[0])
                                for i in range(conc)
                            ]
                            fut = pool.submit(_load_process, "127.0.0.1", port, bodies, duration)
                            figures = await asyncio.wrap_future(fut)
                            results.append(
                                {"mode": mode, "workers": workers, "concurrency": conc, **figures}
                            )
                            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
                    finally:
                        await proc.stop()
    return {"results": results, "duration_s": duration, "run_dir": str(run_dir)}


def _table(report: dict[str, Any]) -> str:
    lines = [
        f"POST /get_token, {report['duration_s']} s per cell (logs: {report['run_dir']})",
        f"{'mode':<6}{'workers':>8}{'conc':>6}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}",
    ]
    for r in report["results"]:
        lines.append(
            f"{r['mode']:<6}{r['workers']:>8}{r['concurrency']:>6}{r['rps']:>10.0f}"
            f"{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['errors']:>8}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--duration", type=float, default=3.0, help="seconds measured per cell (default 3)"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("MATRIXRTC_LOG_LEVEL", "warning")
    report = asyncio.run(run(args.duration))
    if args.json:
        print(json.dumps({"results": report["results"]}))
    else:
        print(_table(report))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    raise SystemExit(main())
