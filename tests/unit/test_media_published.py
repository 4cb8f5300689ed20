"""PublishedTrack (what a Call publishes, fanned out per transport) and the av <-> LiveKit frame
copies the LiveKit transport uses for published tracks and decoded remote frames."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import av
import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from matrixrtc.livekit.frames import (
    AudioToRtc,
    JitterDelay,
    audio_to_av,
    video_to_av,
    video_to_rtc,
)
from matrixrtc.media.frames import SAMPLE_CLOCK
from matrixrtc.media.published import PublishedTrack


class Frames(MediaStreamTrack):
    """A video track that yields the frames put into it, then ends when told."""

    kind = "video"

    def __init__(self) -> None:
        super().__init__()
        self.queue: asyncio.Queue[av.VideoFrame | None] = asyncio.Queue()

    def put(self, width: int, n: int = 1) -> None:
        for _ in range(n):
            self.queue.put_nowait(av.VideoFrame(width, 16, "yuv420p"))

    def end(self) -> None:
        self.queue.put_nowait(None)

    async def recv(self) -> av.VideoFrame:
        frame = await self.queue.get()
        if frame is None:
            raise MediaStreamError
        return frame


async def until(pred: Callable[[], bool]) -> None:
    for _ in range(10_000):
        if pred():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


async def recv_video(track: MediaStreamTrack) -> av.VideoFrame:
    async with asyncio.timeout(2):
        frame = await track.recv()
    assert isinstance(frame, av.VideoFrame)
    return frame


async def test_every_subscriber_gets_every_frame_restamped() -> None:
    hub = PublishedTrack("video")
    a, b = hub.subscribe(), hub.subscribe()
    src = Frames()
    hub.set_source(src)
    src.put(32, 3)
    for sub in (a, b):
        pts = [(await recv_video(sub)).pts or 0 for _ in range(3)]
        assert pts == sorted(set(pts)), pts  # strictly increasing
    assert hub.frames == 3
    await hub.aclose()


async def test_a_new_source_replaces_the_old_and_time_keeps_running() -> None:
    hub = PublishedTrack("video")
    sub = hub.subscribe()
    first, second = Frames(), Frames()
    hub.set_source(first)
    first.put(32)
    before = await recv_video(sub)
    hub.set_source(second)
    first.put(32)  # no longer read
    second.put(64)
    after = await recv_video(sub)
    assert after.width == 64
    assert after.pts is not None
    assert before.pts is not None
    assert after.pts > before.pts
    await hub.aclose()


async def test_an_ended_source_stops_frames_but_not_the_subscribers() -> None:
    hub = PublishedTrack("video")
    sub = hub.subscribe()
    src, nxt = Frames(), Frames()
    hub.set_source(src)
    src.end()
    await until(lambda: hub.source is None)
    hub.set_source(nxt)
    nxt.put(48)
    assert (await recv_video(sub)).width == 48  # the subscriber outlived the ended source
    await hub.aclose()


async def test_a_slow_subscriber_loses_the_oldest_frames() -> None:
    hub = PublishedTrack("video", queue_frames=2)
    sub = hub.subscribe()
    src = Frames()
    hub.set_source(src)
    for w in (16, 32, 48, 64):
        src.put(w)
    await until(lambda: hub.frames == 4)
    assert [(await recv_video(sub)).width for _ in range(2)] == [48, 64]
    await hub.aclose()


async def test_stopping_a_subscriber_ends_its_recv_and_unsubscribes() -> None:
    hub = PublishedTrack("video")
    sub = hub.subscribe()
    pending = asyncio.ensure_future(sub.recv())
    await asyncio.sleep(0)
    sub.stop()
    with pytest.raises(MediaStreamError):
        await pending
    assert hub.subscribers == 0
    await hub.aclose()


async def test_kinds_are_checked() -> None:
    with pytest.raises(ValueError, match="audio or video"):
        PublishedTrack("data")
    hub = PublishedTrack("audio")
    with pytest.raises(ValueError, match="cannot be published as audio"):
        hub.set_source(Frames())


@pytest.mark.parametrize(("width", "height"), [(320, 240), (321, 241), (2, 2)])
def test_video_survives_av_to_livekit_and_back(width: int, height: int) -> None:
    rng = np.random.default_rng(7)
    frame = av.VideoFrame(width, height, "yuv420p")
    for plane in frame.planes:
        plane.update(rng.integers(0, 255, plane.buffer_size, dtype=np.uint8).tobytes())
    back = video_to_av(video_to_rtc(frame))
    assert (back.width, back.height) == (width, height)
    for p, q in zip(frame.planes, back.planes, strict=True):
        w = p.width
        a = np.frombuffer(memoryview(p), np.uint8).reshape(p.height, p.line_size)[:, :w]
        b = np.frombuffer(memoryview(q), np.uint8).reshape(q.height, q.line_size)[:, :w]
        assert np.array_equal(a, b)


def test_video_to_av_keeps_the_senders_timestamp() -> None:
    # The recorder places a frame by its sender's timing when it carries one (frame.time).
    frame = av.VideoFrame(64, 48, "yuv420p")
    stamped = video_to_av(video_to_rtc(frame), timestamp_us=12_345_678)
    assert stamped.time == pytest.approx(12.345678)
    assert video_to_av(video_to_rtc(frame), timestamp_us=0).time is None
    assert video_to_av(video_to_rtc(frame)).time is None


def test_rgb_video_is_converted_to_i420() -> None:
    frame = av.VideoFrame.from_ndarray(np.full((8, 8, 3), 200, np.uint8), format="rgb24")
    rtc_frame = video_to_rtc(frame)
    assert (rtc_frame.width, rtc_frame.height) == (8, 8)
    assert len(rtc_frame.data) == 8 * 8 * 3 // 2


def test_audio_is_resampled_to_48k_mono_and_comes_back_unchanged() -> None:
    pcm = (np.sin(np.arange(480) / 5) * 8000).astype(np.int16).reshape(1, -1)
    frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
    frame.sample_rate = 48_000
    frame.pts = 0
    out = AudioToRtc().convert(frame)
    assert sum(f.samples_per_channel for f in out) == 480
    back = audio_to_av(out[0])
    assert back.sample_rate == 48_000
    assert np.array_equal(back.to_ndarray()[0], pcm[0][: back.samples])


async def test_subscribers_say_whether_anything_is_published_and_announce_flips() -> None:
    hub = PublishedTrack("video")
    sub = hub.subscribe()
    heard: list[bool] = []
    sub.on_publishing_changed(lambda: heard.append(sub.publishing))  # type: ignore[attr-defined]
    assert sub.publishing is False  # type: ignore[attr-defined]
    src, other = Frames(), Frames()
    hub.set_source(src)
    hub.set_source(other)  # still publishing: no flip
    hub.set_source(None)
    assert heard == [True, False]
    hub.set_source(src)
    src.end()  # the source ending unpublishes it
    await until(lambda: heard == [True, False, True, False])
    await hub.aclose()


def test_audio_to_av_stamps_the_streams_sample_count() -> None:
    # LiveKit audio has no timestamp; its sample count is its clock (the recorder's timeline).
    pcm = np.zeros((1, 4800), np.int16)
    frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
    frame.sample_rate = 48_000
    (lk,) = AudioToRtc().convert(frame)
    assert audio_to_av(lk, 96_000).time == pytest.approx(2.0)
    assert audio_to_av(lk, 96_000).opaque is SAMPLE_CLOCK  # the receiver's count, not sender time
    assert audio_to_av(lk).time is None


def test_jitter_delay_is_the_mean_delay_between_two_reads() -> None:
    jitter = JitterDelay()
    jitter.update(10.0, 48_000)  # cumulative: 10 s of delay over 48 000 samples
    assert not jitter.known  # one read says nothing about now
    jitter.update(10.0 + 0.3 * 24_000, 72_000)  # the next 24 000 samples waited 300 ms each
    assert jitter.known
    assert jitter.delay_s == pytest.approx(0.3)
    jitter.update(10.0 + 0.3 * 24_000, 72_000)  # nothing emitted: unchanged
    assert jitter.delay_s == pytest.approx(0.3)


def test_audio_to_av_content_time_is_not_a_sample_clock() -> None:
    pcm = np.zeros((1, 4800), np.int16)
    frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
    frame.sample_rate = 48_000
    (lk,) = AudioToRtc().convert(frame)
    assert audio_to_av(lk, 96_000, content=True).opaque is None
