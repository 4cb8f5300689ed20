"""``python -m matrixrtc play FILE``: join a room's call and send a media file into it.

Anything FFmpeg reads (through PyAV): its first audio and video streams, decoded and sent in
real time, end-to-end encrypted like any call media, over the mesh or the room's LiveKit SFU.
The file is checked before joining: an unreadable or unsupported file is an error (status 1)
and nobody sees us join. Without ``--loop`` the command leaves when the file ends;
``--start S`` begins S seconds in; ``--pattern`` sends a moving test pattern and a 440 Hz tone
instead of a file (until Ctrl-C or ``--duration``).

Progress every two seconds (media time, frames, bitrate, late frames, who is in the call), and
a report at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from aiortc.mediastreams import MediaStreamTrack

from matrixrtc import event_loop
from matrixrtc.commands._call_cli import Console, add_call_arguments, make_call, run_until
from matrixrtc.errors import MatrixRTCError
from matrixrtc.media.file_source import MediaFile, MediaFileError
from matrixrtc.media.sources import SyntheticVideoTrack, ToneAudioTrack

__all__ = ["register", "run"]

_END_GRACE_S = 0.5  # after the last frame: let the encoders send it before leaving


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "play",
        help="send a media file (or a test pattern) into a room's call",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", nargs="?", default=None, help="media file (anything FFmpeg reads)")
    p.add_argument("--pattern", action="store_true", help="a test pattern and tone, no file")
    p.add_argument("--loop", action="store_true", help="play the file again and again")
    p.add_argument("--start", type=float, default=0.0, help="start this many seconds in")
    add_call_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    console = Console(args.output)
    if (args.file is None) == (not args.pattern):
        console.error("give a FILE or --pattern (not both)")
        return 1
    media: MediaFile | None = None
    if args.file is not None:
        try:
            media = MediaFile(args.file, loop=args.loop, start=args.start)
        except MediaFileError as exc:
            console.error(str(exc))
            return 1
    try:
        return event_loop.run(_main(args, console, media))
    except MatrixRTCError as exc:
        console.error(str(exc))
        return 1
    finally:
        if media is not None:
            media.close()


async def _main(args: argparse.Namespace, console: Console, media: MediaFile | None) -> int:
    pattern: tuple[MediaStreamTrack, ...] = ()
    if media is None:
        pattern = (SyntheticVideoTrack(), ToneAudioTrack())
    tracks = media.tracks if media is not None else pattern
    what = media.info.describe() if media is not None else "test pattern 320x240@15 + 440 Hz"
    try:
        async with make_call(args, publish=tracks) as call:
            console.event(
                "ready",
                f"playing {what} into {call.room_id} as {call.client.user_id}",
                room_id=call.room_id,
                user_id=call.client.user_id,
                device_id=call.client.device_id,
                source=what,
            )

            def tick() -> None:
                others = len([p for p in call.participants if not p.is_self])
                via = call.transport.value if call.transport is not None else "-"
                if media is not None:
                    s = media.stats
                    console.event(
                        "progress",
                        f"  {s.media_s:6.1f} s  video {s.frames['video']:5d}  "
                        f"audio {s.frames['audio']:5d}  {s.bitrate_kbps:5.0f} kbit/s  "
                        f"late {sum(s.late.values())}  loops {s.loops}  "
                        f"{others} other(s) in call via {via}",
                        media_s=s.media_s,
                        frames=s.frames,
                        late=s.late,
                        others=others,
                        transport=via,
                    )
                else:
                    v, a = pattern
                    console.event(
                        "progress",
                        f"  video {getattr(v, 'frames_produced', 0):5d}  "
                        f"audio {getattr(a, 'frames_produced', 0):5d}  "
                        f"{others} other(s) in call via {via}",
                        others=others,
                        transport=via,
                    )

            done = media.wait_ended() if media is not None and not media.loop else None
            why = await run_until(duration=args.duration, done=done, tick=tick)
            if why == "done":
                await asyncio.sleep(_END_GRACE_S)
            tick()
    finally:
        for t in pattern:
            t.stop()
    _report(console, media, why)
    return 0


def _report(console: Console, media: MediaFile | None, why: str) -> None:
    if media is None:
        console.event("report", f"stopped ({why})", stopped=why)
        return
    s = media.stats
    lines = [
        f"played {media.path.name}: {s.media_s:.1f} s of media ({why})",
        f"  frames: video {s.frames['video']}, audio {s.frames['audio']}; "
        f"loops {s.loops}; source bitrate {s.bitrate_kbps:.0f} kbit/s",
        f"  late frames (>100 ms): video {s.late['video']}, audio {s.late['audio']}; "
        f"worst {s.max_late_s * 1000:.0f} ms; dropped {sum(s.dropped.values())}",
    ]
    if media.error:
        lines.append(f"  decoding stopped early: {media.error}")
    console.event(
        "report",
        "\n".join(lines),
        stopped=why,
        media_s=s.media_s,
        frames=s.frames,
        late=s.late,
        dropped=s.dropped,
        loops=s.loops,
        error=media.error,
    )
    if media.error:
        print(f"warning: {media.error}", file=sys.stderr)
