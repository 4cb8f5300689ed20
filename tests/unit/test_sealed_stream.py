"""Sealed streams (pure): round trips, wrong keys, truncation, tampering — and fuzzing of the
parser, which must only ever raise SealedStreamError and never hand out altered bytes."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.public import PrivateKey

from matrixrtc.e2ee.sealed_stream import (
    MAGIC,
    BadRecipientKey,
    CorruptChunk,
    NotSealed,
    SealedStreamError,
    SealedStreamReader,
    SealedStreamWriter,
    TrailingData,
    TruncatedStream,
    WrongKey,
)

KEY = PrivateKey(bytes(range(32)))
PUB = bytes(KEY.public_key)
SECRET = bytes(KEY)


def seal(chunks: list[bytes], *, final: bool = True) -> tuple[bytes, list[int]]:
    """The sealed bytes and the offset where each chunk ends."""
    w = SealedStreamWriter(PUB)
    out = bytearray(w.header())
    ends = []
    for c in chunks:
        out += w.chunk(c)
        ends.append(len(out))
    if final:
        out += w.final()
        ends.append(len(out))
    return bytes(out), ends


def open_all(data: bytes, splits: list[int] | None = None, key: bytes = SECRET) -> bytes:
    r = SealedStreamReader(key)
    out = bytearray()
    pos = 0
    for s in sorted(splits or []):
        out += r.feed(data[pos:s])
        pos = s
    out += r.feed(data[pos:])
    r.close()
    return bytes(out)


def test_round_trip_and_layout() -> None:
    data, _ = seal([b"hello ", b"", b"world"])
    assert data.startswith(MAGIC + b"\x01\x00\x50")  # version 1, sealed key 80 bytes
    assert open_all(data) == b"hello world"
    assert b"hello" not in data
    assert b"world" not in data


def test_each_file_has_its_own_stream_key() -> None:
    a, _ = seal([b"same"])
    b, _ = seal([b"same"])
    assert a != b
    assert open_all(a) == open_all(b) == b"same"


def test_wrong_key_is_a_clear_error() -> None:
    data, _ = seal([b"secret"])
    with pytest.raises(WrongKey, match="not sealed to the given private key"):
        open_all(data, key=bytes(PrivateKey.generate()))


def test_truncated_stream_keeps_the_intact_chunks() -> None:
    data, ends = seal([b"a" * 100, b"b" * 100, b"c" * 100])
    r = SealedStreamReader(SECRET)
    got = r.feed(data[: ends[1] + 7])  # two whole chunks and the start of the third
    assert got == b"a" * 100 + b"b" * 100
    with pytest.raises(TruncatedStream, match=r"200 bytes in 2 chunks were intact"):
        r.close()
    # without the final tag but every chunk whole: still truncated
    no_final, _ = seal([b"x"], final=False)
    with pytest.raises(TruncatedStream):
        open_all(no_final)
    with pytest.raises(TruncatedStream, match="header"):
        open_all(data[:50])


def test_trailing_reordered_and_altered() -> None:
    data, ends = seal([b"one", b"two"])
    with pytest.raises(TrailingData):
        open_all(data + b"\x00")
    header_end = ends[0] - (4 + 3 + 17)
    first, second = data[header_end : ends[0]], data[ends[0] : ends[1]]
    swapped = data[:header_end] + second + first + data[ends[1] :]
    with pytest.raises(CorruptChunk, match="chunk 1"):
        open_all(swapped)
    flipped = bytearray(data)
    flipped[ends[0] + 6] ^= 1
    with pytest.raises(CorruptChunk, match="chunk 2"):
        open_all(bytes(flipped))


def test_header_swapped_onto_another_files_chunks_fails() -> None:
    a, ends_a = seal([b"aaaa"])
    b, _ends_b = seal([b"bbbb"])
    header_len = ends_a[0] - (4 + 4 + 17)
    with pytest.raises(SealedStreamError):
        open_all(a[:header_len] + b[header_len:])


def test_not_sealed_and_bad_keys() -> None:
    with pytest.raises(NotSealed):
        open_all(b"\x1aE\xdf\xa3 this is a webm file")
    with pytest.raises(NotSealed, match="version 2"):
        open_all(MAGIC + b"\x02\x00\x50" + bytes(200))
    with pytest.raises(BadRecipientKey):
        SealedStreamWriter(b"short")
    with pytest.raises(BadRecipientKey):
        SealedStreamReader(b"\x00" * 31)


def test_writer_misuse() -> None:
    w = SealedStreamWriter(PUB)
    with pytest.raises(SealedStreamError, match="header"):
        w.chunk(b"x")
    w.header()
    w.final()
    with pytest.raises(SealedStreamError, match="finished"):
        w.chunk(b"x")


def test_a_failed_reader_stays_failed() -> None:
    r = SealedStreamReader(SECRET)
    with pytest.raises(NotSealed):
        r.feed(b"nope, not this")
    with pytest.raises(NotSealed):
        r.feed(b"")
    with pytest.raises(NotSealed):
        r.close()


def test_impossible_chunk_length() -> None:
    data, ends = seal([b"abc"])
    header_end = ends[0] - (4 + 3 + 17)
    bad = data[:header_end] + struct.pack(">I", 0xFFFFFFFF) + data[header_end + 4 :]
    with pytest.raises(CorruptChunk, match="impossible length"):
        open_all(bad)


chunks_st = st.lists(st.binary(max_size=300), max_size=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=chunks_st, splits=st.lists(st.integers(0, 3000), max_size=6))
def test_round_trip_any_feeding(chunks: list[bytes], splits: list[int]) -> None:
    data, _ = seal(chunks)
    assert open_all(data, [s for s in splits if s <= len(data)]) == b"".join(chunks)


@settings(max_examples=300, deadline=None)
@given(
    chunks=chunks_st,
    cut=st.integers(0, 4000),
    flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(1, 255)), max_size=3),
    garbage=st.binary(max_size=40),
)
def test_damaged_input_never_yields_altered_bytes(
    chunks: list[bytes], cut: int, flips: list[tuple[int, int]], garbage: bytes
) -> None:
    """Cut, flipped or extended: the reader either raises SealedStreamError or returns the
    original; what it returned before failing is always a prefix of the original."""
    data, _ = seal(chunks)
    damaged = bytearray(data[:cut] if cut < len(data) else data + garbage)
    for pos, mask in flips:
        if pos < len(damaged):
            damaged[pos] ^= mask
    original = b"".join(chunks)
    r = SealedStreamReader(SECRET)
    got = bytearray()
    try:
        got += r.feed(bytes(damaged))
        r.close()
    except SealedStreamError:
        assert original.startswith(bytes(got))
    else:
        assert bytes(got) == original
        assert bytes(damaged) == data


@settings(max_examples=200, deadline=None)
@given(junk=st.binary(max_size=400))
def test_random_bytes_are_rejected_cleanly(junk: bytes) -> None:
    with pytest.raises(SealedStreamError):
        open_all(junk)
