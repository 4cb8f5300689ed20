"""Scale benchmark: how many call-test participants one box holds, on the mesh and on the SFU.

Run inside the private network namespace (everything binds 127.0.0.1)::

    ./scripts/in-netns .venv/bin/python bench/scale.py [--json] [--mesh 2-8] [--sfu 4,8,12]

One Synapse, one LiveKit and our authorization service are started once; then, one cell at a
time, ``python -m matrixrtc call-test``'s runner puts N participant processes (each: homeserver
login, call agent, Olm keys, frame E2EE, 320×240 @ 15 VP8 + Opus) into a fresh encrypted room
on the mesh (``--mesh``) or on LiveKit (``--sfu``). Each cell's figures come from its
steady-state window (see ``matrixrtc.calltest.runner.measurement_window``): the lowest
per-pair received frame rate over the sent one (``min_fps_ratio``) and the mean process CPU of
a participant in % of one core (``cpu_percent_per_participant``, all threads; LiveKit's own
CPU is reported apart as ``server_cpu_percent``). ``sfu_max_n`` is the largest SFU N measured
whose cell, and every smaller SFU cell, holds ``min_fps_ratio`` ≥ 0.9.

Every cell also carries ``udp``: the datagrams the namespace's sockets took in (``received``)
and dropped at a full receive buffer (``dropped``) while the cell ran, from ``/proc/net/snmp``
(``bench/_host.py``); SFU cells add ``at_port``, the drops at LiveKit's own socket, so drops
at the participants are ``dropped - at_port``. The counters are the namespace's: run inside
``scripts/in-netns`` or they count the host's traffic too. ``--reports DIR`` writes each
cell's whole call-test report (every participant, every pair) to ``DIR/mesh-N.json`` or
``DIR/sfu-N-ENGINE.json``. ``min_sent_video_fps`` is the slowest publisher's encoded video
rate in the window and ``overflows`` the frames dropped at publishers' full per-receiver
queues, by kind (both from the encoders' counters; None on the ``sdk`` engine): a pair below
the rate because its sender encoded less shows there, apart from the receivers.

Mesh cells (issue 19's 8-party target): participants join ``--mesh-join-interval`` apart and
the window is ``--duration`` seconds from the moment every pair receives (start-up does not
eat it); each participant decodes ``--mesh-decode-video`` peers' video (default 1, a spotlight
tile: decoding all seven at n = 8 needs more than the box's two cores) and receives, decrypts
and counts every other stream, so each pair's ratio is still over frames that arrived whole and
decrypted. The cell states it: ``decode_video``, ``policy`` and ``decoded`` (receiver → the
senders it decoded).

``switch_gap_ms`` (``--switch``) is ``bench/switch.py``'s measurement (a process per member):
three members on the mesh, a fourth joins (the call moves to the SFU) and leaves (back to the
mesh); the largest video gap any member saw from any other around each switch (decoded frames,
over the transport the receiver takes that member from). ``switch_gap_ms_without_acks`` is the
same, measured right before in the same run, with each member tearing down its old path
without waiting for the others to receive it on the new one (the switcher before
make-before-break acknowledgements; ``--no-switch-compare`` skips it). Its SFU side runs on the
first ``--sfu-engine`` (``switch_sfu_engine``). Synapse and the authorization service run at a
lower CPU weight (``switch_homeserver_nice``, bench/switch.py's docstring says why);
``switch_gap_ms_same_priority`` (with ``--switch-compare``) is the same measurement with them
at the members' weight.

SFU cells run each participant's LiveKit client on ``--sfu-engine`` (``MediaOptions.engine``):
``aiortc`` (default: our client over aiortc, ``matrixrtc/media_transport/aiortc_engine.py``,
which decodes only the rendered videos and encodes each layer once; with ``--simulcast``, the
default, it publishes layers ``q`` 160×120 and ``h`` 320×240, skips a layer nobody takes, and
its receivers take the low layer past ``--low-layer-above`` remote videos) or ``sdk`` (the
livekit Python SDK, which decodes every subscribed video: it holds 6 on this box);
``aiortc,sdk`` measures a cell of each at every N, one after the other. SFU receivers render
(decode) ``--render-max`` (3) remote videos, a speaker view, and receive, decrypt and count
every other stream. Every SFU cell states its ``engine``; ``sfu_max_n`` is
the first engine's, ``sfu_max_n_by_engine`` each one's.

``go_sdk_anchor`` (``--go-anchor``, on when ``make goanchor`` has built ``.cache/goanchor``):
after each SFU cell, at the same N and on the same LiveKit, bench/goanchor's N participants in
one Go process (LiveKit's server-sdk-go, neither Matrix nor E2EE) publish a looped pre-encoded
320×240 @ 15 VP8 stream plus Opus and subscribe to every other; they count frames and decode
none. Its CPU per participant is that process's CPU over N. Prints figures only;
never fails on a figure. Compare figures within one run: the box is shared.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

from bench._host import cpu_sample, process_cpu_s, steal_cores, udp_drops, udp_sample
from bench._run import run_bench
from matrixrtc.calltest.runner import CallTestConfig, run_call_test
from matrixrtc.devstack import AuthService, LiveKit, Synapse, new_run_dir

TARGET_RATIO = 0.9
ENGINES = ("aiortc", "sdk")
_QUIET = {"LIVEKIT_LOG_LEVEL": "error"}
# SFU cells measure how many participants the box holds once they are in the call, so each
# join (a new process: interpreter start, login, Olm keys; then every member's key share,
# LiveKit subscription and key frame for it) ends before the next begins. 0.5 s apart the
# joins of a dozen overlapped on the two cores and, on 6 Dec, twelve collapsed in 5 of 8
# runs and never recovered; 4 s apart they held in 8 of 9 and none dropped a datagram (the
# ninth: one sender's video at a third of its rate, every other pair at 0.94 or more; the
# full benchmark's n=12 cell still failed in both of the day's runs). Each SFU cell states it.
SFU_JOIN_INTERVAL_S: Final = 4.0


def _ns(text: str) -> list[int]:
    """``2-8`` / ``3,6,12`` / ``4`` → sorted participant counts (each ≥ 2)."""
    out: set[int] = set()
    for part in text.split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected N, A-B or a list") from None
        out.update(range(a, b + 1))
    if any(n < 2 for n in out):
        raise argparse.ArgumentTypeError("a call needs at least two participants")
    return sorted(out)


def _engines(text: str) -> list[str]:
    """``aiortc`` / ``sdk`` / ``aiortc,sdk`` → the SFU engines to measure, in that order."""
    out = [e for e in text.split(",") if e]
    if not out or any(e not in ENGINES for e in out) or len(set(out)) < len(out):
        raise argparse.ArgumentTypeError(f"{text!r}: expected engines from {', '.join(ENGINES)}")
    return out


def _decoded(pair: dict[str, Any], engine: str | None) -> bool:
    """Whether the receiver decoded this pair's video. On the SFU's aiortc engine only the
    rendered videos are (the others are received, decrypted and counted), while the pair's
    own ``decoded`` flag says which frame counter its rate comes from, not that."""
    if pair.get("transport") == "sfu" and engine == "aiortc" and "rendered" in pair:
        return bool(pair["rendered"])
    return bool(pair.get("decoded", True))


def _overflows(w: dict[str, Any]) -> dict[str, int] | None:
    """Frames dropped at publishers' full per-receiver queues in the window, by kind."""
    sent = [x["sent"] for x in w.get("participants", ()) if "sent" in x]
    if not sent:
        return None
    return {k: sum(x[f"{k}_overflows"] for x in sent) for k in ("video", "audio")}


def _cell(n: int, report: dict[str, Any], server_cpu: float | None) -> dict[str, Any]:
    w = report["window"]
    layers: dict[str, dict[str, str]] = {}
    rendered: dict[str, list[str]] = {}
    counted: dict[str, list[str]] = {}
    for pair in w["pairs"]:
        if "layer" in pair:
            got = pair["layer"] + (f" {pair['video_size']}" if "video_size" in pair else "")
            layers.setdefault(pair["receiver"], {})[pair["sender"]] = got
        if "rendered" in pair:
            into = rendered if pair["rendered"] else counted
            into.setdefault(pair["receiver"], []).append(pair["sender"])
    cell: dict[str, Any] = {
        "n": n,
        "min_fps_ratio": w["min_fps_ratio"],
        "cpu_percent_per_participant": w.get("cpu_percent_per_participant"),
        "cpu_percent_total": w.get("cpu_percent_total"),
        "memory_mb_per_participant": w.get("memory_mb_per_participant"),
        "decrypt_failures": w.get("decrypt_failures"),
        # what the publishers sent: a pair below the rate because its sender encoded less
        # shows here (None on the SDK engine, which exposes no encoder counters)
        "min_sent_video_fps": w.get("min_sent_video_fps"),
        "overflows": _overflows(w),
        "window_s": w.get("seconds"),
        "all_pairs_received": w.get("all_pairs_received"),
        # pairs whose video the receiver decoded; the others were received, decrypted, counted
        "decoded_pairs": sum(1 for p in w["pairs"] if _decoded(p, report.get("sfu_engine"))),
    }
    if server_cpu is not None:
        cell["server_cpu_percent"] = server_cpu
    if layers:
        cell["layers"] = layers  # receiver → sender → the simulcast layer it took
    if rendered or counted:
        # receiver → senders whose decoded frames it took into the process (rendered) / only
        # counted from its WebRTC receiver's statistics (received, decrypted, not rendered)
        cell["rendered"] = rendered
        cell["counted"] = counted
    return cell


async def _measure(
    transport: str,
    n: int,
    *,
    base_url: str,
    sfu_url: str | None,
    livekit_pid: int | None,
    args: argparse.Namespace,
    run_dir: Path,
    engine: str = "sdk",
) -> dict[str, Any]:
    sfu = transport == "sfu"
    label = f"{transport} n={n}" + (f" {engine}" if sfu else "")
    cfg = CallTestConfig(
        participants=n,
        duration_s=args.duration,
        transport=transport,
        homeserver=base_url,
        sfu_url=sfu_url,
        loopback=True,
        user_prefix=f"{transport}{n}-" + (f"{engine}-" if sfu else ""),
        run_dir=run_dir / (f"{transport}-{n}" + (f"-{engine}" if sfu else "")),
        settle_s=args.settle,
        simulcast=transport == "sfu" and args.simulcast,
        low_layer_above=args.low_layer_above if transport == "sfu" and args.simulcast else None,
        decode_video=args.mesh_decode_video if transport == "mesh" else None,
        render_max=(args.render_max or None) if transport == "sfu" else None,
        preencoded=transport == "sfu" and args.preencoded,
        # Mesh: participants join one after another and the window is measured once every
        # pair receives, so the start-up (logins, Olm, N(N-1)/2 handshakes at once) neither
        # overloads the box nor shortens the window. SFU: the same with --join-interval and
        # --window.
        join_interval_s=args.mesh_join_interval if transport == "mesh" else args.join_interval,
        window_s=args.duration if transport == "mesh" else args.window,
        delayed_leave_ms=args.delayed_leave_ms,
        sfu_engine=engine,
    )
    if transport == "mesh":
        cfg = replace(cfg, duration_s=args.duration + args.mesh_form_timeout)
    elif args.window is not None:
        cfg = replace(cfg, duration_s=args.window + args.sfu_form_timeout)

    def progress(line: str) -> None:
        if args.verbose:
            print(f"  {label}: {line}", file=sys.stderr, flush=True)

    cpu0, wall0 = process_cpu_s(livekit_pid), time.monotonic()
    try:
        report = await run_call_test(cfg, progress=progress)
    except Exception as exc:  # a cell that fails is a figure (0), not the end of the run
        print(f"  {label} failed: {exc!r}", file=sys.stderr, flush=True)
        return {"n": n, "min_fps_ratio": 0.0, "cpu_percent_per_participant": None,
                "error": repr(exc), **({"engine": engine} if sfu else {})}  # fmt: skip
    cpu1, wall1 = process_cpu_s(livekit_pid), time.monotonic()
    server = None
    if transport == "sfu" and cpu0 is not None and cpu1 is not None:
        server = round((cpu1 - cpu0) / (wall1 - wall0) * 100, 1)  # whole cell, not window
    if args.reports is not None:
        # The whole call-test report (every pair, every participant), for when a cell's
        # summary is not enough to say why it fell short.
        args.reports.mkdir(parents=True, exist_ok=True)
        name = f"{transport}-{n}" + (f"-{engine}" if sfu else "") + ".json"
        (args.reports / name).write_text(json.dumps(report, indent=1, default=str))
    cell = _cell(n, report, server)
    if sfu:
        # which LiveKit client every participant of the cell ran (MediaOptions.engine)
        cell = {"n": n, "engine": engine, "join_interval_s": args.join_interval, **cell}
    if transport == "mesh":
        cell.update(_mesh_policy(report, n, args))
    print(
        f"  {label}: min fps ratio {cell['min_fps_ratio']:.2f}, "
        f"cpu {cell['cpu_percent_per_participant']} %/participant, "
        f"decrypt failures {cell['decrypt_failures']}",
        file=sys.stderr,
        flush=True,
    )
    return cell


def _mesh_policy(report: dict[str, Any], n: int, args: argparse.Namespace) -> dict[str, Any]:
    """What a mesh cell's receivers did: the decode policy, and per receiver the peers whose
    video it decoded (every other peer's video was received, decrypted and counted)."""
    k = args.mesh_decode_video
    decoded: dict[str, list[str]] = {}
    for pair in report["window"]["pairs"]:
        got = decoded.setdefault(pair["receiver"], [])
        if pair.get("decoded", True):
            got.append(pair["sender"])
    shown = "all" if k is None or k >= n - 1 else str(k)
    return {
        "decode_video": k,  # videos each participant decodes (None: all)
        "policy": (
            f"each participant decodes {shown} of its {n - 1} peers' video (the first to "
            "connect, a spotlight tile) and receives, decrypts and counts every other; "
            f"joins {args.mesh_join_interval:g} s apart, window from every pair receiving"
        ),
        "decoded": decoded,  # receiver → senders whose video it decoded
    }


GOANCHOR = Path(__file__).resolve().parents[1] / ".cache" / "goanchor"


def _write_ivf(path: Path, *, seconds: float = 4.0, fps: int = 15) -> None:
    """A looped VP8 clip for the Go anchor: 320×240 moving test pattern, encoded by PyAV."""
    import av
    import numpy as np

    with av.open(str(path), "w", format="ivf") as out:
        stream = out.add_stream("libvpx", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        stream.bit_rate = 360_000
        stream.options = {"deadline": "realtime", "g": str(fps * 2)}
        y, x = np.mgrid[0:240, 0:320]
        for i in range(int(seconds * fps)):
            img = np.stack([(x + 4 * i) % 256, (y + 2 * i) % 256, (x + y) % 256], -1)
            frame = av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


async def _measure_go_anchor(
    n: int, *, url: str, key: str, secret: str, ivf: Path, args: argparse.Namespace
) -> dict[str, Any]:
    import asyncio
    import json

    proc = await asyncio.create_subprocess_exec(
        str(GOANCHOR), "-url", url, "-key", key, "-secret", secret, "-room", f"goanchor-{n}",
        "-n", str(n), "-ivf", str(ivf), "-fps", "15", "-warmup", "5s",
        "-window", f"{max(args.duration - 5.0, 5.0)}s",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), args.duration + 60 + n)
    if proc.returncode != 0:
        raise RuntimeError(f"goanchor n={n}: exit {proc.returncode}: {err.decode()[-2000:]}")
    res = json.loads(out)
    if res["joined"] < n:
        print(f"  go anchor n={n}: {err.decode()[-6000:]}", file=sys.stderr, flush=True)
    cell = {
        "n": n,
        "min_fps_ratio": round(float(res["min_fps_ratio"]), 3),
        "cpu_percent_per_participant": round(float(res["cpu_percent_per_participant"]), 1),
        "joined": res["joined"],
        "layer": "single 320x240 (not decoded)",
    }
    print(f"  go anchor n={n}: {cell}", file=sys.stderr, flush=True)
    return cell


def sfu_max_n(cells: Sequence[dict[str, Any]]) -> int | None:
    """The largest N whose cell and every smaller one hold ``TARGET_RATIO``."""
    best = None
    for cell in sorted(cells, key=lambda c: int(c["n"])):
        if float(cell["min_fps_ratio"]) < TARGET_RATIO:
            break
        best = int(cell["n"])
    return best


def host_calibration() -> dict[str, float]:
    """How fast this host is today, for comparing runs across machines and days: the best of
    5 timings of a pure-Python loop (``sum(range(1000))``, µs; our media stack is mostly
    Python) and the VP8 encode and decode of one 320×240 synthetic frame (ms, libvpx
    realtime, one thread, as the issue's physics figures: ≈ 3.6 and 0.57 ms)."""
    import fractions
    import timeit

    import av

    from matrixrtc.media.sources import SyntheticVideoTrack

    loops = 2000
    python_us = min(timeit.repeat("sum(range(1000))", number=loops, repeat=5)) / loops * 1e6
    track = SyntheticVideoTrack(320, 240, 15)
    frames = [track.frame_at(i) for i in range(45)]
    enc: Any = av.CodecContext.create("libvpx", "w")
    enc.width, enc.height, enc.pix_fmt = 320, 240, "yuv420p"
    enc.time_base, enc.bit_rate, enc.thread_count = fractions.Fraction(1, 90_000), 500_000, 1
    enc.options = {"deadline": "realtime", "cpu-used": "-6", "lag-in-frames": "0"}
    packets = []
    started = time.perf_counter()
    for frame in frames:
        packets += enc.encode(frame)
    encode_ms = (time.perf_counter() - started) / len(frames) * 1000
    dec: Any = av.CodecContext.create("libvpx", "r")
    started = time.perf_counter()
    for packet in packets:
        dec.decode(packet)
    decode_ms = (time.perf_counter() - started) / max(len(packets), 1) * 1000
    return {
        "python_sum_range_1000_us": round(python_us, 1),
        "vp8_encode_320x240_ms": round(encode_ms, 2),
        "vp8_decode_320x240_ms": round(decode_ms, 2),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    run_dir = new_run_dir(prefix="bench-scale")
    began = cpu_sample()
    calibration = host_calibration()
    result: dict[str, Any] = {
        "mesh": [],
        "sfu": [],
        "sfu_max_n": None,
        "go_sdk_anchor": [],
        "switch_gap_ms": None,
    }
    async with contextlib.AsyncExitStack() as stack:
        hs = await stack.enter_async_context(Synapse(run_dir))
        sfu_url = None
        lk_pid = None
        lk_port = None
        if args.sfu:
            lk = await stack.enter_async_context(LiveKit(run_dir))
            svc = await stack.enter_async_context(
                AuthService(run_dir, lk, hs, name="bench-sfu", extra_env=_QUIET)
            )
            sfu_url, lk_pid, lk_port = svc.url, lk.pid, lk.udp_port
        ivf = None
        if args.sfu and args.go_anchor:
            ivf = run_dir / "goanchor.ivf"
            _write_ivf(ivf)
        for n in args.mesh:
            t0, u0 = cpu_sample(), udp_sample()
            result["mesh"].append(
                await _measure("mesh", n, base_url=hs.base_url, sfu_url=None,
                               livekit_pid=None, args=args, run_dir=run_dir)
            )  # fmt: skip
            result["mesh"][-1]["host_steal_cores"] = steal_cores(t0, cpu_sample())
            result["mesh"][-1]["udp"] = udp_drops(u0, udp_sample())
        for n in args.sfu:
            for engine in args.sfu_engine:
                t0, u0 = cpu_sample(), udp_sample(lk_port)
                result["sfu"].append(
                    await _measure("sfu", n, base_url=hs.base_url, sfu_url=sfu_url,
                                   livekit_pid=lk_pid, args=args, run_dir=run_dir,
                                   engine=engine)
                )  # fmt: skip
                result["sfu"][-1]["host_steal_cores"] = steal_cores(t0, cpu_sample())
                # at_port: LiveKit's (every publisher sends to it); the rest: participants'
                result["sfu"][-1]["udp"] = udp_drops(u0, udp_sample(lk_port))
            if ivf is not None:
                result["go_sdk_anchor"].append(
                    await _measure_go_anchor(n, url=lk.url, key=lk.api_key,
                                             secret=lk.api_secret, ivf=ivf, args=args)
                )  # fmt: skip
    by_engine = {
        e: sfu_max_n([c for c in result["sfu"] if c.get("engine") == e]) for e in args.sfu_engine
    }
    result["sfu_max_n"] = by_engine[args.sfu_engine[0]] if args.sfu_engine else None
    result["sfu_max_n_by_engine"] = by_engine
    if args.switch:
        from bench.switch import SWITCH_MEDIA, measure_switches

        # The SFU side on the cells' engine (the first of --sfu-engine).
        aiortc = bool(args.sfu_engine) and args.sfu_engine[0] == "aiortc"
        media = replace(SWITCH_MEDIA, engine="aiortc" if aiortc else "sdk")
        dirs = ("mesh_to_sfu", "sfu_to_mesh")
        if args.switch_compare:
            before = await measure_switches(media, args.switch_runs, acks=False)
            result["switch_gap_ms_without_acks"] = {d: before[d] for d in dirs}
            result["switch_detail_without_acks"] = [r["detail"] for r in before["runs"]]
            # The homeserver at the members' CPU weight (bench/switch.py's docstring).
            same = await measure_switches(media, args.switch_runs, homeserver_nice=0)
            result["switch_gap_ms_same_priority"] = {d: same[d] for d in dirs}
            result["switch_gap_ms_each_same_priority"] = same["each"]
        sw = await measure_switches(media, args.switch_runs)
        result["switch_homeserver_nice"] = sw["homeserver_nice"]
        # The largest gap over every run (the target), with the median and each run's figure.
        result["switch_gap_ms"] = {d: sw[d] for d in dirs}
        result["switch_sfu_engine"] = media.engine
        result["switch_gap_ms_median"] = sw["median"]
        result["switch_runs"] = sw["switches"]
        result["switch_gap_ms_each"] = sw["each"]
        result["switch_gap_phase"] = sw["phase"]
        result["switch_steady_gap_ms"] = sw["steady"]  # the same path with no switch
        result["switch_duration_ms"] = [r["switch_duration_ms"] for r in sw["runs"]]
        result["switch_detail"] = [r["detail"] for r in sw["runs"]]
    # Of the 2 cores, how many the host took for others on average over the whole run (each
    # cell has its own host_steal_cores): figures from a run with a large share are the
    # host's, not ours.
    result["host_steal_cores"] = steal_cores(began, cpu_sample())
    result["host_calibration"] = calibration
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--mesh", type=_ns, default=_ns("2-8"), help="mesh N (default 2-8)")
    parser.add_argument("--sfu", type=_ns, default=_ns("3,6,9,12"), help="SFU N (default 3,6,9,12)")
    parser.add_argument("--no-mesh", dest="mesh", action="store_const", const=[])
    parser.add_argument("--no-sfu", dest="sfu", action="store_const", const=[])
    parser.add_argument(
        "--duration", type=float, default=20.0,
        help="seconds per cell (mesh: of the window, from every pair receiving)",
    )  # fmt: skip
    parser.add_argument(
        "--settle", type=float, default=2.0, help="seconds after every pair has a frame"
    )
    parser.add_argument(
        "--switch", action=argparse.BooleanOptionalAction, default=True,
        help="measure the mesh/SFU switch gaps (bench/switch.py's measurement)",
    )  # fmt: skip
    parser.add_argument(
        "--switch-runs", type=int, default=3,
        help="switch measurements (one switch each way, a fresh stack each): the figure is "
        "the largest gap over all of them",
    )  # fmt: skip
    parser.add_argument(
        "--switch-compare", action=argparse.BooleanOptionalAction, default=True,
        help="also measure the switch without acknowledgements, in the same run",
    )  # fmt: skip
    parser.add_argument(
        "--reports", type=Path, default=None, metavar="DIR",
        help="write each cell's whole call-test report (every pair) into DIR",
    )  # fmt: skip
    parser.add_argument(
        "--simulcast", action=argparse.BooleanOptionalAction, default=True,
        help="SFU cells publish simulcast layers (default on)",
    )  # fmt: skip
    parser.add_argument(
        "--low-layer-above", type=int, default=4,
        help="SFU receivers take the low layer past this many remote videos (default 4)",
    )  # fmt: skip
    parser.add_argument(
        "--render-max", type=int, default=3,
        help="SFU receivers take decoded frames of at most this many remote videos; the "
        "others are received, decrypted and counted (default 3; 0: all)",
    )  # fmt: skip
    parser.add_argument(
        "--preencoded", action=argparse.BooleanOptionalAction, default=False,
        help="SFU publishers send a looped VP8 clip of the pattern encoded once, instead of "
        "the SDK encoding every frame (default off)",
    )  # fmt: skip
    parser.add_argument(
        "--sfu-engine", type=_engines, default=_engines("aiortc"), metavar="ENGINES",
        help="SFU cells: each participant's LiveKit client, aiortc (ours) or sdk (the livekit "
        "SDK); aiortc,sdk measures both at every N (default aiortc)",
    )  # fmt: skip
    parser.add_argument(
        "--window", type=float, default=15.0,
        help="SFU cells: seconds measured from --settle after every pair had a frame, "
        "however long the start-up took (default 15)",
    )  # fmt: skip
    parser.add_argument(
        "--join-interval", type=float, default=SFU_JOIN_INTERVAL_S,
        help="SFU cells: start each participant this long after the previous one is ready "
        f"(default {SFU_JOIN_INTERVAL_S:g}; see SFU_JOIN_INTERVAL_S)",
    )  # fmt: skip
    parser.add_argument(
        "--sfu-form-timeout", type=float, default=90.0, metavar="S",
        help="SFU cells: a call not formed (some pair without a frame) S s after the last "
        "join is measured as it is (default 90)",
    )  # fmt: skip
    parser.add_argument(
        "--delayed-leave-ms", type=int, default=8_000,
        help="each member's delayed leave (default 8000, as Element Call)",
    )  # fmt: skip
    parser.add_argument(
        "--go-anchor", action=argparse.BooleanOptionalAction, default=GOANCHOR.exists(),
        help="after each SFU cell, the Go SDK anchor at the same N (make goanchor builds it)",
    )  # fmt: skip
    parser.add_argument(
        "--mesh-decode-video", type=int, default=1, metavar="K",
        help="mesh cells: each participant decodes K peers' video (a spotlight tile) and "
        "receives, decrypts and counts the others' (default 1; -1: all)",
    )  # fmt: skip
    parser.add_argument(
        "--mesh-join-interval", type=float, default=0.5, metavar="S",
        help="mesh cells: each participant starts S s after the previous one is in the call "
        "(default 0.5)",
    )  # fmt: skip
    parser.add_argument(
        "--mesh-form-timeout", type=float, default=30.0, metavar="S",
        help="mesh cells: the window (--duration s) opens once every pair receives; a cell "
        "whose call has not formed --duration + S s after the last join is measured as it is "
        "(default 30)",
    )  # fmt: skip
    parser.add_argument("--verbose", action="store_true", help="progress lines on stderr")
    args = parser.parse_args(argv)
    if args.mesh_decode_video < 0:
        args.mesh_decode_video = None
    result = run_bench(run, args)
    if result is None:
        return 0
    for kind in ("mesh", "sfu"):
        for c in result[kind]:
            print(
                f"{kind:<4} n={c['n']:>2}  "
                + (f"{c['engine']:<6}  " if "engine" in c else "")
                + f"min fps ratio {c['min_fps_ratio']:.2f}  "
                f"cpu {c.get('cpu_percent_per_participant')} %/participant  "
                f"mem {c.get('memory_mb_per_participant')} MiB  "
                f"LiveKit {c.get('server_cpu_percent', '-')} %  "
                f"decrypt failures {c.get('decrypt_failures')}  "
                f"host stole {c.get('host_steal_cores')} cores  "
                f"udp {c.get('udp')}"
                + (f"  decoded {c['decoded_pairs']} pairs" if "decoded_pairs" in c else "")
            )
    for c in result["go_sdk_anchor"]:
        print(
            f"go   n={c['n']:>2}  min fps ratio {c['min_fps_ratio']:.2f}  "
            f"cpu {c['cpu_percent_per_participant']} %/participant  (Go SDK anchor)"
        )
    print(f"sfu_max_n: {result['sfu_max_n']} (by engine: {result['sfu_max_n_by_engine']})")
    print(f"switch gaps (ms): {result['switch_gap_ms']}")
    if "switch_gap_ms_without_acks" in result:
        print(f"switch gaps without acks (ms): {result['switch_gap_ms_without_acks']}")
    print(f"took {result['bench_duration_s']} s; the host took {result['host_steal_cores']} cores")
    print(f"host calibration: {result['host_calibration']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
