"""Checks shared by the vector tests (committed, fresh from Node, fresh from Chromium).

:func:`check_document` asserts everything the vectors claim: our encryption is byte-identical
to livekit-client's given the same inputs, each side decrypts the other's frames, stateful
receivers follow the sender's ratchet, SIF frames pass or drop, and PyAV decodes what we
decrypted.
"""

from __future__ import annotations

import base64
import hashlib
from collections import defaultdict
from typing import Any, cast

import av

from matrixrtc.e2ee.cryptor import CryptorOptions, FrameCryptor, KeyRing
from matrixrtc.e2ee.frame import decrypt_frame, encrypt_frame
from matrixrtc.e2ee.kdf import Kdf, ratchet_material
from tests.e2ee_vectors.generate import OPUS_SIF_PAYLOAD

__all__ = ["check_document"]

Json = dict[str, Any]


def _b(s: str | None) -> bytes:
    assert s is not None
    return base64.b64decode(s)


def _material(v: Json, *, sender: bool) -> bytes:
    m = v["passphrase"].encode() if v["kdf"] == "PBKDF2" else _b(v["key"])
    for _ in range(v["sender_ratchets"] if sender else 0):
        m = ratchet_material(m, Kdf[v["kdf"]])
    return m


def _stream(v: Json) -> str:
    name: str = v["name"]
    return name.rsplit("/", 1)[0]


def _expected(v: Json) -> bytes:
    # What a receiver must get back: livekit's own decryption where it succeeded; for the
    # frames livekit-client drops (sender ratcheted twice) the plaintext (Opus: no NALU rewrite).
    if v["livekit_decrypted"] is not None:
        return _b(v["livekit_decrypted"])
    return _b(v["plaintext"])


def _decoded_count(codec: str, frames: list[bytes]) -> int:
    ctx = cast(av.VideoCodecContext | av.AudioCodecContext, av.CodecContext.create(codec, "r"))
    n = 0
    for f in frames:
        if f:
            n += len(ctx.decode(av.Packet(f)))
    n += len(ctx.decode(None))
    return n


def check_document(doc: Json) -> None:
    vectors: list[Json] = doc["vectors"]
    assert len(vectors) >= 40
    streams: dict[str, list[Json]] = defaultdict(list)
    for v in vectors:
        streams[_stream(v)].append(v)
    seen_escaped = seen_widened = False
    streams_plain: dict[str, list[bytes]] = {}

    for v in vectors:
        name = v["name"]
        common = {"kind": v["kind"], "codec": v["codec"], "kdf": Kdf[v["kdf"]]}
        if v["sif_trailer"] is not None:
            continue
        plain, lk_enc = _b(v["plaintext"]), _b(v["livekit_encrypted"])
        if not plain:
            assert lk_enc == b"", name  # empty frames pass through, no trailer
            continue
        # 1. Byte-identical encryption given the same key, IV inputs and counter.
        ours = encrypt_frame(
            _material(v, sender=True),
            v["key_index"],
            plain,
            **common,
            keyframe=v["keyframe"],
            ssrc=v["ssrc"],
            timestamp=v["timestamp"],
            counter=v["counter"],
            ring_size=v["ring_size"],
        )
        assert ours == lk_enc, name
        assert lk_enc[-1] == v["key_index"] % v["ring_size"], name
        # 2. Stateless decryption with the sender's current key material.
        got = decrypt_frame(_material(v, sender=True), lk_enc, **common, keyframe=v["keyframe"])
        assert got == _expected(v), name
        if v["livekit_decrypted"] is not None and v["codec"] not in ("h264", "h265"):
            assert _b(v["livekit_decrypted"]) == plain, name
        # 3. livekit-client decrypted what our encrypt_frame produced (other counter/IV).
        if v["sender_ratchets"] < 2:
            assert v["livekit_decrypted_ours"] is not None, name
            assert _b(v["livekit_decrypted_ours"]) == _expected(v), name
            theirs = decrypt_frame(
                _material(v, sender=True), _b(v["ours_encrypted"]), **common, keyframe=v["keyframe"]
            )
            assert theirs == _expected(v), name
        else:
            # livekit-client re-derives ONE ratchet step per attempt, so its window never
            # reaches a sender that ratcheted twice (its own decrypt of its own frames fails).
            assert v["livekit_decrypted"] is None, name
            assert v["livekit_decrypted_ours"] is None, name
        if v["codec"] == "h264" and len(lk_enc) > len(_expected(v)) + 30:
            seen_escaped = True  # longer than widened header + payload + tag + trailer
        if v["codec"] == "h264" and b"\x00\x00\x01" in plain and _expected(v) != plain:
            seen_widened = True
    assert seen_escaped, "no vector exercises RBSP escaping"
    assert seen_widened, "no vector exercises 3-byte start code widening"

    for sname, vs in streams.items():
        first = vs[0]
        if first["sif_trailer"] is not None:
            # 4. SIF: server-injected Opus silence passes in the clear, anything else drops.
            rx = FrameCryptor(sif_trailer=_b(first["sif_trailer"]))
            outs = [rx.decrypt(_b(v["plaintext"]), kind="audio") for v in vs]
            assert outs == [
                None if v["livekit_decrypted"] is None else _b(v["livekit_decrypted"]) for v in vs
            ]
            assert outs[0] == OPUS_SIF_PAYLOAD
            assert hashlib.sha256(OPUS_SIF_PAYLOAD).hexdigest().startswith("aad8d31f")
            assert rx.stats.sif_frames == 1
            assert rx.stats.decrypt_failures == 1
            continue
        # 5. Stateful receivers hold the ORIGINAL key: ratchet-on-failure recovers the sender's
        # ratcheted key (any number of steps within the window) and commits it.
        opts = CryptorOptions(
            ring_size=first["ring_size"],
            ratchet_window=first["ratchet_window"],
            failure_tolerance=-1 if first["kdf"] == "PBKDF2" else 10,
            kdf=Kdf[first["kdf"]],
        )
        ring = KeyRing(opts)
        ring.set_key(_material(first, sender=False), first["key_index"])
        rx = FrameCryptor(ring)
        decrypted = []
        for v in vs:
            out = rx.decrypt(
                _b(v["livekit_encrypted"]), kind=v["kind"], codec=v["codec"], keyframe=v["keyframe"]
            )
            assert out == _expected(v), v["name"]
            decrypted.append(out)
        assert rx.stats.decrypt_failures == 0, sname
        assert rx.stats.ratchets == (1 if first["sender_ratchets"] else 0), sname
        if first["sender_ratchets"]:
            assert ring.material(first["key_index"]) == _material(first, sender=True)
        # 6. Real codec frames: PyAV decodes what we decrypted (every non-empty frame).
        frames = [d for d in decrypted if d]
        if sname.startswith("h264-escaped") and not first["keyframe"]:
            frames = [*streams_plain["h264"][:1], *frames]  # a delta frame needs its key frame
        if first["codec"] in ("vp8", "h264", "opus") and "unparseable" not in sname:
            assert _decoded_count(first["codec"], frames) == len(frames), sname
        streams_plain[sname.split("/", 1)[0]] = frames
