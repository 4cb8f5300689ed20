"""Media benchmark: recording cost per stream, playing cost, and what a recording preserves.

Run inside the private network namespace::

    ./scripts/in-netns .venv/bin/python bench/media.py [--json] [--streams 8] [--seconds 10]

- ``record``: a :class:`~matrixrtc.media.recorder.Recorder` fed ``--streams`` participants'
  320×240@15 video and 48 kHz audio (20 ms frames) in real time, in this process; CPU is the
  process CPU time (all threads: encoding, muxing, writing) over the window, per stream, as %
  of one core; ``dropped_frames`` are frames the writers could not take. Receiving and
  decoding (the call's part) are not included.
- ``record_passthrough``: the same, fed the streams' VP8 frames and Opus packets as the mesh
  hands them on (encoded once beforehand, not counted): written without re-encoding.
- ``play``: ``python -m matrixrtc play`` sending a 320×240@15 VP8/Opus clip (looped) into a
  real mesh call (Synapse from the devstack, E2EE keys over Olm), its process CPU from
  ``/proc`` between joining and the end, as % of one core (decode, pacing, VP8/Opus encode,
  frame encryption, the Matrix sync loop).
- ``psnr_db``, ``av_skew_ms``: a ``Call.record`` in the same call records the player; median
  PSNR of the recorded frames against the source frames of the same number, and how much
  later audio plays than its video (beep onsets against numbered frames).

Prints figures only; never fails on time. About 30 s with the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import fractions
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import av
import numpy as np

from matrixrtc import Call, CallOptions
from matrixrtc.calltest.runner import provision
from matrixrtc.devstack import Synapse, new_run_dir
from matrixrtc.logging import configure_logging
from matrixrtc.media.frames import EncodedFrame
from matrixrtc.media.recorder import Recorder
from tests.media_samples import analyse, write_media_file

FPS = 15
_TICK = os.sysconf("SC_CLK_TCK")


def _frames(seed: int, count: int = 30) -> list[av.VideoFrame]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(240, 320), dtype=np.uint8)
    base = (base // 32 * 32).astype(np.uint8)  # blocky: encodes like a camera, not like noise
    out = []
    for n in range(count):
        y = np.roll(base, n * 4, axis=1)
        uv = np.full((120, 320), 128, np.uint8)
        out.append(av.VideoFrame.from_ndarray(np.concatenate((y, uv)), format="yuv420p"))
    return out


def _audio(seed: int) -> av.AudioFrame:
    t = np.arange(960) / 48_000
    pcm = (np.sin(2 * np.pi * (300 + 40 * seed) * t) * 8000).astype(np.int16).reshape(1, -1)
    frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
    frame.sample_rate = 48_000
    return frame


def _encoded(frames: list[av.VideoFrame]) -> list[EncodedFrame]:
    """``frames`` as a sender's VP8 (a key frame first, then deltas), stamped at 15 fps."""
    ctx = av.CodecContext.create("libvpx", "w")
    ctx.width, ctx.height, ctx.pix_fmt = 320, 240, "yuv420p"
    ctx.time_base = fractions.Fraction(1, 90_000)
    ctx.bit_rate = 500_000
    ctx.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
    out = []
    for n, frame in enumerate(frames):
        frame.pts = n * 6000
        data = b"".join(bytes(p) for p in ctx.encode(frame))
        out.append(
            EncodedFrame(
                kind="video",
                codec="vp8",
                data=data,
                pts=n * 6000,
                time_base=fractions.Fraction(1, 90_000),
                keyframe=n == 0,
            )
        )
    return out


def _opus(frame: av.AudioFrame) -> EncodedFrame:
    """One 20 ms audio frame as a sender's Opus packet."""
    ctx = av.CodecContext.create("libopus", "w")
    ctx.sample_rate, ctx.format, ctx.layout = 48_000, "s16", "mono"
    ctx.bit_rate = 32_000
    ctx.time_base = fractions.Fraction(1, 48_000)
    packets: list[bytes] = []
    for i in range(3):  # the encoder's look-ahead: the second packet is a steady one
        frame.pts = i * 960
        packets += [bytes(p) for p in ctx.encode(frame)]
    return EncodedFrame(
        kind="audio",
        codec="opus",
        data=packets[-1],
        pts=0,
        time_base=fractions.Fraction(1, 48_000),
        keyframe=True,
    )


async def bench_record(streams: int, seconds: float, *, passthrough: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        rec = Recorder(Path(d) / "rec")
        videos: list[list[av.VideoFrame]] | list[list[EncodedFrame]]
        videos = [_frames(i) for i in range(streams)]
        if passthrough:
            videos = [_encoded(v) for v in videos]
        audios: list[av.AudioFrame] | list[EncodedFrame]
        audios = [_audio(i) for i in range(streams)]
        if passthrough:
            audios = [_opus(a) for a in audios]
        for i in range(streams):
            rec.joined(f"@p{i}:bench:DEV", {"user_id": f"@p{i}:bench"})
        loop = asyncio.get_running_loop()
        start, cpu0 = loop.time(), time.process_time()
        tick = 0
        while (now := loop.time()) - start < seconds:
            for i in range(streams):
                a = audios[i]
                if isinstance(a, EncodedFrame):
                    a = dataclasses.replace(a, pts=tick * 960)
                rec.frame(f"@p{i}:bench:DEV", "audio", a)
                if tick % 10 in (0, 3, 7):  # 15 of every 50 ticks of 20 ms: 15 fps
                    n = tick // 10 * 3 + (0, 0, 0, 1, 1, 1, 1, 2, 2, 2)[tick % 10]
                    v = videos[i][n % 30]
                    if isinstance(v, EncodedFrame):  # the sender's clock runs on
                        v = dataclasses.replace(v, pts=n * 6000)
                    rec.frame(f"@p{i}:bench:DEV", "video", v)
            tick += 1
            await asyncio.sleep(max(0.0, start + tick * 0.02 - loop.time()))
        backlog = sum(w._queue.qsize() for w in rec.segment_writers())
        cpu = time.process_time() - cpu0
        wall = now - start
        writers = rec.segment_writers()
        dropped = sum(w.stats.dropped for w in writers)
        encoded = sum(w.stats.frames["video"] for w in writers)
        await asyncio.to_thread(rec.close)
        nbytes = sum(s["bytes"] for p in rec.index()["participants"] for s in p["segments"])
    return {
        "streams": streams,
        "seconds": round(wall, 1),
        "cpu_percent_per_stream": round(100 * cpu / wall / streams, 1),
        "cpu_percent_total": round(100 * cpu / wall, 1),
        "dropped_frames": dropped,
        "backlog_at_end": backlog,
        "video_frames_encoded_in_window": encoded,
        "kbit_per_s_per_stream": round(nbytes * 8 / 1000 / wall / streams),
    }


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


async def bench_call(seconds: float, work: Path) -> dict[str, Any]:
    clip = work / "clip.webm"
    write_media_file(clip, 10.0, fps=FPS, frequency=440.0, beeps=True)
    run_dir = new_run_dir(prefix="bench-media")
    async with Synapse(run_dir) as hs:
        prov = await provision(hs.base_url, ["bench-play", "bench-rec"], encrypted=True)
        (play_user, play_pw), (rec_user, rec_pw) = prov.users
        options = CallOptions(mesh_host_addresses=("127.0.0.1",), turn_from_homeserver=False)
        async with Call(
            prov.room_id,
            homeserver=prov.base_url,
            user=rec_user,
            password=rec_pw,
            transport="mesh",
            options=options,
        ) as call:
            rec = call.record(work / "rec")
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "matrixrtc",
                "--log-level",
                "warning",
                "play",
                str(clip),
                "--loop",
                "--homeserver",
                prov.base_url,
                "--user",
                play_user,
                "--room",
                prov.room_id,
                "--state-dir",
                str(work / "player"),
                "--transport",
                "mesh",
                "--mesh-host",
                "127.0.0.1",
                "--output",
                "json",
                "--duration",
                str(seconds + 2),
                env={**os.environ, "MATRIXRTC_PASSWORD": play_pw},
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
            assert proc.stdout is not None
            while json.loads(await proc.stdout.readline())["event"] != "ready":
                pass
            await asyncio.sleep(2.0)  # connected, keys in
            cpu0, t0 = _proc_cpu(proc.pid), time.monotonic()
            await asyncio.sleep(seconds)
            cpu1, t1 = _proc_cpu(proc.pid), time.monotonic()
            await proc.communicate()
            await asyncio.sleep(1.0)
            await rec.aclose()
    index = json.loads((work / "rec" / "index.json").read_text())
    seg = index["participants"][0]["segments"][0]
    figures = analyse(work / "rec" / seg["file"], FPS, period=10 * FPS)
    return {
        "play": {"cpu_percent": round(100 * (cpu1 - cpu0) / (t1 - t0), 1)},
        "psnr_db": round(figures["psnr"], 1),
        "av_skew_ms": round(figures["skew"] * 1000, 1) if figures["skew"] is not None else None,
        "recorded_frames": len(figures["numbers"]),
    }


async def run(streams: int, seconds: float) -> dict[str, Any]:
    record = await bench_record(streams, seconds, passthrough=False)
    copied = await bench_record(streams, seconds, passthrough=True)
    with tempfile.TemporaryDirectory() as d:
        call = await bench_call(seconds, Path(d))
    return {"record": record, "record_passthrough": copied, **call}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    configure_logging("console", "warning")
    result = asyncio.run(run(args.streams, args.seconds))
    if args.json:
        print(json.dumps(result))
    else:
        for name in ("record", "record_passthrough"):
            r = result[name]
            print(
                f"{name}: {r['streams']} streams 320x240@15 + audio for {r['seconds']} s: "
                f"{r['cpu_percent_per_stream']} % of a core per stream "
                f"({r['cpu_percent_total']} % total), {r['dropped_frames']} dropped, "
                f"backlog {r['backlog_at_end']}, {r['kbit_per_s_per_stream']} kbit/s per stream"
            )
        print(f"play: {result['play']['cpu_percent']} % of a core (mesh call, E2EE)")
        print(
            f"recording of the played clip: PSNR {result['psnr_db']} dB, A/V skew "
            f"{result['av_skew_ms']} ms ({result['recorded_frames']} frames)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
