"""The SDK-encoded camera track's publish options follow MediaOptions' encoder settings: a
bitrate cap and frame-rate preference when asked for, the SDK's own defaults otherwise."""

from __future__ import annotations

from livekit import rtc

from matrixrtc.livekit.connection import MediaOptions, _encoded_by_sdk


def test_a_bitrate_cap_and_keep_framerate_reach_the_publish_options() -> None:
    opts = _encoded_by_sdk(
        MediaOptions(fps=15.0, max_video_kbps=600, keep_framerate=True), simulcast=False
    )
    assert opts.HasField("video_encoding")
    assert opts.video_encoding.max_bitrate == 600_000
    assert opts.video_encoding.max_framerate == 15.0
    assert opts.degradation_preference == rtc.DegradationPreference.MAINTAIN_FRAMERATE.value
    assert opts.video_codec == rtc.VideoCodec.VP8
    assert opts.source == rtc.TrackSource.SOURCE_CAMERA
    assert not opts.simulcast


def test_without_settings_the_sdk_chooses_bitrate_and_degradation() -> None:
    opts = _encoded_by_sdk(MediaOptions(), simulcast=True)
    assert not opts.HasField("video_encoding")
    assert not opts.HasField("degradation_preference")
    assert opts.simulcast
