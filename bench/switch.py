"""Switch benchmark: the largest media gap any member sees when a call moves mesh → SFU → mesh.

Run inside the private network namespace (everything binds 127.0.0.1)::

    ./scripts/in-netns .venv/bin/python bench/switch.py [--json] [--no-acks]

A fresh local stack (Synapse, LiveKit, our authorization service). Every member is **its own
process** (``python -m bench.switch --member``: Homeserver + CallAgent + CallKeys +
MediaSwitcher, 320×240 @ 15 VP8 with frame E2EE, ``mesh_max`` 3), as in a real call: a member
receives frames on its own event loop, so a stall in one member's process is that member's
gap, not everyone's. Three members start on the mesh; a fourth joins (the call moves to the
SFU) and, once everyone is on the SFU, leaves (the call moves back to the mesh). The fourth's
process is started and logged in before anything is measured and stays up (out of the call)
until the end, as a user's client is open before they join and exits on their own machine: its
interpreter start (≈ 1 s of CPU: imports, login, Olm account) and exit are not the join and
the leave, and on this 2-core box they took 0.3–0.5 of a core from the members measured.

Each member measures what it shows: the gaps between consecutive decoded (so decrypted) video
frames of each other member, over the transport it takes that member from at the time
(``MediaSwitcher.via``: the old one until the new one delivered that member, then the new
one). A gap still open at the end counts. ``mesh_to_sfu`` is the largest gap any member saw
from any other between the join and the leave, ``sfu_to_mesh`` from the leave to the end.
Process clocks are comparable: ``time.monotonic`` is the machine's CLOCK_MONOTONIC.

The homeserver and the authorization service run at a lower CPU weight than the members and
LiveKit (``--homeserver-nice``, default 19: ``os.setpriority`` on every thread and the nice of
their scheduler autogroup; 0: the same weight). On a real call they are servers elsewhere; on
this box a switch's signalling (memberships, Olm to-device messages, acknowledgements, the
syncs that carry them) took 0.2–0.35 of a core in Synapse at the very moment the members ran
both paths, and what the members see was partly Synapse's scheduling. LiveKit keeps the
members' weight: it carries the media. A lower weight makes the switch take longer (Synapse
answers later; 1.43–1.58 s instead of 1.14–1.34 mesh→SFU), never the gap (the old path
carries the media meanwhile). ``homeserver_nice`` in the result says what was applied.

``acks`` False (``--no-acks``): members tear down their old transport once they receive
everyone on the new one, without waiting to be received there (the switcher before
make-before-break acknowledgements), for before/after figures in one run.

Prints figures only; never fails on a figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from bench._host import (
    CpuSample,
    busy_cores,
    cpu_sample,
    lower_cpu_weight,
    process_cpu,
    steal_cores,
    udp_drops,
    udp_sample,
)
from bench._run import run_bench
from matrixrtc import event_loop
from matrixrtc.devstack import AuthService, LiveKit, Synapse, UserCreds, new_run_dir
from matrixrtc.livekit import MediaOptions
from matrixrtc.logging import configure_logging

_QUIET = {"LIVEKIT_LOG_LEVEL": "error"}
# What every member sends. On the SFU the SDK's VP8 encoder gets a 600 kbit/s cap (its default
# for 320×240 is ≈225, under which it dropped whole frames of the synthetic picture: 100–140 ms
# holes every receiver of one sender saw at once, in a steady SFU call with no switch) and
# keeps the frame rate under load; ``--sdk-encoder-defaults`` measures without.
SWITCH_MEDIA = MediaOptions(
    width=320, height=240, fps=15.0, max_video_kbps=600, keep_framerate=True
)
SDK_DEFAULT_MEDIA = MediaOptions(width=320, height=240, fps=15.0)
_ROOT = Path(__file__).resolve().parent.parent  # members run as ``python -m bench.switch``
_MARK = "@@switch "  # our lines on a member's stdout
# A member's report is one line: every gap over 50 ms, stall and key event (asyncio's default
# 64 KiB line limit was overrun by a run with 10 s steady windows: the report was lost).
_LINE_LIMIT = 64 * 1024 * 1024
SETTLE_TIMEOUT_S = 60.0
# Media before each switch, and after it before the next step (BENCH_SWITCH_STEADY_S: longer
# steady windows for the no-switch controls).
STEADY_S = float(os.environ.get("BENCH_SWITCH_STEADY_S", "3.0"))
LIMIT_S = 240.0
HOMESERVER_NICE = 19  # see the module docstring
TEARDOWN_S = 1.5


@dataclass(frozen=True, slots=True)
class MemberArgs:
    base_url: str
    user_id: str
    password: str
    room_id: str
    service_url: str
    width: int
    height: int
    fps: float
    audio: bool
    acks: bool
    mesh_max: int = 3
    max_video_kbps: int | None = None
    keep_framerate: bool = False
    engine: str = "sdk"  # MediaOptions.engine: the SFU client (--sfu-engine)
    # The fourth member: started and logged in before the measurement, joins on "join", and
    # after leaving the call stays up until "exit" (see _member).
    visitor: bool = False


# -- the member process ---------------------------------------------------------------------


def _emit(out: TextIO, **fields: Any) -> None:
    out.write(_MARK + json.dumps(fields) + "\n")
    out.flush()


async def _member(args: MemberArgs) -> None:
    from matrixrtc.agent import AgentConfig, CallAgent
    from matrixrtc.call_keys import CallKeys
    from matrixrtc.matrix import Homeserver, Login
    from matrixrtc.mesh.engine import MeshConfig
    from matrixrtc.mesh.matrix_link import MeshLinkConfig
    from matrixrtc.model.transports import FullMeshTransport, LivekitTransport
    from matrixrtc.session.mesh_signalling import SignallingConfig
    from matrixrtc.switching import MediaSwitcher, SwitchConfig

    media = MediaOptions(
        width=args.width, height=args.height, fps=args.fps, audio=args.audio,
        max_video_kbps=args.max_video_kbps, keep_framerate=args.keep_framerate,
        engine="aiortc" if args.engine == "aiortc" else "sdk",
    )  # fmt: skip
    mesh = MeshLinkConfig(
        mesh=MeshConfig(
            host_addresses=("127.0.0.1",),
            signalling=SignallingConfig(invite_timeout_ms=4000, retry_interval_ms=1000),
        )
    )
    config = SwitchConfig(
        mesh_max=args.mesh_max, media=media, mesh=mesh, acks=args.acks,
        # BENCH_SWITCH_SHARE=0: each transport encodes its own copy (A/B against sharing).
        share_encoders=os.environ.get("BENCH_SWITCH_SHARE", "1") != "0",
    )  # fmt: skip
    transports = (LivekitTransport(livekit_service_url=args.service_url), FullMeshTransport())
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    async with Homeserver(args.base_url, Login(args.user_id, password=args.password)) as hs:
        if args.visitor:
            # Logged in before the measurement, as a user's client is open before they join:
            # the process start is not part of the join (it is on their machine, not here).
            _emit(sys.stdout, event="ready")
            await stdin.readline()  # "join"
        async with contextlib.AsyncExitStack() as stack:
            agent = await stack.enter_async_context(
                CallAgent(hs, args.room_id, AgentConfig(transports=transports))
            )
            keys = await stack.enter_async_context(CallKeys(agent))
            switcher = await stack.enter_async_context(MediaSwitcher(agent, keys, config))

            async def report_switches() -> None:
                with switcher.switches() as records:
                    async for r in records:
                        _emit(sys.stdout, event="switched", old=r.old, new=r.new.value,
                              finished_at=r.finished_at, handover=r.handover)  # fmt: skip

            # (when, seconds late, seconds of this thread's CPU meanwhile) where the loop was
            # > 20 ms late: CPU near the lateness is our own long callbacks; far under it, the
            # process waited for a core (or the GIL).
            stalls: list[tuple[float, float, float]] = []

            async def watch_loop() -> None:
                while True:
                    before, cpu = time.monotonic(), time.thread_time()
                    await asyncio.sleep(0.01)
                    late = time.monotonic() - before - 0.01
                    if late > 0.02:
                        stalls.append((before, late, time.thread_time() - cpu))

            key_events: list[tuple[float, str, int | None, str | None]] = []

            async def watch_keys() -> None:
                with keys.events() as events:
                    async for ev in events:
                        if ev.kind.value in ("used", "installed"):
                            key_events.append((ev.monotonic, ev.kind.value, ev.index, ev.user_id))

            helpers = [
                asyncio.create_task(report_switches()),
                asyncio.create_task(watch_loop()),
                asyncio.create_task(watch_keys()),
            ]
            try:
                await stdin.readline()  # "leave", or EOF: the parent is done with us
            finally:
                for task in helpers:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            switcher.refresh()  # every frame counted so far: an open gap is not a stale view
            now = time.monotonic()
            gaps = [
                (g.peer.user_id, g.start, g.end, g.transport.value, False)
                for g in switcher.gaps
                if g.seconds > 0.05
            ]
            for ref, seen in switcher.peers.items():  # a gap still open now counts
                present = any(
                    (p.user_id, p.device_id) == (ref.user_id, ref.device_id)
                    for p in agent.participants
                )
                if present and seen.last_frame_at is not None and seen.open_gap_s(now) > 0.05:
                    gaps.append((ref.user_id, seen.last_frame_at, now, "open", True))
            # As Call.leave(): the leave event before the rest (this report, the teardown),
            # so the others start switching at once; the gaps were taken just before.
            await agent.leave()
            _emit(
                sys.stdout,
                event="report",
                user=args.user_id,
                gaps=gaps,
                history=[
                    {
                        "old": r.old,
                        "new": r.new.value,
                        "started_at": r.started_at,
                        "finished_at": r.finished_at,
                        "handover": r.handover,
                    }
                    for r in switcher.history
                ],
                cut_at={
                    ref.user_id: {k.value: t for k, t in seen.cut_at.items()}
                    for ref, seen in switcher.peers.items()
                },
                frames={
                    ref.user_id: {k.value: n for k, n in seen.frames.items()}
                    for ref, seen in switcher.peers.items()
                },
                stalls=stalls,
                keys=key_events,
                frame_trace=_frame_trace(),
                rx_trace=_rx_trace(),
                pickup_trace=_pickup_trace(),
            )
        if args.visitor:
            # Out of the call; the process ends after the measurement (its exit is not part
            # of the leave: on a real call it runs on the leaver's own machine).
            _emit(sys.stdout, event="left")
            await stdin.readline()  # "exit", or EOF


def _frame_trace() -> list[Any]:
    """This member's encoders' per-frame rows (``MATRIXRTC_FRAME_TRACE=1``; else empty), the
    newest ``fanout.TRACE_ROWS`` of each trace, as are the two below."""
    from matrixrtc.mesh.fanout import FRAME_TRACE

    return list(FRAME_TRACE) if FRAME_TRACE is not None else []


def _pickup_trace() -> list[Any]:
    """This member's RTP senders' per-frame rows (``MATRIXRTC_FRAME_TRACE=1``)."""
    from matrixrtc.mesh.fanout import PICKUP_TRACE

    return list(PICKUP_TRACE) if PICKUP_TRACE is not None else []


def _rx_trace() -> list[Any]:
    """This member's receive hooks' per-frame rows (``MATRIXRTC_FRAME_TRACE=1``)."""
    from matrixrtc.mesh.fanout import RX_TRACE

    return list(RX_TRACE) if RX_TRACE is not None else []


# -- the parent -----------------------------------------------------------------------------


class _Proc:
    """One member process and the lines it printed."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc
        self.switched: list[dict[str, Any]] = []
        self.report: dict[str, Any] | None = None
        self.events: set[str] = set()  # "ready", "left" (the visitor's)
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, name: str, args: MemberArgs, log: Path) -> _Proc:
        member = [sys.executable, "-m", "bench.switch", "--member", json.dumps(asdict(args))]
        return await cls.spawn(name, member, log)

    @classmethod
    async def spawn(cls, name: str, argv: Sequence[str], log: Path) -> _Proc:
        with log.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=err, cwd=_ROOT, limit=_LINE_LIMIT,
            )  # fmt: skip
        return cls(name, proc)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace")
            if not line.startswith(_MARK):
                continue
            msg = json.loads(line[len(_MARK) :])
            if msg["event"] == "switched":
                self.switched.append(msg)
            elif msg["event"] == "report":
                self.report = msg
            else:
                self.events.add(msg["event"])
            self._changed.set()

    async def _until(self, done: Callable[[], bool]) -> None:
        """Until ``done()`` holds after one of our lines; fails if the member exits first."""
        while not done():
            if self.proc.returncode is not None:
                # Its last lines (the report) may still be in the pipe: read them first.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._reader), 5.0)
                if done():
                    return
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode})")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._changed.wait()

    async def on(self, kind: str) -> dict[str, Any]:
        """Until this member's latest start or switch is to ``kind``."""
        async with asyncio.timeout(SETTLE_TIMEOUT_S):
            await self._until(lambda: bool(self.switched and self.switched[-1]["new"] == kind))
        return self.switched[-1]

    async def leave(self) -> dict[str, Any]:
        """Ask for the report and let the member leave the call."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"leave\n")
        await self.proc.stdin.drain()
        async with asyncio.timeout(30):
            await self._until(lambda: self.report is not None)
            await self.proc.wait()
            await self._reader
        assert self.report is not None
        return self.report

    async def command(self, line: str, until: str | None = None) -> None:
        """Write ``line`` to the member; then wait for its ``until`` event."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()
        if until is not None:
            await self.until_event(until)

    async def until_event(self, event: str) -> None:
        async with asyncio.timeout(SETTLE_TIMEOUT_S):
            await self._until(lambda: event in self.events)

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


class _Profile:
    """py-spy sampling a set of member processes while one switch runs (``--profile DIR``):
    each writes collapsed stacks (``--format raw``, CPU samples only, every thread), read back
    into the share of samples each function was on the stack for."""

    def __init__(self, out: Path | None, window: str) -> None:
        self._out = out
        self._window = window
        self._spies: list[tuple[asyncio.subprocess.Process, Path]] = []

    async def add(self, member: _Proc) -> None:
        if self._out is None:
            return
        path = self._out / f"{self._window}-{member.name}.txt"
        spy = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).with_name("py-spy")), "record", "--nonblocking",
            "--rate", "200", "--format", "raw", "--output", str(path),
            "--pid", str(member.proc.pid),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        self._spies.append((spy, path))

    async def stop(self) -> dict[str, Any] | None:
        """Stop sampling (py-spy writes its file on SIGINT); the summary over every member."""
        if self._out is None:
            return None
        for spy, _ in self._spies:
            if spy.returncode is None:
                spy.send_signal(signal.SIGINT)
        for spy, _ in self._spies:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await spy.wait()
            if spy.returncode is None:
                spy.kill()
                await spy.wait()
        return _summarize([p for _, p in self._spies if p.exists()])


# Where a sample's stack passes (py-spy prints frames as ``Class.func (pkg/file.py:line)``),
# under one heading; a sample counts for every heading its stack matches.
_GROUPS: dict[str, tuple[str, ...]] = {
    "matrix_adapter": ("matrixrtc/matrix/",),  # sync, to-device, crypto (nio below it)
    "olm_and_store": ("nio/crypto/", "nio/store/", "peewee.py"),
    "sqlite": ("peewee.py",),
    "rtp_receive": ("aiortc/rtcrtpreceiver.py", "aiortc/rtcdtlstransport.py"),
    "vp8_decode": ("Vp8Decoder.decode (",),
    "vp8_encode": ("Vp8Encoder.encode (",),
    "ice": ("aioice/",),
    "frame_crypto": ("matrixrtc/e2ee/",),
    "livekit_adapter": ("matrixrtc/livekit/",),
    "mesh_adapter": ("matrixrtc/mesh/",),
}


def _summarize(paths: Sequence[Path]) -> dict[str, Any]:
    """Share of CPU samples (over all the files) each function, and each :data:`_GROUPS`
    heading, was on the stack for."""
    total = 0
    inclusive: dict[str, int] = {}
    groups = dict.fromkeys(_GROUPS, 0)
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            total += n
            for name in {f.rsplit(":", 1)[0] + ")" for f in stack.split(";")}:
                inclusive[name] = inclusive.get(name, 0) + n
            for group, needles in _GROUPS.items():
                if any(needle in stack for needle in needles):
                    groups[group] += n
    pct = 100 / total if total else 0.0
    top = sorted(inclusive.items(), key=lambda kv: -kv[1])[:25]
    return {
        "samples": total,
        "groups_pct": {g: round(n * pct, 1) for g, n in groups.items()},
        "top_pct": [[name, round(n * pct, 1)] for name, n in top],
    }


def _cores_by_process(
    since: tuple[CpuSample, dict[str, float]],
    until: tuple[CpuSample, dict[str, float]],
) -> dict[str, float]:
    """How many cores each process kept busy on average between two snapshots
    (``(cpu_sample(), process_cpu())``); a process started in between counts from its start,
    one that ended in between is left out. ``other``: the rest of the machine."""
    wall = (until[0].total - since[0].total) / (os.cpu_count() or 1)
    if wall <= 0:
        return {}
    out = {
        name: round((used - since[1].get(name, 0.0)) / wall, 2)
        for name, used in until[1].items()
        if name in since[1] or name.startswith("sw")
    }
    out["other"] = round(busy_cores(since[0], until[0]) - sum(out.values()), 2)
    return out


def _name(user_id: str) -> str:
    return user_id.split(":")[0].lstrip("@")


def _largest(
    reports: Sequence[dict[str, Any]], since: float, until: float, exclude: str | None = None
) -> dict[str, Any]:
    """The largest gap any member saw from any other that overlaps ``[since, until)``."""
    best: dict[str, Any] = {"ms": 0}
    stalls = {r["user"]: r["stalls"] for r in reports}
    keys = {r["user"]: r["keys"] for r in reports}
    for r in reports:
        for peer, start, end, ended_by, still_open in r["gaps"]:
            if peer == exclude or end < since or start >= until:
                continue
            ms = round((end - start) * 1000)
            if ms > best["ms"]:
                best = {"ms": ms, "receiver": _name(r["user"]), "sender": _name(peer),
                        "from_ms": round((start - since) * 1000), "ended_by": ended_by,
                        "start": start, "end": end,
                        "open": still_open,
                        # Where the event loops of the two were late during the gap.
                        "loop_stalls_ms": {
                            who: [[round((t - since) * 1000), round(late * 1000), round(cpu * 1000)]
                                  for t, late, cpu in stalls.get(uid, []) if start <= t < end]
                            for who, uid in (("receiver", r["user"]), ("sender", peer))
                        },
                        # The sender's switches to a new key, and the receiver's installs of
                        # the sender's keys, from 1.5 s before the gap to its end.
                        "keys": sorted(
                            [round((t - since) * 1000), f"{who} {kind}", index]
                            for who, uid in (("sender", peer), ("receiver", r["user"]))
                            for t, kind, index, user in keys.get(uid, [])
                            if start - 1.5 <= t <= end
                            and ((who, kind) == ("sender", "used")
                                 or ((who, kind) == ("receiver", "installed") and user == peer))
                        )}  # fmt: skip
    return best


def _over(
    reports: Sequence[dict[str, Any]], since: float, until: float, ms: int
) -> list[list[Any]]:
    """Every gap over ``ms`` within ``[since, until)``: [from_ms, ms, receiver, sender], in
    time order (one sender seen late by every receiver at once: the sender or the server;
    one receiver late from every sender: the receiver)."""
    out = []
    for r in reports:
        for peer, start, end, _ended_by, _open in r["gaps"]:
            if start >= since and end < until and (end - start) * 1000 > ms:
                out.append([round((start - since) * 1000), round((end - start) * 1000),
                            _name(r["user"]), _name(peer)])  # fmt: skip
    return sorted(out)


def _causes(
    reports: Sequence[dict[str, Any]], since: float, until: float, ms: int
) -> list[list[Any]]:
    """Every gap over ``ms`` within ``[since, until)`` against the sender's own encoder rows
    (``MATRIXRTC_FRAME_TRACE=1``): [from_ms, ms, receiver, sender, via, cause, detail].
    ``not produced``: the sender's encoder for that transport fanned out no frame inside the
    gap (``detail``: ms from the gap's start at which the frames before and after it were read
    from the source, encoded and fanned out: a late read is the source or the event loop, a
    late encode the encoder thread); ``held``: frames were made but not queued for every peer
    (a key the peer lacks, a queue overflow, waiting for a key frame); ``sent``: frames were
    queued for every peer inside the gap and arrived late or never (transit, the SFU, or the
    receiver)."""
    trace = {r["user"]: r.get("frame_trace") or [] for r in reports}
    rx_trace = {r["user"]: r.get("rx_trace") or [] for r in reports}
    pickups = {r["user"]: r.get("pickup_trace") or [] for r in reports}
    stalls = {r["user"]: r["stalls"] for r in reports}
    out = []
    for r in reports:
        for peer, start, end, via, _open in r["gaps"]:
            if not (start >= since and end < until and (end - start) * 1000 > ms):
                continue
            # The sender's encoder rows: its transport's, or the call's shared encoder's.
            rows = [t for t in trace.get(peer, []) if t[0] in (via, "shared")]
            detail: dict[str, Any] = {}
            if not rows:
                cause = "no trace"
            else:
                inside = [t for t in rows if start + 0.003 < t[3] < end - 0.003]
                before = [t for t in rows if t[3] <= start + 0.003][-1:]
                after = [t for t in rows if t[3] >= end - 0.003][:1]

                taken = {(lab, pts): at for lab, at, pts in pickups.get(peer, [])}

                def rel(
                    t: Sequence[Any], start: float = start, taken: dict[Any, float] = taken
                ) -> list[int | None]:
                    # read, encoded, fanned out, taken by the (first) RTP sender: ms from start
                    at = taken.get((t[0], t[4]))
                    return [round((x - start) * 1000) for x in t[1:4]] + [
                        None if at is None else round((at - start) * 1000),
                        int(t[6]), t[7], t[8]]  # fmt: skip

                detail = {"before": [rel(t) for t in before], "inside": [rel(t) for t in inside],
                          "after": [rel(t) for t in after]}  # fmt: skip
                if not inside:
                    cause = "not produced"
                elif any(t[7] < t[8] for t in inside):  # queued for fewer than subscribed
                    cause = "held"
                else:
                    cause = "sent"
            # What the receiver got from that sender on that transport around the gap: ms
            # from the gap's start, and the RTP timestamp step from the frame before (6000 at
            # 15 fps: none missing; 12000: one frame never arrived whole).
            rx = [
                t
                for t in rx_trace.get(r["user"], [])
                if t[0].startswith(f"{via} {peer}") and start - 0.2 <= t[1] <= end + 0.2
            ]
            detail["received"] = [
                [round((t[1] - start) * 1000), t[2] - prev[2]]
                for prev, t in itertools.pairwise(rx)
                if start - 0.01 <= t[1] <= end + 0.15
            ]
            # Where the receiver's and the sender's event loops ran late (> 20 ms) meanwhile.
            detail["late_loops"] = {
                who: [[round((t - start) * 1000), round(late * 1000), round(cpu * 1000)]
                      for t, late, cpu in stalls.get(uid, []) if start - 0.1 <= t < end]
                for who, uid in (("receiver", r["user"]), ("sender", peer))
            }  # fmt: skip
            # The other transport meanwhile (a gap across a cutover: was the old path still
            # delivering?): the sender's fan-outs and the receiver's arrivals inside the gap.
            other = "sfu" if via == "mesh" else "mesh"
            detail["other"] = {
                "via": other,
                "sent": [round((t[3] - start) * 1000) for t in trace.get(peer, [])
                         if t[0] in (other, "shared") and start < t[3] < end],
                "received": [round((t[1] - start) * 1000) for t in rx_trace.get(r["user"], [])
                             if t[0].startswith(f"{other} {peer}") and start < t[1] < end],
            }  # fmt: skip
            out.append([round((start - since) * 1000), round((end - start) * 1000),
                        _name(r["user"]), _name(peer), via, cause, detail])  # fmt: skip
    return sorted(out, key=lambda row: row[0])


def _phase(reports: Sequence[dict[str, Any]], gap: dict[str, Any], kind: str) -> str:
    """Where ``gap`` lies against its receiver's cutover of its sender to ``kind``: on the old
    path (it ended before the cutover), across the cutover (the switch itself), or on the new
    path (it began after it)."""
    if "receiver" not in gap:
        return "none"
    r = next(r for r in reports if _name(r["user"]) == gap["receiver"])
    cut = next((c.get(kind) for uid, c in r["cut_at"].items() if _name(uid) == gap["sender"]), None)
    if cut is None:
        return "no cutover"
    start, end = gap["start"], gap["end"]
    return "old path" if end < cut else "new path" if start >= cut else "across cutover"


def _order(reports: Sequence[dict[str, Any]], t0: float, step: int) -> list[dict[str, Any]]:
    """Per member: when its ``step``-th switch started and finished and when each other member
    cut it over (ms after ``t0``): who tore down before whom."""
    out = []
    for r in reports:
        if len(r["history"]) <= step:
            continue
        h = r["history"][step]
        new = h["new"]
        out.append({
            "member": _name(r["user"]),
            "switch": f"{h['old']} -> {new}",
            "started_ms": round((h["started_at"] - t0) * 1000),
            "finished_ms": round((h["finished_at"] - t0) * 1000),
            "handover": h["handover"],
            "taken_from_new_by_others_ms": {
                _name(o["user"]): round((o["cut_at"][r["user"]][new] - t0) * 1000)
                for o in reports
                if o is not r and new in o["cut_at"].get(r["user"], {})
            },
        })  # fmt: skip
    return out


async def measure_switch(
    media: MediaOptions,
    *,
    acks: bool = True,
    profile: Path | None = None,
    homeserver_nice: int = HOMESERVER_NICE,
) -> dict[str, Any]:
    """The figures of one run (see the module docstring); with ``profile`` (a directory),
    py-spy samples every member from each switch's start until everyone finished it.
    ``homeserver_nice``: the CPU weight of Synapse and the authorization service (0: as the
    members')."""
    run_dir = new_run_dir(prefix="bench-switch")
    procs: list[_Proc] = []
    async with (
        Synapse(run_dir) as hs,
        LiveKit(run_dir) as lk,
        AuthService(run_dir, lk, hs, name="bench-sfu", extra_env=_QUIET) as svc,
    ):
        users = [await hs.register(f"sw{i}") for i in range(4)]
        room_id = await hs.create_call_room(users[0], invite=users[1:], encrypted=True)

        def args(u: UserCreds) -> MemberArgs:
            return MemberArgs(
                base_url=hs.base_url, user_id=u.user_id, password=u.password, room_id=room_id,
                service_url=svc.url, width=media.width, height=media.height, fps=media.fps,
                audio=media.audio, acks=acks, max_video_kbps=media.max_video_kbps,
                keep_framerate=media.keep_framerate, engine=media.engine,
            )  # fmt: skip

        def pids() -> dict[str, int | None]:
            servers = {"synapse": hs.pid, "livekit": lk.pid, "auth": svc.pid}
            return {**{p.name: p.proc.pid for p in procs}, **servers}

        lowered = {
            name: lower_cpu_weight(pid, homeserver_nice)
            for name, pid in (("synapse", hs.pid), ("auth", svc.pid))
            if pid is not None and homeserver_nice
        }

        try:
            for i, u in enumerate(users[:3]):
                procs.append(await _Proc.start(f"sw{i}", args(u), run_dir / f"sw{i}.log"))
            first = list(procs)
            # The fourth is up and logged in before anything is measured; it joins at t_join.
            visitor = dataclasses.replace(args(users[3]), visitor=True)
            fourth = await _Proc.start("sw3", visitor, run_dir / "sw3.log")
            procs.append(fourth)
            await asyncio.gather(*(p.on("mesh") for p in first), fourth.until_event("ready"))
            cpu_mesh, udp_mesh = cpu_sample(), udp_sample()
            cpu_mesh_by = process_cpu(pids())
            t_on_mesh = time.monotonic()
            await asyncio.sleep(STEADY_S)
            cpu_join = cpu_sample()
            cpu_join_by = process_cpu(pids())
            spies = _Profile(profile, "mesh_to_sfu")
            for p in first:
                await spies.add(p)
            t_join = time.monotonic()
            await fourth.command("join")
            await spies.add(fourth)
            to_sfu = await asyncio.gather(*(p.on("sfu") for p in procs))
            cpu_on_sfu = cpu_sample()
            cpu_on_sfu_by = process_cpu(pids())
            t_on_sfu = time.monotonic()
            profiles = {"mesh_to_sfu": await spies.stop()}
            await asyncio.sleep(STEADY_S)
            cpu_leave = cpu_sample()
            cpu_leave_by = process_cpu(pids())
            spies = _Profile(profile, "sfu_to_mesh")
            for p in first:
                await spies.add(p)
            t_leave = time.monotonic()
            await fourth.command("leave", until="left")
            assert fourth.report is not None
            fourth_report = fourth.report
            back = await asyncio.gather(*(p.on("mesh") for p in first))
            cpu_back, udp_back = cpu_sample(), udp_sample()
            cpu_back_by = process_cpu(pids())
            t_back = time.monotonic()
            profiles["sfu_to_mesh"] = await spies.stop()
            await asyncio.sleep(STEADY_S)
            reports = [await p.leave() for p in first]
        finally:
            await asyncio.gather(*(p.kill() for p in procs), return_exceptions=True)
    everyone = [*reports, fourth_report]
    if dump := os.environ.get("BENCH_SWITCH_DUMP"):
        # Diagnostics: the raw per-member reports and the switch times (CLOCK_MONOTONIC), one
        # JSON line per run, to set beside bench/rtp_sniff.py's packet times.
        with Path(dump).open("a") as f:  # noqa: ASYNC230 (after the measurement)
            f.write(json.dumps({"t_join": t_join, "t_on_sfu": t_on_sfu, "t_leave": t_leave,
                                "t_back": t_back, "reports": everyone}) + "\n")  # fmt: skip
    to_sfu_gap = _largest(everyone, t_join, t_leave)
    # After the leave the fourth member's media ends for good: not a gap of the switch.
    to_mesh_gap = _largest(reports, t_leave, float("inf"), exclude=users[3].user_id)
    to_sfu_gap["phase"] = _phase(everyone, to_sfu_gap, "sfu")
    to_mesh_gap["phase"] = _phase(reports, to_mesh_gap, "mesh")
    # Controls: the largest gap in steady calls with no switch (3 members on the mesh before
    # the join; 4 on the SFU once all had switched, until the leave).
    steady = {
        "mesh": _largest(reports, t_on_mesh, t_join)["ms"],
        "sfu": _largest(everyone, t_on_sfu, t_leave)["ms"],
        # The SFU once the old mesh has had TEARDOWN_S to close (its teardown runs in the
        # background after the switch finished).
        "sfu_after_teardown": _largest(everyone, t_on_sfu + TEARDOWN_S, t_leave)["ms"],
        "sfu_gaps_over_100_ms": _over(everyone, t_on_sfu + TEARDOWN_S, t_leave, 100),
    }
    # The largest gap that overlaps the switch itself (its start until every member finished).
    in_switch = {
        "mesh_to_sfu": _largest(everyone, t_join, t_on_sfu)["ms"],
        "sfu_to_mesh": _largest(reports, t_leave, t_back, exclude=users[3].user_id)["ms"],
    }
    # Every gap over 100 ms during each switch: one sender late at every receiver at once (the
    # sender's capture or encoder, or the server), or one receiver late from every sender.
    in_switch_over = {
        "mesh_to_sfu": _over(everyone, t_join, t_on_sfu, 100),
        "sfu_to_mesh": _over(reports, t_leave, t_back, 100),
    }
    result: dict[str, Any] = {
        "mesh_to_sfu": to_sfu_gap["ms"],
        "sfu_to_mesh": to_mesh_gap["ms"],
        "encoder": {"max_video_kbps": media.max_video_kbps, "keep_framerate": media.keep_framerate},
        "sfu_engine": media.engine,
        # Synapse's and the authorization service's nice, and what each got (module doc).
        "homeserver_nice": {"nice": homeserver_nice, "applied": lowered},
        "steady_gap_ms": steady,
        "in_switch_gap_ms": in_switch,
        "in_switch_gaps_over_100_ms": in_switch_over,
        # With MATRIXRTC_FRAME_TRACE=1: each of those gaps against the sender's encoder rows.
        "gap_causes": {
            "mesh_to_sfu": _causes(everyone, t_join, t_on_sfu, 100),
            "sfu_to_mesh": _causes(reports, t_leave, t_back, 100),
            "steady_sfu": _causes(everyone, t_on_sfu + TEARDOWN_S, t_leave, 100),
        }
        if any(r.get("frame_trace") for r in everyone)
        else None,
        "switch_duration_ms": {
            "mesh_to_sfu": round((max(s["finished_at"] for s in to_sfu) - t_join) * 1000),
            "sfu_to_mesh": round((max(s["finished_at"] for s in back) - t_leave) * 1000),
        },
        # The machine's load (cores busy, of os.cpu_count()): steady on the mesh and on the
        # SFU, and during each switch (from its start until every member finished it).
        # Datagrams dropped at full socket buffers from the first steady phase to the end of
        # the switch back (every member, Synapse, LiveKit): lost packets become gaps.
        "udp": udp_drops(udp_mesh, udp_back),
        "busy_cores": {
            "mesh": busy_cores(cpu_mesh, cpu_join),
            "mesh_to_sfu": busy_cores(cpu_join, cpu_on_sfu),
            "sfu": busy_cores(cpu_on_sfu, cpu_leave),
            "sfu_to_mesh": busy_cores(cpu_leave, cpu_back),
            # Of which stolen by the host, over the whole run (see bench._host.steal_cores).
            "stolen": steal_cores(cpu_mesh, cpu_back),
        },
        # The same per process (members, Synapse, LiveKit, the authorization service): what
        # kept the machine busy. The leaver is left out of sfu_to_mesh (it has exited).
        "busy_cores_by_process": {
            w: _cores_by_process((a, a_by), (b, b_by))
            for w, a, a_by, b, b_by in (
                ("mesh", cpu_mesh, cpu_mesh_by, cpu_join, cpu_join_by),
                ("mesh_to_sfu", cpu_join, cpu_join_by, cpu_on_sfu, cpu_on_sfu_by),
                ("sfu", cpu_on_sfu, cpu_on_sfu_by, cpu_leave, cpu_leave_by),
                ("sfu_to_mesh", cpu_leave, cpu_leave_by, cpu_back, cpu_back_by),
            )
        },
        "detail": {
            "mesh_to_sfu": {"largest": to_sfu_gap, "order": _order(everyone, t_join, 1)},
            "sfu_to_mesh": {"largest": to_mesh_gap, "order": _order(reports, t_leave, 2)},
        },
    }
    if profile is not None:
        result["profile"] = profiles
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-acks", dest="acks", action="store_false")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="py-spy every member during each switch (raw stacks in DIR; a summary in the "
        "result: costs CPU, so not for the gap figures)",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=1,
        help="measure this many times (a fresh stack each: one switch each way per run); "
        "the figures are the max over the runs, with the median and every run's value",
    )
    parser.add_argument(
        "--sdk-encoder-defaults",
        action="store_true",
        help="publish to the SFU with the SDK's encoder defaults (≈225 kbit/s at 320×240, "
        "balanced degradation): the figures before SWITCH_MEDIA",
    )
    parser.add_argument(
        "--sfu-engine",
        choices=("sdk", "aiortc"),
        default="sdk",
        help="the SFU client (MediaOptions.engine): the LiveKit SDK, or our RtcClient on aiortc "
        "(cheaper; its encoder has no bitrate cap or frame-rate preference)",
    )
    parser.add_argument(
        "--homeserver-nice",
        type=int,
        default=HOMESERVER_NICE,
        help="CPU weight of Synapse and the authorization service, as a nice value (default "
        f"{HOMESERVER_NICE}: servers elsewhere on a real call; 0: the members' weight)",
    )
    parser.add_argument("--member", help=argparse.SUPPRESS)  # a member process (JSON args)
    args = parser.parse_args(argv)
    if not -20 <= args.homeserver_nice <= 19:
        parser.error("--homeserver-nice: a nice value, from -20 to 19")
    if args.homeserver_nice < 0 and os.geteuid() != 0:
        # setpriority would raise PermissionError once the stack is up
        parser.error("--homeserver-nice below 0 raises a priority: that needs root")
    configure_logging(level="error")
    if args.member:
        debug = bool(os.environ.get("BENCH_SWITCH_DEBUG"))  # log callbacks blocking > 40 ms
        if debug:
            import logging

            slow = logging.getLogger("asyncio")
            slow.setLevel(logging.WARNING)
            slow.addHandler(logging.StreamHandler(sys.stderr))
            slow.propagate = False

            async def debugged() -> None:
                # BENCH_SWITCH_SLOW_S: the threshold (default 40 ms)
                slow_s = float(os.environ.get("BENCH_SWITCH_SLOW_S", "0.04"))
                asyncio.get_running_loop().slow_callback_duration = slow_s
                await _member(MemberArgs(**json.loads(args.member)))

            event_loop.run(debugged(), debug=True)
        elif os.environ.get("BENCH_SWITCH_STACKS"):

            async def sampled() -> None:
                _sample_stalls(asyncio.get_running_loop())
                await _member(MemberArgs(**json.loads(args.member)))

            event_loop.run(sampled())
        else:
            event_loop.run(_member(MemberArgs(**json.loads(args.member))))
        return 0
    media = SDK_DEFAULT_MEDIA if args.sdk_encoder_defaults else SWITCH_MEDIA
    media = dataclasses.replace(media, engine=args.sfu_engine)

    async def run(a: argparse.Namespace) -> dict[str, Any]:
        async with asyncio.timeout(LIMIT_S):
            if a.profile is not None:
                a.profile.mkdir(parents=True, exist_ok=True)
            return await measure_switch(
                media, acks=a.acks, profile=a.profile, homeserver_nice=a.homeserver_nice
            )

    if args.runs <= 1:
        result = run_bench(run, args)
        if result is not None:
            print(f"switch gaps (ms): mesh->sfu {result['mesh_to_sfu']}, "
                  f"sfu->mesh {result['sfu_to_mesh']}")  # fmt: skip
            print(json.dumps(result["detail"], indent=1))
            if "profile" in result:
                print(json.dumps(result["profile"], indent=1))
        return 0

    async def runs(a: argparse.Namespace) -> dict[str, Any]:
        async with asyncio.timeout(LIMIT_S * a.runs):
            return await measure_switches(
                media, a.runs, acks=a.acks, homeserver_nice=a.homeserver_nice
            )

    result = run_bench(runs, args)
    if result is not None:
        for d in ("mesh_to_sfu", "sfu_to_mesh"):
            print(f"{d}: max {result[d]} ms, median {result['median'][d]} ms over "
                  f"{result['switches']} switches: {result['each'][d]} "
                  f"(phase of each: {result['phase'][d]}; overlapping the switch: "
                  f"{result['in_switch'][d]}; steady control: {result['steady'][d]})")  # fmt: skip
    return 0


def _sample_stalls(loop: asyncio.AbstractEventLoop, lag_s: float = 0.012) -> None:
    """BENCH_SWITCH_STACKS=1: while the event loop is more than ``lag_s`` behind its 5 ms
    heartbeat, a watchdog thread writes the loop thread's stack to stderr every 3 ms
    (``@@stall <monotonic> <lag ms> <frames>``): which code a stall runs (diagnostic)."""
    import threading
    import traceback

    loop_thread = threading.get_ident()
    beat = [time.monotonic()]

    def tick() -> None:
        beat[0] = time.monotonic()
        loop.call_later(0.005, tick)

    def watch() -> None:
        while True:
            time.sleep(0.003)
            lag = time.monotonic() - beat[0]
            if lag <= lag_s:
                continue
            frame = sys._current_frames().get(loop_thread)
            if frame is None:
                continue
            where = ";".join(
                f"{Path(f.filename).name}:{f.name}:{f.lineno}"
                for f in traceback.extract_stack(frame)[-14:]
            )
            sys.stderr.write(f"@@stall {time.monotonic():.4f} {lag * 1000:.0f} {where}\n")

    loop.call_soon(tick)
    threading.Thread(target=watch, name="stall-sampler", daemon=True).start()


async def measure_switches(
    media: MediaOptions, runs: int, *, acks: bool = True, homeserver_nice: int = HOMESERVER_NICE
) -> dict[str, Any]:
    """:func:`measure_switch` ``runs`` times (a fresh stack each), through :func:`aggregate`."""
    return aggregate(
        [
            await measure_switch(media, acks=acks, homeserver_nice=homeserver_nice)
            for _ in range(runs)
        ]
    )


_STEADY_OF = {"mesh_to_sfu": "sfu", "sfu_to_mesh": "mesh"}


def aggregate(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several runs' figures: ``mesh_to_sfu`` / ``sfu_to_mesh`` are the **largest** gap over all
    of them (the target), with the median, each run's value, where each largest gap lay
    (:func:`_phase`), the largest gap overlapping each switch, and the steady control of the
    transport switched to (no switch; ``steady_gap_ms``)."""
    dirs = ("mesh_to_sfu", "sfu_to_mesh")
    each = {d: [r[d] for r in results] for d in dirs}
    return {
        **{d: max(each[d]) for d in dirs},
        "switches": len(results),
        "encoder": results[0].get("encoder"),
        "sfu_engine": results[0].get("sfu_engine"),
        "homeserver_nice": results[0].get("homeserver_nice", {}).get("nice"),
        "median": {d: statistics.median(each[d]) for d in dirs},
        "each": each,
        "phase": {d: [r["detail"][d]["largest"].get("phase") for r in results] for d in dirs},
        "in_switch": {d: [r["in_switch_gap_ms"][d] for r in results] for d in dirs},
        "steady": {d: [r["steady_gap_ms"][_STEADY_OF[d]] for r in results] for d in dirs},
        "busy_cores": [r["busy_cores"] for r in results],
        "udp": [r["udp"] for r in results],
        "busy_cores_by_process": [r["busy_cores_by_process"] for r in results],
        "runs": list(results),
    }


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
