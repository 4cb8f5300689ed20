"""The looped VP8 clip a pre-encoded LiveKit publisher sends: one period of the pattern, one
shown frame per packet, starting at a key frame; a key frame asked for is the next thing sent."""

from __future__ import annotations

import av
import av.packet

from matrixrtc.livekit.preencoded import KEY_INTERVAL, ClipPlayer, encode_pattern_clip
from matrixrtc.media.sources import SyntheticVideoTrack


def test_clip_is_one_decodable_period_of_the_pattern() -> None:
    clip = encode_pattern_clip(320, 240, 15.0)
    assert len(clip.frames) == SyntheticVideoTrack(320, 240, 15.0).period == 80
    keys = [i for i, (_, key) in enumerate(clip.frames) if key]
    assert keys == list(range(0, 80, KEY_INTERVAL))
    kbps = sum(len(d) for d, _ in clip.frames) * 8 / (80 / 15) / 1000
    assert 150 < kbps < 800
    decoder = av.CodecContext.create("libvpx", "r")
    sizes = [
        (f.width, f.height) for d, _ in clip.frames for f in decoder.decode(av.packet.Packet(d))
    ]
    assert sizes == [(320, 240)] * 80


def test_player_loops_and_answers_a_key_request_at_once() -> None:
    clip = encode_pattern_clip(160, 120, 15.0, key_interval=10)
    player = ClipPlayer(clip)
    sent = [player.next() for _ in range(len(clip.frames) + 3)]
    assert [d for d, _ in sent] == [d for d, _ in clip.frames + clip.frames[:3]]
    assert player.position == 3
    data, key = player.next(key_requested=True)
    assert key
    assert data == clip.frames[10][0]
    assert player.keys_answered == 1
    assert player.next(key_requested=True) == clip.frames[20]  # mid-clip: jumps again
    assert player.keys_answered == 2
    assert player.position == 21
