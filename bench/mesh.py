"""Full-mesh benchmark: CPU per participant with encode-once vs per-peer encoders, and the time
from joining to the first decoded frame.

Run inside the private network namespace (everything binds 127.0.0.1)::

    ./scripts/in-netns .venv/bin/python bench/mesh.py [--json]

All N participants run in this one process (in-process to-device queue, real aiortc peer
connections over loopback), so "CPU per participant" is the process CPU time (all threads)
divided by N and by the wall time of the window, as % of one core. Per-peer mode is aiortc's
own path (one encoder per RTCRtpSender fed through MediaRelay) without frame E2EE; encode-once
mode runs with a frame transform (AES-128-GCM, the cost of E2EE included). Prints figures
only; never fails on time. Bounded: about a minute with the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench._run import run_bench
from matrixrtc.media.sources import SyntheticVideoTrack, ToneAudioTrack
from matrixrtc.mesh.engine import MeshConfig, MeshEngine
from matrixrtc.mesh.transform import FrameDecryptor
from matrixrtc.session.mesh_signalling import DeviceRef, LocalDevice, mesh_conf_id

CONF = mesh_conf_id("!bench:localhost")


class _Decryptor:
    def __init__(self, aead: AESGCM) -> None:
        self.aead = aead

    def decrypt(
        self, frame: bytes, *, kind: str, codec: str, keyframe: bool | None
    ) -> bytes | None:
        n = 1 if kind == "audio" else (10 if keyframe else 3)
        try:
            return frame[:n] + self.aead.decrypt(frame[-12:], frame[n:-12], frame[:n])
        except Exception:
            return None


class _BenchTransform:
    """One AES-128-GCM key for everyone: measures the cost, not key management."""

    def __init__(self) -> None:
        self.aead = AESGCM(bytes(range(16)))
        self.counter = 0

    def encrypt(
        self, frame: bytes, *, kind: str, codec: str, keyframe: bool, ssrc: int, timestamp: int
    ) -> bytes | None:
        self.counter += 1
        n = 1 if kind == "audio" else (10 if keyframe else 3)
        iv = ssrc.to_bytes(4, "big") + self.counter.to_bytes(8, "big")
        return frame[:n] + self.aead.encrypt(iv, frame[n:], frame[:n]) + iv

    def decryptor(self, participant: DeviceRef) -> FrameDecryptor:
        return _Decryptor(self.aead)


class _Router:
    def __init__(self) -> None:
        self.engines: dict[DeviceRef, MeshEngine] = {}

    def sender(self, origin: DeviceRef) -> _Sender:
        return _Sender(self, origin)


@dataclass
class _Sender:
    router: _Router
    origin: DeviceRef

    async def send_to_device(
        self, user_id: str, device_id: str, event_type: str, content: Mapping[str, Any]
    ) -> None:
        engine = self.router.engines.get(DeviceRef(user_id, device_id))
        if engine is not None:
            engine.receive(self.origin.user_id, event_type, dict(content))


def _ref(i: int) -> DeviceRef:
    return DeviceRef(f"@p{i:02d}:localhost", f"DEV{i:02d}")


def _engine(
    router: _Router, r: DeviceRef, *, encode_once: bool, width: int, height: int, fps: float
) -> MeshEngine:
    engine = MeshEngine(
        LocalDevice(
            user_id=r.user_id, device_id=r.device_id, session_id=f"s{r.device_id}", conf_id=CONF
        ),
        router.sender(r),
        sources=[SyntheticVideoTrack(width, height, fps), ToneAudioTrack()],
        config=MeshConfig(host_addresses=("127.0.0.1",), encode_once=encode_once),
        transform=_BenchTransform() if encode_once else None,
    )
    router.engines[r] = engine
    return engine


def _decoded(engine: MeshEngine, peer: DeviceRef, kind: str = "video") -> int:
    link = engine.link_for(peer)
    stats = None if link is None else link.stats.get(kind)
    return 0 if stats is None else stats.frames_decoded


async def _until(predicate: Any, within: float) -> bool:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def measure_cpu(
    n: int, *, encode_once: bool, width: int, height: int, fps: float, window: float
) -> dict[str, Any]:
    router = _Router()
    refs = [_ref(i) for i in range(n)]
    engines = [
        _engine(router, r, encode_once=encode_once, width=width, height=height, fps=fps)
        for r in refs
    ]
    members = {r: f"s{r.device_id}" for r in refs}
    try:
        for e in engines:
            e.start()
            e.set_members(members)
        pairs = [(e, p) for e, r in zip(engines, refs, strict=True) for p in refs if p != r]
        ok = await _until(lambda: all(_decoded(e, p) > 0 for e, p in pairs), 20)
        await asyncio.sleep(1.0)  # let start-up key frames and bitrate settle
        before = [_decoded(e, p) for e, p in pairs]
        cpu0, wall0 = time.process_time(), time.monotonic()
        await asyncio.sleep(window)
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        fps_in = [(_decoded(e, p) - b) / wall for (e, p), b in zip(pairs, before, strict=True)]
        return {
            "participants": n,
            "mode": "encode_once" if encode_once else "per_peer",
            "connected": ok,
            "cpu_percent_per_participant": round(100 * cpu / wall / n, 1),
            "cpu_percent_total": round(100 * cpu / wall, 1),
            "fps_in_min": round(min(fps_in), 1),
            "fps_in_mean": round(statistics.fmean(fps_in), 1),
            "video_encodes_per_frame": (
                round(
                    statistics.fmean(
                        e.encoders["video"].frames_encoded / max(1, e.encoders["video"].frames_in)
                        for e in engines
                    ),
                    2,
                )
                if encode_once
                else n - 1
            ),
        }
    finally:
        await asyncio.gather(*(e.aclose() for e in engines))


async def measure_join(joins: int, *, width: int, height: int, fps: float) -> dict[str, Any]:
    """An existing participant; a newcomer joins ``joins`` times: join → first decoded frame."""
    router = _Router()
    host = _ref(0)
    host_engine = _engine(router, host, encode_once=True, width=width, height=height, fps=fps)
    host_engine.start()
    delays: list[float] = []
    try:
        for i in range(1, joins + 1):
            guest = _ref(i)
            guest_engine = _engine(
                router, guest, encode_once=True, width=width, height=height, fps=fps
            )
            members = {host: f"s{host.device_id}", guest: f"s{guest.device_id}"}
            t0 = time.monotonic()
            guest_engine.start()
            guest_engine.set_members(members)
            host_engine.set_members(members)
            if await _until(lambda g=guest_engine: _decoded(g, host) > 0, 10):
                link = guest_engine.link_for(host)
                assert link is not None
                first = link.stats["video"].first_frame_at
                assert first is not None
                delays.append(first - t0)
            host_engine.set_members({host: f"s{host.device_id}"})
            await guest_engine.aclose()
            del router.engines[guest]
    finally:
        await host_engine.aclose()
    return {
        "joins": joins,
        "succeeded": len(delays),
        "first_frame_ms_p50": round(1000 * statistics.median(delays)) if delays else None,
        "first_frame_ms_all": [round(1000 * d) for d in delays],
    }


async def run_profile(
    resolution: str, fps: float, max_participants: int, window: float, joins: int
) -> dict[str, Any]:
    width, height = (int(x) for x in resolution.split("x"))
    cpu: list[dict[str, Any]] = []
    for n in range(2, max_participants + 1):
        for encode_once in (True, False):
            cpu.append(
                await measure_cpu(
                    n, encode_once=encode_once, width=width, height=height, fps=fps, window=window
                )
            )
    ratios = {}
    for n in range(2, max_participants + 1):
        once = next(r for r in cpu if r["participants"] == n and r["mode"] == "encode_once")
        per = next(r for r in cpu if r["participants"] == n and r["mode"] == "per_peer")
        ratios[str(n)] = round(
            once["cpu_percent_per_participant"] / max(0.1, per["cpu_percent_per_participant"]), 2
        )
    join = await measure_join(joins, width=width, height=height, fps=fps)
    return {
        "resolution": resolution,
        "fps": fps,
        "window_s": window,
        "cpu": cpu,
        "cpu_ratio_encode_once_over_per_peer": ratios,
        "join": join,
    }


def _profile(text: str) -> tuple[str, float]:
    """``WxH@FPS`` → (``"WxH"``, fps)."""
    resolution, _, fps = text.partition("@")
    w, _, h = resolution.partition("x")
    if not (w.isdigit() and h.isdigit()):
        raise argparse.ArgumentTypeError(f"expected WxH@FPS, got {text!r}")
    return resolution, float(fps or 15)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    profiles = args.profile or [_profile("320x240@15"), _profile("640x480@30")]
    return {
        "profiles": [
            await run_profile(res, fps, args.max_participants, args.window, args.joins)
            for res, fps in profiles
        ]
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--profile",
        type=_profile,
        action="append",
        help="WxH@FPS, repeatable (default: 320x240@15 and 640x480@30)",
    )
    parser.add_argument("--max-participants", type=int, default=5)
    parser.add_argument("--window", type=float, default=4.0, help="seconds measured per case")
    parser.add_argument("--joins", type=int, default=5)
    args = parser.parse_args(argv)
    result = run_bench(run, args)
    if result is None:
        return 0
    for prof in result["profiles"]:
        print(f"mesh at {prof['resolution']}@{prof['fps']:g}, {prof['window_s']:g} s windows")
        print(
            f"{'N':>2} {'mode':<12} {'cpu%/participant':>17} {'total cpu%':>10} "
            f"{'fps in min/mean':>16}"
        )
        for r in prof["cpu"]:
            print(
                f"{r['participants']:>2} {r['mode']:<12} {r['cpu_percent_per_participant']:>17} "
                f"{r['cpu_percent_total']:>10} {r['fps_in_min']:>8}/{r['fps_in_mean']:<7}"
            )
        print("ratio encode-once / per-peer:", prof["cpu_ratio_encode_once_over_per_peer"])
        j = prof["join"]
        print(
            f"join -> first frame: p50 {j['first_frame_ms_p50']} ms "
            f"over {j['succeeded']}/{j['joins']} joins {j['first_frame_ms_all']}\n"
        )
    print(f"took {result['bench_duration_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
