"""Synthetic sources and counting sinks used by the mesh engine."""

from __future__ import annotations

import asyncio
import time

import av
import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from matrixrtc.media.sinks import CountingSink, ReceiveStats
from matrixrtc.media.sources import SyntheticVideoTrack, ToneAudioTrack


async def test_video_source_defaults_pacing_and_motion() -> None:
    track = SyntheticVideoTrack()
    assert (track.width, track.height, track.fps) == (320, 240, 15)
    fast = SyntheticVideoTrack(64, 48, 50)
    start = time.monotonic()
    frames = [await fast.recv() for _ in range(6)]
    elapsed = time.monotonic() - start
    assert 0.08 <= elapsed < 0.5  # 5 intervals of 20 ms, paced
    assert [f.pts for f in frames] == [i * 1800 for i in range(6)]
    assert (frames[0].width, frames[0].height, frames[0].format.name) == (64, 48, "yuv420p")
    a, b = frames[0].to_ndarray(), frames[1].to_ndarray()
    assert not np.array_equal(a, b)  # it moves


def test_video_source_rejects_bad_geometry() -> None:
    with pytest.raises(ValueError, match="even"):
        SyntheticVideoTrack(321, 240)
    with pytest.raises(ValueError, match="fps"):
        SyntheticVideoTrack(320, 240, 0)


async def test_tone_is_20ms_48k_mono_s16() -> None:
    tone = ToneAudioTrack()
    f1, f2 = await tone.recv(), await tone.recv()
    assert isinstance(f1, av.AudioFrame)
    assert (f1.samples, f1.sample_rate, f1.format.name, f1.layout.name) == (
        960,
        48000,
        "s16",
        "mono",
    )
    assert f2.pts == 960
    assert np.abs(f1.to_ndarray()).max() > 1000  # not silence


@pytest.mark.parametrize("hz", [440.0, 441.5])
def test_tone_frames_are_the_sine_from_a_cache_or_not(hz: float) -> None:
    """Each frame holds the sine at its own samples; a whole number of hertz repeats every
    second, so those frames come from a cache (the same array), others are computed."""
    tone = ToneAudioTrack(hz)

    def expected(n: int) -> np.ndarray:
        s = np.arange(n * 960, (n + 1) * 960)
        return (np.sin(s / 48000 * 2 * np.pi * hz) * 0.25 * 32767).astype(np.int16)

    for n in (0, 1, 7, 49, 50, 51, 107):
        got = tone._pcm(n).reshape(-1)
        assert np.abs(got.astype(int) - expected(n)).max() <= 1, n
    assert (tone._pcm(1) is tone._pcm(51)) is hz.is_integer()


def test_receive_stats_fps_and_first_frame() -> None:
    stats = ReceiveStats(kind="video", started_at=100.0)
    assert stats.first_frame_delay is None
    for i in range(30):
        stats.frame_decoded(100.5 + i / 15)
    assert stats.frames_decoded == 30
    assert stats.first_frame_delay == pytest.approx(0.5)
    assert stats.fps(now=100.5 + 29 / 15) == pytest.approx(15.0, abs=0.5)
    assert stats.fps(now=200.0) == 0.0


class _Finite(MediaStreamTrack):
    kind = "video"

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    async def recv(self) -> av.VideoFrame:
        if self.n == 0:
            raise MediaStreamError
        self.n -= 1
        await asyncio.sleep(0)
        return av.VideoFrame(16, 16, "yuv420p")


async def test_sink_drains_until_the_track_ends() -> None:
    sink = CountingSink(_Finite(7))
    sink.start()
    await asyncio.sleep(0.05)
    assert sink.stats.frames_decoded == 7
    assert sink.stats.first_frame_at is not None
    await sink.aclose()
