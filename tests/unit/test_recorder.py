"""The recorder with real encoders and PyAV round trips: quality and sync, segments and
index.json, files playable while written and after a SIGKILL, sealed files equal to plain
ones and holding no plaintext, write errors, and the decrypt-recording command."""

from __future__ import annotations

import fractions
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import av
import numpy as np
import pytest
from nacl.public import PrivateKey

from matrixrtc.cli import build_parser
from matrixrtc.e2ee.sealed_stream import TruncatedStream
from matrixrtc.errors import LocalError
from matrixrtc.media.frames import SAMPLE_CLOCK, EncodedFrame, vp8_frame_size
from matrixrtc.media.recorder import (
    OPUS_SILENCE_20MS,
    Recorder,
    SegmentWriter,
    opus_samples,
    read_index,
)
from matrixrtc.media.sealed_file import decrypt_file, read_private_key
from tests.media_samples import (
    audio_span,
    av_skew,
    beep_onsets,
    dominant_frequency,
    luma,
    psnr,
    read_barcode,
    read_media,
    tone,
    video_frame,
)

ROOT = Path(__file__).resolve().parents[2]


def cli_main(argv: list[str]) -> int:
    """A command as ``python -m matrixrtc`` runs it, minus the global logging set-up (which
    would bind structlog to pytest's captured streams)."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


KEY = PrivateKey(bytes(range(1, 33)))
PUB = bytes(KEY.public_key)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def feed(put: object, clock: FakeClock, seconds: float, *, first: int = 0) -> None:
    """Numbered 320x240 video at 15 fps and a 440 Hz tone in 20 ms frames, in step."""
    assert callable(put)
    pcm = tone(seconds + 1)
    start = clock.now
    audio_i = 0

    def audio_until(t: float) -> None:
        nonlocal audio_i
        while audio_i * 0.02 <= t:
            clock.now = start + audio_i * 0.02
            chunk = pcm[audio_i * 960 : (audio_i + 1) * 960].reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout="mono")
            frame.sample_rate = 48_000
            put("audio", frame)
            audio_i += 1

    for n in range(round(seconds * 15)):
        t = n / 15
        audio_until(t)
        clock.now = start + t
        put("video", video_frame(first + n))
    audio_until(seconds - 0.01)
    clock.now = start + seconds


def settle(*writers: SegmentWriter, limit_s: float = 30.0) -> None:
    """Until the writers have taken every queued frame and written nothing new for 0.5 s."""
    deadline = time.monotonic() + limit_s
    last = -1
    while time.monotonic() < deadline:
        now = sum(w.file.bytes_written for w in writers)
        if now == last and not any(w._queue.qsize() for w in writers):
            return
        last = now
        time.sleep(0.5)


def check_recording(path: Path, seconds: float, *, first: int = 0) -> None:
    video, audio, audio_start = read_media(path)
    numbers = [read_barcode(y) for _, y in video]
    assert numbers == list(range(first, first + round(seconds * 15)))
    assert all(n is not None for n in numbers)
    scores = [
        psnr(y, luma(video_frame(n)))
        for (_, y), n in zip(video, range(first, first + len(video)), strict=True)
    ]
    assert min(scores) >= 30, scores
    assert abs(dominant_frequency(audio) - 440) < 3
    duration = len(audio) / 48_000
    assert abs(duration - seconds) <= 0.02 * seconds + 0.03, duration
    # In step: the first video frame and the first audio sample both start at 0.
    assert abs(video[0][0] - audio_start / 48_000) <= 0.03


def test_segment_round_trip_quality_and_sync(tmp_path: Path) -> None:
    clock = FakeClock()
    writer = SegmentWriter(tmp_path / "a.webm", clock=clock)
    feed(writer.put, clock, 2.0)
    writer.close()
    assert writer.stats.error is None
    assert writer.stats.dropped == 0
    assert writer.stats.frames == {"audio": 100, "video": 30}
    with av.open(str(tmp_path / "a.webm")) as c:
        assert c.format.name.startswith("matroska")
        assert {s.codec_context.name for s in c.streams} == {"opus", "vp8"}
    check_recording(tmp_path / "a.webm", 2.0)


def test_leave_and_rejoin_appends_segments_listed_in_index(tmp_path: Path) -> None:
    clock = FakeClock()
    wall = iter(range(1_800_000_000, 1_800_001_000))
    rec = Recorder(tmp_path / "rec", clock=clock, wall_clock=lambda: float(next(wall)))
    rec.joined("@alice:hs:DEV", {"user_id": "@alice:hs", "device_id": "DEV"})
    feed(lambda k, f: rec.frame("@alice:hs:DEV", k, f), clock, 1.0)
    # bob only ever sends: he gets a segment anyway
    feed(lambda k, f: rec.frame("@bob:hs:X", k, f), clock, 1.0)
    rec.finish(rec.left("@alice:hs:DEV"))
    rec.joined("@alice:hs:DEV")
    feed(lambda k, f: rec.frame("@alice:hs:DEV", k, f), clock, 1.0, first=100)
    rec.close()
    index = json.loads((tmp_path / "rec" / "index.json").read_text())
    assert index["finished"] is True
    assert index["encrypted"] is False
    alice, bob = index["participants"]
    assert (alice["id"], alice["user_id"], alice["device_id"]) == (
        "@alice:hs:DEV",
        "@alice:hs",
        "DEV",
    )
    assert [s["file"] for s in alice["segments"]] == ["alice_hs_DEV.1.webm", "alice_hs_DEV.2.webm"]
    assert [s["file"] for s in bob["segments"]] == ["bob_hs_X.1.webm"]
    first, second = alice["segments"]
    assert first["joined_at"] < first["left_at"] < second["joined_at"] < second["left_at"]
    assert first["frames"] == {"audio": 50, "video": 15}
    assert first["error"] is None
    check_recording(tmp_path / "rec" / "alice_hs_DEV.1.webm", 1.0)
    check_recording(tmp_path / "rec" / "alice_hs_DEV.2.webm", 1.0, first=100)
    with pytest.raises(Exception, match="already holds a recording"):
        Recorder(tmp_path / "rec")


def test_playable_while_being_written(tmp_path: Path) -> None:
    clock = FakeClock()
    writer = SegmentWriter(tmp_path / "live.webm", clock=clock)
    feed(writer.put, clock, 3.0)
    settle(writer)
    shutil.copy(tmp_path / "live.webm", tmp_path / "snapshot.webm")  # the writer is still open
    video, audio, _ = read_media(tmp_path / "snapshot.webm")
    numbers = [read_barcode(y) for _, y in video]
    assert len(numbers) >= 15
    assert numbers == list(range(len(numbers)))
    assert len(audio) >= 48_000
    writer.close()


_CRASH_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from matrixrtc.media.recorder import SegmentWriter
    from tests.unit.test_recorder import FakeClock, feed, settle, PUB
    out = Path(sys.argv[1])
    clock = FakeClock()
    plain = SegmentWriter(out / "plain.webm", clock=clock)
    sealed = SegmentWriter(out / "sealed.webm.sealed", recipient=PUB, clock=clock)
    feed(lambda k, f: (plain.put(k, f), sealed.put(k, f)), clock, 3.0)
    settle(plain, sealed)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_files_survive_a_crash(tmp_path: Path) -> None:
    script = _CRASH_SCRIPT.format(root=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, timeout=60, check=False
    )
    assert proc.returncode == -9
    video, audio, _ = read_media(tmp_path / "plain.webm")
    assert len(video) >= 15
    assert len(audio) >= 48_000
    with pytest.raises(TruncatedStream):
        decrypt_file(tmp_path / "sealed.webm.sealed", tmp_path / "restored.webm", bytes(KEY))
    restored, restored_audio, _ = read_media(tmp_path / "restored.webm")
    assert len(restored) >= 15
    assert len(restored_audio) >= 48_000
    numbers = [read_barcode(y) for _, y in restored]
    assert numbers == list(range(len(numbers)))


def test_sealed_file_decrypts_to_the_plain_bytes_and_holds_no_plaintext(tmp_path: Path) -> None:
    clock = FakeClock()
    plain = SegmentWriter(tmp_path / "p.webm", clock=clock, bitexact=True)
    sealed = SegmentWriter(tmp_path / "s.webm.sealed", recipient=PUB, clock=clock, bitexact=True)

    def both(kind: str, frame: av.AudioFrame | av.VideoFrame) -> None:
        plain.put(kind, frame)
        sealed.put(kind, frame)

    feed(both, clock, 2.0)
    plain.close()
    sealed.close()
    decrypt_file(tmp_path / "s.webm.sealed", tmp_path / "s.webm", bytes(KEY))
    plain_bytes = (tmp_path / "p.webm").read_bytes()
    assert (tmp_path / "s.webm").read_bytes() == plain_bytes
    on_disk = (tmp_path / "s.webm.sealed").read_bytes()
    assert b"\x1a\x45\xdf\xa3" not in on_disk  # no EBML header
    assert b"webm" not in on_disk
    assert b"V_VP8" not in on_disk
    with av.open(str(tmp_path / "p.webm")) as c:
        frames = [bytes(p) for p in c.demux() if p.size >= 24]
    assert len(frames) > 100
    assert not [f for f in frames if f[:24] in on_disk]  # no frame's bytes on disk


_FSIZE_SCRIPT = textwrap.dedent(
    """
    import json, resource, signal, sys
    from pathlib import Path
    sys.path.insert(0, {root!r})
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))
    from matrixrtc.media.recorder import Recorder
    from tests.unit.test_recorder import FakeClock, feed
    clock = FakeClock()
    rec = Recorder(Path(sys.argv[1]), clock=clock)
    feed(lambda k, f: rec.frame("@a:hs:D", k, f), clock, 4.0)
    rec.close()
    print(json.dumps(rec.errors))
    """
)


def test_a_write_error_ends_the_file_cleanly_and_is_reported(tmp_path: Path) -> None:
    """A real write failure (the file-size limit: EFBIG) mid-recording."""
    proc = subprocess.run(
        [sys.executable, "-c", _FSIZE_SCRIPT.format(root=str(ROOT)), str(tmp_path / "rec")],
        cwd=ROOT,
        timeout=60,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(errors) == 1
    assert "File too large" in errors[0]
    index = json.loads((tmp_path / "rec" / "index.json").read_text())
    seg = index["participants"][0]["segments"][0]
    assert "File too large" in seg["error"]
    video, audio, _ = read_media(tmp_path / "rec" / seg["file"])  # playable up to the error
    assert len(video) >= 5
    assert len(audio) > 0


def test_decrypt_recording_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["recording-key", str(tmp_path / "key")]) == 0
    public = capsys.readouterr().out.strip()
    assert oct(os.stat(tmp_path / "key").st_mode & 0o777) == "0o600"
    assert cli_main(["recording-key", str(tmp_path / "key")]) == 1  # never overwritten
    from matrixrtc.media.sealed_file import parse_key

    clock = FakeClock()
    rec = Recorder(tmp_path / "rec", recipient=parse_key(public), clock=clock)
    rec.joined("@a:hs:D", {"user_id": "@a:hs", "device_id": "D"})
    feed(lambda k, f: rec.frame("@a:hs:D", k, f), clock, 3.0)
    rec.close()
    assert sorted(p.name for p in (tmp_path / "rec").iterdir()) == [
        "a_hs_D.1.webm.sealed",
        "index.json.sealed",
    ]
    # Who was in the call is sealed too; the key holder reads it.
    assert b"@a:hs" not in (tmp_path / "rec" / "index.json.sealed").read_bytes()
    with pytest.raises(LocalError):
        read_index(tmp_path / "rec")  # no key
    assert read_index(tmp_path / "rec", read_private_key(tmp_path / "key"))["encrypted"] is True
    with pytest.raises(LocalError):
        Recorder(tmp_path / "rec", recipient=parse_key(public))  # not twice in one directory
    assert (
        cli_main(["decrypt-recording", "--key", str(tmp_path / "key"), str(tmp_path / "rec")]) == 0
    )
    out = tmp_path / "rec-decrypted"
    index = json.loads((out / "index.json").read_text())
    assert index["encrypted"] is False
    assert index["participants"][0]["user_id"] == "@a:hs"
    assert index["participants"][0]["segments"][0]["file"] == "a_hs_D.1.webm"
    check_recording(out / "a_hs_D.1.webm", 3.0)
    capsys.readouterr()
    # wrong key: a clear error, nothing written
    (tmp_path / "other").write_text(
        __import__("base64").b64encode(bytes(PrivateKey.generate())).decode()
    )
    code = cli_main(
        [
            "decrypt-recording",
            "--key",
            str(tmp_path / "other"),
            str(tmp_path / "rec"),
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert code == 1
    assert "not sealed to the given private key" in capsys.readouterr().err
    assert not (tmp_path / "x" / "a_hs_D.1.webm").exists()
    # truncated: what was intact is restored, status 2
    sealed = tmp_path / "rec" / "a_hs_D.1.webm.sealed"
    cut = tmp_path / "cut.webm.sealed"
    cut.write_bytes(sealed.read_bytes()[: sealed.stat().st_size * 2 // 3])
    assert cli_main(["decrypt-recording", "--key", str(tmp_path / "key"), str(cut)]) == 2
    assert "TRUNCATED" in capsys.readouterr().out
    video, _, _ = read_media(tmp_path / "cut.webm")
    assert len(video) >= 5
    assert np.all([read_barcode(y) is not None for _, y in video])


def test_a_burst_keeps_the_senders_spacing(tmp_path: Path) -> None:
    """Frames carrying sender timestamps (as aiortc's do) that arrive in a burst — held back
    until a key arrived — are written at their original spacing, not at their arrival."""
    clock = FakeClock()
    writer = SegmentWriter(tmp_path / "burst.webm", clock=clock)
    start = clock.now
    rtp0 = 123_456_789
    for n in range(45):
        # frames 0-7 all arrive at 0.6 s; then each on time (+0.1 s network delay)
        clock.now = start + (0.6 if n < 8 else n / 15 + 0.1)
        frame = video_frame(n)
        frame.pts = rtp0 + n * 6000
        frame.time_base = fractions.Fraction(1, 90_000)
        writer.put("video", frame)
    writer.close()
    video, _, _ = read_media(tmp_path / "burst.webm")
    times = [t for t, _ in video]
    steps = np.diff(times)
    assert [read_barcode(y) for _, y in video] == list(range(45))
    assert np.all(np.abs(steps - 1 / 15) < 0.01), steps


@pytest.mark.parametrize("change", ["stretched", "lost"])
def test_stamped_audio_stays_in_step(tmp_path: Path, change: str) -> None:
    """LiveKit-like stamps (video: µs, audio: the stream's sample count, 100 ms frames).
    stretched: the receiver's jitter buffer adds 200 ms at 2 s (more samples than time): the
    recorder drops the excess. lost: 300 ms of audio never arrive (fewer samples than time):
    the recorder leaves a gap. Either way every later beep stays with its video frame."""
    clock = FakeClock()
    writer = SegmentWriter(tmp_path / "stretch.webm", clock=clock)
    start = clock.now
    pcm = tone(8, beeps=True)
    events: list[tuple[float, str, av.AudioFrame | av.VideoFrame]] = []
    for n in range(6 * 15):
        vframe = video_frame(n)
        vframe.pts = 5_000_000 + round(n / 15 * 1e6)
        vframe.time_base = fractions.Fraction(1, 1_000_000)
        events.append((n / 15 + 0.03, "video", vframe))
    count = 0  # samples handed out so far (the audio's stamp)
    for i in range(60):  # 100 ms of source audio each, arriving when it ends
        chunk = pcm[i * 4800 : (i + 1) * 4800]
        if change == "stretched" and i == 20:  # 200 ms that were never sent, in one frame
            chunk = np.concatenate([np.zeros(9600, np.int16), chunk])
        if change == "lost" and i in (20, 21, 22):
            continue
        aframe = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        aframe.sample_rate = 48_000
        aframe.pts = count
        aframe.time_base = fractions.Fraction(1, 48_000)
        aframe.opaque = SAMPLE_CLOCK
        count += len(chunk)
        events.append(((i + 1) * 0.1 + 0.05, "audio", aframe))
    for t, kind, frame in sorted(events, key=lambda e: e[0]):
        clock.now = start + t
        writer.put(kind, frame)
    writer.close()
    if change == "stretched":
        assert writer.stats.trimmed_s == pytest.approx(0.2, abs=0.05)
    else:
        assert writer.stats.trimmed_s == 0
        assert writer.stats.gaps == 1
    path = tmp_path / "stretch.webm"
    video, audio, _ = read_media(path)
    a_start, _ = audio_span(path)
    onsets = [a_start + t for t in beep_onsets(audio)]
    assert len(onsets) == (5 if change == "stretched" else 4), onsets  # lost: one beep too
    numbered = [(t, k) for t, y in video if (k := read_barcode(y)) is not None]
    assert len(numbered) == 6 * 15
    base = float(np.median([t - k / 15 for t, k in numbered]))  # where source time 0 is
    late = [(o - base) - round(o - base) for o in onsets]  # each beep against its second
    assert all(abs(x) <= 0.05 for x in late), late
    skew, _ = av_skew(numbered, onsets, 15)
    assert abs(skew) <= 0.05, skew


def _drain(writer: SegmentWriter) -> None:
    """Faster than real time, the writer's queue would overflow (and drop): let it catch up."""
    while writer._queue.qsize() > 100:
        time.sleep(0.002)


def _vp8_frames(count: int, *, keyframe_at: int) -> list[tuple[bytes, bool]]:
    """Numbered frames encoded once as a sender would: key frames at 0 and ``keyframe_at``."""
    ctx = av.CodecContext.create("libvpx", "w")
    ctx.width, ctx.height, ctx.pix_fmt = 320, 240, "yuv420p"
    ctx.time_base = fractions.Fraction(1, 90_000)
    ctx.bit_rate = 600_000
    ctx.gop_size = 10_000
    ctx.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
    out = []
    for n in range(count):
        frame = video_frame(n)
        frame.pts = n * 6000
        frame.pict_type = (
            av.video.frame.PictureType.I
            if n in (0, keyframe_at)
            else av.video.frame.PictureType.NONE
        )
        packets = ctx.encode(frame)
        out.append((b"".join(bytes(p) for p in packets), any(p.is_keyframe for p in packets)))
    return out


def test_received_vp8_is_written_as_it_came(tmp_path: Path) -> None:
    """Passthrough: encoded VP8 frames (as the mesh hands them on after decryption) go into
    the file byte for byte, starting at a key frame (asked for once the segment starts
    mid-stream); decoded video of the same participant is ignored; audio is encoded."""
    encoded = _vp8_frames(60, keyframe_at=12)
    asked: list[float] = []
    clock = FakeClock()
    writer = SegmentWriter(tmp_path / "copy.webm", clock=clock)
    start = clock.now
    pcm = tone(5)
    audio_i = 0
    for n, (data, key) in enumerate(encoded[5:], start=5):  # joined mid-stream, at frame 5
        t = n / 15
        while audio_i * 0.02 <= t:
            clock.now = start + audio_i * 0.02
            chunk = pcm[audio_i * 960 : (audio_i + 1) * 960].reshape(1, -1)
            aframe = av.AudioFrame.from_ndarray(chunk, format="s16", layout="mono")
            aframe.sample_rate = 48_000
            writer.put("audio", aframe)
            audio_i += 1
        clock.now = start + t
        writer.put(
            "video",
            EncodedFrame(
                kind="video",
                codec="vp8",
                data=data,
                pts=n * 6000,
                time_base=fractions.Fraction(1, 90_000),
                keyframe=key,
                request_keyframe=lambda: asked.append(clock.now),
            ),
        )
        writer.put("video", video_frame(1000 + n))  # the decoded copy: not written
        _drain(writer)
    writer.close()
    assert writer.stats.error is None
    assert writer.stats.video_passthrough
    assert asked  # frames 5-11 are deltas: a key frame was asked for
    assert len(asked) <= 2  # ...at most once per 0.5 s
    with av.open(str(tmp_path / "copy.webm")) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.width, stream.height) == ("vp8", 320, 240)
        written = [bytes(p) for p in container.demux(stream) if p.size]
    assert written == [data for data, _ in encoded[12:]]  # from the key frame on, unchanged
    video, audio, _ = read_media(tmp_path / "copy.webm")
    assert [read_barcode(y) for _, y in video] == list(range(12, 60))
    assert np.allclose(np.diff([t for t, _ in video]), 1 / 15, atol=0.002)
    assert abs(dominant_frequency(audio) - 440) < 3


def test_vp8_frame_size_reads_key_frames_only() -> None:
    (key, is_key), (delta, _) = _vp8_frames(2, keyframe_at=0)
    assert is_key
    assert vp8_frame_size(key) == (320, 240)
    assert vp8_frame_size(delta) is None
    assert vp8_frame_size(b"\x00" * 4) is None


def test_sender_stamped_audio_is_written_as_it_came(tmp_path: Path) -> None:
    """RTP-stamped audio (the mesh) that arrives 150 ms late for 1.5 s (a congested event
    loop; nothing lost) and on time again: written contiguously, every beep one second after
    the last — no silence inserted while it was late, nothing dropped when it caught up."""
    clock = FakeClock()
    writer = SegmentWriter(tmp_path / "late.webm", clock=clock)
    start = clock.now
    pcm = tone(7, beeps=True)
    for i in range(300):  # 20 ms frames
        late = 0.15 if 100 <= i < 175 else 0.0
        clock.now = start + (i + 1) * 0.02 + 0.03 + late
        aframe = av.AudioFrame.from_ndarray(
            pcm[i * 960 : (i + 1) * 960].reshape(1, -1), format="s16", layout="mono"
        )
        aframe.sample_rate = 48_000
        aframe.pts = 1_000_000 + i * 960
        aframe.time_base = fractions.Fraction(1, 48_000)
        writer.put("audio", aframe)
    writer.close()
    assert (writer.stats.gaps, writer.stats.trimmed_s) == (0, 0)
    _, audio, _ = read_media(tmp_path / "late.webm")
    onsets = beep_onsets(audio)
    assert len(onsets) == 5, onsets  # 1 s … 5 s (the one at 0 has no quiet before it)
    assert np.allclose(np.diff(onsets), 1.0, atol=0.006), onsets


def _opus_packets(seconds: float) -> list[bytes]:
    """A beeping tone as a sender's 20 ms Opus packets (mono, as Chromium sends)."""
    ctx = av.CodecContext.create("libopus", "w")
    ctx.sample_rate, ctx.format, ctx.layout = 48_000, "s16", "mono"
    ctx.bit_rate = 64_000
    ctx.time_base = fractions.Fraction(1, 48_000)
    pcm = tone(seconds + 0.1, beeps=True)
    out: list[bytes] = []
    for i in range(round(seconds * 50)):
        frame = av.AudioFrame.from_ndarray(
            pcm[i * 960 : (i + 1) * 960].reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate, frame.pts = 48_000, i * 960
        out += [bytes(p) for p in ctx.encode(frame)]
    return out


def test_opus_samples_reads_the_toc() -> None:
    assert opus_samples(OPUS_SILENCE_20MS) == 960
    assert all(opus_samples(p) == 960 for p in _opus_packets(0.2))
    assert opus_samples(bytes([0x0B << 3 | 1, 0])) == 2 * 2880  # SILK 60 ms, two frames
    assert opus_samples(bytes([0x1F << 3 | 3, 5])) == 5 * 960  # CELT 20 ms, five frames
    assert opus_samples(b"") is None


@pytest.mark.parametrize("lost", [False, True])
def test_received_opus_is_written_as_it_came(tmp_path: Path, lost: bool) -> None:
    """Passthrough audio: the mesh's decrypted Opus packets go into the file unchanged (decoded
    audio of the same participant is ignored); 200 ms of packets lost on the way (an RTP
    timestamp jump) become 20 ms silence packets, so every later beep stays in place."""
    packets = _opus_packets(5.0)
    clock = FakeClock()
    writer = SegmentWriter(tmp_path / "opus.webm", clock=clock)
    start = clock.now
    sent = []
    for i, data in enumerate(packets):
        clock.now = start + (i + 1) * 0.02 + 0.03  # arrives when it ends
        if lost and 170 <= i < 180:  # 3.4-3.6 s: between two beeps
            continue
        sent.append(data)
        writer.put(
            "audio",
            EncodedFrame(
                kind="audio",
                codec="opus",
                data=data,
                pts=7_000 + i * 960,
                time_base=fractions.Fraction(1, 48_000),
                keyframe=True,
            ),
        )
        decoded = av.AudioFrame.from_ndarray(np.zeros((1, 960), np.int16), layout="mono")
        decoded.sample_rate = 48_000
        writer.put("audio", decoded)  # the decoded copy: not written
        _drain(writer)
    writer.close()
    assert writer.stats.dropped == 0
    assert writer.stats.audio_passthrough
    assert writer.stats.error is None

    with av.open(str(tmp_path / "opus.webm")) as container:
        written = [bytes(p) for p in container.demux(container.streams.audio[0]) if p.size]
    # As sent; the 200 ms lost are ten 20 ms silence packets.
    expected = sent[:170] + [OPUS_SILENCE_20MS] * 10 + sent[170:] if lost else sent
    assert written == expected
    _, audio, _ = read_media(tmp_path / "opus.webm")
    onsets = beep_onsets(audio)
    assert len(onsets) == 4, onsets  # 1 s … 4 s
    assert np.allclose(np.diff(onsets), 1.0, atol=0.006), onsets
    assert abs(dominant_frequency(audio) - 440) < 3


def test_writers_sharing_frames_that_need_scaling(tmp_path: Path) -> None:
    """Two recordings of one call get the very same frame objects; frames of another size are
    scaled by each writer's own reformatter (frame.reformat() keeps one on the shared frame:
    two writer threads using it at once crashed FFmpeg)."""
    clock = FakeClock()
    writers = [SegmentWriter(tmp_path / f"{i}.webm", clock=clock) for i in range(2)]
    first = video_frame(0)
    big = [video_frame(n, 640, 480) for n in range(1, 91)]
    for w in writers:
        w.put("video", first)  # the file's size: 320x240
    for frame in big:
        clock.now += 1 / 15
        for w in writers:
            w.put("video", frame)
    for w in writers:
        w.close()
        assert w.stats.error is None
        assert w.stats.frames["video"] == 91
