"""Indicative SFU capacity of our own LiveKit client (``matrixrtc.livekit.rtc_client``), issue 19.

Not yet the ``bench/scale.py`` SFU cell (that needs the client as an engine of the LiveKit
transport, with Matrix and the sender-key machinery): here N processes join one LiveKit room
directly with fixed per-participant keys (LiveKit's frame E2EE format, no Matrix). Each
publishes VP8 320×240@15 (encoded once, ``SharedEncoder``) and Opus, encrypted per frame;
receives every other participant's audio and video through the mesh's receive path (frame
assembler, decryptor, counters) and decodes the video of ``--render`` of them (the first ones by
identity), audio of none. No simulcast on this path: every receiver takes the single 320×240
layer.

    ./scripts/in-netns .venv/bin/python bench/sfu_engine.py --n 6 9 12 [--json]

Per cell: min_fps_ratio (the worst sender→receiver video pair over the window, decrypted frames
/ s ÷ 15), CPU % of a core per participant (mean of the processes), LiveKit's CPU %.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench._host import process_cpu_s

FPS = 15.0


def _key(identity: str) -> bytes:
    return hashlib.sha256(identity.encode()).digest()[:16]


async def _child(url: str, token: str, identity: str, n: int, render: int, window: float) -> None:
    from aiortc.mediastreams import MediaStreamError

    from matrixrtc.e2ee import KeyRings
    from matrixrtc.livekit.rtc_client import ReceivedTrack, RtcClient
    from matrixrtc.media.sinks import ReceiveStats
    from matrixrtc.media.sources import SyntheticVideoTrack, ToneAudioTrack
    from matrixrtc.mesh.fanout import SharedEncoder, adopt_sender, install_receive_hook
    from matrixrtc.mesh.transform import CryptorTransform

    names = [f"p{i:02d}" for i in range(n)]
    rendered = set([x for x in names if x != identity][:render])
    keys = KeyRings()
    for name in names:
        keys.install(name, 0, _key(name))
    stats: dict[str, ReceiveStats] = {}
    sif = b""

    def on_track(received: ReceivedTrack) -> None:
        st = ReceiveStats(kind=received.kind)
        if received.kind == "video":
            if not received.identity or received.identity in stats:
                print(f"track {received.track_id} of {received.identity!r}", file=sys.stderr)
            stats[received.identity] = st
        install_receive_hook(
            received.receiver,
            decryptor=keys.cryptor(received.identity, sif_trailer=sif),
            stats=st,
            decode=received.kind == "video" and received.identity in rendered,
        )
        if received.kind == "video" and received.identity in rendered:
            track = received.track

            async def drain() -> None:
                with contextlib.suppress(MediaStreamError):  # the track ends with the client
                    while True:
                        await track.recv()
                        st.frames_decoded += 1

            asyncio.get_running_loop().create_task(drain())

    client = RtcClient(url, token, on_track=on_track)
    joined = await client.connect()
    sif = joined.sif_trailer
    transform = CryptorTransform(keys.cryptor(identity), lambda _: keys.cryptor(identity))
    encoders = [
        SharedEncoder(SyntheticVideoTrack(320, 240, FPS), transform=transform),
        SharedEncoder(ToneAudioTrack(), transform=transform),
    ]
    await client.publish([e.subscribe() for e in encoders], on_sender=adopt_sender)
    for e in encoders:
        e.start()
    deadline = time.monotonic() + 60
    # Counters bumped per packet, no event to await:
    while time.monotonic() < deadline and (  # noqa: ASYNC110
        len(stats) < n - 1 or any(s.encoded_frames < 15 for s in stats.values())
    ):
        await asyncio.sleep(0.2)
    stuck = sorted(k for k, s in stats.items() if s.encoded_frames < 15)
    if stuck or len(stats) < n - 1:
        sub = client._sub
        pc_state = f"{sub.pc.connectionState}/{sub.pc.iceConnectionState}" if sub else None
        if sub is not None:
            await _explain_stuck(client, sub.pc)
        print(
            f"{identity}: not receiving from {stuck} (of {sorted(stats)}); subscriber {pc_state}"
            f" tracks={len(client.tracks)} decrypted="
            f"{ {k: (s.encoded_frames, s.decrypt_failures) for k, s in stats.items()} }",
            file=sys.stderr, flush=True,
        )  # fmt: skip
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    before = {k: s.encoded_frames for k, s in stats.items()}
    decoded_before = {k: s.frames_decoded for k, s in stats.items()}
    failures_before = sum(s.decrypt_failures for s in stats.values())
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    await asyncio.sleep(window)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    elapsed = time.monotonic() - t0
    cpu = (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / elapsed * 100
    fps = {k: (s.encoded_frames - before.get(k, 0)) / elapsed for k, s in stats.items()}
    report = {
        "identity": identity,
        "cpu_percent": round(cpu, 1),
        "fps": {k: round(v, 2) for k, v in fps.items()},
        "missing": sorted(set(names) - {identity} - set(stats)),
        "decoded": sorted(k for k, s in stats.items() if s.frames_decoded > decoded_before[k]),
        "decrypt_failures": sum(s.decrypt_failures for s in stats.values()) - failures_before,
    }
    print(json.dumps(report), flush=True)
    await client.aclose()
    for e in encoders:
        await e.aclose()


async def _explain_stuck(client: Any, pc: Any) -> None:
    """Where a stuck receiver's packets go: per track its m-line's SSRCs in the offer, the
    packets aiortc counted, and the SSRCs aiortc's RTP router routes (unknown SSRCs of a
    payload type that several receivers share are dropped there).

    Diagnostic only, printed for a receiver that got nothing: it reads aiortc's private
    ``RTCDtlsTransport._rtp_router`` (its ``ssrc_table``; aiortc is pinned, and a layout
    change only loses this line: ``getattr`` with a default) and our RtcClient's subscriber
    map."""
    sdp = pc.remoteDescription.sdp if pc.remoteDescription else ""
    ssrc_by_mid: dict[str, list[str]] = {}
    mid = ""
    for line in sdp.splitlines():
        if line.startswith("a=mid:"):
            mid = line[6:]
        elif line.startswith("a=ssrc:") and "cname" in line:
            ssrc_by_mid.setdefault(mid, []).append(line[7:].split()[0])
    for t in pc.getTransceivers():
        stats = await t.receiver.getStats()
        packets = [s.packetsReceived for s in stats.values() if s.type == "inbound-rtp"]
        router = getattr(t.receiver.transport, "_rtp_router", None)
        routed = sorted(
            k for k, v in (router.ssrc_table.items() if router else ()) if v is t.receiver
        )
        m = t.mid or ""
        print(
            f"  mid={m} {t.kind} dir={t.currentDirection} offer_ssrcs={ssrc_by_mid.get(m)}"
            f" routed_ssrcs={routed} packets={packets} track={client._sub.mid_to_track.get(m)}",
            file=sys.stderr, flush=True,
        )  # fmt: skip


async def _cell(
    n: int, render: int, window: float, stagger: float, anchor: bool
) -> tuple[dict[str, object], dict[str, object] | None]:
    from livekit import api

    from bench.scale import GOANCHOR, _measure_go_anchor, _write_ivf
    from matrixrtc.devstack import LiveKit

    run_dir = Path(tempfile.mkdtemp(prefix="sfu-engine-"))
    async with LiveKit(run_dir) as lk:
        room = f"bench-{uuid.uuid4().hex[:6]}"
        async with api.LiveKitAPI(lk.http_url, lk.api_key, lk.api_secret) as lkapi:
            await lkapi.room.create_room(api.CreateRoomRequest(name=room))
        procs = []
        for i in range(n):
            identity = f"p{i:02d}"
            token = (
                api.AccessToken(lk.api_key, lk.api_secret)
                .with_identity(identity)
                .with_grants(api.VideoGrants(room_join=True, room=room))
                .to_jwt()
            )
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    __file__,
                    "--child",
                    lk.url,
                    token,
                    identity,
                    str(n),
                    str(render),
                    str(window),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                )
            )
            await asyncio.sleep(stagger)
        for p in procs:
            assert p.stdout is not None
            line = b"-"
            while line and line.strip() != b"ready":  # the child's log lines share stdout
                line = await asyncio.wait_for(p.stdout.readline(), 90)
            if not line:
                raise RuntimeError("a participant ended before it was ready")
        lk_pid = lk._proc.pid
        assert lk_pid is not None
        lk0, t0 = process_cpu_s(lk_pid) or 0.0, time.monotonic()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(b"go\n")
            await p.stdin.drain()
        reports = []
        for p in procs:
            assert p.stdout is not None
            line = b"-"
            while line and not line.startswith(b"{"):
                line = await asyncio.wait_for(p.stdout.readline(), window + 30)
            reports.append(json.loads(line))
        lk_cpu = ((process_cpu_s(lk_pid) or 0.0) - lk0) / (time.monotonic() - t0) * 100
        for p in procs:
            await p.wait()
        go = None
        if anchor and GOANCHOR.exists():
            # Same N, same LiveKit, after our processes left: the Go SDK's figure on this box now.
            ivf = run_dir / "goanchor.ivf"
            _write_ivf(ivf)
            go = await _measure_go_anchor(
                n, url=lk.url, key=lk.api_key, secret=lk.api_secret, ivf=ivf,
                args=argparse.Namespace(duration=window + 5.0),
            )  # fmt: skip
    pairs = sorted(
        (v / FPS, f"{sender}->{r['identity']}") for r in reports for sender, v in r["fps"].items()
    )
    ratios = [ratio for ratio, _ in pairs]
    missing = sum(len(r["missing"]) for r in reports)
    return {
        "n": n,
        "min_fps_ratio": round(min(ratios) if ratios and not missing else 0.0, 3),
        "cpu_percent_per_participant": round(sum(r["cpu_percent"] for r in reports) / n, 1),
        "livekit_cpu_percent": round(lk_cpu, 1),
        "decrypt_failures": sum(r["decrypt_failures"] for r in reports),
        "worst_pairs": [[p, round(ratio, 3)] for ratio, p in pairs[:3]],
        "missing": {r["identity"]: r["missing"] for r in reports if r["missing"]},
        "cpu_percent_max": max(r["cpu_percent"] for r in reports),
        "policy": {
            "layer": "single 320x240 (no simulcast on this path)",
            "rendered_video_per_receiver": min(render, n - 1),
            "counted_only_video_per_receiver": max(0, n - 1 - render),
            "audio": "received, decrypted, counted, not decoded",
            "decoded_by": {r["identity"]: r["decoded"] for r in reports},
        },
    }, go


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        from matrixrtc import event_loop

        url, token, identity, n, render, window = sys.argv[2:8]
        event_loop.run(_child(url, token, identity, int(n), int(render), float(window)))
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, nargs="+", default=[3, 6, 9, 12])
    parser.add_argument("--render", type=int, default=1, help="videos each receiver decodes")
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--stagger", type=float, default=0.5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--go-anchor", action=argparse.BooleanOptionalAction, default=True,
        help="after each cell, bench/goanchor at the same N on the same LiveKit (make goanchor)",
    )  # fmt: skip
    args = parser.parse_args()
    cells, anchors = [], []
    for n in args.n:
        cell, go = asyncio.run(_cell(n, args.render, args.window, args.stagger, args.go_anchor))
        cells.append(cell)
        if go is not None:
            anchors.append(go)
        if not args.json:
            print(
                f"n={n:2d} min_fps_ratio={cell['min_fps_ratio']:.3f} "
                f"cpu/participant={cell['cpu_percent_per_participant']:.1f}% "
                f"livekit={cell['livekit_cpu_percent']:.1f}% "
                f"decrypt_failures={cell['decrypt_failures']}",
                flush=True,
            )
    ok = [int(str(c["n"])) for c in cells if float(str(c["min_fps_ratio"])) >= 0.9]
    out = {"sfu_aiortc": cells, "sfu_max_n": max(ok) if ok else 0, "go_sdk_anchor": anchors}
    print(json.dumps(out, indent=None if not args.json else 2))


if __name__ == "__main__":
    main()
