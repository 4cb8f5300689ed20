"""``python -m matrixrtc join`` as a full participant, and its fast clean exit.

Real Synapse, one process per member. The exit figure here has a loose bound (the box may be
busy); ``bench/join.py`` reports ``sigterm_exit_ms`` against the p50 ≤ 150 ms target.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest_asyncio

from matrixrtc.calltest.exit_timing import sigterm_exit
from matrixrtc.devstack import Synapse, UserCreds

CALL_MEMBER = "org.matrix.msc3401.call.member"
# The process used to spend 0.2-0.4 s in the interpreter's teardown after printing "left".
TEARDOWN_P50_MS = 100.0
EXIT_P50_MS = 300.0  # loaded box; bench/join.py measures against 150
FOCUS = "http://127.0.0.1:9/livekit/jwt"


def _log_file(state_dir: Path) -> BinaryIO:
    """The process's stderr, next to its state directory."""
    state_dir.mkdir(parents=True, exist_ok=True)
    return (state_dir.parent / f"{state_dir.name}.log").open("ab")


class JoinProcess:
    """One ``join --output json`` process and everything it printed."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(
        cls, hs: Synapse, user: UserCreds, room_id: str, state_dir: Path, *extra: str
    ) -> JoinProcess:
        env = {**os.environ, "MATRIXRTC_PASSWORD": user.password}
        with _log_file(state_dir) as log:
            proc = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "matrixrtc", "--log-level", "info", "join"),
                *("--homeserver", hs.base_url, "--user", user.user_id, "--room", room_id),
                *("--state-dir", str(state_dir), "--output", "json", *extra),
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                env=env,
            )
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.lines.append(json.loads(line))
                self._changed.set()

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("event") == name]

    async def until(self, what: str, pred: Any, within: float = 30.0) -> None:
        try:
            async with asyncio.timeout(within):
                while not pred(self):
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            tail = [
                {k: v for k, v in line.items() if k in ("event", "kind", "index", "user_id", "to")}
                for line in self.lines
                if line.get("event") not in ("media", "participants")
            ][-12:]
            raise AssertionError(f"{what}: not within {within} s; last lines {tail}") from None

    async def stop(self) -> int:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.proc.wait(), 20)
        await self._reader
        return code


@pytest_asyncio.fixture(loop_scope="session")
async def procs() -> AsyncIterator[list[JoinProcess]]:
    started: list[JoinProcess] = []
    yield started
    for p in started:
        if p.proc.returncode is None:
            p.proc.kill()
            await p.proc.wait()


async def test_sigterm_sends_the_leave_and_exits_at_once(synapse: Synapse, run_dir: Path) -> None:
    user = await synapse.register(f"quit-{secrets.token_hex(2)}")
    room_id = await synapse.create_call_room(user)
    runs = await sigterm_exit(synapse, user, room_id, run_dir / "join-exit", runs=5)
    exits = [r.exit_ms for r in runs]
    teardown = [r.exit_ms - r.left_ms for r in runs]
    print(f"SIGTERM -> gone (ms): {[round(x) for x in exits]}; after 'left': {teardown}")
    assert all(r.left_in_room for r in runs), runs
    assert statistics.median(teardown) <= TEARDOWN_P50_MS, teardown
    assert statistics.median(exits) <= EXIT_P50_MS, exits


async def test_agent_config_switches_reach_the_membership(
    synapse: Synapse, run_dir: Path, procs: list[JoinProcess]
) -> None:
    user = await synapse.register(f"sw-{secrets.token_hex(2)}")
    room_id = await synapse.create_call_room(user)
    p = await JoinProcess.start(
        synapse,
        user,
        room_id,
        run_dir / f"switches-{secrets.token_hex(2)}",
        *("--livekit-service-url", FOCUS, "--transport-selection", "oldest_membership"),
        *("--expires-ms", "7200000", "--intent", "audio"),
    )
    procs.append(p)
    await p.until("ready", lambda q: q.events("ready"))
    device = p.events("ready")[0]["device_id"]
    key = f"_{user.user_id}_{device}_m.call"
    content: dict[str, Any] | None = None
    async with asyncio.timeout(20):
        while not content:
            content = await synapse.get_state(user, room_id, CALL_MEMBER, key)
            await asyncio.sleep(0.1)
    assert content["focus_active"]["focus_selection"] == "oldest_membership"
    assert content["expires"] == 7_200_000
    assert content["m.call.intent"] == "audio"
    assert await p.stop() == 0
    assert await synapse.get_state(user, room_id, CALL_MEMBER, key) == {}


async def test_sticky_dialect_and_media_keys_without_media(
    synapse: Synapse, run_dir: Path, procs: list[JoinProcess]
) -> None:
    user = await synapse.register(f"st-{secrets.token_hex(2)}")
    room_id = await synapse.create_call_room(user, encrypted=True)
    p = await JoinProcess.start(
        synapse,
        user,
        room_id,
        run_dir / f"sticky-{secrets.token_hex(2)}",
        *("--livekit-service-url", FOCUS, "--dialect", "sticky", "--e2ee", "on"),
    )
    procs.append(p)

    def sticky_self(q: JoinProcess) -> bool:
        return any(
            x["is_self"] and x["dialect"] == "sticky"
            for ev in q.events("participants")
            for x in ev["participants"]
        )

    await p.until("own sticky membership", sticky_self)
    await p.until("key 0 in use", lambda q: any(k["kind"] == "used" for k in q.events("key")))
    assert await p.stop() == 0


async def test_two_shell_participants_exchange_keys_and_media(
    synapse: Synapse, run_dir: Path, procs: list[JoinProcess]
) -> None:
    tag = secrets.token_hex(2)
    ann, bob = await synapse.register(f"sha-{tag}"), await synapse.register(f"shb-{tag}")
    room_id = await synapse.create_call_room(ann, invite=[bob], encrypted=True)
    # Sticky dialect. Bob's process starts once ann's membership is out: each process logs in
    # a new device, so ann's (Megolm-encrypted) membership was sent before bob's device
    # existed and must still reach it (ann re-sends it under a new session; before that fix
    # bob never listed ann, about one run in three when started together, see
    # test_sticky_new_device.py).
    media = (
        *("--media", "mesh", "--e2ee", "on", "--dialect", "sticky"),
        *("--mesh-host-address", "127.0.0.1", "--width", "160", "--height", "120"),
        *("--report-s", "0.5"),
    )
    a = await JoinProcess.start(synapse, ann, room_id, run_dir / f"shell-{ann.user_id}", *media)
    procs.append(a)
    await a.until(
        "ann's own membership",
        lambda q: any(x["is_self"] for ev in q.events("participants") for x in ev["participants"]),
    )
    b = await JoinProcess.start(synapse, bob, room_id, run_dir / f"shell-{bob.user_id}", *media)
    procs.append(b)
    await a.until("ready", lambda q: q.events("ready"))
    await b.until("ready", lambda q: q.events("ready"))

    def frames_from(other: JoinProcess) -> Any:
        ready = other.events("ready")[0]
        who = f"{ready['user_id']}:{ready['device_id']}"
        return lambda q: any(m["video"].get(who, 0) >= 10 for m in q.events("media"))

    started = time.monotonic()
    await a.until("video from bob", frames_from(b), 60)
    await b.until("video from ann", frames_from(a), 60)
    print(f"both decode each other's video {time.monotonic() - started:.1f} s after ready")
    for me, other in ((a, b), (b, a)):
        assert any(t["to"] == "mesh" for t in me.events("transport"))
        installed = [k for k in me.events("key") if k["kind"] == "installed"]
        assert any(k["user_id"] == other.events("ready")[0]["user_id"] for k in installed)
        assert any(k["kind"] == "used" and k["index"] == 0 for k in me.events("key"))
        dialects = {p["dialect"] for p in me.events("participants")[-1]["participants"]}
        assert dialects == {"sticky"}
    for p in (a, b):
        assert await p.stop() == 0
        assert p.events("left")
