"""livekit-client's E2EE worker in real Chromium (BoringSSL WebCrypto) against our cryptor.

A fresh vector set (new keys, SSRC, timestamps; real PyAV frames) is encrypted and decrypted
by livekit-client 2.23's own worker bundle running in a Chromium module worker; the same checks
as for the committed vectors apply: byte-identical encryption, both directions decrypt.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from pathlib import Path
from typing import cast

import av
import pytest

from matrixrtc.devstack import Chromium
from matrixrtc.e2ee import DecryptError, decrypt_frame
from tests.browser.helpers import run_node, serve_dir
from tests.e2ee_vectors.checks import check_document
from tests.e2ee_vectors.generate import HERE, assemble, plan_vectors

REPO = HERE.parents[1]


async def test_livekit_worker_in_chromium_matches_our_cryptor(
    chromium: Chromium, tmp_path: Path
) -> None:
    plan = plan_vectors(seed=None)
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps({"jobs": plan.jobs}))
    async with serve_dir(REPO) as base:
        out = await run_node(
            str(HERE / "chromium_run.mjs"),
            chromium.devtools_url,
            f"{base}/tests/e2ee_vectors/chromium.html",
            str(jobs),
            limit=60,
        )
    result = json.loads(out.strip().splitlines()[-1])
    print(f"browser: {result['browser']}, console: {result['console'][:5]}")
    assert "Chrome/" in result["browser"]
    check_document(assemble(plan, result))


async def test_chromium_webrtc_frames_decrypt_with_our_cryptor(
    chromium: Chromium, tmp_path: Path
) -> None:
    """Real Chromium media (fake camera/mic → VP8/Opus encoders → livekit's worker via
    web/e2ee/frame-e2ee.mjs) over a loopback call: the receiving browser decodes it, and the
    encrypted frames alice sent decrypt with our cryptor and decode with PyAV."""
    key, index = os.urandom(16), 3
    async with serve_dir(REPO) as base:
        out = await run_node(
            str(HERE / "chromium_webrtc.mjs"),
            chromium.devtools_url,
            f"{base}/tests/e2ee_vectors/webrtc.html",
            base64.b64encode(key).decode(),
            str(index),
            "20000",  # at most; the page stops once 60 frames each went out and bob decoded 10
            limit=60,
        )
    r = json.loads(out.strip().splitlines()[-1])
    print({k: v for k, v in r.items() if k != "captured"})
    assert r["errors"] == [], r["errors"]
    assert r["framesDecoded"] >= 10  # the receiving browser decrypted and decoded video
    video, audio = r["captured"]["video"], r["captured"]["audio"]
    assert len(video) >= 10
    assert video[0]["type"] == "key"  # captured from the first frame on: decodable
    assert len(audio) >= 10

    for kind, codec, frames in (("video", "vp8", video), ("audio", "opus", audio)):
        plain = []
        counters = []
        for f in frames:
            enc = base64.b64decode(f["data"])
            if not enc:
                continue  # DTX: passed through unencrypted
            assert enc[-1] == index
            assert enc[-2] == 12
            iv = enc[-14:-2]
            ssrc, ts, third = struct.unpack(">III", iv)
            assert (ssrc, ts) == (f["ssrc"], f["timestamp"])
            counters.append((ts - third) & 0xFFFFFFFF)
            keyframe = f["type"] == "key" if kind == "video" else None
            plain.append(decrypt_frame(key, enc, kind=kind, codec=codec, keyframe=keyframe))
            with pytest.raises(DecryptError):
                decrypt_frame(os.urandom(16), enc, kind=kind, codec=codec, keyframe=keyframe)
        # livekit's send counter rises by one per encrypted frame of an SSRC.
        assert counters == list(range(counters[0], counters[0] + len(counters)))
        ctx = cast(av.VideoCodecContext | av.AudioCodecContext, av.CodecContext.create(codec, "r"))
        decoded = 0
        for p in plain:
            decoded += len(ctx.decode(av.Packet(p)))
        print(f"{kind}: {len(plain)} encrypted frames, PyAV decoded {decoded}")
        assert decoded == len(plain), (kind, decoded, len(plain))
