"""The mesh's VP8 frame assembler (matrixrtc.mesh.jitter): frames out at their marker bit, a
lost packet waited on briefly and then given up (never a 512-packet stall), one PLI per wait
for a key frame (never one per packet). Fake packets and clock; no network."""

from __future__ import annotations

from typing import Any

from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtp import RtpPacket

from matrixrtc.mesh.jitter import AssembledFrame, FrameAssembler, vp8_starts_frame

KEY = b"\x00key"  # VP8 frame tag bit 0 clear: a key frame
DELTA = b"\x01dlt"


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _packets(seq: int, ts: int, frame: bytes, parts: int = 2) -> list[RtpPacket]:
    """One VP8 frame as ``parts`` RTP packets (descriptor S bit on the first, marker on the
    last), depayloaded as aiortc leaves them (``_data``)."""
    chunk = max(1, len(frame) // parts)
    pieces = [frame[i * chunk : (i + 1) * chunk if i < parts - 1 else None] for i in range(parts)]
    out = []
    for i, piece in enumerate(pieces):
        p = RtpPacket(
            payload_type=97,
            sequence_number=(seq + i) & 0xFFFF,
            timestamp=ts,
            marker=int(i == parts - 1),
            payload=bytes([0x10 if i == 0 else 0x00]) + piece,
        )
        p._data = piece  # type: ignore[attr-defined]
        out.append(p)
    return out


def _stream(start_seq: int, kinds: str, parts: int = 2) -> list[list[RtpPacket]]:
    """Frames ``K``/``D`` in a row, each ``parts`` packets, 3000 ticks apart."""
    frames = []
    seq = start_seq
    for i, k in enumerate(kinds):
        frames.append(_packets(seq, 1000 + 3000 * i, (KEY if k == "K" else DELTA) + bytes([i])))
        seq += parts
    return frames


def _rig(**kw: Any) -> tuple[FrameAssembler, list[AssembledFrame], _Clock]:
    got: list[AssembledFrame] = []
    clock = _Clock()
    asm = FrameAssembler(lambda f, _p: got.append(f), clock=clock, **kw)
    return asm, got, clock


def test_a_frame_goes_out_at_its_marker_packet_whole_and_in_order() -> None:
    asm, got, _ = _rig()
    frames = _stream(10, "KDDD")
    out_after = []
    for frame in frames:
        for p in frame:
            assert asm.add(p) == (False, None)
            out_after.append(len(got))
    # Complete at the marker (the last packet), not one frame late as aiortc's buffer is.
    assert out_after == [0, 1, 1, 2, 2, 3, 3, 4]
    assert [f.data for f in got] == [KEY + b"\x00"] + [DELTA + bytes([i]) for i in (1, 2, 3)]
    assert [f.keyframe for f in got] == [True, False, False, False]
    assert [f.timestamp for f in got] == [1000, 4000, 7000, 10000]


def test_a_retransmitted_packet_releases_every_held_frame_at_once() -> None:
    asm, got, clock = _rig()
    frames = _stream(65530, "KDDDD")  # crosses the 16-bit sequence wrap
    lost = frames[1][0]
    for frame in frames:
        for p in frame:
            if p is not lost:
                asm.add(p)
    assert len(got) == 1  # held behind the gap
    clock.now += 0.1  # NACK + retransmission, within the wait
    assert asm.add(lost) == (False, None)
    assert [f.timestamp for f in got] == [1000, 4000, 7000, 10000, 13000]
    assert asm.skips == 0
    assert asm.plis == 0


def test_a_lost_packet_costs_the_wait_then_resumes_at_a_held_key_frame() -> None:
    asm, got, clock = _rig(give_up_s=0.3)
    frames = _stream(1, "KDDKD")
    for frame in frames[:1]:
        for p in frame:
            asm.add(p)
    lost = frames[1][1]
    pli = []
    for frame in frames[1:]:
        for p in frame:
            if p is not lost:
                pli.append(asm.add(p)[0])
    assert len(got) == 1
    clock.now += 0.31
    more = _packets(11, 16000, DELTA + b"\x05")
    for p in more:
        pli.append(asm.add(p)[0])
    # Skipped to the key frame it held: the deltas in between would not decode.
    assert [f.timestamp for f in got] == [1000, 10000, 13000, 16000]
    assert asm.skips == 1
    assert not any(pli)  # a key frame was at hand: no PLI


def test_without_a_key_frame_held_deltas_are_dropped_and_one_pli_per_interval_asks() -> None:
    asm, got, clock = _rig(give_up_s=0.3, pli_interval_s=0.5)
    frames = _stream(1, "KDDDDDDD")
    for p in frames[0]:
        asm.add(p)
    lost = frames[1][0]
    plis = []
    for frame in frames[1:4]:
        for p in frame:
            if p is not lost:
                plis.append(asm.add(p)[0])
    clock.now += 0.31
    for frame in frames[4:]:
        for p in frame:
            plis.append(asm.add(p)[0])
            clock.now += 0.02
    assert [f.timestamp for f in got] == [1000]  # no delta after the loss is handed on
    assert sum(plis) == 1  # one PLI, not one per packet
    clock.now += 0.5
    later = _packets(17, 25000, DELTA + b"\x08")
    assert [asm.add(p)[0] for p in later] == [True, False]  # asked again after the interval
    key = _packets(19, 28000, KEY + b"\x09")
    assert [asm.add(p)[0] for p in key] == [False, False]
    assert got[-1].timestamp == 28000
    assert got[-1].keyframe


def test_capacity_reached_gives_up_without_waiting() -> None:
    asm, got, _ = _rig(give_up_s=60.0, capacity=5)
    frames = _stream(1, "KDDDK")
    for p in frames[0]:
        asm.add(p)
    for frame in frames[1:]:
        for p in frame[1:]:  # every delta lost its first packet
            asm.add(p)
    for p in frames[4]:
        asm.add(p)
    assert [f.timestamp for f in got] == [1000, 13000]


def test_late_and_duplicate_packets_are_ignored() -> None:
    asm, got, _ = _rig()
    frames = _stream(100, "KD")
    for p in frames[0] + frames[1]:
        asm.add(p)
    for p in frames[0] + frames[1]:
        assert asm.add(p) == (False, None)
    assert len(got) == 2


def test_aiortc_jitter_buffer_stalls_on_the_same_loss() -> None:
    """Why the assembler exists: aiortc's buffer holds every later frame behind one lost
    packet until 512 more packets arrived (≈ 17 s at 15 fps and two packets a frame), even
    past the key frame the sender made on the receiver's PLI."""
    jb = JitterBuffer(capacity=512, is_video=True)
    frames = _stream(1, "K" + "D" * 19 + "K" + "D" * 180)
    lost = frames[1][0]
    out = 0
    for frame in frames:
        for p in frame:
            if p is not lost:
                _, f = jb.add(p)
                out += f is not None
    # 200 frames (13 s at 15 fps) and nothing handed on: not even the key frame before the
    # loss, which aiortc only sees as whole when the next frame's first packet arrives.
    assert out == 0
    asm, got, clock = _rig()
    for frame in frames:
        for p in frame:
            if p is not lost:
                asm.add(p)
                clock.now += 1 / 30
    assert [f.timestamp for f in got[:2]] == [1000, 1000 + 3000 * 20]  # resumed at the key
    assert len(got) == 1 + 181


def test_frame_starts_come_from_the_vp8_payload_descriptor() -> None:
    assert vp8_starts_frame(b"\x10\x00")
    assert vp8_starts_frame(b"\x90\x80\x00")  # extended descriptor, S set, partition 0
    assert not vp8_starts_frame(b"\x00\x00")  # a continuation
    assert not vp8_starts_frame(b"\x11\x00")  # the start of partition 1, not of the frame
    assert not vp8_starts_frame(b"")
