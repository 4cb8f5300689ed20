"""Frame format rules (LiveKit E2EE) and the stateful cryptor's failure handling."""

from __future__ import annotations

import hashlib
import hmac
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from matrixrtc.e2ee import frame as fmt
from matrixrtc.e2ee.cryptor import (
    ELEMENT_CALL,
    SHARED_PASSPHRASE,
    CryptorOptions,
    FrameCryptor,
    KeyRing,
)
from matrixrtc.e2ee.frame import (
    DecryptError,
    UnsupportedCodecError,
    clear_header_length,
    decrypt_frame,
    encrypt_frame,
    make_iv,
    parse_rbsp,
    write_rbsp,
)
from matrixrtc.e2ee.kdf import Kdf, derive_frame_key, ratchet_material
from matrixrtc.errors import LocalError, RemoteError

KEY = bytes(range(16))
SSRC = 0x11223344
VP8_KEY = bytes([0x90, 0x03, 0x00, 0x9D, 0x01, 0x2A]) + os.urandom(200)  # P bit 0: key frame
VP8_DELTA = bytes([0x31, 0x02, 0x00]) + os.urandom(100)
OPUS = bytes([0x78]) + os.urandom(80)
H264 = (
    b"\x00\x00\x00\x01\x67"
    + b"\x42" * 9  # SPS
    + b"\x00\x00\x00\x01\x68"
    + b"\xce" * 3  # PPS
    + b"\x00\x00\x01\x65\x88"
    + os.urandom(50).replace(b"\x00", b"\x01")  # IDR, short start code
)


def _counting_cryptor(
    key: bytes = KEY, index: int = 0, opts: CryptorOptions = ELEMENT_CALL
) -> FrameCryptor:
    ring = KeyRing(opts)
    ring.set_key(key, index)
    return FrameCryptor(ring, counter_start=lambda: 0)


# ---------------------------------------------------------------- key derivation
def _hkdf_ref(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out += block
        i += 1
    return out[:length]


def test_hkdf_uses_lk_salt_and_128_zero_bytes_of_info() -> None:
    assert derive_frame_key(KEY) == _hkdf_ref(KEY, b"LKFrameEncryptionKey", bytes(128), 16)
    assert ratchet_material(KEY) == _hkdf_ref(KEY, b"LKFrameEncryptionKey", bytes(128), 32)
    assert derive_frame_key(KEY) != _hkdf_ref(KEY, b"LKFrameEncryptionKey", b"", 16)


def test_pbkdf2_100000_iterations_sha256() -> None:
    pw = b"secret passphrase"
    ref = hashlib.pbkdf2_hmac("sha256", pw, b"LKFrameEncryptionKey", 100_000, 16)
    assert derive_frame_key(pw, Kdf.PBKDF2) == ref
    assert ratchet_material(pw, Kdf.PBKDF2) == hashlib.pbkdf2_hmac(
        "sha256", pw, b"LKFrameEncryptionKey", 100_000, 32
    )


# ---------------------------------------------------------------- layout
@pytest.mark.parametrize(
    ("kind", "codec", "frame", "keyframe", "n"),
    [
        ("audio", "opus", OPUS, None, 1),
        ("video", "vp8", VP8_KEY, None, 10),
        ("video", "vp8", VP8_DELTA, None, 3),
        ("video", "VP8", VP8_DELTA, True, 10),  # explicit flag wins, codec case-insensitive
        ("video", "vp9", VP8_KEY, True, 0),
        ("video", "h264", H264, True, H264.index(b"\x65\x88") + 2),
        ("video", "h264", b"garbage" + H264, True, 10),  # not Annex B: VP8 rule
        ("video", "h264", b"\x00\x00\x00\x01\x67abcdef", False, 3),  # no slice: VP8 rule
        ("video", "something-new", H264, True, H264.index(b"\x65\x88") + 2),  # bytes decide
        ("video", "something-new", VP8_DELTA, None, 3),
    ],
)
def test_clear_header_bytes(
    kind: str, codec: str, frame: bytes, keyframe: bool | None, n: int
) -> None:
    assert clear_header_length(frame, kind, codec, keyframe)[0] == n
    enc = encrypt_frame(
        KEY, 5, frame, kind=kind, codec=codec, keyframe=keyframe, ssrc=1, timestamp=2
    )
    assert enc[: min(n, 4)] == frame[: min(n, 4)]
    out = decrypt_frame(KEY, enc, kind=kind, codec=codec, keyframe=keyframe)
    if clear_header_length(frame, kind, codec, keyframe)[1]:
        assert out == fmt.widen_start_codes(frame[:n]) + frame[n:]
    else:
        assert out == frame


def test_h265_first_vcl_nalu() -> None:
    f = b"\x00\x00\x00\x01\x40\x01" + b"\x0c" * 10 + b"\x00\x00\x00\x01\x26\x01" + b"\xaa" * 40
    assert clear_header_length(f, "video", "h265")[0] == f.index(b"\x26\x01") + 2


def test_av1_is_refused() -> None:
    with pytest.raises(UnsupportedCodecError):
        encrypt_frame(KEY, 0, b"\x12\x00" * 10, kind="video", codec="av1", ssrc=1, timestamp=1)
    c = _counting_cryptor()
    assert c.encrypt(b"\x12\x00" * 10, kind="video", codec="av1", ssrc=1, timestamp=1) is None
    assert c.stats.encrypt_failures == 1


def test_trailer_layout_and_aad() -> None:
    enc = encrypt_frame(
        KEY, 300, VP8_DELTA, kind="video", codec="vp8", ssrc=SSRC, timestamp=90000, counter=7
    )
    assert len(enc) == len(VP8_DELTA) + 16 + 12 + 2
    assert enc[-2] == 12
    assert enc[-1] == 300 % 256
    assert enc[-14:-2] == make_iv(SSRC, 90000, 7)
    # The clear header is authenticated: flipping a header bit breaks decryption.
    tampered = bytes([enc[0] ^ 0x40]) + enc[1:]
    with pytest.raises(DecryptError):
        decrypt_frame(KEY, tampered, kind="video", codec="vp8", keyframe=False)


def test_key_index_byte_is_index_mod_ring_size() -> None:
    enc = encrypt_frame(
        KEY, 255, OPUS, kind="audio", codec="opus", ssrc=1, timestamp=1, ring_size=16
    )
    assert enc[-1] == 15
    ring = KeyRing(CryptorOptions(ring_size=16))
    ring.set_key(KEY, 255)
    assert ring.current_index == 15
    assert FrameCryptor(ring).decrypt(enc, kind="audio") == OPUS


def test_iv_words() -> None:
    assert make_iv(1, 2, 0) == bytes.fromhex("000000010000000200000002")
    assert make_iv(1, 2, 5) == bytes.fromhex("0000000100000002fffffffd")  # wraps like u32
    assert make_iv(-1, 0x1_0000_0005, 0xFFFF + 3) == bytes.fromhex("ffffffff0000000500000002")


def test_empty_frames_pass_through_and_one_byte_opus_is_encrypted() -> None:
    assert encrypt_frame(KEY, 0, b"", kind="audio", codec="opus", ssrc=1, timestamp=1) == b""
    c = _counting_cryptor()
    assert c.encrypt(b"", kind="audio", ssrc=1, timestamp=1) == b""
    assert c.decrypt(b"", kind="audio") == b""
    one = c.encrypt(b"\xf8", kind="audio", ssrc=1, timestamp=1)
    assert one is not None
    assert len(one) == 31
    assert c.decrypt(one, kind="audio") == b"\xf8"


def test_send_counter_per_ssrc() -> None:
    c = _counting_cryptor()
    ivs = []
    for ssrc in (1, 1, 2, 1):
        out = c.encrypt(OPUS, kind="audio", ssrc=ssrc, timestamp=1000)
        assert out is not None
        ivs.append(out[-14:-2])
    assert ivs == [
        make_iv(1, 1000, 0),
        make_iv(1, 1000, 1),
        make_iv(2, 1000, 0),
        make_iv(1, 1000, 2),
    ]


def test_encrypt_without_key_fails_cleanly() -> None:
    c = FrameCryptor()
    assert c.encrypt(OPUS, kind="audio", ssrc=1, timestamp=1) is None
    assert c.stats.encrypt_failures == 1


def test_ring_and_options_validation() -> None:
    with pytest.raises(LocalError):
        CryptorOptions(ring_size=0)
    with pytest.raises(LocalError):
        encrypt_frame(KEY, 0, OPUS, kind="audio", codec="opus", ssrc=1, timestamp=1, ring_size=300)
    with pytest.raises(LocalError):
        encrypt_frame(
            KEY, 0, b"\x90\x00", kind="video", codec="vp8", keyframe=True, ssrc=1, timestamp=1
        )
    assert issubclass(DecryptError, RemoteError)


# ---------------------------------------------------------------- ratchet and tolerance
def _sender(ratchets: int, index: int = 4) -> FrameCryptor:
    tx = _counting_cryptor(index=index)
    for _ in range(ratchets):
        tx.ring.ratchet()
    return tx


@pytest.mark.parametrize("steps", [1, 2, 10])
def test_receiver_follows_sender_ratchet_within_window(steps: int) -> None:
    tx, rx = _sender(steps), _counting_cryptor(index=4)
    enc = tx.encrypt(OPUS, kind="audio", ssrc=1, timestamp=1)
    assert enc is not None
    assert rx.decrypt(enc, kind="audio") == OPUS
    assert rx.ring.material(4) == tx.ring.material(4)  # committed
    assert rx.stats.ratchets == 1
    # The next frame decrypts directly with the committed key.
    assert (
        rx.decrypt(tx.encrypt(OPUS, kind="audio", ssrc=1, timestamp=2) or b"", kind="audio") == OPUS
    )
    assert rx.stats.ratchets == 1


def test_ratchet_beyond_window_fails_and_never_commits() -> None:
    tx, rx = _sender(11), _counting_cryptor(index=4)
    enc = tx.encrypt(OPUS, kind="audio", ssrc=1, timestamp=1)
    assert enc is not None
    assert rx.decrypt(enc, kind="audio") is None
    assert rx.ring.material(4) == KEY
    # A forged frame (wrong key) never moves the receiver's key either.
    forged = encrypt_frame(os.urandom(16), 4, OPUS, kind="audio", codec="opus", ssrc=1, timestamp=1)
    assert rx.decrypt(forged, kind="audio") is None
    assert rx.ring.material(4) == KEY
    assert rx.stats.decrypt_failures == 2


def test_no_ratchet_with_window_zero() -> None:
    rx = _counting_cryptor(index=4, opts=CryptorOptions(ratchet_window=0))
    enc = _sender(1).encrypt(OPUS, kind="audio", ssrc=1, timestamp=1)
    assert enc is not None
    assert rx.decrypt(enc, kind="audio") is None


def test_wrong_key_is_counted_then_marked_invalid_until_a_new_key() -> None:
    rx = _counting_cryptor(index=2)
    wrong = encrypt_frame(os.urandom(16), 2, OPUS, kind="audio", codec="opus", ssrc=1, timestamp=1)
    for _ in range(11):  # failures 1..11: the 11th exceeds the tolerance of 10
        assert rx.decrypt(wrong, kind="audio") is None
    assert rx.ring.is_invalid(2)
    assert rx.stats.decrypt_failures == 11
    assert rx.stats.invalid_key_drops == 0
    good = encrypt_frame(KEY, 2, OPUS, kind="audio", codec="opus", ssrc=1, timestamp=1)
    assert rx.decrypt(good, kind="audio") is None  # dropped unseen
    assert rx.stats.invalid_key_drops == 1
    rx.ring.set_key(KEY, 2)
    assert rx.decrypt(good, kind="audio") == OPUS
    assert not rx.ring.is_invalid(2)


def test_success_resets_failure_count() -> None:
    rx = _counting_cryptor(index=2)
    wrong = encrypt_frame(os.urandom(16), 2, OPUS, kind="audio", codec="opus", ssrc=1, timestamp=1)
    good = encrypt_frame(KEY, 2, OPUS, kind="audio", codec="opus", ssrc=1, timestamp=1)
    for _ in range(30):
        for _ in range(10):
            rx.decrypt(wrong, kind="audio")
        assert rx.decrypt(good, kind="audio") == OPUS
    assert rx.ring.failures(2) == 0


def test_passphrase_mode_never_invalidates() -> None:
    ring = KeyRing(SHARED_PASSPHRASE)
    ring.set_key(b"hunter2", 0)
    rx = FrameCryptor(ring)
    wrong = encrypt_frame(os.urandom(16), 0, OPUS, kind="audio", codec="opus", ssrc=1, timestamp=1)
    for _ in range(20):
        assert rx.decrypt(wrong, kind="audio") is None
    assert not ring.is_invalid(0)
    good = encrypt_frame(
        b"hunter2", 0, OPUS, kind="audio", codec="opus", ssrc=1, timestamp=1, kdf=Kdf.PBKDF2
    )
    assert rx.decrypt(good, kind="audio") == OPUS


def test_missing_key_is_counted() -> None:
    rx = _counting_cryptor(index=0)
    enc = encrypt_frame(KEY, 9, OPUS, kind="audio", codec="opus", ssrc=1, timestamp=1)
    assert rx.decrypt(enc, kind="audio") is None
    assert rx.stats.missing_key == 1
    # A ring of 16 has nothing beyond slot 15.
    small = _counting_cryptor(opts=CryptorOptions(ring_size=16))
    enc = encrypt_frame(KEY, 200, OPUS, kind="audio", codec="opus", ssrc=1, timestamp=1)
    assert small.decrypt(enc, kind="audio") is None
    assert small.stats.missing_key == 1


def test_sif_trailer_rule() -> None:
    trailer = b"\x01\x02\x03\x04\x05\x06\x07\x08"
    silence = bytes([0xF8, 0xFF, 0xFE]) + bytes(77)
    rx = FrameCryptor(sif_trailer=trailer)
    assert rx.decrypt(silence + trailer, kind="audio") == silence
    assert rx.decrypt(OPUS + trailer, kind="audio") is None  # not a known filler frame
    assert rx.stats.sif_frames == 1
    with pytest.raises(DecryptError):
        decrypt_frame(KEY, OPUS + trailer, kind="audio", codec="opus", sif_trailer=trailer)


# ---------------------------------------------------------------- properties
def _rbsp_reference(data: bytes) -> bytes:
    out, zeros = bytearray(), 0
    for b in data:
        if b <= 3 and zeros >= 2:
            out.append(3)
            zeros = 0
        out.append(b)
        zeros = zeros + 1 if b == 0 else 0
    return bytes(out)


def _unrbsp_reference(data: bytes) -> bytes:
    out, i = bytearray(), 0
    while i < len(data):
        if len(data) - i >= 3 and data[i] == 0 and data[i + 1] == 0 and data[i + 2] == 3:
            out += b"\x00\x00"
            i += 3
        else:
            out.append(data[i])
            i += 1
    return bytes(out)


def _starts_reference(s: bytes) -> list[int]:
    # livekit-client's byte-by-byte scan, transcribed as a specification.
    result: list[int] = []
    start = pos = 0
    search = len(s) - 3
    while pos < search:
        while pos < search:
            if pos < search - 1 and s[pos : pos + 4] == b"\x00\x00\x00\x01":
                break
            if s[pos : pos + 3] == b"\x00\x00\x01":
                break
            pos += 1
        if pos >= search:
            pos = len(s)
        end = pos
        while end > start and s[end - 1] == 0:
            end -= 1
        if start == 0:
            if end != start:
                raise ValueError
        else:
            result.append(start)
        scl = 4 if pos < len(s) - 3 and s[pos : pos + 4] == b"\x00\x00\x00\x01" else 3
        start = pos = pos + scl
    return result


_nal_bytes = st.lists(
    st.sampled_from(
        [b"\x00", b"\x00\x00\x01", b"\x00\x00\x00\x01", b"\x03", b"\x65", b"\x41", b"\x26", b"\xff"]
    ),
    max_size=40,
).map(b"".join)


@settings(deadline=None)
@given(st.binary(max_size=300) | _nal_bytes)
def test_rbsp_matches_reference_and_round_trips(data: bytes) -> None:
    assert write_rbsp(data) == _rbsp_reference(data)
    assert parse_rbsp(write_rbsp(data)) == data
    assert parse_rbsp(data) == _unrbsp_reference(data)
    escaped = write_rbsp(data)
    assert b"\x00\x00\x01" not in escaped
    assert b"\x00\x00\x00" not in escaped


@settings(deadline=None)
@given(_nal_bytes | st.binary(max_size=100))
def test_nalu_scan_matches_reference(data: bytes) -> None:
    try:
        expected: list[int] | None = _starts_reference(data)
    except ValueError:
        expected = None
    try:
        got: list[int] | None = fmt._nalu_starts(data)
    except ValueError:
        got = None
    assert got == expected


@settings(deadline=None)
@given(_nal_bytes)
def test_start_code_widening(data: bytes) -> None:
    wide = fmt.widen_start_codes(data)
    ref, i = bytearray(), 0
    while i < len(data):
        if data[i : i + 3] == b"\x00\x00\x01" and (i == 0 or data[i - 1] != 0):
            ref += b"\x00\x00\x00\x01"
            i += 3
        else:
            ref.append(data[i])
            i += 1
    assert wide == bytes(ref)


_kinds = st.sampled_from(
    [
        ("audio", "opus"),
        ("video", "vp8"),
        ("video", "vp9"),
        ("video", "h264"),
        ("video", "h265"),
        ("video", None),
    ]
)


@settings(max_examples=150, deadline=None)
@given(
    _kinds,
    st.binary(min_size=10, max_size=600) | _nal_bytes.filter(lambda b: len(b) >= 10),
    st.booleans(),
)
def test_round_trip_any_frame(kc: tuple[str, str | None], frame: bytes, key: bool) -> None:
    kind, codec = kc
    tx = _counting_cryptor(index=9)
    rx = _counting_cryptor(index=9)
    enc = tx.encrypt(frame, kind=kind, codec=codec, keyframe=key, ssrc=7, timestamp=99)
    assert enc is not None
    n, nalu = clear_header_length(frame, kind, codec, key)
    expected = fmt.widen_start_codes(frame[:n]) + frame[n:] if nalu else frame
    out = rx.decrypt(enc, kind=kind, codec=codec, keyframe=key)
    if out is None:
        # The format's own ambiguity (livekit-client has it too): the receiver re-derives N
        # from the *encrypted* bytes. For a payload that is not Annex B but gets no VP8-like
        # header rule, ciphertext can form start codes and change N; nothing can decrypt it.
        assert clear_header_length(enc, kind, codec, key) != (n, nalu)
    else:
        assert out == expected


@settings(max_examples=300, deadline=None)
@given(
    _kinds,
    st.booleans(),
    st.data(),
)
def test_bad_frames_fail_cleanly_and_are_counted(
    kc: tuple[str, str | None], key: bool, data: st.DataObject
) -> None:
    kind, codec = kc
    tx = _counting_cryptor(index=1)
    rx = _counting_cryptor(index=1)
    plain = data.draw(st.binary(min_size=10, max_size=300), label="plain")
    enc = tx.encrypt(plain, kind=kind, codec=codec, keyframe=key, ssrc=7, timestamp=99)
    assert enc is not None
    how = data.draw(st.sampled_from(["truncate", "garble", "oversize", "random", "wrong-key"]))
    if how == "truncate":
        bad = enc[: data.draw(st.integers(1, len(enc) - 1))]
    elif how == "garble":
        i = data.draw(st.integers(0, len(enc) - 2))  # the key-index byte picks another slot
        bad = enc[:i] + bytes([enc[i] ^ data.draw(st.integers(1, 255))]) + enc[i + 1 :]
    elif how == "oversize":
        bad = enc + data.draw(st.binary(min_size=1, max_size=70_000))
    elif how == "random":
        bad = data.draw(st.binary(min_size=1, max_size=2000))
    else:
        bad = encrypt_frame(
            os.urandom(16), 1, plain, kind=kind, codec=codec, keyframe=key, ssrc=7, timestamp=99
        )
    before = rx.stats.decrypt_failures
    assert rx.decrypt(bad, kind=kind, codec=codec, keyframe=key) is None
    assert rx.stats.decrypt_failures == before + 1
    assert rx.stats.decrypted == 0
