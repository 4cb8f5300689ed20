"""Encode-once fan-out and the per-receiver decrypt hook, on real PyAV codecs and aiortc
objects in-process (no network)."""

from __future__ import annotations

import asyncio
import contextlib
import fractions
from typing import Any

import av
import pytest
from aiortc import RTCPeerConnection
from aiortc.codecs import get_decoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtcrtpreceiver import RemoteStreamTrack
from aiortc.rtp import RTCP_PSFB_APP, RTCP_PSFB_PLI, RtcpPsfbPacket, RtpPacket, pack_remb_fci

from matrixrtc.e2ee import KeyRings
from matrixrtc.errors import LocalError
from matrixrtc.media.sinks import ReceiveStats
from matrixrtc.media.sources import SyntheticVideoTrack, ToneAudioTrack
from matrixrtc.mesh.fanout import (
    MAX_VIDEO_BITRATE,
    MIN_VIDEO_BITRATE,
    REOPEN_MIN_INTERVAL_S,
    FanOutTrack,
    SharedEncoder,
    adopt_sender,
    install_receive_hook,
    set_receive_decoding,
)
from matrixrtc.mesh.ice import IceServerConfig, rtc_configuration
from matrixrtc.mesh.jitter import FrameAssembler
from matrixrtc.mesh.transform import CryptorTransform, vp8_is_keyframe

VP8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=97)


async def _drain(track: FanOutTrack, into: list[av.Packet[Any]]) -> None:
    """Collect packets until the track ends (stopped, or its encoder gone); any other error
    fails the test through the gather that awaits this."""
    with contextlib.suppress(MediaStreamError):
        while True:
            into.append(await track.recv())


@pytest.mark.parametrize("subscribers", [1, 3])
async def test_one_encode_per_frame_whatever_the_number_of_peers(subscribers: int) -> None:
    source = SyntheticVideoTrack(160, 120, 30)
    encoder = SharedEncoder(source)
    tracks = [encoder.subscribe() for _ in range(subscribers)]
    received: list[list[av.Packet[Any]]] = [[] for _ in tracks]
    readers = [asyncio.create_task(_drain(t, r)) for t, r in zip(tracks, received, strict=True)]
    encoder.start()
    await asyncio.sleep(0.6)
    await encoder.aclose()
    await asyncio.gather(*readers)
    assert encoder.frames_in >= 12
    # One encode per frame read; the frame read last may still be in the encode thread when
    # aclose cancels the loop (a loaded box: 17 of 18).
    assert encoder.frames_in - 1 <= encoder.frames_encoded <= encoder.frames_in
    # Every peer got the very same packets (objects), starting at a key frame.
    for packets in received:
        assert len(packets) >= encoder.frames_encoded - 1
        assert packets[0] is received[0][0]
        assert vp8_is_keyframe(bytes(packets[0]))
    # And they decode.
    decoder = get_decoder(VP8)
    frames = []
    for p in received[-1]:
        frames += decoder.decode(JitterFrame(data=bytes(p), timestamp=p.pts or 0))
    assert len(frames) == len(received[-1])
    assert isinstance(frames[0], av.VideoFrame)
    assert (frames[0].width, frames[0].height) == (160, 120)


async def test_no_subscribers_means_no_encoding() -> None:
    source = SyntheticVideoTrack(160, 120, 30)
    encoder = SharedEncoder(source)
    encoder.start()
    await asyncio.sleep(0.2)
    await encoder.aclose()
    assert encoder.frames_in > 0
    assert encoder.frames_encoded == 0


async def test_audio_is_encoded_once_into_20ms_opus_packets() -> None:
    encoder = SharedEncoder(ToneAudioTrack())
    a, b = encoder.subscribe(), encoder.subscribe()
    got_a: list[av.Packet[Any]] = []
    got_b: list[av.Packet[Any]] = []
    readers = [asyncio.create_task(_drain(a, got_a)), asyncio.create_task(_drain(b, got_b))]
    encoder.start()
    await asyncio.sleep(0.3)
    await encoder.aclose()
    await asyncio.gather(*readers)
    assert encoder.frames_encoded == encoder.frames_in >= 10
    assert [p.pts for p in got_a[:3]] == [0, 960, 1920]
    assert [id(p) for p in got_a] == [id(p) for p in got_b]


def test_target_bitrate_is_the_minimum_over_peers() -> None:
    encoder = SharedEncoder(SyntheticVideoTrack())
    a, b, c = encoder.subscribe(), encoder.subscribe(), encoder.subscribe()
    assert encoder.target_bitrate == 500_000  # default before any report
    a.report_bitrate(900_000)
    b.report_bitrate(400_000)
    assert encoder.target_bitrate == 400_000
    b.stop()  # the constrained peer leaves
    assert encoder.target_bitrate == 900_000
    c.report_bitrate(1)
    assert encoder.target_bitrate == MIN_VIDEO_BITRATE
    c.stop()
    a.report_bitrate(10**9)
    assert encoder.target_bitrate == MAX_VIDEO_BITRATE


async def _until(done: Any, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.005)):
        if done():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not met in time")


async def test_a_paused_track_gets_nothing_while_its_sibling_still_does() -> None:
    """What MediaTransport.hush() relies on when the encoder is shared (local_media): the
    transport that left pauses its own tracks, and the other transport's keep their frames."""
    encoder = SharedEncoder(SyntheticVideoTrack(fps=50.0))
    hushed, other = encoder.subscribe(), encoder.subscribe()
    encoder.start()
    try:
        await asyncio.wait_for(hushed.recv(), 5)  # both are sent to
        await asyncio.wait_for(other.recv(), 5)
        hushed.paused = True
        while not hushed._queue.empty():  # what was queued before the pause
            hushed._queue.get_nowait()
        sent = other.packets_sent
        for _ in range(5):
            await asyncio.wait_for(other.recv(), 5)
        assert other.packets_sent == sent + 5
        assert hushed._queue.empty()
    finally:
        await encoder.aclose()


async def test_with_every_track_paused_the_source_is_read_and_nothing_encoded() -> None:
    """We left the call and linger on the SFU: the source is still read, so it never backs
    up, but no frame is encoded or reaches a peer."""
    encoder = SharedEncoder(SyntheticVideoTrack(fps=50.0))
    track = encoder.subscribe()
    encoder.start()
    try:
        await asyncio.wait_for(track.recv(), 5)  # sending
        track.paused = True
        while not track._queue.empty():
            track._queue.get_nowait()
        read = encoder.frames_in
        await _until(lambda: encoder.frames_in >= read + 5)
        assert track._queue.empty()
        assert encoder.frames_encoded <= read + 1  # at most the one in hand at the pause
    finally:
        await encoder.aclose()


async def test_overflow_restarts_a_slow_video_peer_at_a_keyframe() -> None:
    encoder = SharedEncoder(SyntheticVideoTrack(), queue_frames=2)
    track = encoder.subscribe()
    packet = av.Packet(b"\x01delta")
    key = av.Packet(b"\x00key")
    track._push(packet, False)  # dropped: a new peer starts at a key frame
    track._push(key, True)
    track._push(packet, False)
    track._push(packet, False)  # overflow: queue cleared, wait for the next key frame
    track._push(packet, False)
    track._push(key, True)
    assert track.overflows == 1
    assert await track.recv() is key


async def test_keyframe_requests_and_remb_reach_the_shared_encoder() -> None:
    encoder = SharedEncoder(SyntheticVideoTrack())
    pc = RTCPeerConnection(rtc_configuration([]))
    try:
        track = encoder.subscribe()
        sender = pc.addTrack(track)
        adopt_sender(sender)
        adopt_sender(sender)  # idempotent
        await sender._handle_rtcp_packet(
            RtcpPsfbPacket(fmt=RTCP_PSFB_PLI, ssrc=1, media_ssrc=sender._ssrc)
        )
        assert encoder.keyframe_requests_from_peers == 1
        assert encoder._force_keyframe
        remb = RtcpPsfbPacket(
            fmt=RTCP_PSFB_APP, ssrc=1, media_ssrc=0, fci=pack_remb_fci(300_000, [sender._ssrc])
        )
        await sender._handle_rtcp_packet(remb)
        assert track.bitrate_report == 300_000
        assert encoder.target_bitrate == 300_000
    finally:
        await pc.close()
        await encoder.aclose()


class _Flaky:
    def __init__(self) -> None:
        self.calls = 0

    def decrypt(
        self, frame: bytes, *, kind: str, codec: str, keyframe: bool | None
    ) -> bytes | None:
        self.calls += 1
        if frame.startswith(b"boom"):
            raise RuntimeError("decryptor bug")
        if frame.startswith(b"bad"):
            return None
        return frame[::-1]


async def test_receive_hook_decrypts_counts_and_never_raises() -> None:
    pc = RTCPeerConnection(rtc_configuration([]))
    try:
        receiver = pc.addTransceiver("video").receiver
        stats = ReceiveStats(kind="video")
        decryptor = _Flaky()
        install_receive_hook(receiver, decryptor=decryptor, stats=stats)
        install_receive_hook(receiver, decryptor=decryptor, stats=stats)  # idempotent
        q: Any = receiver._RTCRtpReceiver__decoder_queue  # type: ignore[attr-defined]
        q.set_decoding(False)  # these frames are not VP8: count them, do not decode them
        error_flag = receiver._RTCRtpReceiver__decoder_error  # type: ignore[attr-defined]
        q.put((VP8, JitterFrame(data=b"\x00abc", timestamp=1)))
        q.put((VP8, JitterFrame(data=b"bad", timestamp=2)))
        q.put((VP8, JitterFrame(data=b"boom", timestamp=3)))
        assert not error_flag.is_set()
        q.put((VP8, JitterFrame(data=b"\x01xyz", timestamp=4)))
        # Only counted: each frame decrypts on its own, no key frame is needed after drops.
        assert not error_flag.is_set()
        q.set_decoding(True)
        assert error_flag.is_set()  # a decoder now: it starts at a key frame, asked for
        error_flag.clear()
        q.put((VP8, JitterFrame(data=b"bad", timestamp=5)))
        q.put((VP8, JitterFrame(data=b"abc\x01", timestamp=6)))  # clear: a delta frame
        assert error_flag.is_set()  # recovered after drops while decoding: ask again
        q.put(None)
        # nothing reaches aiortc's decoder thread but its stop sentinel
        assert [q.get_nowait() for _ in range(q.qsize())] == [None]
        assert stats.decrypt_failures == 3
        assert stats.encoded_frames == 3
        assert decryptor.calls == 6
    finally:
        await pc.close()


async def test_receive_hook_decodes_on_the_loop_into_the_track() -> None:
    """Clear VP8 frames are decoded inline and land on the receiver's track queue; with
    decoding off they are only counted, and decoding resumes at a key frame (PLI asked)."""
    encoder = av.CodecContext.create("libvpx", "w")
    encoder.width, encoder.height, encoder.pix_fmt = 64, 48, "yuv420p"
    encoder.options = {"deadline": "realtime", "kf-max-dist": "1000"}
    encoded: list[bytes] = []
    for i in range(6):
        frame = av.VideoFrame(64, 48, "yuv420p")
        frame.pts = i
        encoded += [bytes(p) for p in encoder.encode(frame)]
    assert vp8_is_keyframe(encoded[0])
    assert not vp8_is_keyframe(encoded[1])
    pc = RTCPeerConnection(rtc_configuration([]))
    try:
        transceiver = pc.addTransceiver("video")
        receiver = transceiver.receiver
        stats = ReceiveStats(kind="video")
        install_receive_hook(receiver, decryptor=None, stats=stats)
        q: Any = receiver._RTCRtpReceiver__decoder_queue  # type: ignore[attr-defined]
        receiver._track = RemoteStreamTrack(kind="video")  # as setRemoteDescription does
        out: asyncio.Queue[Any] = receiver._track._queue
        error_flag = receiver._RTCRtpReceiver__decoder_error  # type: ignore[attr-defined]
        for i, data in enumerate(encoded[:2]):
            q.put((VP8, JitterFrame(data=data, timestamp=i)))
        assert out.qsize() == 2
        assert isinstance(out.get_nowait(), av.VideoFrame)
        out.get_nowait()
        q.set_decoding(False)
        q.put((VP8, JitterFrame(data=encoded[2], timestamp=2)))
        assert out.qsize() == 0
        q.set_decoding(True)
        assert error_flag.is_set()  # a PLI: the decoder needs a key frame to resume
        q.put((VP8, JitterFrame(data=encoded[3], timestamp=3)))  # a delta: skipped
        assert out.qsize() == 0
        assert stats.encoded_frames == 4
        assert q.qsize() == 0  # aiortc's thread got nothing
    finally:
        await pc.close()


async def test_decoding_is_switched_through_the_receiver_hook() -> None:
    """What the switcher uses to stop decoding a member cut over to another transport: the
    hooked receiver counts frames but decodes none until switched back on."""
    pc = RTCPeerConnection(rtc_configuration([]))
    try:
        receiver = pc.addTransceiver("video").receiver
        assert not set_receive_decoding(receiver, False)  # no hook: nothing to switch
        stats = ReceiveStats(kind="video")
        install_receive_hook(receiver, decryptor=None, stats=stats)
        receiver._track = RemoteStreamTrack(kind="video")  # as setRemoteDescription does
        q: Any = receiver._RTCRtpReceiver__decoder_queue  # type: ignore[attr-defined]
        out: asyncio.Queue[Any] = receiver._track._queue
        encoder = av.CodecContext.create("libvpx", "w")
        encoder.width, encoder.height, encoder.pix_fmt = 64, 48, "yuv420p"
        encoder.time_base = fractions.Fraction(1, 15)
        frame = av.VideoFrame(64, 48, "yuv420p")
        frame.pts = 0
        key = b"".join(bytes(p) for p in encoder.encode(frame))
        assert set_receive_decoding(receiver, False)
        assert not stats.decoding
        q.put((VP8, JitterFrame(data=key, timestamp=0)))
        assert out.qsize() == 0
        assert stats.encoded_frames == 1
        assert set_receive_decoding(receiver, True)
        q.put((VP8, JitterFrame(data=key, timestamp=1)))
        assert out.qsize() == 1
    finally:
        await pc.close()


def test_hook_refuses_a_started_receiver() -> None:
    class Started:
        _RTCRtpReceiver__decoder_thread = object()

    with pytest.raises(LocalError):
        install_receive_hook(Started(), decryptor=None, stats=ReceiveStats(kind="video"))  # type: ignore[arg-type]


def test_ice_servers_are_never_left_to_aiortc_defaults() -> None:
    cfg = rtc_configuration([])
    assert cfg.iceServers == []
    turn = IceServerConfig(urls=("turn:127.0.0.1:3478",), username="u", credential="p")
    cfg = rtc_configuration([turn], relay_only=True)
    assert cfg.iceServers is not None
    assert cfg.iceServers[0].urls == ["turn:127.0.0.1:3478"]
    assert str(cfg.iceTransportPolicy.value) == "relay"


def test_vp8_keyframe_bit() -> None:
    assert vp8_is_keyframe(b"\x10\x02\x00")
    assert not vp8_is_keyframe(b"\x11\x02\x00")
    assert not vp8_is_keyframe(b"")


class _Gate:
    """Encrypts (trivially) only while ``open``; a broken call raises."""

    def __init__(self) -> None:
        self.open = True
        self.broken = False

    def encrypt(
        self, frame: bytes, *, kind: str, codec: str, keyframe: bool, ssrc: int, timestamp: int
    ) -> bytes | None:
        if self.broken:
            raise RuntimeError("transform bug")
        return frame if self.open else None

    def decryptor(self, participant: Any) -> Any:
        raise NotImplementedError


async def test_after_dropped_frames_peers_resume_at_a_keyframe() -> None:
    gate = _Gate()
    encoder = SharedEncoder(SyntheticVideoTrack(160, 120, 30), transform=gate)
    track = encoder.subscribe()
    got: list[av.Packet[Any]] = []
    reader = asyncio.create_task(_drain(track, got))
    encoder.start()
    await asyncio.sleep(0.2)
    gate.open = False  # e.g. no key yet
    await asyncio.sleep(0.2)
    gate.broken = True  # and a transform that raises must not end the track either
    await asyncio.sleep(0.1)
    dropped_at = len(got)
    gate.open, gate.broken = True, False
    await asyncio.sleep(0.3)
    await encoder.aclose()
    await reader
    assert encoder.encrypt_drops > 0
    assert len(got) > dropped_at + 3
    assert vp8_is_keyframe(bytes(got[dropped_at]))
    assert not vp8_is_keyframe(bytes(got[dropped_at + 1]))


async def test_frames_under_a_key_the_peer_was_not_sent_are_held_back() -> None:
    # Our sender encrypts with key 1; one peer has been sent only key 0 (a late joiner before
    # the send completes), another has key 1. The first gets nothing until it is sent key 1,
    # then resumes at a key frame that it can decrypt; the second is never held.
    rings = KeyRings()
    rings.install("me", 1, b"k" * 16)
    transform = CryptorTransform(rings.cryptor("me"), lambda peer: rings.cryptor("me"))
    encoder = SharedEncoder(SyntheticVideoTrack(160, 120, 30), transform=transform)
    sent_to_late: set[int] = {0}
    late, keyed = encoder.subscribe(), encoder.subscribe()
    late.admit = lambda index: index in sent_to_late
    keyed.admit = lambda index: index in {0, 1}
    got_late: list[av.Packet[Any]] = []
    got_keyed: list[av.Packet[Any]] = []
    readers = [
        asyncio.create_task(_drain(late, got_late)),
        asyncio.create_task(_drain(keyed, got_keyed)),
    ]
    encoder.start()
    await asyncio.sleep(0.4)
    assert got_late == []
    assert late.held > 0
    assert len(got_keyed) >= 5
    keyframes_before = encoder.keyframes
    sent_to_late.add(1)
    await asyncio.sleep(0.4)
    await encoder.aclose()
    await asyncio.gather(*readers)
    assert len(got_late) >= 5
    assert vp8_is_keyframe(bytes(got_late[0]))  # a key frame was asked for at once
    assert encoder.keyframes > keyframes_before
    rx = rings.cryptor("me")
    assert all(
        rx.decrypt(bytes(p), kind="video", codec="vp8", keyframe=None) is not None for p in got_late
    )


async def test_the_encoded_copy_restarts_at_a_key_frame_after_a_gap() -> None:
    """Handed-on VP8 starts at a key frame and, after a gap (a decrypt failure, a sequence
    gap the frame assembler gave up on), resumes only at the next one, asking for it by
    PLI; decoded frames are unaffected."""
    encoder = av.CodecContext.create("libvpx", "w")
    encoder.width, encoder.height, encoder.pix_fmt = 64, 48, "yuv420p"
    encoder.options = {"deadline": "realtime", "kf-max-dist": "1000"}
    encoded: list[bytes] = []
    for i in range(8):
        frame = av.VideoFrame(64, 48, "yuv420p")
        frame.pts = i
        if i == 5:
            frame.pict_type = av.video.frame.PictureType.I  # a key frame
        encoded += [bytes(p) for p in encoder.encode(frame)]
    keys = [vp8_is_keyframe(d) for d in encoded]
    assert keys[0]
    assert keys[5]
    assert not any(keys[1:5])
    pc = RTCPeerConnection(rtc_configuration([]))
    try:
        receiver = pc.addTransceiver("video").receiver
        stats = ReceiveStats(kind="video")
        copied: list[bytes] = []
        install_receive_hook(
            receiver, decryptor=_Flaky(), stats=stats, on_encoded=lambda f: copied.append(f.data)
        )
        q: Any = receiver._RTCRtpReceiver__decoder_queue  # type: ignore[attr-defined]
        q.set_decoding(False)
        error_flag = receiver._RTCRtpReceiver__decoder_error  # type: ignore[attr-defined]

        def put(data: bytes, ts: int) -> None:  # _Flaky decrypts by reversing
            q.put((VP8, JitterFrame(data=data[::-1], timestamp=ts)))

        put(encoded[0], 0)
        put(encoded[1], 1)
        assert copied == encoded[:2]
        q.put((VP8, JitterFrame(data=b"bad", timestamp=2)))  # fails to decrypt: a gap
        error_flag.clear()
        put(encoded[3], 3)  # a delta after the gap: not copied, a key frame asked for
        assert error_flag.is_set()
        put(encoded[4], 4)
        put(encoded[5], 5)  # the key frame: the copy resumes
        put(encoded[6], 6)
        assert copied == encoded[:2] + encoded[5:7]
        # Our frame assembler (in place of aiortc's jitter buffer) gives up on a lost
        # packet: a gap too.
        jitter = q.assembler
        assert isinstance(jitter, FrameAssembler)
        jitter.capacity = 3  # give up at once
        # aiortc calls it through its jitter-buffer slot, which routes VP8 to it.
        route = receiver._RTCRtpReceiver__jitter_buffer  # type: ignore[attr-defined]
        codecs = receiver._RTCRtpReceiver__codecs  # type: ignore[attr-defined]
        codecs[97] = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=97)

        def rtp(seq: int, ts: int, marker: int) -> RtpPacket:
            p = RtpPacket(payload_type=97, sequence_number=seq, timestamp=ts, marker=marker)
            p.payload = b"\x10" + encoded[7][::-1]
            p._data = encoded[7][::-1]  # type: ignore[attr-defined]
            return p

        assert route.add(rtp(1, 1, 0)) == (False, None)  # a frame still arriving
        route.add(rtp(3, 9, 0))  # seq 2 lost
        route.add(rtp(5, 12, 0))  # 3 held: the assembler skips the gap
        assert jitter.skips == 1
        put(encoded[7], 7)
        assert copied == encoded[:2] + encoded[5:7]
        assert q.copy_gate.gaps == 2  # the decrypt failure, the assembler's give-up
    finally:
        await pc.close()


async def test_a_peer_sending_another_codec_than_vp8_keeps_aiortcs_jitter_buffer() -> None:
    """The frame assembler reads VP8's payload descriptor: a peer that negotiated H264 is
    reassembled by aiortc's own buffer (frames by timestamp), not dropped as malformed VP8."""
    pc = RTCPeerConnection(rtc_configuration([]))
    try:
        receiver = pc.addTransceiver("video").receiver
        install_receive_hook(receiver, decryptor=None, stats=ReceiveStats(kind="video"))
        q: Any = receiver._RTCRtpReceiver__decoder_queue  # type: ignore[attr-defined]
        route = receiver._RTCRtpReceiver__jitter_buffer  # type: ignore[attr-defined]
        codecs = receiver._RTCRtpReceiver__codecs  # type: ignore[attr-defined]
        codecs[102] = RTCRtpCodecParameters(mimeType="video/H264", clockRate=90000, payloadType=102)
        frames = []
        for seq, ts in enumerate((10, 10, 20, 30)):
            p = RtpPacket(payload_type=102, sequence_number=seq, timestamp=ts)
            p.payload = p._data = b"\x05nal"  # type: ignore[attr-defined]
            frames.append(route.add(p)[1])
        # aiortc's buffer: a frame is out when the next timestamp begins.
        assert [f.timestamp if f else None for f in frames] == [None, None, 10, 20]
        assert q.assembler.frames == 0
    finally:
        await pc.close()


def test_a_new_bitrate_reopens_the_encoder_at_most_every_few_seconds() -> None:
    """Each reopen makes a key frame for every peer: swinging REMB reports under load must
    not turn into a key frame storm."""
    encoder = SharedEncoder(SyntheticVideoTrack(64, 48, 15))

    def frame() -> av.VideoFrame:
        f = av.VideoFrame(64, 48, "yuv420p")
        f.pts = 0
        return f

    keys = []
    for bitrate in (500_000, 300_000, 800_000, 200_000):
        keys += [k for *_, k in encoder._encode_video(frame(), False, bitrate)]
    assert encoder.reopens == 1
    assert keys == [True, False, False, False]
    encoder._opened_at -= REOPEN_MIN_INTERVAL_S  # time passes
    keys = [k for *_, k in encoder._encode_video(frame(), False, 200_000)]
    assert encoder.reopens == 2
    assert keys == [True]
