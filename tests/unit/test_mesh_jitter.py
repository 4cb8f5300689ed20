"""The mesh's VP8 frame assembler (matrixrtc.mesh.jitter): frames out at their marker bit, a
lost packet waited on briefly and then given up (never a 512-packet stall), one PLI per wait
for a key frame (never one per packet). Fake packets and clock; no network."""

from __future__ import annotations

from typing import Any

from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtp import RtpPacket
from hypothesis import given, settings
from hypothesis import strategies as st

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
        frames.append(
            _packets(seq, 1000 + 3000 * i, (KEY if k == "K" else DELTA) + bytes([i]), parts)
        )
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


# --- properties (hypothesis): any reordering, loss and malformed input ----------------------

_GIVE_UP = 0.3
_PLI_EVERY = 0.5


def _sent(start_seq: int, kinds: str, parts: list[int]) -> list[list[RtpPacket]]:
    """Frames of ``kinds`` with the given packet counts from ``start_seq`` (wrapping)."""
    frames, seq = [], start_seq
    for i, k in enumerate(kinds):
        body = (KEY if k == "K" else DELTA) + i.to_bytes(2, "big") + b"x" * parts[i]
        frames.append(_packets(seq, 1000 + 3000 * i, body, parts[i]))
        seq += parts[i]
    return frames


@st.composite
def _streams(draw: st.DrawFn, max_frames: int = 30) -> tuple[str, list[list[RtpPacket]]]:
    n = draw(st.integers(1, max_frames))
    kinds = "K" + "".join(draw(st.lists(st.sampled_from("KDDDD"), min_size=n - 1, max_size=n - 1)))
    parts = draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
    start = draw(st.integers(0, 0xFFFF))  # sequence numbers wrap anywhere
    return kinds, _sent(start, kinds, parts)


def _displaced(data: st.DataObject, packets: list[RtpPacket], most: int) -> list[RtpPacket]:
    """``packets`` reordered: each moved by up to ``most`` places (network reordering)."""
    draw = data.draw
    keys = [i + draw(st.integers(0, most)) + 0.5 * draw(st.booleans()) for i in range(len(packets))]
    return [p for _, p in sorted(zip(keys, packets, strict=True), key=lambda kp: kp[0])]


def _frame_of(frames: list[list[RtpPacket]]) -> dict[int, int]:
    return {int(f[0].timestamp): i for i, f in enumerate(frames)}


@settings(max_examples=50)  # make test's budget: ~1 s under coverage
@given(stream=_streams(), data=st.data())
def test_property_reordering_without_loss_hands_on_every_frame_once_in_order(
    stream: tuple[str, list[list[RtpPacket]]], data: st.DataObject
) -> None:
    _, frames = stream
    most = data.draw(st.integers(0, 6))
    packets = _displaced(data, [p for f in frames for p in f], most=most)
    # The stream's first packet leads (the assembler starts at the first frame start it sees).
    packets.remove(frames[0][0])
    packets.insert(0, frames[0][0])
    asm, got, _ = _rig()
    for p in packets:
        assert asm.add(p) == (False, None)
    assert [f.data for f in got] == [b"".join(p._data for p in f) for f in frames]  # type: ignore[attr-defined]
    assert asm.skips == asm.plis == asm.dropped_frames == 0


@settings(max_examples=40)  # ~2 s under coverage
@given(stream=_streams(), data=st.data())
def test_property_loss_never_hands_on_a_broken_or_undecodable_frame_and_recovers(
    stream: tuple[str, list[list[RtpPacket]]], data: st.DataObject
) -> None:
    """Whatever is lost and however late packets come: every frame handed on is whole, in
    order, and decodable (a key frame, or the frame right after the previous one handed on);
    PLIs come at most once per interval; and a clean stream afterwards is handed on again."""
    kinds, frames = stream
    tail_kinds = "K" + "D" * 10 + "K" + "D" * 10
    last = frames[-1][-1]
    tail = _sent(0, tail_kinds, [2] * len(tail_kinds))
    offset = len(kinds)
    for i, tf in enumerate(tail):  # continue the sequence numbers and timestamps
        for j, p in enumerate(tf):
            p.sequence_number = (last.sequence_number + 1 + 2 * i + j) & 0xFFFF
            p.timestamp = 1000 + 3000 * (offset + i)
    packets = [p for f in frames for p in f]
    lost = data.draw(st.sets(st.integers(0, len(packets) - 1), max_size=len(packets)))
    kept = [p for i, p in enumerate(packets) if i not in lost]
    arriving = _displaced(data, kept, most=data.draw(st.integers(0, 4)))
    asm, got, clock = _rig(give_up_s=_GIVE_UP, pli_interval_s=_PLI_EVERY)
    start = clock.now
    plis = 0
    for p in arriving:
        plis += asm.add(p)[0]
        clock.now += data.draw(st.sampled_from([0.0, 0.01, 0.05, 0.2]))
    for tf in tail:  # 15 frames a second, no loss
        for p in tf:
            plis += asm.add(p)[0]
        clock.now += 1 / 15
    sent = frames + tail
    whole = {int(sf[0].timestamp): b"".join(p._data for p in sf) for sf in sent}  # type: ignore[attr-defined]
    index = _frame_of(sent)
    order = [index[f.timestamp] for f in got]
    assert order == sorted(set(order))  # in order, none twice
    for k, f in enumerate(got):
        assert f.data == whole[f.timestamp]  # whole
        i = index[f.timestamp]
        assert f.keyframe == ((kinds + tail_kinds)[i] == "K")
        assert f.keyframe or (k > 0 and order[k - 1] == i - 1)  # decodable
    assert plis == asm.plis <= 1 + (clock.now - start) / _PLI_EVERY
    # Recovered: the tail's second half (after its second key frame) is all handed on.
    assert order[-11:] == list(range(len(sent) - 11, len(sent)))


_descriptor = st.one_of(
    st.binary(max_size=6),  # anything, including empty (padding) and truncated descriptors
    st.sampled_from([b"\x10", b"\x00", b"\x90\x80", b"\x90\x80\x80\x01", b"\x11", b"\x1f"]).flatmap(
        lambda d: st.binary(max_size=4).map(lambda rest: d + rest)
    ),
)


@given(
    st.lists(
        st.tuples(
            st.integers(0, 0xFFFF),  # sequence number
            st.integers(0, 8),  # timestamp (few values: collisions on purpose)
            st.booleans(),  # marker
            _descriptor,
            st.sampled_from([0.0, 0.01, 0.4]),
        ),
        max_size=120,
    )
)
def test_property_malformed_packets_never_raise_stall_or_flood(
    rows: list[tuple[int, int, bool, bytes, float]],
) -> None:
    """Random sequence numbers, timestamps, markers and VP8 payload descriptors (truncated,
    empty, wrong partition): no exception, nothing held past capacity, a PLI at most per
    interval, and only frames that begin with a frame start are handed on."""
    asm, got, clock = _rig(capacity=32, give_up_s=_GIVE_UP, pli_interval_s=_PLI_EVERY)
    start = clock.now
    starts: set[int] = set()
    plis = 0
    for seq, ts, marker, payload, dt in rows:
        p = RtpPacket(payload_type=97, sequence_number=seq, timestamp=ts, marker=int(marker))
        p.payload = payload
        p._data = payload[1:]  # type: ignore[attr-defined]
        if vp8_starts_frame(payload):
            starts.add(ts)
        plis += asm.add(p)[0]
        assert len(asm._packets) <= asm.capacity
        clock.now += dt
    assert all(f.timestamp in starts for f in got)
    assert plis <= 1 + (clock.now - start) / _PLI_EVERY


def test_padding_between_frames_costs_nothing() -> None:
    """A sender without RTX probes bandwidth with payload-less packets on the media SSRC
    (Chromium does): they are passed over, not taken for the middle of a lost frame."""
    asm, got, _ = _rig()
    seq = 1
    for i, k in enumerate("KDDD"):
        for p in _packets(seq, 1000 + 3000 * i, (KEY if k == "K" else DELTA) + bytes([i])):
            asm.add(p)
        seq += 2
        pad = RtpPacket(payload_type=97, sequence_number=seq, timestamp=1000 + 3000 * i)
        pad._data = b""  # type: ignore[attr-defined]
        assert asm.add(pad) == (False, None)
        seq += 1
    assert [f.timestamp for f in got] == [1000, 4000, 7000, 10000]
    assert asm.skips == asm.plis == asm.dropped_frames == 0


def test_a_sender_whose_sequence_numbers_restart_is_followed_after_its_next_key_frame() -> None:
    """Far behind what was handed on is not a late packet: the assembler starts over at once
    (a restart ahead is a gap, given up after the wait)."""
    asm, got, clock = _rig()
    for f in _stream(40000, "KD"):
        for p in f:
            asm.add(p)
    for restart, ts in ((30000, 90000), (50000, 180000)):  # behind, then ahead
        for f in _sent(restart, "DKD", [2, 2, 2]):  # a delta first, then a key frame
            clock.now += 0.2
            for p in f:
                p.timestamp += ts
                asm.add(p)
    # behind: at once, from the key frame; ahead: after the 0.3 s wait, from the key frame.
    assert [f.timestamp for f in got] == [1000, 4000, 94000, 97000, 184000, 187000]
    assert asm.skips == 2


def test_a_stream_only_counted_resumes_at_the_next_whole_frame_and_asks_for_no_key() -> None:
    """``needs_key`` false (nothing decodes or copies the stream: frames are decrypted and
    counted one by one): after a loss the next whole frame is handed on, delta or not, and no
    PLI is sent; once a decoder needs keys again, deltas after a loss wait for one."""
    wants = [False]
    asm, got, clock = _rig(give_up_s=0.3, pli_interval_s=0.5, needs_key=lambda: wants[0])
    frames = _stream(1, "KDDDDDDD")
    lost = frames[1][0]
    plis = []
    for frame in frames[:4]:
        for p in frame:
            if p is not lost:
                plis.append(asm.add(p)[0])
    clock.now += 0.31
    for frame in frames[4:6]:
        for p in frame:
            plis.append(asm.add(p)[0])
    # Only the frame that lost a packet is missing: 2 and 3 were held behind the gap.
    assert [f.timestamp for f in got] == [1000, 7000, 10000, 13000, 16000]
    assert not any(plis)
    assert asm.skips == 1
    wants[0] = True  # a decoder now: a loss means waiting for a key frame, asked by PLI
    lost = frames[6][1]
    for p in frames[6]:
        if p is not lost:
            asm.add(p)
    first, second = frames[7]
    assert asm.add(first)[0] is False  # the gap is there from now
    clock.now += 0.31
    assert asm.add(second)[0] is True  # given up, no key frame held: asked for
    assert [f.timestamp for f in got][-1] == 16000  # the delta after the loss is held back


def _cut(frame: list[RtpPacket], keep: int) -> list[RtpPacket]:
    """The first ``keep`` packets of ``frame``: an SFU switched layers mid-frame."""
    return frame[:keep]


def test_a_frame_cut_short_by_a_layer_switch_is_dropped_and_the_key_frame_goes_on() -> None:
    # LiveKit stops forwarding the old layer mid-frame and renumbers the new layer's key frame
    # to follow straight on: no sequence gap, but the cut frame has no marker packet.
    asm, got, _ = _rig()
    old = _stream(1, "KD", parts=3)
    cut = _cut(old[1], 2)
    new_key = _packets(6, 50_000, KEY + b"\x07", parts=2)
    new_delta = _packets(8, 53_000, DELTA + b"\x08", parts=2)
    plis = [asm.add(p)[0] for p in [*old[0], *cut, *new_key, *new_delta]]
    assert [f.timestamp for f in got] == [1000, 50_000, 53_000]
    assert got[1].keyframe
    assert asm.dropped_frames == 1
    assert not any(plis)  # the key frame was already there: nothing to ask for


def test_a_frame_cut_short_before_a_delta_frame_waits_for_a_key_frame() -> None:
    asm, got, _ = _rig(pli_interval_s=0.5)
    old = _stream(1, "KD", parts=3)
    cut = _cut(old[1], 2)
    delta = _packets(6, 50_000, DELTA + b"\x07", parts=2)
    plis = [asm.add(p)[0] for p in [*old[0], *cut, *delta]]
    assert [f.timestamp for f in got] == [1000]  # the cut frame and the delta on it: dropped
    assert sum(plis) == 1
    key = _packets(8, 53_000, KEY + b"\x08", parts=2)
    for p in key:
        asm.add(p)
    assert got[-1].timestamp == 53_000
