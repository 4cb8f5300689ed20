"""Membership benchmark: N call agents (one process each) on a real local Synapse.

    ./scripts/in-netns .venv/bin/python bench/membership.py --agents 10 [--json]

Figures (printed as one JSON object with ``--json``, else as a summary):

- ``converge_s``: all agents are released at the same instant (each has already logged in
  and synced); the time until every agent lists all N members;
- ``leave_detect_s``: one agent is SIGKILLed; the time until every other agent no longer lists
  it (its MSC4140 delayed leave fires after ``delay_ms`` without heartbeats);
- ``heartbeat_cpu_percent``: CPU used per idle agent process (sync long-poll plus delayed-leave
  restarts), averaged over an idle window, in percent of one core.

Targets on loopback with 10 agents: ``converge_s`` <= 2, ``leave_detect_s`` <= delay + 3 s.
Timestamps are ``time.monotonic()``, which on Linux is one clock for all processes. The run is
bounded (each phase has a deadline); it never passes or fails on time: it prints figures.

``--worker`` is the per-agent process this script starts for itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------------------ worker


async def _worker(args: argparse.Namespace) -> int:
    from matrixrtc.agent import AgentConfig, CallAgent
    from matrixrtc.logging import configure_logging
    from matrixrtc.matrix import Homeserver, Login
    from matrixrtc.model import LivekitTransport

    configure_logging("console", "warning")

    def say(**obj: Any) -> None:
        print(json.dumps(obj), flush=True)

    login = Login(args.user, password=os.environ["MATRIXRTC_PASSWORD"])
    async with Homeserver(args.homeserver, login, state_dir=Path(args.state_dir)) as hs:
        say(event="ready", user_id=hs.user_id, device_id=hs.device_id)
        loop = asyncio.get_running_loop()
        go = await loop.run_in_executor(None, sys.stdin.readline)
        if go.strip() != "go":
            return 1
        config = AgentConfig(
            transports=(LivekitTransport(livekit_service_url="http://127.0.0.1:9/jwt"),),
            delayed_leave_ms=args.delay_ms,
        )
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        async with CallAgent(hs, args.room, config) as agent:
            with agent.changes() as changes:
                while not stop.is_set():
                    getter = asyncio.ensure_future(changes.get())
                    stopper = asyncio.ensure_future(stop.wait())
                    done, _ = await asyncio.wait(
                        {getter, stopper}, return_when=asyncio.FIRST_COMPLETED
                    )
                    for t in (getter, stopper):
                        if t not in done:
                            t.cancel()
                            with contextlib.suppress(asyncio.CancelledError):
                                await t
                    if getter in done:
                        change = getter.result()
                        say(event="n", t=time.monotonic(), n=len(change.participants))
    return 0


# -------------------------------------------------------------------------------- main


@dataclass
class _Worker:
    proc: asyncio.subprocess.Process
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    counts: list[tuple[float, int]] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    reader: asyncio.Task[None] | None = None

    async def read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if obj.get("event") == "ready":
                self.ready.set()
            elif obj.get("event") == "n":
                async with self.changed:
                    self.counts.append((float(obj["t"]), int(obj["n"])))
                    self.changed.notify_all()

    async def first_time(self, pred: Any, after: float, within: float) -> float:
        """The first reported time > ``after`` at which ``pred(count)`` held."""

        def found() -> float | None:
            for t, n in self.counts:
                if t >= after and pred(n):
                    return t
            return None

        async def _wait() -> float:
            async with self.changed:
                await self.changed.wait_for(lambda: found() is not None)
            t = found()
            assert t is not None
            return t

        return await asyncio.wait_for(_wait(), within)

    def cpu_seconds(self) -> float:
        # schedstat's first field is on-CPU time in ns; /proc/PID/stat counts 10 ms ticks,
        # too coarse for an idle agent.
        return int(Path(f"/proc/{self.proc.pid}/schedstat").read_text().split()[0]) / 1e9


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    from matrixrtc.devstack import Synapse, new_run_dir
    from matrixrtc.logging import configure_logging

    configure_logging("console", "warning")
    n = args.agents
    run_dir = new_run_dir(prefix="bench-membership")
    workers: list[_Worker] = []
    async with Synapse(run_dir) as hs:
        users = [await hs.register(f"bench{i}") for i in range(n)]
        room = await hs.create_call_room(users[0], invite=users[1:])
        state = Path(tempfile.mkdtemp(prefix="agents-", dir=run_dir))
        try:
            for i, u in enumerate(users):
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    __file__,
                    "--worker",
                    "--homeserver",
                    hs.base_url,
                    "--user",
                    u.user_id,
                    "--room",
                    room,
                    "--state-dir",
                    str(state / str(i)),
                    "--delay-ms",
                    str(args.delay_ms),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    env={**os.environ, "MATRIXRTC_PASSWORD": u.password},
                )
                w = _Worker(proc)
                w.reader = asyncio.create_task(w.read())
                workers.append(w)
            await asyncio.wait_for(asyncio.gather(*(w.ready.wait() for w in workers)), 60)

            # 1. Simultaneous join: release everyone at once.
            t0 = time.monotonic()
            for w in workers:
                assert w.proc.stdin is not None
                w.proc.stdin.write(b"go\n")
            await asyncio.gather(*(w.proc.stdin.drain() for w in workers if w.proc.stdin))
            seen_all = await asyncio.gather(
                *(w.first_time(lambda c: c == n, t0, 30) for w in workers)
            )
            converge_s = max(seen_all) - t0

            # 2. Idle: CPU per agent over a window of heartbeats and long-polls.
            await asyncio.sleep(1.0)
            before = [w.cpu_seconds() for w in workers]
            w0 = time.monotonic()
            await asyncio.sleep(args.idle_s)
            window = time.monotonic() - w0
            cpu = [
                (w.cpu_seconds() - b) / window * 100 for w, b in zip(workers, before, strict=True)
            ]

            # 3. SIGKILL one agent; the others must see it leave via its delayed event.
            victim, others = workers[0], workers[1:]
            t_kill = time.monotonic()
            victim.proc.kill()
            await victim.proc.wait()
            deadline = args.delay_ms / 1000 + 15
            gone = await asyncio.gather(
                *(w.first_time(lambda c: c == n - 1, t_kill, deadline) for w in others)
            )
            leave_detect_s = max(gone) - t_kill
        finally:
            for w in workers:
                if w.proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        w.proc.send_signal(signal.SIGTERM)
            for w in workers:
                try:
                    await asyncio.wait_for(w.proc.wait(), 15)
                except TimeoutError:
                    w.proc.kill()
                    await w.proc.wait()
                if w.reader is not None:
                    w.reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await w.reader
    return {
        "agents": n,
        "converge_s": round(converge_s, 3),
        "leave_detect_s": round(leave_detect_s, 3),
        "heartbeat_cpu_percent": round(statistics.fmean(cpu), 2),
        "heartbeat_cpu_percent_max": round(max(cpu), 2),
        "delay_ms": args.delay_ms,
        "restart_interval_ms": min(5_000, args.delay_ms * 5 // 8),
        "idle_window_s": round(window, 1),
    }


def _summary(r: dict[str, Any]) -> str:
    delay_s = r["delay_ms"] / 1000
    return "\n".join(
        [
            f"membership benchmark: {r['agents']} agents, one process each, real Synapse",
            f"  converge   {r['converge_s']:.3f} s  (all see all after a simultaneous join;"
            f" target <= 2 s)",
            f"  leave      {r['leave_detect_s']:.3f} s  (SIGKILL -> others see the leave;"
            f" target <= {delay_s + 3:.1f} s = delay {delay_s:.1f} s + 3 s)",
            f"  idle CPU   {r['heartbeat_cpu_percent']:.2f} % per agent (max"
            f" {r['heartbeat_cpu_percent_max']:.2f} %) over {r['idle_window_s']} s,"
            f" restart every {r['restart_interval_ms']} ms",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--agents", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--delay-ms", type=int, default=3_000, help="delayed-leave delay")
    p.add_argument("--idle-s", type=float, default=10.0, help="idle window for the CPU figure")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--homeserver", help=argparse.SUPPRESS)
    p.add_argument("--user", help=argparse.SUPPRESS)
    p.add_argument("--room", help=argparse.SUPPRESS)
    p.add_argument("--state-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return asyncio.run(_worker(args))
    if args.agents < 2:
        p.error("--agents must be at least 2")
    result = asyncio.run(_main(args))
    print(json.dumps(result) if args.json else _summary(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
