"""``python -m matrixrtc demo``: bring the local stack up, run the smoke flow, report, tear down.

Later issues replace the body of the flow with the real call demo.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from livekit import api, rtc

from matrixrtc.devstack import new_run_dir
from matrixrtc.devstack.stack import LocalStack, local_stack
from matrixrtc.errors import MatrixRTCError, RemoteError

__all__ = ["register"]

log = structlog.get_logger(__name__)

CALL_MEMBER = "org.matrix.msc3401.call.member"
LEAVE_DELAY_MS = 3000


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the demo on an embedded local stack and print a report",
        description=(
            "Start Synapse + LiveKit, run the smoke flow (two users, a call room, a delayed "
            "leave that fires, a LiveKit participant), print a summary with timings, tear down."
        ),
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="directory for configs, data and logs (default: a new one under /tmp/matrixrtc-runs)",
    )
    parser.set_defaults(func=_run)


@dataclass
class _Report:
    t0: float = field(default_factory=time.monotonic)
    steps: list[tuple[str, float]] = field(default_factory=list)

    def step(self, what: str, seconds: float) -> None:
        self.steps.append((what, seconds))
        print(f"[{time.monotonic() - self.t0:6.2f} s] {what} ({seconds:.2f} s)", flush=True)


async def _matrix_flow(stack: LocalStack, report: _Report) -> None:
    hs = stack.synapse
    alice, bob = stack.users[0], stack.users[1]
    t = time.monotonic()
    room = await hs.create_call_room(alice, invite=[bob], name="demo call")
    report.step(f"call room {room} created, {bob.user_id} joined", time.monotonic() - t)

    key = f"_{alice.user_id}_{alice.device_id}_m.call"
    membership = {
        "application": "m.call",
        "call_id": "",
        "scope": "m.room",
        "device_id": alice.device_id,
        "focus_active": {"type": "livekit", "focus_selection": "oldest_membership"},
        "foci_preferred": [],
    }
    t = time.monotonic()
    await hs.put_state(alice, room, CALL_MEMBER, key, membership)
    await hs.put_state(
        alice, room, CALL_MEMBER, key, {}, params={"org.matrix.msc4140.delay": str(LEAVE_DELAY_MS)}
    )
    report.step(f"{alice.user_id} joined the call, delayed leave in 3 s", time.monotonic() - t)
    t = time.monotonic()
    while (await hs.get_state(bob, room, CALL_MEMBER, key)) != {}:
        if time.monotonic() - t > 15:
            raise RemoteError("the delayed leave did not fire within 15 s")
        await asyncio.sleep(0.05)
    report.step("delayed leave fired; bob sees alice's membership emptied", time.monotonic() - t)


async def _livekit_flow(stack: LocalStack, report: _Report) -> None:
    lk = stack.livekit
    alice = stack.users[0]
    async with api.LiveKitAPI(lk.http_url, lk.api_key, lk.api_secret) as lkapi:
        t = time.monotonic()
        await lkapi.room.create_room(api.CreateRoomRequest(name="demo-room"))
        report.step("LiveKit room demo-room created", time.monotonic() - t)
        token = (
            api.AccessToken(lk.api_key, lk.api_secret)
            .with_identity(f"{alice.user_id}:{alice.device_id}")
            .with_grants(api.VideoGrants(room_join=True, room="demo-room"))
            .to_jwt()
        )
        room = rtc.Room()
        t = time.monotonic()
        try:
            await room.connect(lk.url, token, rtc.RoomOptions(connect_timeout=10))
        except rtc.ConnectError as e:
            raise RemoteError(f"LiveKit participant could not connect: {e}") from e
        try:
            listed = await lkapi.room.list_participants(
                api.ListParticipantsRequest(room="demo-room")
            )
            identities = [p.identity for p in listed.participants]
            if identities != [f"{alice.user_id}:{alice.device_id}"]:
                raise RemoteError(f"unexpected LiveKit participants {identities}")
            report.step(f"LiveKit participant {identities[0]} connected", time.monotonic() - t)
        finally:
            await room.disconnect()


async def _demo(args: argparse.Namespace, run_dir: Path) -> int:
    report = _Report()
    print(f"matrixrtc demo: run dir {run_dir}", flush=True)
    try:
        t = time.monotonic()
        async with local_stack(run_dir) as stack:
            report.step(f"LiveKit up at {stack.livekit.url}", stack.livekit.startup_seconds or 0)
            report.step(
                f"Synapse up at {stack.synapse.base_url}", stack.synapse.startup_seconds or 0
            )
            users = ", ".join(u.user_id for u in stack.users)
            report.step(f"stack ready, users {users} registered", time.monotonic() - t)
            await _matrix_flow(stack, report)
            await _livekit_flow(stack, report)
            t = time.monotonic()
        report.step("stack stopped", time.monotonic() - t)
    except MatrixRTCError as e:
        print(f"demo FAILED: {e}", flush=True)
        return 1
    total = time.monotonic() - report.t0
    print("\nsummary", flush=True)
    for what, seconds in report.steps:
        print(f"  {seconds:6.2f} s  {what}")
    print(f"  {total:6.2f} s  total; logs under {run_dir}", flush=True)
    return 0


def _run(args: argparse.Namespace) -> int:
    run_dir: Path = args.run_dir or new_run_dir(prefix="demo")
    run_dir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(_demo(args, run_dir))
