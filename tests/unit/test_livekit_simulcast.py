"""Simulcast, sans I/O (matrixrtc.livekit.simulcast and its signalling): the layer plan, the
offer rewritten for RID layers, AddTrackRequest layers, UpdateTrackSettings and dynacast's
SubscribedQualityUpdate; and the pieces around the encoders (ScaledFeed, a layer that is not
wanted)."""

from __future__ import annotations

import asyncio
import fractions
import itertools
import re

import av
import pytest
from aiortc import RTCPeerConnection
from aiortc.mediastreams import MediaStreamError
from aiortc.sdp import SessionDescription
from hypothesis import given
from hypothesis import strategies as st
from livekit.protocol import models as lk_models
from livekit.protocol import rtc as lk_rtc

from matrixrtc.livekit import signal
from matrixrtc.livekit.simulcast import (
    RID_EXTENSION_URI,
    SimulcastLayer,
    layers_for,
    simulcast_offer,
)
from matrixrtc.media.sources import ScaledFeed, SyntheticVideoTrack, ToneAudioTrack
from matrixrtc.mesh.fanout import SharedEncoder


async def _aiortc_offer() -> str:
    pc = RTCPeerConnection()
    try:
        pc.addTrack(ToneAudioTrack())
        pc.addTrack(SyntheticVideoTrack(320, 240, 15.0))
        return str((await pc.createOffer()).sdp)
    finally:
        await pc.close()


def _sections(sdp: str) -> list[list[str]]:
    lines = sdp.removesuffix("\r\n").split("\r\n")
    starts = [i for i, line in enumerate(lines) if line.startswith("m=")] + [len(lines)]
    return [lines[a:b] for a, b in itertools.pairwise(starts)]


def test_layers_halve_each_side_and_keep_even_sizes() -> None:
    low, full = layers_for(320, 240, 500_000)
    assert full == SimulcastLayer("h", "medium", 320, 240, 500_000)
    assert (low.rid, low.quality, low.width, low.height) == ("q", "low", 160, 120)
    assert 0 < low.bitrate < full.bitrate
    odd_low, _ = layers_for(326, 182, 500_000)
    assert (odd_low.width, odd_low.height) == (162, 90)  # 163 and 91 are odd: VP8 wants even
    # too small to halve: one layer
    assert layers_for(30, 30, 100_000) == (SimulcastLayer("h", "medium", 30, 30, 100_000),)


async def test_offer_announces_rid_layers_on_the_video_section_only() -> None:
    offer = await _aiortc_offer()
    audio_before, video_before = _sections(offer)
    mid = next(line[6:] for line in video_before if line.startswith("a=mid:"))
    out, ext_id = simulcast_offer(offer, mid, ("q", "h"))
    assert out.endswith("\r\n")
    assert "\n" not in out.replace("\r\n", "")
    audio, video = _sections(out)
    assert audio == audio_before  # untouched
    assert f"a=extmap:{ext_id} {RID_EXTENSION_URI}" in video
    # Unused in *every* section: the sections share one transport, and pion reads each
    # packet's extensions with one map (audio's ssrc-audio-level has id 2 in aiortc's offer).
    in_use = {int(x.split()[0][9:]) for x in offer.split("\r\n") if x.startswith("a=extmap")}
    assert 2 in {int(x.split()[0][9:]) for x in audio_before if x.startswith("a=extmap")}
    assert ext_id not in in_use
    assert video[-3:] == ["a=rid:q send", "a=rid:h send", "a=simulcast:send q;h"]
    # no SSRC of aiortc's (pion learns each layer's SSRC from its RID) and no RTX
    assert not [x for x in video if x.startswith(("a=ssrc:", "a=ssrc-group:"))]
    rtx = {x.split()[0][9:] for x in video_before if x.startswith("a=rtpmap:") and " rtx/" in x}
    assert rtx
    assert not [x for x in video if any(x.startswith(f"a={a}:{pt} ") for pt in rtx
                                        for a in ("rtpmap", "fmtp", "rtcp-fb"))]  # fmt: skip
    assert not set(video[0].split()[3:]) & rtx
    assert "97" in video[0].split()[3:]  # VP8 stays
    # still an SDP aiortc (and so a strict parser) reads
    parsed = SessionDescription.parse(out)
    assert [m.kind for m in parsed.media] == ["audio", "video"]
    assert "rtx" not in {c.name for c in parsed.media[1].rtp.codecs}


async def test_offer_without_that_mid_or_rids_is_refused() -> None:
    offer = await _aiortc_offer()
    with pytest.raises(ValueError, match="no m-section"):
        simulcast_offer(offer, "nope", ("q", "h"))
    with pytest.raises(ValueError, match="at least one rid"):
        simulcast_offer(offer, "1", ())


@given(st.text(max_size=400), st.sampled_from(["0", "1", "x"]))
def test_any_text_is_rewritten_or_refused_cleanly(sdp: str, mid: str) -> None:
    try:
        out, ext_id = simulcast_offer(sdp, mid, ("q", "h"))
    except ValueError:
        return
    assert 1 <= ext_id <= 14
    assert not re.search(rf"^a=extmap:{ext_id}\D", sdp, re.M)  # never an id the offer uses
    assert "a=simulcast:send q;h" in out


def test_add_track_carries_the_layers_and_settings_ask_a_quality() -> None:
    low, full = layers_for(320, 240, 500_000)
    request = lk_rtc.SignalRequest()
    request.ParseFromString(
        signal.encode_add_track(cid="c", name="video", kind="video", layers=(low, full))
    )
    got = [(x.quality, x.width, x.height, x.bitrate, x.rid) for x in request.add_track.layers]
    assert got == [
        (lk_models.VideoQuality.LOW, 160, 120, low.bitrate, "q"),
        (lk_models.VideoQuality.MEDIUM, 320, 240, 500_000, "h"),
    ]
    request.ParseFromString(signal.encode_add_track(cid="a", name="audio", kind="audio"))
    assert not request.add_track.layers
    request.ParseFromString(signal.encode_track_settings(["TR_1", "TR_2"], "high"))
    assert list(request.track_setting.track_sids) == ["TR_1", "TR_2"]
    assert request.track_setting.quality == lk_models.VideoQuality.HIGH
    assert not request.track_setting.disabled


def test_dynacast_update_decodes_to_the_wanted_qualities() -> None:
    q = lk_rtc.SubscribedQuality
    flat = lk_rtc.SignalResponse(
        subscribed_quality_update=lk_rtc.SubscribedQualityUpdate(
            track_sid="TR_v",
            subscribed_qualities=[
                q(quality=lk_models.VideoQuality.LOW, enabled=True),
                q(quality=lk_models.VideoQuality.MEDIUM, enabled=False),
            ],
        )
    )
    assert signal.decode(flat.SerializeToString()) == signal.QualitiesWanted(
        track_sid="TR_v", enabled=frozenset({"low"})
    )
    per_codec = lk_rtc.SignalResponse(
        subscribed_quality_update=lk_rtc.SubscribedQualityUpdate(
            track_sid="TR_v",
            subscribed_codecs=[
                lk_rtc.SubscribedCodec(
                    codec="vp8",
                    qualities=[
                        q(quality=lk_models.VideoQuality.LOW, enabled=True),
                        q(quality=lk_models.VideoQuality.MEDIUM, enabled=True),
                        q(quality=lk_models.VideoQuality.HIGH, enabled=False),
                    ],
                )
            ],
        )
    )
    event = signal.decode(per_codec.SerializeToString())
    assert isinstance(event, signal.QualitiesWanted)
    assert event.enabled == {"low", "medium"}
    nobody = lk_rtc.SignalResponse(
        subscribed_quality_update=lk_rtc.SubscribedQualityUpdate(track_sid="TR_v")
    )
    assert signal.decode(nobody.SerializeToString()) == signal.QualitiesWanted(
        track_sid="TR_v", enabled=frozenset()
    )


def _frame(pts: int, width: int = 320, height: int = 240) -> av.VideoFrame:
    frame = av.VideoFrame(width, height, "yuv420p")
    frame.pts = pts
    frame.time_base = fractions.Fraction(1, 90_000)
    return frame


async def test_scaled_feed_scales_keeps_the_newest_and_ends() -> None:
    feed = ScaledFeed(160, 120, maxsize=2)
    for pts in (0, 6000, 12000):
        feed.feed(_frame(pts))
    feed.feed(av.AudioFrame(format="s16", layout="mono", samples=960))  # not video: ignored
    assert feed.dropped == 1  # the oldest went
    first = await feed.recv()
    assert (first.width, first.height, first.pts) == (160, 120, 6000)
    assert first.time_base == fractions.Fraction(1, 90_000)
    assert (await feed.recv()).pts == 12000
    feed.stop()
    with pytest.raises(MediaStreamError):
        await feed.recv()
    feed.feed(_frame(18000))  # after stop: nothing queues


class _Frames(SyntheticVideoTrack):
    """A source yielding frames as fast as they are read (no pacing)."""

    def __init__(self) -> None:
        super().__init__(64, 48, 15.0)
        self.n = 0

    async def recv(self) -> av.VideoFrame:
        await asyncio.sleep(0)
        self.n += 1
        return _frame(self.n * 6000, 64, 48)


async def test_unwanted_layer_skips_frames_tees_them_and_resumes_at_a_key_frame() -> None:
    teed: list[int] = []
    encoder = SharedEncoder(_Frames())
    encoder.tee = lambda frame: teed.append(int(frame.pts or 0))
    track = encoder.subscribe()
    encoder.start()
    try:
        await asyncio.wait_for(track.recv(), 5)
        assert encoder.keyframes == 1  # the first frame
        encoder.set_wanted(False)
        assert not encoder.wanted
        while not track._queue.empty():
            track._queue.get_nowait()
        encoded, tee_seen = encoder.frames_encoded, len(teed)
        for _ in range(20):
            await asyncio.sleep(0)
        assert encoder.frames_encoded == encoded  # nothing encoded while unwanted ...
        assert len(teed) > tee_seen  # ... but every frame still reached the lower layers
        assert track._queue.empty()
        encoder.set_wanted(True)
        await asyncio.wait_for(track.recv(), 5)
        assert encoder.keyframes == 2  # resumed at a key frame: receivers that missed frames decode
    finally:
        await encoder.aclose()


def test_adaptive_stream_is_asked_in_the_join_url_only_when_wanted() -> None:
    from urllib.parse import parse_qs, urlsplit

    with_it = parse_qs(urlsplit(signal.rtc_url("ws://h", "t", adaptive_stream=True)).query)
    assert with_it["adaptive_stream"] == ["1"]
    assert "adaptive_stream" not in parse_qs(urlsplit(signal.rtc_url("ws://h", "t")).query)
