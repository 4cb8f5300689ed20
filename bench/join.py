"""Join benchmark: join → first decrypted remote video frame on SFU and mesh; switch gaps.

Run inside the private network namespace (everything binds 127.0.0.1)::

    ./scripts/in-netns .venv/bin/python bench/join.py [--json] [--joins 10]

A fresh local stack (Synapse, LiveKit, our authorization service as ``python -m sfu serve``)
and one host member who publishes 320×240 @ 15 fps with E2EE. Each join is a new sticky-form
member (new member id, so a new LiveKit identity) running ``LiveKitTransport.update``: OpenID
token from Synapse, ``/get_token`` at the service, LiveKit connect with Element Call's key
provider, publish, subscribe; the clock stops at the first video frame of the host that the SDK
has decrypted and decoded. Keys are exchanged in-process at the start of the join, so the
to-device hop and the key manager's use-key delay are not in the figure.

Mesh path: a host member (Homeserver + CallAgent + CallKeys + MatrixMesh, mesh transport only,
encrypted room) and, per join, a freshly logged-in guest device; the clock starts when the
guest's agent starts joining (login is before) and stops at the first video frame of the host
that the guest decrypted and decoded. This one includes the whole Matrix path: membership
event, sync, Olm key exchange (and the use-key delay when the host rotates on a join after its
10 s grace period), MSC2746 signalling over to-device, ICE/DTLS.

Switch gaps: ``bench/switch.py`` (a process per member; three on the mesh with ``mesh_max`` 3,
a fourth joins and leaves). Each direction's figure is the largest gap between two decoded video
frames from one peer that any member showed around that switch.

Late joiners (``late_join_decrypt_failures``): two members on one transport (mesh, then SFU)
until their keys are past the grace period (2 s here), then a third joins; the figure is the
most frames the joiner could not decrypt in one join (target ≤ 2; see
``matrixrtc.calltest.late_join`` for how the SFU figure is derived from the SDK's states).

Fast exit (``sigterm_exit_ms``): ``python -m matrixrtc join`` processes, each SIGTERMed once in
the call; SIGTERM → process gone, with the leave in the room (target p50 ≤ 150 ms; js-sdk
42-62 ms). ``sigterm_left_ms``: SIGTERM → the process printed "left" (leave sent, all closed).

Prints figures only; never fails on time. Bounded: about 2 min with the defaults, 6 min at most.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any
from urllib.parse import quote

from bench._run import run_bench
from bench.switch import measure_switch
from matrixrtc.agent import AgentConfig, CallAgent
from matrixrtc.call_keys import CallKeys
from matrixrtc.calltest.exit_timing import sigterm_exit
from matrixrtc.calltest.late_join import late_join
from matrixrtc.devstack import AuthService, LiveKit, Synapse, UserCreds, new_run_dir
from matrixrtc.livekit import LiveKitTransport, MediaOptions, OwnDevice
from matrixrtc.matrix import Homeserver, Login
from matrixrtc.matrix.homeserver import OpenIdToken
from matrixrtc.media.sources import SyntheticVideoTrack
from matrixrtc.mesh.engine import MeshConfig
from matrixrtc.mesh.matrix_link import MatrixMesh, MeshLinkConfig
from matrixrtc.model.membership import CallMembership, Dialect, RtcMemberData
from matrixrtc.model.transports import FullMeshTransport, LivekitTransport
from matrixrtc.session.media_policy import MediaKind
from matrixrtc.session.mesh_signalling import DeviceRef, SignallingConfig

LIMIT_S = 360.0
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


_QUIET = {"LIVEKIT_LOG_LEVEL": "error"}


def _ms(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"p50_ms": None, "p95_ms": None}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"p50_ms": round(1000 * statistics.median(ordered)), "p95_ms": round(1000 * p95)}


async def measure_sfu(joins: int, media: MediaOptions, gap_s: float) -> dict[str, Any]:
    run_dir = new_run_dir(prefix="bench-join")
    async with (
        Synapse(run_dir) as hs,
        LiveKit(run_dir) as lk,
        AuthService(run_dir, lk, hs, name="bench-sfu", extra_env=_QUIET) as svc,
    ):
        service_url = svc.url
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
    return {
        **_ms(firsts),
        "joins": joins,
        "failed": failures,
        "first_frame_ms_all": [round(1000 * d) for d in firsts],
        "connect": _ms(connects),
        "video_subscribed": _ms(subscribes),
    }


_MESH_LINK = MeshLinkConfig(
    mesh=MeshConfig(
        host_addresses=("127.0.0.1",),
        signalling=SignallingConfig(invite_timeout_ms=4000, retry_interval_ms=1000),
    )
)


async def measure_mesh(joins: int, media: MediaOptions, gap_s: float) -> dict[str, Any]:
    run_dir = new_run_dir(prefix="bench-join-mesh")
    mesh_only = AgentConfig(transports=(FullMeshTransport(),))
    async with Synapse(run_dir) as hs:
        host_user, guest_user = await hs.register("host"), await hs.register("guest")
        room_id = await hs.create_call_room(host_user, invite=[guest_user], encrypted=True)
        firsts: list[float] = []
        failures = 0
        async with contextlib.AsyncExitStack() as host_stack:
            host_hs = await host_stack.enter_async_context(
                Homeserver(hs.base_url, Login(host_user.user_id, password=host_user.password))
            )
            host_agent = await host_stack.enter_async_context(
                CallAgent(host_hs, room_id, mesh_only)
            )
            host_keys = await host_stack.enter_async_context(CallKeys(host_agent))
            host_track = SyntheticVideoTrack(media.width, media.height, media.fps)
            host_stack.callback(host_track.stop)
            await host_stack.enter_async_context(
                MatrixMesh(host_agent, keys=host_keys, sources=[host_track], config=_MESH_LINK)
            )
            host_ref = DeviceRef(host_hs.user_id, host_hs.device_id)
            for _ in range(joins):
                async with contextlib.AsyncExitStack() as guest_stack:
                    guest_hs = await guest_stack.enter_async_context(
                        Homeserver(
                            hs.base_url, Login(guest_user.user_id, password=guest_user.password)
                        )
                    )
                    track = SyntheticVideoTrack(media.width, media.height, media.fps)
                    guest_stack.callback(track.stop)
                    started = time.monotonic()
                    agent = await guest_stack.enter_async_context(
                        CallAgent(guest_hs, room_id, mesh_only)
                    )
                    keys = await guest_stack.enter_async_context(CallKeys(agent))
                    mesh = await guest_stack.enter_async_context(
                        MatrixMesh(agent, keys=keys, sources=[track], config=_MESH_LINK)
                    )
                    deadline = started + FIRST_FRAME_TIMEOUT_S
                    while time.monotonic() < deadline:
                        link = mesh.engine.link_for(host_ref) if mesh.engine else None
                        video = link.stats.get("video") if link is not None else None
                        if video is not None and video.first_frame_at is not None:
                            firsts.append(video.first_frame_at - started)
                            break
                        await asyncio.sleep(0.005)
                    else:
                        failures += 1
                await asyncio.sleep(gap_s)
    return {
        **_ms(firsts),
        "joins": joins,
        "failed": failures,
        "first_frame_ms_all": [round(1000 * d) for d in firsts],
    }


async def measure_late_join(runs: int) -> dict[str, Any]:
    run_dir = new_run_dir(prefix="bench-late-join")
    every: dict[str, list[int]] = {"mesh": [], "sfu": []}
    firsts: dict[str, list[float]] = {"mesh": [], "sfu": []}
    async with (
        Synapse(run_dir) as hs,
        LiveKit(run_dir) as lk,
        AuthService(run_dir, lk, hs, name="bench-sfu", extra_env=_QUIET) as svc,
    ):
        n = 0
        for kind in (MediaKind.MESH, MediaKind.SFU):
            for _ in range(runs):
                n += 1
                users = (
                    await hs.register(f"lja{n}"),
                    await hs.register(f"ljb{n}"),
                    await hs.register(f"ljc{n}"),
                )
                r = await late_join(hs, users, kind, sfu_url=svc.url)
                every[kind.value].append(r.total)
                firsts[kind.value] += [s for s in r.first_frame_s.values() if s is not None]
    return {
        "mesh": max(every["mesh"]),
        "sfu": max(every["sfu"]),
        "all": every,
        "first_frame_ms_p50": {
            k: round(1000 * statistics.median(v)) if v else None for k, v in firsts.items()
        },
    }


async def measure_sigterm(runs: int) -> dict[str, Any]:
    run_dir = new_run_dir(prefix="bench-sigterm")
    async with Synapse(run_dir) as hs:
        user = await hs.register("quitter")
        room_id = await hs.create_call_room(user)
        done = await sigterm_exit(hs, user, room_id, run_dir, runs=runs)
    exits = sorted(r.exit_ms for r in done)
    lefts = sorted(r.left_ms for r in done)
    return {
        "sigterm_exit_ms": {
            "p50": round(statistics.median(exits)),
            "max": round(exits[-1]),
            "all": [round(x) for x in exits],
            "left_in_room": sum(r.left_in_room for r in done),
            "runs": len(done),
        },
        "sigterm_left_ms": {"p50": round(statistics.median(lefts)), "max": round(lefts[-1])},
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    media = MediaOptions(width=320, height=240, fps=15.0)
    async with asyncio.timeout(LIMIT_S):
        sfu = await measure_sfu(args.joins, media, args.gap)
        mesh = await measure_mesh(args.joins, media, args.gap)
        switch = await measure_switch(replace(media, audio=False))
        late = await measure_late_join(args.late_joins)
        exits = await measure_sigterm(args.exits)
    durations = switch.pop("switch_duration_ms")
    switch_detail = switch.pop("detail")
    return {
        "mesh": mesh,
        "sfu": sfu,
        "switch_gap_ms": switch,
        "switch_duration_ms": durations,
        "switch_detail": switch_detail,
        "late_join_decrypt_failures": late,
        **exits,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--joins", type=int, default=10)
    parser.add_argument("--gap", type=float, default=1.5, help="seconds between joins")
    parser.add_argument("--late-joins", type=int, default=3, help="late joins per transport")
    parser.add_argument("--exits", type=int, default=10, help="SIGTERMed join processes")
    args = parser.parse_args(argv)
    result = run_bench(run, args)
    if result is None:
        return 0
    sfu = result["sfu"]
    print(f"SFU join → first decrypted remote frame, {sfu['joins']} joins (320x240@15, E2EE)")
    print(f"  p50 {sfu['p50_ms']} ms   p95 {sfu['p95_ms']} ms   failed {sfu['failed']}")
    print(f"  token + LiveKit connect done: p50 {sfu['connect']['p50_ms']} ms")
    print(f"  host's video subscribed:      p50 {sfu['video_subscribed']['p50_ms']} ms")
    print(f"  all: {sfu['first_frame_ms_all']}")
    mesh = result["mesh"]
    print(f"mesh join (membership, Olm keys, to-device signalling) → first frame, {mesh['joins']}")
    print(f"  p50 {mesh['p50_ms']} ms   p95 {mesh['p95_ms']} ms   failed {mesh['failed']}")
    print(f"  all: {mesh['first_frame_ms_all']}")
    gaps, took = result["switch_gap_ms"], result["switch_duration_ms"]
    print("switch, largest video gap any member saw (3 on mesh, mesh_max 3, a 4th joins/leaves)")
    print(f"  mesh → sfu {gaps['mesh_to_sfu']} ms (switch took {took['mesh_to_sfu']} ms)")
    print(f"  sfu → mesh {gaps['sfu_to_mesh']} ms (switch took {took['sfu_to_mesh']} ms)")
    late = result["late_join_decrypt_failures"]
    print("late joiner (after the key grace period), most undecryptable frames in one join")
    print(f"  mesh {late['mesh']}  sfu {late['sfu']}  (target <= 2; all: {late['all']})")
    ex, lf = result["sigterm_exit_ms"], result["sigterm_left_ms"]
    print(f"SIGTERM -> leave sent and process gone, {ex['runs']} runs")
    print(f"  p50 {ex['p50']} ms  max {ex['max']} ms  (target p50 <= 150; all {ex['all']})")
    print(f"  leave in the room {ex['left_in_room']}/{ex['runs']}; 'left' p50 {lf['p50']} ms")
    print(f"({result['bench_duration_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
