"""How fast ``python -m matrixrtc join`` leaves on SIGTERM.

One ``join`` process per run (membership only, the given dialect); once our own membership is
in the room it gets SIGTERM, and the clock stops when the process is gone. Each run also
records when the process printed ``{"event": "left"}`` (after the leave was sent and
everything closed) and checks that the room then holds the leave. Used by the integration test
(``tests/integration/test_join_cli.py``) and ``bench/join.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matrixrtc.devstack import Synapse, UserCreds

__all__ = ["ExitRun", "sigterm_exit"]

CALL_MEMBER = "org.matrix.msc3401.call.member"
READY_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 15.0


@dataclass(frozen=True, slots=True)
class ExitRun:
    exit_ms: float  # SIGTERM → process gone
    left_ms: float  # SIGTERM → "left" printed (leave sent, everything closed)
    left_in_room: bool  # the membership was the leave content afterwards


async def _read_until_joined(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    assert proc.stdout is not None
    ready: dict[str, Any] = {}
    while True:
        line = await proc.stdout.readline()
        if not line:
            raise AssertionError("join exited before it was in the call")
        ev = json.loads(line)
        if ev.get("event") == "ready":
            ready = ev
        if ev.get("event") == "participants" and any(p["is_self"] for p in ev["participants"]):
            return ready


async def sigterm_exit(
    synapse: Synapse,
    user: UserCreds,
    room_id: str,
    state_root: Path,
    *,
    runs: int = 5,
    settle_s: float = 0.5,
    extra_args: tuple[str, ...] = (),
) -> list[ExitRun]:
    """``runs`` join processes, one after the other, each ended by SIGTERM."""
    out: list[ExitRun] = []
    for i in range(runs):
        argv = [
            sys.executable,
            "-m",
            "matrixrtc",
            "--log-level",
            "warning",
            "join",
            "--homeserver",
            synapse.base_url,
            "--user",
            user.user_id,
            "--room",
            room_id,
            "--state-dir",
            str(state_root / f"exit-{i}"),
            "--livekit-service-url",
            "http://127.0.0.1:9/livekit/jwt",  # advertised only: nothing connects to it
            "--output",
            "json",
            *extra_args,
        ]
        env = {**os.environ, "MATRIXRTC_PASSWORD": user.password}
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                ready = await _read_until_joined(proc)
            await asyncio.sleep(settle_s)  # a member in its steady state, not mid-join
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(EXIT_TIMEOUT_S):
                assert proc.stdout is not None
                rest = await proc.stdout.read()
                await proc.wait()
            gone = time.monotonic()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        left = [
            json.loads(line)
            for line in rest.decode().splitlines()
            if line.strip() and json.loads(line).get("event") == "left"
        ]
        key = f"_{user.user_id}_{ready['device_id']}_m.call"
        state = await synapse.get_state(user, room_id, CALL_MEMBER, key)
        out.append(
            ExitRun(
                exit_ms=1000 * (gone - sent),
                left_ms=1000 * (left[0]["monotonic"] - sent) if left else float("nan"),
                left_in_room=state == {},
            )
        )
    return out
