"""Known media for the media tests: numbered video frames, tones, and ways to check them.

Every video frame carries its number in a 12-bit barcode (black/white blocks across the top
16 rows) over a smooth moving picture, so a recording can be aligned frame by frame with its
source after any codec, and PSNR compares the right frames. Audio is a pure tone whose
frequency an FFT recovers.
"""

from __future__ import annotations

import fractions
import math
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import av
import numpy as np

BITS = 12
BAR_ROWS = 16


def picture(n: int, width: int = 320, height: int = 240) -> np.ndarray:
    """Frame ``n`` (< 2048) as a (height * 3 / 2, width) yuv420p array."""
    ys, xs = np.mgrid[0:height, 0:width]
    y = (64 + 64 * np.sin((xs + 3 * n) / 23.0) + 48 * np.cos((ys - 2 * n) / 17.0)).astype(np.uint8)
    # A bright square moving across: real motion for the encoder.
    cx = (n * 5) % max(1, width - 40)
    y[BAR_ROWS + 20 : BAR_ROWS + 60, cx : cx + 40] = 220
    block = width // BITS
    for bit in range(BITS):  # the last block is always white: black frames read as nothing
        on = bit == BITS - 1 or (n >> bit) & 1
        y[:BAR_ROWS, bit * block : (bit + 1) * block] = 235 if on else 16
    u = np.full((height // 2, width // 2), 128, np.uint8)
    u[:, :] = (128 + 40 * np.sin(np.arange(width // 2) / 19.0 + n / 10)).astype(np.uint8)
    v = np.full((height // 2, width // 2), 110, np.uint8)
    return np.concatenate((y, u.reshape(height // 4, width), v.reshape(height // 4, width)), axis=0)


def video_frame(n: int, width: int = 320, height: int = 240) -> av.VideoFrame:
    return av.VideoFrame.from_ndarray(picture(n, width, height), format="yuv420p")


def luma(frame: av.VideoFrame) -> np.ndarray:
    return frame.to_ndarray(format="gray")


def read_barcode(y: np.ndarray) -> int | None:
    """The frame number in a luma plane, or None when the barcode is unreadable."""
    width = y.shape[1]
    block = width // BITS
    n = 0
    for bit in range(BITS):
        cell = y[2 : BAR_ROWS - 2, bit * block + 3 : (bit + 1) * block - 3]
        mean = float(cell.mean())
        if 60 < mean < 190:
            return None
        if mean >= 190:
            n |= 1 << bit
    if not n >> (BITS - 1):
        return None  # no marker: not one of our frames (black, or another picture)
    return n & ((1 << (BITS - 1)) - 1)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two luma planes of the same shape (barcode rows excluded)."""
    a = a[BAR_ROWS:].astype(np.float64)
    b = b[BAR_ROWS:].astype(np.float64)
    mse = float(np.mean((a - b) ** 2))
    return 99.0 if mse == 0 else 10 * math.log10(255.0**2 / mse)


BEEP_S = 0.25  # with beeps=True the tone sounds for the first quarter of every second


def tone(
    seconds: float, frequency: float = 440.0, rate: int = 48_000, *, beeps: bool = False
) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    pcm = np.sin(2 * math.pi * frequency * t) * 0.3 * 32767
    if beeps:  # A/V sync marks: a beep starts exactly when frame k * fps is shown
        pcm[(t % 1.0) >= BEEP_S] = 0
    return pcm.astype(np.int16)


def beep_onsets(samples: np.ndarray, rate: int = 48_000) -> list[float]:
    """Times (s from the first sample) where a beep starts after at least 0.3 s of quiet."""
    win = rate // 200  # 5 ms
    n = len(samples) // win
    env = np.abs(samples[: n * win].astype(np.float64)).reshape(n, win).max(axis=1)
    loud = env > 0.1 * 32767 * 0.3
    onsets = []
    quiet = 0
    for i, is_loud in enumerate(loud):
        if is_loud and quiet >= 60:
            onsets.append(i * win / rate)
        quiet = 0 if is_loud else quiet + 1
    return onsets


def beep_lengths(samples: np.ndarray, rate: int = 48_000) -> list[float]:
    """How long each beep (as :func:`beep_onsets` finds them) stays loud, in s (5 ms steps):
    0.25 s each for our tone, unless something cut it short (an echo canceller, a lost
    frame) or stretched it."""
    win = rate // 200
    n = len(samples) // win
    env = np.abs(samples[: n * win].astype(np.float64)).reshape(n, win).max(axis=1)
    loud = env > 0.1 * 32767 * 0.3
    lengths = []
    quiet = 0
    for i, is_loud in enumerate(loud):
        if is_loud and quiet >= 60:
            end = i
            while end < n and loud[end]:
                end += 1
            lengths.append((end - i) * win / rate)
        quiet = 0 if is_loud else quiet + 1
    return lengths


def av_skew(video: list[tuple[float, int]], onsets: list[float], fps: int) -> tuple[float, float]:
    """(skew, spread) in seconds: how much later audio plays than the video it belongs to.

    ``video`` holds (time in the recording, source frame number); ``onsets`` the beep times in
    the recording. Each is mapped to its source time; the median offsets are compared."""
    v_off = np.array([t - n / fps for t, n in video])
    # A beep belongs to the source second nearest to (onset - video offset).
    base = float(np.median(v_off))
    a_off = np.array([t - round(t - base) for t in onsets])
    return float(np.median(a_off) - base), float(np.percentile(np.abs(v_off - base), 90))


def dominant_frequency(samples: np.ndarray, rate: int = 48_000) -> float:
    samples = samples.astype(np.float64)
    samples -= samples.mean()
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[int(np.argmax(spectrum))])


def write_wav(
    path: Path,
    seconds: float,
    frequency: float = 440.0,
    rate: int = 48_000,
    *,
    beeps: bool = False,
) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(tone(seconds, frequency, rate, beeps=beeps).tobytes())


def write_y4m(path: Path, frames: int, fps: int = 15, width: int = 320, height: int = 240) -> None:
    with path.open("wb") as f:
        f.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for n in range(frames):
            f.write(b"FRAME\n")
            f.write(picture(n, width, height).tobytes())


def write_media_file(
    path: Path,
    seconds: float,
    *,
    fps: int = 15,
    width: int = 320,
    height: int = 240,
    frequency: float | None = 440.0,
    video: str | None = "libvpx",
    audio: str = "libopus",
    audio_rate: int = 48_000,
    beeps: bool = False,
) -> None:
    """A file with numbered frames (``video`` codec) and a tone (``audio`` codec)."""
    with av.open(str(path), "w") as out:
        vs = None
        if video is not None:
            options = (
                {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
                if "vpx" in video
                else {}
            )
            if video == "libx264":
                options = {"preset": "ultrafast", "tune": "zerolatency"}
            vs = cast(av.video.stream.VideoStream, out.add_stream(video, rate=fps, options=options))
            vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
            vs.bit_rate = 1_500_000
        as_ = None
        if frequency is not None:
            as_ = cast(av.audio.stream.AudioStream, out.add_stream(audio, rate=audio_rate))
            as_.layout = "mono"
        if vs is not None:
            for n in range(round(seconds * fps)):
                frame = video_frame(n, width, height)
                frame.pts = n
                frame.time_base = fractions.Fraction(1, fps)
                for p in vs.encode(frame):
                    out.mux(p)
            for p in vs.encode(None):
                out.mux(p)
        if as_ is not None and frequency is not None:
            pcm = tone(seconds, frequency, audio_rate, beeps=beeps)
            step = 960
            for i in range(0, len(pcm) - step + 1, step):
                af = av.AudioFrame.from_ndarray(
                    pcm[i : i + step].reshape(1, -1), format="s16", layout="mono"
                )
                af.sample_rate = audio_rate
                af.pts = i
                af.time_base = fractions.Fraction(1, audio_rate)
                for p in as_.encode(af):
                    out.mux(p)
            for p in as_.encode(None):
                out.mux(p)


def decode(path: Path) -> Iterator[av.VideoFrame | av.AudioFrame]:
    with av.open(str(path)) as container:
        for frame in container.decode(*container.streams.video, *container.streams.audio):
            if isinstance(frame, av.VideoFrame | av.AudioFrame):
                yield frame


def read_media(path: Path) -> tuple[list[tuple[float, np.ndarray]], np.ndarray, int]:
    """(video frames as (time, luma)), mono audio samples at 48 kHz, audio start in samples."""
    video: list[tuple[float, np.ndarray]] = []
    chunks: list[np.ndarray] = []
    first_audio: int | None = None
    resampler = av.AudioResampler(format="s16", layout="mono", rate=48_000)
    for frame in decode(path):
        if isinstance(frame, av.VideoFrame):
            video.append((float(frame.time or 0.0), luma(frame)))
        else:
            if first_audio is None:
                first_audio = round((frame.time or 0.0) * 48_000)
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
    audio = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    return video, audio, first_audio or 0


def audio_span(path: Path) -> tuple[float, float]:
    """(first audio frame's time, last audio frame's end) in a file, in seconds."""
    start: float | None = None
    end = 0.0
    with av.open(str(path)) as container:
        for frame in container.decode(*container.streams.audio):
            t = float(frame.time or 0.0)
            start = t if start is None else start
            end = max(end, t + frame.samples / frame.sample_rate)
    return (start or 0.0, end)


def unwrap(numbers: list[int], period: int | None) -> list[int]:
    """Frame numbers of a looping source made monotonic (each wrap adds ``period``)."""
    if period is None:
        return numbers
    out: list[int] = []
    base = 0
    for n in numbers:
        if out and n + base < out[-1] - period // 2:
            base += period
        out.append(n + base)
    return out


def analyse(path: Path, fps: int, period: int | None = None) -> dict[str, Any]:
    """Figures of a recording of our numbered, beeping media (the caller asserts on them):
    numbers (frame numbers in file order), psnr (median dB over numbered frames, against the
    source frame of that number), frequency, video_span (fitted) and video_span_ends (first to
    last numbered frame) against source_span (s), beeps_span (s
    between the first and last beep onset), beep_lengths (s), skew (s, audio later than its
    video), frames, coverage (share of the source frames from the first numbered one to the
    last that the recording holds)."""
    video, audio, _ = read_media(path)
    raw = [(t, n, y) for t, y in video if (n := read_barcode(y)) is not None]
    if not raw:
        return {"numbers": [], "frames": len(video)}
    h, w = raw[0][2].shape
    scores = sorted(psnr(y, luma(video_frame(n, w, h))) for _, n, y in raw)
    numbers = unwrap([n for _, n, _ in raw], period)
    numbered = [(t, n, y) for (t, _, y), n in zip(raw, numbers, strict=True)]
    a_start, _ = audio_span(path)
    onsets = [a_start + t for t in beep_onsets(audio)]
    skew = av_skew([(t, n) for t, n, _ in numbered], onsets, fps)[0] if onsets else None
    return {
        "numbers": numbers,
        "frames": len(video),
        "size": (w, h),
        "psnr": scores[len(scores) // 2],
        "psnr_p10": scores[len(scores) // 10],
        "frequency": dominant_frequency(audio) if len(audio) else None,
        "source_span": (numbers[-1] - numbers[0] + 1) / fps,
        # The source's frames as the recording times them: a least-squares line through
        # (frame number, time), so one frame misplaced at either end (a receiver's first
        # frame, decoded late) does not count as the whole stream's pace; a recording that
        # runs fast or slow, or jumps mid-stream, moves it all the same.
        "video_span": float(
            np.polyfit([n for _, n, _ in numbered], [t for t, _, _ in numbered], 1)[0]
        )
        * (numbers[-1] - numbers[0] + 1),
        "video_span_ends": numbered[-1][0] - numbered[0][0] + 1 / fps,
        "coverage": len(set(numbers)) / (numbers[-1] - numbers[0] + 1),
        "onsets": onsets,
        "beep_lengths": beep_lengths(audio),
        "beeps_span": onsets[-1] - onsets[0] if len(onsets) > 1 else None,
        "skew": skew,
    }
