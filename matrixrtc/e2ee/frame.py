"""LiveKit's E2EE media frame format (livekit-client 2.23 ``FrameCryptor``), stateless.

An encrypted frame is::

    [ N clear header bytes ][ AES-128-GCM ciphertext ‖ 16-byte tag ][ IV (12) ][ 12 ][ key index ]

The N header bytes stay readable for the SFU and the depacketiser and are the AEAD's
associated data. N depends on the codec (Opus 1; VP8 10 on key frames, 3 on delta frames;
VP9 0; H.264/H.265: up to two bytes into the first slice NAL unit). For H.264/H.265 everything
after the header is RBSP-escaped after encryption, so no start code can appear in it, and the
header's 3-byte start codes are widened to 4 bytes (what the receiving depacketiser rebuilds).
The IV is ``u32be(ssrc) ‖ u32be(rtp_ts) ‖ u32be(rtp_ts − counter mod 0xffff)``; receivers read
it from the trailer. Zero-length frames (Opus DTX) pass through untouched.

Frames ending with the room's SIF trailer were injected by the SFU in the clear; they are
accepted only when the payload is one of the SFU's known filler frames.
"""

from __future__ import annotations

import enum
import hashlib
import re
import struct

from cryptography.exceptions import InvalidTag

from matrixrtc.e2ee.kdf import DEFAULT_SALT, Kdf, KeySet, keyset
from matrixrtc.errors import LocalError, RemoteError

__all__ = [
    "IV_LENGTH",
    "RING_SIZE",
    "TAG_LENGTH",
    "TRAILER_LENGTH",
    "Codec",
    "DecryptError",
    "TrackKind",
    "UnsupportedCodecError",
    "clear_header_length",
    "decrypt_frame",
    "encrypt_frame",
    "frame_key_index",
    "make_iv",
    "parse_rbsp",
    "seal",
    "sif_payload",
    "unseal",
    "widen_start_codes",
    "write_rbsp",
]

IV_LENGTH = 12
TAG_LENGTH = 16
TRAILER_LENGTH = IV_LENGTH + 2  # IV ‖ IV length ‖ key index
RING_SIZE = 256  # Element Call's keyringSize
# Shortest encrypted frame after the header: empty ciphertext, tag, IV, two trailer bytes.
_MIN_BODY = TAG_LENGTH + TRAILER_LENGTH
_IV = struct.Struct(">III")
_TRAILERS = tuple(bytes((IV_LENGTH, i)) for i in range(256))


class TrackKind(enum.StrEnum):
    """What a frame carries (a WebRTC track's ``kind``); decides the clear header."""

    AUDIO = "audio"
    VIDEO = "video"


class Codec(enum.StrEnum):
    """Codecs with a known clear-header rule. Any other string is an unknown video codec."""

    OPUS = "opus"
    VP8 = "vp8"
    VP9 = "vp9"
    AV1 = "av1"
    H264 = "h264"
    H265 = "h265"


class DecryptError(RemoteError):
    """A frame could not be decrypted: malformed, wrong key, or not from a known SIF."""


class UnsupportedCodecError(LocalError):
    """The codec has no frame-encryption rule (AV1, as in livekit-client)."""


# ---------------------------------------------------------------- clear header length
# VP8 (RFC 6386 §9.1): 10 bytes of a key frame's uncompressed chunk, 3 of a delta frame's.
_VP8_KEY = 10
_VP8_DELTA = 3

_H264_SLICES = frozenset({1, 5})
_H265_SLICES = frozenset((*range(10), *range(16, 22)))
_SHORT_START_CODE = re.compile(b"(?<!\x00)\x00\x00\x01")
_NEEDS_ESCAPE = re.compile(b"\x00\x00(?=[\x00-\x03])")
_ESCAPED = re.compile(b"\x00\x00\x03")


def _nalu_starts(data: bytes) -> list[int]:
    """Offsets just after each Annex B start code, with livekit-client's quirks.

    A start code counts only with at least one byte after it, and trailing zero bytes of a
    NALU belong to the next start code. Raises ValueError if bytes precede the first start
    code (the data is not Annex B).
    """
    n = len(data)
    starts: list[int] = []
    start = pos = 0
    limit = n - 3
    while pos < limit:
        q = data.find(b"\x00\x00\x01", pos)
        if q == -1 or q > n - 4:
            pos = n
        elif q > pos and data[q - 1] == 0:
            pos = q - 1
        else:
            pos = q
        end = pos
        while end > start and data[end - 1] == 0:
            end -= 1
        if start == 0:
            if end != 0:
                raise ValueError("bytes before the first start code")
        else:
            starts.append(start)
        four = pos + 3 < n and data[pos : pos + 4] == b"\x00\x00\x00\x01"
        start = pos = pos + (4 if four else 3)
    return starts


def _nalu_header_length(data: bytes, known: Codec | None) -> int | None:
    """Clear bytes of an H.264/H.265 frame, None if it is neither, ValueError if unparseable."""
    starts = _nalu_starts(data)
    # The bytes outrank the signalled codec; H.264 is checked first because some H.264
    # non-slice NALUs read as H.265 slice types, not the reverse.
    codec: Codec | None = None
    if any(data[i] & 0x1F in _H264_SLICES for i in starts):
        codec = Codec.H264
    elif any((data[i] >> 1) & 0x3F in _H265_SLICES for i in starts):
        codec = Codec.H265
    else:
        codec = known
    if codec is None:
        return None
    for i in starts:
        t = data[i] & 0x1F if codec is Codec.H264 else (data[i] >> 1) & 0x3F
        if t in (_H264_SLICES if codec is Codec.H264 else _H265_SLICES):
            return i + 2
    raise ValueError("no slice NAL unit")


def _vp8_is_key(frame: bytes) -> bool:
    # VP8 frame tag: bit 0 of the first byte is 0 for a key frame; it is always in the clear.
    return len(frame) > 0 and not frame[0] & 1


_CODECS: dict[str, Codec] = {c.value: c for c in Codec}
_AUDIO = (1, False)
_VP8_KEY_RULE = (_VP8_KEY, False)
_VP8_DELTA_RULE = (_VP8_DELTA, False)


def clear_header_length(
    frame: bytes, kind: TrackKind | str, codec: Codec | str | None, keyframe: bool | None = None
) -> tuple[int, bool]:
    """``(N, nalu)``: clear header bytes of ``frame`` and whether it is NALU-processed.

    ``keyframe=None`` reads the VP8 key-frame bit from the frame (valid on encrypted frames
    too, since it lies in the clear header). Raises UnsupportedCodecError for AV1.
    """
    if kind == "audio":
        return _AUDIO
    if codec == "vp8":  # the common case first, without normalising
        key = (not frame or not frame[0] & 1) if keyframe is None else keyframe
        return _VP8_KEY_RULE if key else _VP8_DELTA_RULE
    c = _CODECS.get(codec.lower()) if codec is not None else None
    if c is Codec.VP9:
        return 0, False
    if c is Codec.AV1:
        raise UnsupportedCodecError("AV1 frames cannot be encrypted in LiveKit's frame format")
    if c is not Codec.VP8:
        try:
            n = _nalu_header_length(frame, c if c in (Codec.H264, Codec.H265) else None)
        except ValueError:
            n = None  # unparseable: livekit-client falls back to the VP8 rule
        if n is not None:
            return n, True
    key = _vp8_is_key(frame) if keyframe is None else keyframe
    return (_VP8_KEY if key else _VP8_DELTA), False


# ---------------------------------------------------------------- RBSP escaping
def write_rbsp(data: bytes) -> bytes:
    """Insert an emulation-prevention 0x03 after every 00 00 that precedes a byte ≤ 3."""
    if b"\x00\x00" not in data:
        return data
    return _NEEDS_ESCAPE.sub(b"\x00\x00\x03", data)


def parse_rbsp(data: bytes) -> bytes:
    """Remove emulation-prevention bytes (inverse of :func:`write_rbsp`)."""
    if b"\x00\x00\x03" not in data:
        return data
    return _ESCAPED.sub(b"\x00\x00", data)


def widen_start_codes(header: bytes) -> bytes:
    """00 00 01 → 00 00 00 01: the receiving depacketiser rebuilds 4-byte start codes."""
    return _SHORT_START_CODE.sub(b"\x00\x00\x00\x01", header)


# ---------------------------------------------------------------- IV, trailer, SIF
def make_iv(ssrc: int, timestamp: int, counter: int) -> bytes:
    """The 12-byte IV for the ``counter``-th frame (counter as kept per SSRC by the sender)."""
    ts = timestamp & 0xFFFFFFFF
    return _IV.pack(ssrc & 0xFFFFFFFF, ts, (ts - counter % 0xFFFF) & 0xFFFFFFFF)


def frame_key_index(frame: bytes) -> int | None:
    """The key-index byte of an encrypted frame (None for an empty frame)."""
    return frame[-1] if frame else None


# SHA-256 of the filler payloads LiveKit's SFU injects (VP8 8x8 key frame, H.264 2x2 SPS, PPS
# and IDR, Opus silence), as listed by livekit-client's sifPayload.ts.
_SIF_HASHES = frozenset(
    bytes.fromhex(h)
    for h in (
        "ef0161653d8b2b23aad46624b420af1d03ce48950e9fc85718028f91b50f9219",
        "f0a0e09647d891d6d50aa898bce7108090375d0d55e50a2bb21147afee558e44",
        "61d9665eed71b6d424ae9539330a3bdd5cb386d4d781c808219a6e36750493a7",
        "faffc26b68a2fc09096fa20f3351e706398b6f838a7500c8063472c2e476e90d",
        "aad8d31fc56b2802ca500e58c2fb9d0b29ad71bb7cb52cd6530251eade188988",
    )
)


def sif_payload(frame: bytes, sif_trailer: bytes) -> bytes | None:
    """If ``frame`` ends with the room's SIF trailer, the clear payload before it.

    Raises DecryptError when the trailer matches but the payload is not a known filler frame
    (someone is trying to smuggle plaintext past the decryptor). None when not a SIF frame.
    """
    if not sif_trailer or not frame.endswith(sif_trailer):
        return None
    payload = frame[: len(frame) - len(sif_trailer)]
    if hashlib.sha256(payload).digest() not in _SIF_HASHES:
        raise DecryptError("frame ends with the SIF trailer but carries an unknown payload")
    return payload


# ---------------------------------------------------------------- seal / unseal
def seal(keys: KeySet, key_byte: int, frame: bytes, n: int, nalu: bool, iv: bytes) -> bytes:
    """Encrypt ``frame`` with ``n`` clear header bytes (the format's core; no checks)."""
    header = frame[:n]
    if nalu:
        header = widen_start_codes(header)
        body = keys.aead.encrypt(iv, frame[n:], header)
        return header + write_rbsp(b"".join((body, iv, _TRAILERS[key_byte])))
    return b"".join((header, keys.aead.encrypt(iv, frame[n:], header), iv, _TRAILERS[key_byte]))


def unseal(keys: KeySet, frame: bytes, n: int, nalu: bool) -> bytes:
    """Decrypt an encrypted frame whose clear header is ``n`` bytes long.

    Raises DecryptError for a malformed frame and InvalidTag when the key does not fit.
    """
    header = frame[:n]
    body = parse_rbsp(frame[n:]) if nalu else frame
    size = len(body)
    start = 0 if nalu else n
    if size - start < _MIN_BODY or len(header) < n:
        raise DecryptError(f"frame too short ({len(frame)} bytes, {n} clear)")
    if body[size - 2] != IV_LENGTH:
        raise DecryptError(f"IV length byte is {body[size - 2]}, expected {IV_LENGTH}")
    end = size - TRAILER_LENGTH
    return header + keys.aead.decrypt(body[end : size - 2], body[start:end], header)


# ---------------------------------------------------------------- public stateless API
def encrypt_frame(
    key_material: bytes,
    key_index: int,
    frame: bytes,
    *,
    kind: TrackKind | str,
    codec: Codec | str | None,
    keyframe: bool | None = None,
    ssrc: int,
    timestamp: int,
    counter: int = 0,
    kdf: Kdf = Kdf.HKDF,
    salt: bytes = DEFAULT_SALT,
    ring_size: int = RING_SIZE,
) -> bytes:
    """Encrypt one media frame as livekit-client does.

    ``key_material`` is the sender key (16 random bytes from ``io.element.call.encryption_keys``;
    a UTF-8 passphrase with ``kdf=Kdf.PBKDF2``). ``counter`` is the sender's per-SSRC frame
    counter (livekit-client starts it at a random value and adds one per frame). The trailer's
    key-index byte is ``key_index % ring_size``. Empty frames are returned unchanged.

    Raises UnsupportedCodecError for AV1 and LocalError for a frame shorter than its clear
    header.
    """
    if not frame:
        return frame
    if not 1 <= ring_size <= RING_SIZE:
        raise LocalError(f"ring_size must be within 1..256, not {ring_size}")
    n, nalu = clear_header_length(frame, kind, codec, keyframe)
    if len(frame) < n:
        raise LocalError(f"frame of {len(frame)} bytes is shorter than its {n}-byte header")
    iv = make_iv(ssrc, timestamp, counter)
    return seal(keyset(bytes(key_material), kdf, salt), key_index % ring_size, frame, n, nalu, iv)


def decrypt_frame(
    key_material: bytes,
    frame: bytes,
    *,
    kind: TrackKind | str,
    codec: Codec | str | None,
    keyframe: bool | None = None,
    key_index: int | None = None,
    kdf: Kdf = Kdf.HKDF,
    salt: bytes = DEFAULT_SALT,
    ring_size: int = RING_SIZE,
    sif_trailer: bytes = b"",
) -> bytes:
    """Decrypt one frame with the given key material (no ratcheting, no state).

    Empty frames and known SIF frames are returned in the clear. With ``key_index`` the
    frame's key-index byte must equal ``key_index % ring_size``.

    Raises DecryptError (a RemoteError) whenever the frame is malformed or the key is wrong.
    """
    if not frame:
        return frame
    sif = sif_payload(frame, sif_trailer)
    if sif is not None:
        return sif
    if key_index is not None and frame[-1] != key_index % ring_size:
        raise DecryptError(f"frame uses key index {frame[-1]}, expected {key_index % ring_size}")
    try:
        n, nalu = clear_header_length(frame, kind, codec, keyframe)
    except UnsupportedCodecError as e:
        raise DecryptError(str(e)) from e
    try:
        return unseal(keyset(bytes(key_material), kdf, salt), frame, n, nalu)
    except InvalidTag as e:
        raise DecryptError("authentication failed: wrong key or corrupted frame") from e
