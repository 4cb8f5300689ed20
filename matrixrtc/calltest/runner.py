"""The call-test coordinator: users and a room, N participant processes, progress, report.

:class:`ParticipantProcess` runs one :mod:`matrixrtc.calltest.participant` and follows its
JSON lines; :func:`run_call_test` does a whole run (the ``call-test`` command and the demo);
tests drive :class:`ParticipantProcess` directly to kill or add participants mid-call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import structlog

from matrixrtc import event_loop
from matrixrtc.calltest.participant import ParticipantConfig
from matrixrtc.devstack import AuthService, LiveKit, Synapse, new_run_dir
from matrixrtc.errors import LocalError, RemoteError
from matrixrtc.tasks import OwnedTasks

__all__ = [
    "CallTestConfig",
    "ParticipantProcess",
    "Provisioned",
    "build_report",
    "format_report",
    "provision",
    "run_call_test",
]

log = structlog.get_logger(__name__)

CALL_MEMBER = "org.matrix.msc3401.call.member"


@dataclass(frozen=True, slots=True, kw_only=True)
class CallTestConfig:
    participants: int = 3
    duration_s: float = 20.0
    width: int = 320
    height: int = 240
    fps: float = 15.0
    e2ee: bool = True
    homeserver: str | None = None  # None: start the embedded Synapse
    user_prefix: str = "calltest-"
    password: str | None = None  # for an external homeserver's existing users
    run_dir: Path | None = None
    delayed_leave_ms: int = 8_000
    # "mesh"; "sfu" (LiveKit only); "auto" (the mesh/SFU policy, switching live). sfu and
    # auto use sfu_url, or an embedded LiveKit + authorization service (auto: only when the
    # policy can pick the SFU, i.e. more than mesh_max participants).
    transport: str = "mesh"
    mesh_max: int = 4
    sfu_url: str | None = None
    join_interval_s: float = 0.0  # start each participant this long after the previous joined
    receive_only: int = 0  # the last this many participants publish nothing (viewers/recorders)
    settle_s: float = 2.0  # after every pair has a frame, before the measurement window opens
    # Media over 127.0.0.1 only, no TURN. None: so for the embedded stack only (a benchmark
    # passes its own loopback stack as homeserver/sfu_url and True).
    loopback: bool | None = None
    simulcast: bool = False  # SFU: publish simulcast layers
    html: Path | None = None  # write the timeline page (matrixrtc.calltest.html) here
    low_layer_above: int | None = None  # SFU: receivers take the low layer past this many
    decode_video: int | None = None  # mesh: decode the video of this many peers (None: all)
    # Run until the measurement window (settle_s after every pair has a frame) has lasted this
    # long, however long the call took to form; duration_s then only bounds the wait for every
    # pair (a call that never forms ends duration_s after the last join). None: duration_s
    # after the last join, whatever part of it the start-up took.
    window_s: float | None = None
    render_max: int | None = None  # SFU: receivers take frames of at most this many videos
    preencoded: bool = False  # SFU: publish a looped clip encoded once (livekit.preencoded)
    # SFU: the LiveKit client (MediaOptions.engine): "sdk" (the livekit SDK) or "aiortc" (ours)
    sfu_engine: str = "sdk"


@dataclass(frozen=True, slots=True)
class Provisioned:
    base_url: str
    room_id: str
    users: tuple[tuple[str, str], ...]  # (user id, password)


async def _call(
    http: aiohttp.ClientSession,
    base: str,
    method: str,
    path: str,
    body: Any = None,
    token: str | None = None,
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.request(method, base + path, json=body, headers=headers) as resp:
        data: Any = await resp.json(content_type=None)
        if resp.status >= 400:
            raise RemoteError(f"{method} {path}: {resp.status} {data}")
        return data if isinstance(data, dict) else {}


async def provision(
    base_url: str,
    names: Sequence[str],
    *,
    encrypted: bool,
    password: str | None = None,
) -> Provisioned:
    """Register (or log in) ``names`` and create a call room they have all joined.

    Every member may send call memberships (power level 0), as Element Call sets it up.
    """
    pw = password or secrets.token_urlsafe(16)
    users: list[tuple[str, str, str]] = []  # (user id, password, token)
    async with aiohttp.ClientSession() as http:
        for name in names:
            try:
                body = await _call(
                    http,
                    base_url,
                    "POST",
                    "/_matrix/client/v3/register",
                    {"username": name, "password": pw, "auth": {"type": "m.login.dummy"}},
                )
            except RemoteError:
                body = await _call(
                    http,
                    base_url,
                    "POST",
                    "/_matrix/client/v3/login",
                    {
                        "type": "m.login.password",
                        "identifier": {"type": "m.id.user", "user": name},
                        "password": pw,
                    },
                )
            users.append((str(body["user_id"]), pw, str(body["access_token"])))
        req: dict[str, Any] = {
            "preset": "private_chat",
            "name": "call-test",
            "invite": [u for u, _, _ in users[1:]],
            "power_level_content_override": {"events": {CALL_MEMBER: 0}},
        }
        if encrypted:
            req["initial_state"] = [
                {
                    "type": "m.room.encryption",
                    "state_key": "",
                    "content": {"algorithm": "m.megolm.v1.aes-sha2"},
                }
            ]
        room = await _call(
            http, base_url, "POST", "/_matrix/client/v3/createRoom", req, users[0][2]
        )
        room_id = str(room["room_id"])
        for _, _, token in users[1:]:
            await _call(
                http, base_url, "POST", f"/_matrix/client/v3/join/{quote(room_id, safe='')}", {},
                token,
            )  # fmt: skip
        # The registration devices are not call devices: each participant logs in afresh.
        for _, _, token in users:
            with contextlib.suppress(RemoteError):
                await _call(http, base_url, "POST", "/_matrix/client/v3/logout", {}, token)
    return Provisioned(base_url, room_id, tuple((u, p) for u, p, _ in users))


class ParticipantProcess:
    """One participant process and everything it reported."""

    def __init__(self, cfg: ParticipantConfig, proc: asyncio.subprocess.Process) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.proc = proc
        self.ready: dict[str, Any] | None = None
        self.stats: list[dict[str, Any]] = []
        self.final: dict[str, Any] | None = None
        self._changed = asyncio.Condition()
        self._tasks = OwnedTasks(f"calltest-runner {cfg.name}", log, event_prefix="calltest")
        self._reader = self._tasks.spawn(self._read(), "reader")

    @classmethod
    async def start(cls, cfg: ParticipantConfig, log_path: Path) -> ParticipantProcess:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "matrixrtc.calltest.participant",
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                stdin=asyncio.subprocess.PIPE,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        # On stdin, not the command line: the configuration holds a password.
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(cfg.to_json()).encode() + b"\n")
        await proc.stdin.drain()
        proc.stdin.close()
        return cls(cfg, proc)

    @property
    def device(self) -> tuple[str, str] | None:
        if self.ready is None:
            return None
        return str(self.ready["user_id"]), str(self.ready["device_id"])

    @property
    def peer_id(self) -> str | None:
        d = self.device
        return None if d is None else f"{d[0]}|{d[1]}"

    @property
    def latest(self) -> dict[str, Any] | None:
        return self.final or (self.stats[-1] if self.stats else None)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(msg, dict):
                continue
            async with self._changed:
                kind = msg.get("event")
                if kind == "ready":
                    self.ready = msg
                elif kind == "stats":
                    self.stats.append(msg)
                elif kind == "final":
                    self.final = msg
                self._changed.notify_all()
        async with self._changed:
            self._changed.notify_all()

    async def wait_until(
        self, predicate: Callable[[ParticipantProcess], bool], timeout_s: float
    ) -> None:
        """Until ``predicate(self)`` holds after a report; TimeoutError otherwise."""
        async with asyncio.timeout(timeout_s), self._changed:
            while not predicate(self):
                if self._reader.done():
                    raise LocalError(f"{self.name} exited (status {self.proc.returncode})")
                await self._changed.wait()

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        await self.wait_until(lambda p: p.ready is not None, timeout_s)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)

    async def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM (a clean leave), then SIGKILL after ``timeout_s``; waits for the reader."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout_s)
        except TimeoutError:
            self.kill()
            await self.proc.wait()
        failure = None
        try:
            async with asyncio.timeout(5.0):
                failure = await self._tasks.join()
        except TimeoutError:
            failure = await self._tasks.cancel()
        if failure is not None:  # its reports are incomplete: say so, never swallow it
            raise failure

    async def wait(self, timeout_s: float) -> int:
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout_s)
        except TimeoutError:
            await self.stop()
            raise


@contextlib.asynccontextmanager
async def participants(
    configs: Sequence[ParticipantConfig], log_dir: Path, *, join_interval_s: float = 0.0
) -> AsyncIterator[list[ParticipantProcess]]:
    """Start every participant; on exit stop those still running (never leaves orphans).

    With ``join_interval_s``, each one starts that long after the previous one is in the call.
    """
    procs: list[ParticipantProcess] = []
    try:
        for cfg in configs:
            if procs and join_interval_s > 0:
                await procs[-1].wait_ready()
                await asyncio.sleep(join_interval_s)
            procs.append(await ParticipantProcess.start(cfg, log_dir / f"{cfg.name}.log"))
        yield procs
    finally:
        await asyncio.gather(*(p.stop() for p in procs), return_exceptions=True)


# -- report ---------------------------------------------------------------------------------


def _rate(count: float, start_ms: int | None, end_ms: int | None) -> float:
    if start_ms is None or end_ms is None or end_ms <= start_ms:
        return 0.0
    return count / ((end_ms - start_ms) / 1000)


def _kbps(count: int | None, start_ms: int | None, end_ms: int | None) -> float | None:
    return None if count is None else round(_rate(count * 8 / 1000, start_ms, end_ms), 1)


def build_report(
    procs: Sequence[ParticipantProcess], cfg: CallTestConfig, *, end_ms: int | None = None
) -> dict[str, Any]:
    """The ``--json`` object: per participant and per peer figures over the whole run, and
    the steady-state ``window`` (:func:`measurement_window`, ending at ``end_ms``)."""
    names = {p.peer_id: p.name for p in procs if p.peer_id is not None}
    out: list[dict[str, Any]] = []
    for p in procs:
        last = p.latest
        if last is None:
            out.append({"id": p.name, "error": "no report", "peers": []})
            continue
        joined = int(last["joined_at_ms"])
        end = int(last["t_ms"])
        peers = []
        connected: list[int] = []
        first: list[int] = []
        for peer in last["peers"]:
            c_at, f_at = peer.get("connected_at_ms"), peer.get("first_frame_at_ms")
            if c_at is not None:
                connected.append(int(c_at))
            if f_at is not None:
                first.append(int(f_at))
            peers.append(
                {
                    "id": names.get(peer["id"], peer["id"]),
                    "fps_in": round(
                        _rate(
                            _frames(peer), f_at if peer.get("video_decoded", True) else c_at, end
                        ),
                        1,
                    ),
                    "video_decoded": bool(peer.get("video_decoded", True)),
                    # None: the transport does not say (LiveKit's SDK counts no bytes).
                    "kbps_in": _kbps(peer.get("bytes_in", 0), c_at, end),
                    "kbps_out": _kbps(peer.get("bytes_out", 0), c_at, end),
                    "frames_decoded": peer["frames_decoded"],
                    "decrypt_failures": peer["decrypt_failures"],
                    "connect_ms": None if c_at is None else int(c_at) - joined,
                    "transport": peer.get("transport", "mesh"),
                }
            )
        out.append(
            {
                "id": p.name,
                "user_id": p.device[0] if p.device else None,
                "device_id": p.device[1] if p.device else None,
                "connect_ms": max(connected) - joined if connected else None,
                "first_frame_ms": max(first) - joined if first else None,
                "cpu_percent": last.get("cpu_percent_avg"),
                "memory_mb": last.get("rss_mb"),
                "memory_peak_mb": max(
                    (float(x["rss_mb"]) for x in [*p.stats, last] if x.get("rss_mb") is not None),
                    default=None,
                ),
                "receive_only": bool(last.get("receive_only", False)),
                "event_loop": last.get("event_loop"),
                "key_index": last.get("key_index"),
                "key_rotation_ms": last.get("key_rotation_ms", []),
                "key_delivery_ms": last.get("key_delivery_ms", []),
                "switches": [
                    {**sw, "at_ms": sw["at_ms"] - joined if sw.get("at_ms") else None}
                    for sw in last.get("switches", [])
                ],
                "peers": peers,
            }
        )
    return {
        "participants": out,
        "window": measurement_window(procs, cfg, end_ms),
        "duration_s": cfg.duration_s,
        "fps": cfg.fps,
        "resolution": f"{cfg.width}x{cfg.height}",
        "e2ee": cfg.e2ee,
        "transport": cfg.transport,
        **({"sfu_engine": cfg.sfu_engine} if cfg.transport != "mesh" else {}),
    }


def _senders(procs: Sequence[ParticipantProcess]) -> dict[str, str]:
    """Peer id -> name of every participant that publishes."""
    return {
        p.peer_id: p.name
        for p in procs
        if p.peer_id is not None and not (p.latest or {}).get("receive_only", False)
    }


def _frames(peer: Mapping[str, Any]) -> int:
    """A pair's video frames: decoded ones, or received and decrypted ones where the receiver
    does not decode that peer's video (``--decode-video``)."""
    if peer.get("video_decoded", True):
        return int(peer.get("frames_decoded", 0))
    return int(peer.get("frames_received", 0))


def _all_receiving_at(p: ParticipantProcess, senders: Mapping[str, str]) -> int | None:
    """Wall ms of ``p``'s first report with a frame from every other publisher."""
    expected = {pid for pid in senders if pid != p.peer_id}
    for sample in p.stats:
        got = {x["id"] for x in sample["peers"] if _frames(x) > 0}
        if expected <= got:
            return int(sample["t_ms"])
    return None


def _sent(a: Mapping[str, Any], b: Mapping[str, Any], secs: float) -> dict[str, Any] | None:
    """What a publisher's encoders did between two of its reports, over every transport it
    published on (both during a switch): frames its sources gave and it encoded per second,
    key frames, key-frame requests from receivers, and frames dropped at a receiver's full
    queue (its RTP sender late). None: no encoder counters (a receive-only participant, the
    SDK engine)."""
    before, after = a.get("encoders") or {}, b.get("encoders") or {}
    if not after:
        return None

    def delta(kind: str, counter: str) -> int:
        total = 0
        for transport, kinds in after.items():
            now = int(kinds.get(kind, {}).get(counter, 0))
            then = int(before.get(transport, {}).get(kind, {}).get(counter, 0))
            total += now - then if now >= then else now  # a new encoder counts from 0
        return total

    larger = sorted({k for kinds in after.values() for k in kinds if k.startswith("video/")})
    return {
        # With simulcast "video" is the smallest layer; each larger one's encoded rate (0
        # while no receiver takes it: the SFU's dynacast) is here by its RID.
        "larger_layers_fps": {
            k.partition("/")[2]: round(delta(k, "frames_encoded") / secs, 2) for k in larger
        },
        "video_fps_source": round(delta("video", "frames_in") / secs, 2),
        "video_fps_encoded": round(delta("video", "frames_encoded") / secs, 2),
        "keyframes": delta("video", "keyframes"),
        "keyframe_requests": delta("video", "keyframe_requests"),
        "video_overflows": delta("video", "overflows"),
        "audio_overflows": delta("audio", "overflows"),
    }


def window_opens_ms(procs: Sequence[ParticipantProcess], cfg: CallTestConfig) -> int | None:
    """Wall ms at which :func:`measurement_window`'s window opens: ``cfg.settle_s`` after every
    participant has a frame from every publisher (None: some pair has none yet)."""
    senders = _senders(procs)
    starts = [_all_receiving_at(p, senders) for p in procs]
    if not procs or any(s is None for s in starts):
        return None
    return max(s for s in starts if s is not None) + round(cfg.settle_s * 1000)


def measurement_window(
    procs: Sequence[ParticipantProcess], cfg: CallTestConfig, end_ms: int | None = None
) -> dict[str, Any]:
    """Steady-state figures: from ``cfg.settle_s`` after every participant receives every
    publisher (or, if some pair never does, from 5 s after the last join) to ``end_ms`` (the
    last reports before the stop). Per pair: frames per second decoded in the window and its
    ratio to the sent rate; per participant: CPU (% of one core, all threads) and memory.
    ``min_fps_ratio`` is over every (receiver, publisher) pair; a pair with no frame is 0."""
    senders = _senders(procs)
    if not procs or not all(p.stats for p in procs):
        return {"min_fps_ratio": 0.0, "pairs": [], "error": "a participant sent no report"}
    opens = window_opens_ms(procs, cfg)
    if opens is not None:
        start = opens
        complete = True
    else:
        start = max(int(p.stats[0]["joined_at_ms"]) for p in procs) + 5_000
        complete = False
    end = end_ms or min(int(p.stats[-1]["t_ms"]) for p in procs)
    if end - start < 2_000:  # too short a run for a settle: take what there is
        start = min(start, end - 2_000)
    pairs: list[dict[str, Any]] = []
    per: list[dict[str, Any]] = []
    for p in procs:
        inside = [s for s in p.stats if start <= int(s["t_ms"]) <= end]
        if len(inside) < 2:
            inside = p.stats[-2:] if len(p.stats) >= 2 else p.stats * 2
        a, b = inside[0], inside[-1]
        secs = max(1e-3, (int(b["t_ms"]) - int(a["t_ms"])) / 1000)
        cpu = None
        if a.get("cpu_s") is not None and b.get("cpu_s") is not None:
            cpu = round((float(b["cpu_s"]) - float(a["cpu_s"])) / secs * 100, 1)
        per.append(
            {
                "id": p.name,
                "cpu_percent": cpu,
                "memory_mb": b.get("rss_mb"),
                "receive_only": bool(b.get("receive_only", False)),
                **({"sent": sent} if (sent := _sent(a, b, secs)) is not None else {}),
            }
        )
        frames_a = {x["id"]: _frames(x) for x in a["peers"]}
        fails_a = {x["id"]: int(x.get("decrypt_failures", 0)) for x in a["peers"]}
        frames_b = {x["id"]: (_frames(x), x) for x in b["peers"]}
        for pid, sender in senders.items():
            if pid == p.peer_id:
                continue
            n_b, peer = frames_b.get(pid, (0, {}))
            fps = max(0, n_b - frames_a.get(pid, 0)) / secs
            pairs.append(
                {
                    "receiver": p.name,
                    "sender": sender,
                    "fps": round(fps, 2),
                    "fps_ratio": round(fps / cfg.fps, 3),
                    # in the window (after the first key): not the start-up ones
                    "decrypt_failures": max(
                        0, int(peer.get("decrypt_failures", 0)) - fails_a.get(pid, 0)
                    ),
                    "transport": peer.get("transport", "mesh"),
                    "decoded": bool(peer.get("video_decoded", True)),
                    **({"layer": peer["layer"]} if peer.get("layer") else {}),
                    **({"video_size": peer["video_size"]} if peer.get("video_size") else {}),
                    **({"rendered": peer["rendered"]} if peer.get("rendered") is not None else {}),
                }
            )
    cpus = [x["cpu_percent"] for x in per if x["cpu_percent"] is not None]
    sent_fps = [x["sent"]["video_fps_encoded"] for x in per if "sent" in x]
    mems = [float(x["memory_mb"]) for x in per if x["memory_mb"] is not None]
    return {
        "start_ms": start,
        "end_ms": end,
        "seconds": round((end - start) / 1000, 1),
        "all_pairs_received": complete,
        "min_fps_ratio": round(min((x["fps_ratio"] for x in pairs), default=0.0), 3),
        "cpu_percent_per_participant": round(sum(cpus) / len(cpus), 1) if cpus else None,
        "cpu_percent_total": round(sum(cpus), 1) if cpus else None,
        "memory_mb_per_participant": round(sum(mems) / len(mems), 1) if mems else None,
        "decrypt_failures": sum(x["decrypt_failures"] for x in pairs),
        # the slowest publisher's encoded video rate (None: no encoder counters, e.g. the SDK)
        "min_sent_video_fps": round(min(sent_fps), 2) if sent_fps else None,
        "participants": per,
        "pairs": pairs,
    }


def write_html(path: Path, report: Mapping[str, Any], procs: Sequence[ParticipantProcess]) -> None:
    """The self-contained timeline page (:mod:`matrixrtc.calltest.html`) at ``path``."""
    from matrixrtc.calltest.html import render_html

    names = {p.peer_id: p.name for p in procs if p.peer_id is not None}
    runs = [(p.name, p.stats, p.final) for p in procs]
    path.write_text(render_html(report, runs, names), encoding="utf-8")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, list):
        return ",".join(_fmt(v) for v in value) or "-"
    return str(value)


def format_report(report: Mapping[str, Any]) -> str:
    """A fixed-width table: one row per participant and peer."""
    rows: list[tuple[str, ...]] = [
        (
            "participant",
            "connect ms",
            "1st frame ms",
            "cpu %",
            "mem MiB",
            "key rot ms",
            "key dlv ms",
            "peer",
            "fps in",
            "kbit/s in",
            "kbit/s out",
            "frames",
            "decrypt fail",
        )
    ]
    for p in report["participants"]:
        head = (
            p["id"],
            _fmt(p.get("connect_ms")),
            _fmt(p.get("first_frame_ms")),
            _fmt(p.get("cpu_percent")),
            _fmt(p.get("memory_mb")) + (" (recv-only)" if p.get("receive_only") else ""),
            _fmt(p.get("key_rotation_ms")),
            _fmt(max(p.get("key_delivery_ms") or [None], key=lambda v: v or 0)),
        )
        blank = ("",) * len(head)
        for i, peer in enumerate(p["peers"] or [{}]):
            rows.append(
                (
                    *(head if i == 0 else blank),
                    _fmt(peer.get("id")),
                    _fmt(peer.get("fps_in")),
                    _fmt(peer.get("kbps_in")),
                    _fmt(peer.get("kbps_out")),
                    _fmt(peer.get("frames_decoded")),
                    _fmt(peer.get("decrypt_failures")),
                )
            )
    transport = report.get("transport", "mesh")
    switched: list[str] = []
    if transport != "mesh":
        # Which transport carried each pair at the end, and every switch (ms after the join).
        vias = ["via"]
        for p in report["participants"]:
            vias += [_fmt(peer.get("transport")) for peer in p["peers"] or [{}]]
        rows = [(*r, v) for r, v in zip(rows, vias, strict=True)]
        for p in report["participants"]:
            for sw in p.get("switches", []):
                switched.append(
                    f"  {p['id']} at {_fmt(sw.get('at_ms'))} ms: {_fmt(sw.get('from'))} -> "
                    f"{sw.get('to')} in {sw.get('duration_ms')} ms ({sw.get('reason')})"
                )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    title = (
        f"{transport} call: {len(report['participants'])} participants, {report['resolution']} @ "
        f"{report['fps']:g} fps, {report['duration_s']:g} s, "
        f"E2EE {'on' if report.get('e2ee') else 'off'}"
    )
    if switched:
        switched.insert(0, "transport starts and switches:")
    summary: list[str] = []
    w = report.get("window")
    if w and "seconds" in w:
        summary.append(
            f"steady state ({w['seconds']:g} s window): min fps ratio {w['min_fps_ratio']:.2f}, "
            f"cpu {_fmt(w.get('cpu_percent_per_participant'))} % per participant "
            f"({_fmt(w.get('cpu_percent_total'))} % total), "
            f"{_fmt(w.get('memory_mb_per_participant'))} MiB per participant, "
            f"{w['decrypt_failures']} decrypt failures"
        )
    return "\n".join([title, *lines, *switched, *summary])


def progress_line(procs: Sequence[ParticipantProcess], elapsed: float) -> str:
    parts = []
    for p in procs:
        last = p.latest
        if last is None:
            parts.append(f"{p.name}: starting")
            continue
        peers = last["peers"]
        up = sum(1 for x in peers if x.get("connected_at_ms") is not None)
        fps = "/".join(f"{x['fps_in']:.0f}" for x in peers) or "-"
        mem = last.get("rss_mb")
        parts.append(
            f"{p.name}: {up} peers, fps {fps}, cpu {last['cpu_percent']:.0f}%"
            + (f", {mem:.0f} MiB" if mem is not None else "")
        )
    if len(procs) > 4:  # one line per call, not per participant, past a handful
        return f"[{elapsed:5.1f} s] " + _progress_summary(procs)
    return f"[{elapsed:5.1f} s] " + " | ".join(parts)


def _progress_summary(procs: Sequence[ParticipantProcess]) -> str:
    lasts = [p.latest for p in procs]
    live = [x for x in lasts if x is not None]
    fps = [float(peer["fps_in"]) for x in live for peer in x["peers"]]
    cpu = [float(x["cpu_percent"]) for x in live]
    mem = [float(x["rss_mb"]) for x in live if x.get("rss_mb") is not None]
    return (
        f"{len(live)}/{len(procs)} reporting, {sum(len(x['peers']) for x in live)} pairs, "
        f"fps min {min(fps, default=0):.0f} mean {sum(fps) / max(1, len(fps)):.1f}, "
        f"cpu {sum(cpu):.0f}% total ({max(cpu, default=0):.0f}% max), "
        f"mem {sum(mem):.0f} MiB total"
    )


# -- one run ------------------------------------------------------------------------------


async def _embedded_sfu(stack: contextlib.AsyncExitStack, run_dir: Path, hs: Synapse) -> str:
    """Start LiveKit and our authorization service (``python -m sfu serve``) in front of it;
    both stop with ``stack``. Returns the service URL members advertise."""
    lk = await stack.enter_async_context(LiveKit(run_dir))
    svc = await stack.enter_async_context(AuthService(run_dir, lk, hs, name="call-test-sfu"))
    return svc.url


async def run_call_test(
    cfg: CallTestConfig, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run the whole call test and return the report (see :func:`build_report`)."""
    if cfg.participants < 2:
        raise LocalError("a call needs at least two participants")
    if not 0 <= cfg.receive_only < cfg.participants:
        raise LocalError("at least one participant must publish (--receive-only < N)")
    # The participants inherit MATRIXRTC_EVENT_LOOP: a bad value fails here, before any start.
    event_loop.loop_name()
    run_dir = cfg.run_dir or new_run_dir(prefix="call-test")
    say = progress or (lambda _: None)
    loopback = cfg.homeserver is None if cfg.loopback is None else cfg.loopback
    async with contextlib.AsyncExitStack() as stack:
        if cfg.homeserver is None:
            t = time.monotonic()
            synapse = await stack.enter_async_context(Synapse(run_dir))
            base_url = synapse.base_url
            say(f"Synapse up at {base_url} ({time.monotonic() - t:.1f} s)")
        else:
            base_url = cfg.homeserver
        sfu_url = cfg.sfu_url
        wants_sfu = cfg.transport == "sfu" or (
            cfg.transport == "auto" and cfg.participants > cfg.mesh_max
        )
        if sfu_url is None and wants_sfu:
            if cfg.homeserver is not None:
                raise LocalError(f"--transport {cfg.transport} with --homeserver needs --sfu-url")
            t = time.monotonic()
            sfu_url = await _embedded_sfu(stack, run_dir, synapse)
            say(f"LiveKit and the authorization service up ({time.monotonic() - t:.1f} s)")
        tag = secrets.token_hex(2)
        names = [f"{cfg.user_prefix}{i + 1}-{tag}" for i in range(cfg.participants)]
        if cfg.homeserver is not None and cfg.password is not None:
            names = [f"{cfg.user_prefix}{i + 1}" for i in range(cfg.participants)]
        prov = await provision(base_url, names, encrypted=cfg.e2ee, password=cfg.password)
        say(f"room {prov.room_id} ({'encrypted' if cfg.e2ee else 'unencrypted'})")
        base = ParticipantConfig(
            name="",
            homeserver=base_url,
            user="",
            password="",
            room_id=prov.room_id,
            duration_s=0,
            width=cfg.width,
            height=cfg.height,
            fps=cfg.fps,
            e2ee=cfg.e2ee,
            delayed_leave_ms=cfg.delayed_leave_ms,
            # Embedded stack: loopback only. A real homeserver: its TURN servers, any address.
            host_addresses=("127.0.0.1",) if loopback else None,
            turn_from_homeserver=not loopback,
            transport=cfg.transport if sfu_url is not None else "mesh",
            sfu_url=sfu_url,
            mesh_max=cfg.mesh_max,
            simulcast=cfg.simulcast,
            low_layer_above=cfg.low_layer_above,
            decode_video=cfg.decode_video,
            render_max=cfg.render_max,
            preencoded=cfg.preencoded,
            sfu_engine=cfg.sfu_engine,
        )
        viewers = range(cfg.participants - cfg.receive_only, cfg.participants)
        configs = [
            replace(base, name=f"p{i + 1}", user=user, password=pw, receive_only=i in viewers)
            for i, (user, pw) in enumerate(prov.users)
        ]
        procs = await stack.enter_async_context(
            participants(configs, run_dir / "participants", join_interval_s=cfg.join_interval_s)
        )
        await asyncio.gather(*(p.wait_ready() for p in procs))
        t0 = time.monotonic()
        deadline = cfg.duration_s
        opened = False
        while (elapsed := time.monotonic() - t0) < deadline:
            say(progress_line(procs, elapsed))
            dead = [p.name for p in procs if p.proc.returncode is not None]
            if dead:
                raise RemoteError(f"participant(s) exited early: {', '.join(dead)}")
            if cfg.window_s is not None and not opened:
                opens_ms = window_opens_ms(procs, cfg)
                if opens_ms is not None:
                    opened = True
                    deadline = elapsed + max(0.0, opens_ms / 1000 - time.time()) + cfg.window_s
                    say(f"every pair receives: measuring {cfg.window_s:.0f} s from here")
            await asyncio.sleep(max(0.0, min(1.0, deadline - elapsed)))
        end_ms = round(time.time() * 1000)
        await asyncio.gather(*(p.stop() for p in procs))
        report = build_report(procs, cfg, end_ms=end_ms)
        if cfg.html is not None:
            write_html(cfg.html, report, procs)
            say(f"timelines written to {cfg.html}")
        return report
    raise AssertionError("unreachable")  # pragma: no cover  (mypy: the stack may swallow)
