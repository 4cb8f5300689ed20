"""Join benchmark, SFU path: from starting a join to the first decrypted remote video frame.

Run inside the private network namespace (everything binds 127.0.0.1)::

    ./scripts/in-netns .venv/bin/python bench/join.py [--json] [--joins 10]

A fresh local stack (Synapse, LiveKit, our authorization service as ``python -m sfu serve``)
and one host member who publishes 320×240 @ 15 fps with E2EE. Each join is a new sticky-form
member (new member id, so a new LiveKit identity) running ``LiveKitTransport.update``: OpenID
token from Synapse, ``/get_token`` at the service, LiveKit connect with Element Call's key
provider, publish, subscribe; the clock stops at the first video frame of the host that the SDK
has decrypted and decoded. Keys are exchanged in-process at the start of the join, so the
to-device hop and the key manager's use-key delay are not in the figure. The mesh part and the
switch gap belong to a later benchmark. Prints figures only; never fails on time. Bounded:
about 35 s with the defaults, 90 s at most.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from matrixrtc.devstack import LiveKit, Synapse, UserCreds, new_run_dir
from matrixrtc.devstack._process import ManagedProcess, free_tcp_port
from matrixrtc.livekit import LiveKitTransport, MediaOptions, OwnDevice
from matrixrtc.logging import configure_logging
from matrixrtc.matrix.homeserver import OpenIdToken
from matrixrtc.model.membership import CallMembership, Dialect, RtcMemberData
from matrixrtc.model.transports import LivekitTransport

LIMIT_S = 90.0
FIRST_FRAME_TIMEOUT_S = 10.0


def _openid(hs: Synapse, user: UserCreds) -> Callable[[], Awaitable[OpenIdToken]]:
    async def fetch() -> OpenIdToken:
        path = f"/_matrix/client/v3/user/{quote(user.user_id, safe='')}/openid/request_token"
        r = await hs.request("POST", path, user=user, json_body={})
        return OpenIdToken(
            r["access_token"], r["token_type"], r["matrix_server_name"], r["expires_in"]
        )

    return fetch


def _membership(user: UserCreds, service_url: str, ts: int) -> CallMembership:
    member_id = str(uuid.uuid4())
    data = RtcMemberData.for_join(
        user_id=user.user_id,
        device_id=user.device_id,
        member_id=member_id,
        transports=[LivekitTransport(livekit_service_url=service_url)],
    )
    return CallMembership(
        dialect=Dialect.STICKY,
        event_id=f"$bench-{member_id}",
        sender=user.user_id,
        origin_server_ts=ts,
        data=data,
    )


def _transport(
    hs: Synapse, user: UserCreds, m: CallMembership, room_id: str, media: MediaOptions
) -> LiveKitTransport:
    own = OwnDevice(user.user_id, user.device_id, m.member_id, sticky=True)
    return LiveKitTransport(room_id=room_id, own=own, openid=_openid(hs, user), media=media)


async def _service(run_dir: Path, lk: LiveKit, hs: Synapse) -> tuple[ManagedProcess, str]:
    port = free_tcp_port()
    url = f"http://127.0.0.1:{port}"
    proc = ManagedProcess(
        name="bench-sfu",
        argv=[sys.executable, "-m", "sfu", "serve"],
        log_path=run_dir / "bench-sfu" / "service.log",
        cwd=run_dir,
        env={
            **os.environ,
            "LIVEKIT_URL": lk.url,
            "LIVEKIT_KEY": lk.api_key,
            "LIVEKIT_SECRET": lk.api_secret,
            "LIVEKIT_JWT_BIND": f"127.0.0.1:{port}",
            "LIVEKIT_FULL_ACCESS_HOMESERVERS": hs.server_name,
            "MATRIXRTC_SFU_HOMESERVER_OVERRIDES": f"{hs.server_name}={hs.base_url}",
            "MATRIXRTC_SFU_RATE_LIMIT": "0",
            "LIVEKIT_LOG_LEVEL": "error",
        },
    )

    async def ready() -> bool:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as s,
            s.get(url + "/healthz") as r,
        ):
            return r.status == 200

    await proc.start(ready, 30)
    return proc, url


def _ms(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"p50_ms": None, "p95_ms": None}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"p50_ms": round(1000 * statistics.median(ordered)), "p95_ms": round(1000 * p95)}


async def measure_sfu(joins: int, media: MediaOptions, gap_s: float) -> dict[str, Any]:
    run_dir = new_run_dir(prefix="bench-join")
    async with Synapse(run_dir) as hs, LiveKit(run_dir) as lk:
        proc, service_url = await _service(run_dir, lk, hs)
        try:
            host_user, guest_user = await hs.register("host"), await hs.register("guest")
            room_id = await hs.create_call_room(host_user, invite=[guest_user])
            host_m = _membership(host_user, service_url, 1)
            host = _transport(hs, host_user, host_m, room_id, media)
            host_key, guest_key = os.urandom(16), os.urandom(16)
            host.use_own_key(0, host_key)
            firsts: list[float] = []
            connects: list[float] = []
            subscribes: list[float] = []
            failures = 0
            try:
                await host.update([host_m], host_m)
                for i in range(joins):
                    guest_m = _membership(guest_user, service_url, 2 + i)
                    guest = _transport(hs, guest_user, guest_m, room_id, media)
                    guest.set_remote_key(host_m.rtc_backend_identity, 0, host_key)
                    guest.use_own_key(0, guest_key)
                    host.set_remote_key(guest_m.rtc_backend_identity, 0, guest_key)
                    started = time.monotonic()
                    try:
                        await guest.update([host_m, guest_m], guest_m)
                        (conn,) = guest.connections.values()
                        if conn.connected_at is not None:
                            connects.append(conn.connected_at - started)
                        deadline = started + FIRST_FRAME_TIMEOUT_S
                        while time.monotonic() < deadline:
                            stats = conn.stats.get(host_m.rtc_backend_identity)
                            if stats is not None and stats.first_video_at is not None:
                                firsts.append(stats.first_video_at - started)
                                if stats.video_subscribed_at is not None:
                                    subscribes.append(stats.video_subscribed_at - started)
                                break
                            await asyncio.sleep(0.005)
                        else:
                            failures += 1
                    finally:
                        await guest.aclose()
                    # LiveKit throttles key-frame requests per track (pli_throttle, up to 1 s):
                    # back-to-back joins would measure the throttle, not a join.
                    await asyncio.sleep(gap_s)
            finally:
                await host.aclose()
        finally:
            await proc.stop()
    return {
        **_ms(firsts),
        "joins": joins,
        "failed": failures,
        "first_frame_ms_all": [round(1000 * d) for d in firsts],
        "connect": _ms(connects),
        "video_subscribed": _ms(subscribes),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    media = MediaOptions(width=320, height=240, fps=15.0)
    async with asyncio.timeout(LIMIT_S):
        return {"sfu": await measure_sfu(args.joins, media, args.gap)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--joins", type=int, default=10)
    parser.add_argument("--gap", type=float, default=1.5, help="seconds between joins")
    args = parser.parse_args(argv)
    configure_logging(level="error")
    started = time.monotonic()
    result = asyncio.run(run(args))
    result["bench_duration_s"] = round(time.monotonic() - started, 1)
    if args.json:
        print(json.dumps(result))
        return 0
    sfu = result["sfu"]
    print(f"SFU join → first decrypted remote frame, {sfu['joins']} joins (320x240@15, E2EE)")
    print(f"  p50 {sfu['p50_ms']} ms   p95 {sfu['p95_ms']} ms   failed {sfu['failed']}")
    print(f"  token + LiveKit connect done: p50 {sfu['connect']['p50_ms']} ms")
    print(f"  host's video subscribed:      p50 {sfu['video_subscribed']['p50_ms']} ms")
    print(f"  all: {sfu['first_frame_ms_all']}")
    print(f"({result['bench_duration_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
