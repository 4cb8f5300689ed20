"""Cross-implementation vectors: livekit-client's own E2EE worker encrypts and decrypts.

Real Opus, VP8 and H.264 frames come from PyAV's encoders; H.265, VP9 and a few edge cases
are synthetic. ``livekit_cryptor.mjs`` runs livekit-client's unmodified worker bundle in
Node 20 (WebCrypto) and

* encrypts every frame with known key material, key index, SSRC and RTP timestamp (its send
  counter starts at 0 because the harness pins Math.random), then decrypts its own output;
* decrypts the frames *our* :func:`encrypt_frame` produced.

``python -m tests.e2ee_vectors.generate`` rewrites ``vectors.json`` (committed);
``tests/unit/test_e2ee_vectors.py`` checks the committed file and a freshly generated set.
"""

from __future__ import annotations

import argparse
import base64
import fractions
import json
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import av
import numpy as np

from matrixrtc.e2ee.frame import clear_header_length, encrypt_frame, widen_start_codes
from matrixrtc.e2ee.kdf import Kdf, ratchet_material

__all__ = [
    "HARNESS",
    "VECTORS",
    "MediaFrame",
    "Plan",
    "assemble",
    "build_vectors",
    "media_frames",
    "node_available",
    "plan_vectors",
]

HERE = Path(__file__).resolve().parent
HARNESS = HERE / "livekit_cryptor.mjs"
VECTORS = HERE / "vectors.json"
LIVEKIT_WORKER = HERE.parents[1] / "node_modules/livekit-client/dist/livekit-client.e2ee.worker.mjs"

# The filler frame LiveKit's SFU injects for Opus (livekit-client sifPayload.ts OpusSilenceFrame).
OPUS_SIF_PAYLOAD = bytes([0xF8, 0xFF, 0xFE]) + bytes(77)

Json = dict[str, Any]


@dataclass(frozen=True)
class MediaFrame:
    data: bytes
    timestamp: int
    keyframe: bool


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _video(
    codec_name: str, options: dict[str, str], n: int, w: int = 96, h: int = 64
) -> list[tuple[bytes, bool]]:
    ctx = cast(av.VideoCodecContext, av.CodecContext.create(codec_name, "w"))
    ctx.width, ctx.height, ctx.pix_fmt = w, h, "yuv420p"
    ctx.time_base = fractions.Fraction(1, 30)
    ctx.bit_rate = 300_000
    ctx.options = options
    out: list[tuple[bytes, bool]] = []
    for i in range(n):
        img = np.full((h * 3 // 2, w), (i * 37) % 256, dtype=np.uint8)
        img[: h // 2, : w // 2] = 220 - i * 20  # something moving, so deltas are not empty
        frame = av.VideoFrame.from_ndarray(img, format="yuv420p")
        frame.pts = i
        out += [(bytes(p), bool(p.is_keyframe)) for p in ctx.encode(frame)]
    out += [(bytes(p), bool(p.is_keyframe)) for p in ctx.encode(None)]
    return out


def _opus(n: int) -> list[bytes]:
    ctx = av.CodecContext.create("libopus", "w")
    ctx.sample_rate, ctx.layout, ctx.format, ctx.bit_rate = 48_000, "mono", "s16", 32_000
    out: list[bytes] = []
    for i in range(n):
        t = np.arange(960) + i * 960
        pcm = (np.sin(t * 2 * np.pi * 440 / 48_000) * 8000).astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate, frame.pts = 48_000, i * 960
        out += [bytes(p) for p in ctx.encode(frame)]
    return out


def _short_start_codes(frame: bytes) -> bytes:
    """The same access unit with 3-byte start codes after the first NALU (as some encoders)."""
    head, rest = frame[:4], frame[4:]
    return head + rest.replace(b"\x00\x00\x00\x01", b"\x00\x00\x01")


def media_frames(rng: random.Random) -> dict[str, tuple[str, str, list[MediaFrame]]]:
    """Named streams: ``name → (kind, codec, frames)`` with RTP timestamps from ``rng``."""
    ts_audio = rng.randrange(1 << 32)
    ts_video = rng.randrange(1 << 32)

    def audio(frames: list[bytes]) -> list[MediaFrame]:
        return [
            MediaFrame(f, (ts_audio + 960 * i) & 0xFFFFFFFF, False) for i, f in enumerate(frames)
        ]

    def video(frames: list[tuple[bytes, bool]]) -> list[MediaFrame]:
        return [
            MediaFrame(f, (ts_video + 3000 * i) & 0xFFFFFFFF, k) for i, (f, k) in enumerate(frames)
        ]

    vp8 = _video("libvpx", {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}, 5)
    h264 = _video(
        "libx264", {"preset": "ultrafast", "tune": "zerolatency", "profile": "baseline"}, 3
    )
    # H.265: VPS, SPS, PPS, then an IDR_W_RADL slice (type 19); random payloads without
    # zero bytes, so they hold no start code.
    h265 = b"".join(
        b"\x00\x00\x00\x01" + bytes(hdr) + bytes(rng.randrange(1, 256) for _ in range(size))
        for hdr, size in (((0x40, 1), 20), ((0x42, 1), 30), ((0x44, 1), 6), ((0x26, 1), 400))
    )
    return {
        "opus": ("audio", "opus", audio([*_opus(4), b"\xf8"])),  # … and a 1-byte DTX frame
        "opus-empty": ("audio", "opus", audio([b""])),
        "vp8": ("video", "vp8", video(vp8)),
        "h264": ("video", "h264", video(h264)),
        "h264-short-start-codes": (
            "video",
            "h264",
            video([(_short_start_codes(h264[0][0]), True)]),
        ),
        "h265": ("video", "h265", video([(h265, True)])),
        "vp9": ("video", "vp9", video([(rng.randbytes(300), True)])),
        # Not Annex B although signalled as H.264: livekit-client falls back to the VP8 rule.
        "h264-unparseable": (
            "video",
            "h264",
            video([(b"\x01" + rng.randbytes(200), True), (b"\x01" + rng.randbytes(200), False)]),
        ),
    }


def _escaping_timestamp(key: bytes, frame: MediaFrame, ssrc: int) -> int:
    """An RTP timestamp for which the encrypted H.264 frame needs RBSP escaping."""
    n, _ = clear_header_length(frame.data, "video", "h264", frame.keyframe)
    # Unescaped size: the header with its start codes widened, the rest, tag and trailer.
    plain_size = len(widen_start_codes(frame.data[:n])) + len(frame.data) - n + 30
    ts = frame.timestamp
    for _ in range(2_000_000):  # ~4k tries expected for a 650-byte frame
        enc = encrypt_frame(key, 3, frame.data, kind="video", codec="h264", ssrc=ssrc, timestamp=ts)
        if len(enc) > plain_size:  # grew: emulation-prevention bytes were inserted
            return ts
        ts = (ts + 1) & 0xFFFFFFFF
    raise RuntimeError("no timestamp needing RBSP escaping found")


def node_available() -> bool:
    return shutil.which("node") is not None and LIVEKIT_WORKER.exists()


def run_livekit(jobs: list[Json]) -> Json:
    proc = subprocess.run(
        ["node", str(HARNESS)],
        input=json.dumps({"jobs": jobs}).encode(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"livekit harness failed: {proc.stderr.decode(errors='replace')}")
    result: Json = json.loads(proc.stdout)
    return result


@dataclass
class Plan:
    """Frames and jobs for livekit-client, and what :func:`assemble` needs afterwards."""

    jobs: list[Json]
    setups: list[Json]
    streams: dict[str, tuple[str, str, list[MediaFrame]]]
    key: bytes
    passphrase: str
    ssrc: int
    sif_trailer: bytes


def build_vectors(seed: int | None = None) -> Json:
    """Generate frames, run livekit-client (Node) both ways, return the vector document."""
    plan = plan_vectors(seed)
    return assemble(plan, run_livekit(plan.jobs))


def plan_vectors(seed: int | None = None) -> Plan:
    """Frames, keys and the livekit-client jobs (encrypt, decrypt, decrypt ours)."""
    rng = random.Random(seed)
    streams = media_frames(rng)
    key = rng.randbytes(16)
    passphrase = "correct horse battery staple"
    ssrc = rng.randrange(1 << 32)

    # Make sure at least one H.264 frame exercises RBSP escaping of the ciphertext (the
    # largest frame, so that a timestamp whose IV yields an escape is found quickly).
    kind, codec, frames = streams["h264"]
    big = max(frames, key=lambda f: len(f.data))
    ts = _escaping_timestamp(key, big, ssrc)
    streams["h264-escaped"] = (kind, codec, [MediaFrame(big.data, ts, big.keyframe)])

    setups: list[Json] = []
    for name in streams:
        setups.append({"stream": name, "kdf": "HKDF", "key_index": 3, "options": {}})
    setups += [
        # Key-index byte = index mod ring size: livekit's default ring of 16, index 255 → 15.
        {"stream": "vp8", "kdf": "HKDF", "key_index": 255, "options": {"keyringSize": 16}},
        # Shared-passphrase mode (ExternalE2EEKeyProvider): PBKDF2, no ratchet, no tolerance.
        {
            "stream": "opus",
            "kdf": "PBKDF2",
            "key_index": 0,
            "options": {
                "sharedKey": True,
                "ratchetWindowSize": 0,
                "failureTolerance": -1,
                "keyringSize": 16,
            },
        },
        # The sender ratcheted once / twice; receivers hold the original key.
        {"stream": "vp8", "kdf": "HKDF", "key_index": 7, "ratchet": 1, "options": {}},
        {"stream": "opus", "kdf": "HKDF", "key_index": 7, "ratchet": 2, "options": {}},
        # A room with a SIF trailer: server-injected Opus silence passes, other payloads drop.
        {"stream": "opus-sif", "kdf": "HKDF", "key_index": 3, "options": {}},
    ]
    sif_trailer = rng.randbytes(8)
    streams["opus-sif"] = (
        "audio",
        "opus",
        [
            MediaFrame(OPUS_SIF_PAYLOAD + sif_trailer, 0, False),
            MediaFrame(b"\x78" + rng.randbytes(40) + sif_trailer, 960, False),
        ],
    )

    jobs: list[Json] = []
    for i, s in enumerate(setups):
        kind, codec, frames = streams[s["stream"]]
        common = {
            "kind": kind,
            "codec": codec,
            "kdf": s["kdf"],
            "key": _b64(key),
            "passphrase": passphrase,
            "key_index": s["key_index"],
            "options": s["options"],
            "sif_trailer": _b64(sif_trailer) if s["stream"] == "opus-sif" else None,
        }
        wire = [
            {
                "data": _b64(f.data),
                "timestamp": f.timestamp,
                "ssrc": ssrc,
                "type": "key" if f.keyframe else "delta",
            }
            for f in frames
        ]
        s["id"] = f"s{i}"
        if s["stream"] == "opus-sif":
            # The SIF frames are what a receiver sees; nobody encrypts them.
            jobs.append(
                {**common, "id": f"s{i}-dec", "op": "decode", "identity": f"rx{i}", "frames": wire}
            )
            continue
        jobs.append(
            {
                **common,
                "id": f"s{i}-enc",
                "op": "encode",
                "identity": f"tx{i}",
                "frames": wire,
                "ratchet_before": s.get("ratchet", 0),
            }
        )
        jobs.append(
            {
                **common,
                "id": f"s{i}-dec",
                "op": "decode",
                "identity": f"rx{i}",
                "decode_from": f"s{i}-enc",
            }
        )
        # Ours → livekit: a counter start near the 0xffff wrap of the IV's third word.
        material = passphrase.encode() if s["kdf"] == "PBKDF2" else key
        for _ in range(s.get("ratchet", 0)):
            material = ratchet_material(material, Kdf[s["kdf"]])
        ours = [
            encrypt_frame(
                material,
                s["key_index"],
                f.data,
                kind=kind,
                codec=codec,
                keyframe=f.keyframe,
                ssrc=ssrc,
                timestamp=f.timestamp,
                counter=0xFFFE + j,
                kdf=Kdf[s["kdf"]],
                ring_size=s["options"].get("keyringSize", 256),
            )
            for j, f in enumerate(frames)
        ]
        s["ours"] = ours
        jobs.append(
            {
                **common,
                "id": f"s{i}-ours",
                "op": "decode",
                "identity": f"ro{i}",
                "frames": [{**w, "data": _b64(o)} for w, o in zip(wire, ours, strict=True)],
            }
        )

    return Plan(jobs, setups, streams, key, passphrase, ssrc, sif_trailer)


def assemble(plan: Plan, result: Json) -> Json:
    """The vector document from a plan and livekit-client's answers to its jobs."""
    setups, streams, key, passphrase = plan.setups, plan.streams, plan.key, plan.passphrase
    ssrc, sif_trailer = plan.ssrc, plan.sif_trailer
    out = result["jobs"]
    vectors: list[Json] = []
    for s in setups:
        kind, codec, frames = streams[s["stream"]]
        sid = s["id"]
        enc = out.get(f"{sid}-enc", {"frames": [None] * len(frames)})["frames"]
        dec = out[f"{sid}-dec"]["frames"]
        ours_dec = out.get(f"{sid}-ours", {"frames": [None] * len(frames)})["frames"]
        for j, f in enumerate(frames):
            vectors.append(
                {
                    "name": f"{s['stream']}/{s['kdf']}/idx{s['key_index']}"
                    f"/ratchet{s.get('ratchet', 0)}/{j}",
                    "kind": kind,
                    "codec": codec,
                    "keyframe": f.keyframe,
                    "kdf": s["kdf"],
                    "key": _b64(key) if s["kdf"] == "HKDF" else None,
                    "passphrase": passphrase if s["kdf"] == "PBKDF2" else None,
                    "key_index": s["key_index"],
                    "ring_size": s["options"].get("keyringSize", 256),
                    "ratchet_window": s["options"].get("ratchetWindowSize", 10),
                    "sender_ratchets": s.get("ratchet", 0),
                    "ssrc": ssrc,
                    "timestamp": f.timestamp,
                    "counter": j,
                    "sif_trailer": _b64(sif_trailer) if s["stream"] == "opus-sif" else None,
                    "plaintext": _b64(f.data),
                    # None: livekit-client dropped the frame (see "livekit_decrypted").
                    "livekit_encrypted": enc[j],
                    "livekit_decrypted": dec[j],
                    "ours_encrypted": _b64(s["ours"][j]) if "ours" in s else None,
                    "ours_counter": 0xFFFE + j,
                    "livekit_decrypted_ours": ours_dec[j],
                }
            )
    logs = {k: v["logs"] for k, v in out.items() if v["logs"]}
    return {
        "livekit_client": result["version"],
        "generator": "tests/e2ee_vectors/generate.py",
        "harness": "tests/e2ee_vectors/livekit_cryptor.mjs",
        "vectors": vectors,
        "livekit_logs": logs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=20261126)
    ap.add_argument("--out", type=Path, default=VECTORS)
    args = ap.parse_args()
    doc = build_vectors(args.seed)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {len(doc['vectors'])} vectors to {args.out}")


if __name__ == "__main__":
    main()
