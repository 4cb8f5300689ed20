"""Synthetic video published as a looped VP8 clip, encoded once instead of every frame.

A LiveKit participant that publishes the synthetic pattern through an ``rtc.VideoSource``
has the SDK's Rust core encode every frame (libvpx VP8: ≈ 3.6 ms a 320×240 frame, ≈ 5.4 % of
a core at 15 fps, plus the I420 copy of each frame into the SDK). The pattern repeats every
``SyntheticVideoTrack.period`` frames, so one period encoded when publishing (≈ 0.3 s of CPU
in a worker thread) is a clip that loops without a seam. :class:`ClipPlayer` feeds it to an
``rtc.EncodedVideoSource`` published with ``ENCODER_BACKEND_PRE_ENCODED`` (livekit 1.2.1):
on the wire it is the same kind of stream, real VP8 at the pattern's size and rate, each
frame still encrypted by the sender's frame cryptor. What it does not do: adapt its bitrate
to the SFU's congestion feedback (the clip is encoded at ``BITRATE_BPS``). A key frame
asked for (a new subscriber, a PLI) is answered at once by jumping to the clip's next key
frame (the pattern skips ahead by at most ``KEY_INTERVAL`` frames).
"""

from __future__ import annotations

import fractions
from dataclasses import dataclass
from typing import Final

import av

from matrixrtc.media.sources import SyntheticVideoTrack

__all__ = ["BITRATE_BPS", "KEY_INTERVAL", "ClipPlayer", "EncodedClip", "encode_pattern_clip"]

# The SDK's own cap for a 320×240 camera track (its 4:3 presets give that size the 480×360
# preset's 225 kbit/s): the pre-encoded stream is no richer than the one the SDK would send.
BITRATE_BPS: Final = 225_000
KEY_INTERVAL: Final = 20  # frames between key frames in the clip


@dataclass(frozen=True, slots=True)
class EncodedClip:
    """Encoded frames in order: (VP8 frame, whether it is a key frame); the first is one."""

    width: int
    height: int
    fps: float
    frames: tuple[tuple[bytes, bool], ...]


def encode_pattern_clip(
    width: int, height: int, fps: float, *, key_interval: int = KEY_INTERVAL
) -> EncodedClip:
    """One period of the synthetic pattern, VP8-encoded (libvpx, real-time settings, no
    alt-ref or lagged frames: every packet is one shown frame). Blocking: call it in a
    thread."""
    pattern = SyntheticVideoTrack(width, height, fps)
    codec = av.CodecContext.create("libvpx", "w")
    assert isinstance(codec, av.VideoCodecContext)
    codec.width, codec.height, codec.pix_fmt = width, height, "yuv420p"
    codec.bit_rate = BITRATE_BPS
    codec.time_base = fractions.Fraction(1, round(fps))
    codec.options = {
        "deadline": "realtime",
        "lag-in-frames": "0",
        "auto-alt-ref": "0",
        "error-resilient": "1",
        "g": str(key_interval),
        "keyint_min": str(key_interval),
    }
    frames: list[tuple[bytes, bool]] = []
    for n in range(pattern.period):
        frame = pattern.frame_at(n)
        frame.pts, frame.time_base = n, codec.time_base
        frames.extend((bytes(p), bool(p.is_keyframe)) for p in codec.encode(frame))
    frames.extend((bytes(p), bool(p.is_keyframe)) for p in codec.encode(None))
    pattern.stop()
    if len(frames) != pattern.period or not frames[0][1]:
        raise ValueError(f"the encoder gave {len(frames)} frames for {pattern.period}")
    return EncodedClip(width, height, fps, tuple(frames))


class ClipPlayer:
    """The clip's frames in a loop; ``next(key_requested)`` jumps to a key frame first when
    one was asked for."""

    def __init__(self, clip: EncodedClip) -> None:
        self.clip = clip
        self.position = 0
        self.keys_answered = 0

    def next(self, key_requested: bool = False) -> tuple[bytes, bool]:
        frames = self.clip.frames
        if key_requested and not frames[self.position][1]:
            while not frames[self.position][1]:
                self.position = (self.position + 1) % len(frames)
            self.keys_answered += 1
        frame = frames[self.position]
        self.position = (self.position + 1) % len(frames)
        return frame
