"""MediaFile: real files decoded by PyAV, paced in real time, looped, started later; bad
files rejected with a reason before anything else happens."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from matrixrtc.media.file_source import MediaFile, MediaFileError
from tests.media_samples import (
    dominant_frequency,
    luma,
    read_barcode,
    write_media_file,
    write_wav,
    write_y4m,
)


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("media") / "sample.webm"
    write_media_file(path, 1.0, fps=15, frequency=440.0)
    return path


async def drain(track: MediaStreamTrack, limit: int = 10_000) -> list[Any]:
    """Frames until the track ends (or ``limit``); typed loosely: tests know the kind."""
    frames: list[Any] = []
    try:
        while len(frames) < limit:
            frame = await track.recv()
            assert isinstance(frame, av.AudioFrame | av.VideoFrame)
            frames.append(frame)
    except MediaStreamError:
        pass
    return frames


async def test_plays_in_real_time_audio_and_video_together(sample: Path) -> None:
    media = MediaFile(sample)
    assert media.audio is not None
    assert media.video is not None
    assert "vp8" in media.info.describe()
    assert "opus" in media.info.describe()
    start = time.monotonic()
    audio, video = await asyncio.gather(drain(media.audio), drain(media.video))
    elapsed = time.monotonic() - start
    assert 0.85 <= elapsed <= 1.6  # one second of media, paced
    assert [read_barcode(luma(f)) for f in video] == list(range(15))
    assert all(isinstance(f, av.VideoFrame) and f.format.name == "yuv420p" for f in video)
    # 90 kHz media time (WebM stores milliseconds)
    assert all(abs(f.pts - n * 6000) <= 90 for n, f in enumerate(video))
    assert all(f.sample_rate == 48_000 and f.samples == 960 for f in audio[:-1])
    assert audio[1].pts == 960
    assert audio[-1].pts == 960 * (len(audio) - 1)
    assert 49 <= len(audio) <= 51
    pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in audio])
    assert abs(dominant_frequency(pcm) - 440) < 5
    assert media.stats.frames == {"audio": len(audio), "video": 15}
    assert media.stats.late == {"audio": 0, "video": 0}
    assert media.stats.bitrate_kbps > 0
    media.close()


async def test_start_skips_into_the_file(sample: Path) -> None:
    media = MediaFile(sample, start=0.6)
    assert media.video is not None
    video = await drain(media.video)
    numbers = [read_barcode(luma(f)) for f in video]
    assert numbers[0] in (8, 9, 10)
    assert numbers[-1] == 14
    assert video[0].pts == 0 or video[0].pts < 9000  # media time starts near 0
    media.close()


async def test_loop_continues_media_time(sample: Path) -> None:
    media = MediaFile(sample, loop=True)
    assert media.video is not None
    assert media.audio is not None
    video, audio = await asyncio.gather(drain(media.video, 33), drain(media.audio, 110))
    numbers = [read_barcode(luma(f)) for f in video]
    assert numbers == [*range(15), *range(15), 0, 1, 2]
    pts = [f.pts for f in video]
    assert pts == sorted(pts)
    assert len(set(pts)) == len(pts)
    assert pts[15] >= 15 * 6000 - 1  # the second pass starts after the first one's end
    audio_pts = [f.pts for f in audio]
    assert audio_pts == sorted(audio_pts)
    assert media.stats.loops >= 2
    media.close()
    assert await drain(media.video) == []  # ended


async def test_audio_only_and_video_only(tmp_path: Path) -> None:
    write_wav(tmp_path / "tone.wav", 0.3, 1000.0, rate=44_100)
    write_y4m(tmp_path / "video.y4m", 3, fps=15)
    wav = MediaFile(tmp_path / "tone.wav")
    assert wav.video is None
    assert wav.audio is not None
    assert wav.tracks == (wav.audio,)
    frames = await drain(wav.audio)
    assert all(f.sample_rate == 48_000 for f in frames)  # resampled from 44.1 kHz
    pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in frames])
    assert abs(dominant_frequency(pcm) - 1000) < 10
    y4m = MediaFile(tmp_path / "video.y4m")
    assert y4m.audio is None
    assert y4m.video is not None
    assert [read_barcode(luma(f)) for f in await drain(y4m.video)] == [0, 1, 2]


def test_bad_files_are_rejected_before_playing(tmp_path: Path, sample: Path) -> None:
    with pytest.raises(MediaFileError, match="no such file"):
        MediaFile(tmp_path / "missing.mp4")
    with pytest.raises(MediaFileError, match="is a directory"):
        MediaFile(tmp_path)
    (tmp_path / "notes.txt").write_text("not a video at all\n" * 50)
    with pytest.raises(MediaFileError, match="not a media file"):
        MediaFile(tmp_path / "notes.txt")
    (tmp_path / "noise.bin").write_bytes(bytes(range(256)) * 64)
    with pytest.raises(MediaFileError, match="not a media file"):
        MediaFile(tmp_path / "noise.bin")
    with pytest.raises(MediaFileError, match="past its end"):
        MediaFile(sample, start=5.0)
    with pytest.raises(MediaFileError, match="≥ 0"):
        MediaFile(sample, start=-1)
    # A file cut after its header: it opens but yields no frame.
    data = sample.read_bytes()
    (tmp_path / "cut.webm").write_bytes(data[:300])
    with pytest.raises(MediaFileError):
        MediaFile(tmp_path / "cut.webm")


def test_a_file_without_audio_or_video_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "subs.vtt"
    path.write_text("WEBVTT\n\n00:00.000 --> 00:01.000\nhello\n")
    with pytest.raises(MediaFileError, match="no audio or video"):
        MediaFile(path)
