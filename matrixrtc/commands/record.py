"""``python -m matrixrtc record DIR``: join a room's call and record every other participant.

Each participant's decrypted audio and video go to their own WebM file in DIR (Opus + VP8;
on the mesh written as received, without re-encoding), one file per presence (leaving and
coming back starts the next one), with ``index.json``
listing participants, join/leave times and files. Files are written in one-second clusters
and stay playable while being written and after a crash.

``--encrypt-to PUBLIC_KEY`` (from ``recording-key``) seals every file to that X25519 key as it
is written (``NAME.webm.sealed``): nothing playable touches the disk, and only the private
key's holder can ``decrypt-recording``; ``index.json`` (who, when, which files) is sealed too
(``index.json.sealed``).

The call goes on when a file cannot be written (full disk): the error is reported, the files
so far stay playable, and the exit status is 2. Stops on Ctrl-C/SIGTERM or ``--duration``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from matrixrtc import event_loop
from matrixrtc.commands._call_cli import Console, add_call_arguments, make_call, run_until
from matrixrtc.e2ee.sealed_stream import SealedStreamError
from matrixrtc.errors import MatrixRTCError
from matrixrtc.media.call_media import CallRecording
from matrixrtc.media.recorder import index_path
from matrixrtc.media.sealed_file import parse_key

__all__ = ["register", "run"]


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "record",
        help="record every participant of a room's call to WebM files",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dir", type=Path, help="recording directory (created; must be new)")
    p.add_argument("--encrypt-to", default=None, metavar="PUBLIC_KEY", help="X25519, base64")
    add_call_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    console = Console(args.output)
    recipient = None
    if args.encrypt_to is not None:
        try:
            recipient = parse_key(args.encrypt_to)
        except SealedStreamError as exc:
            console.error(f"--encrypt-to: {exc}")
            return 1
    if index_path(args.dir) is not None:
        console.error(f"{args.dir} already holds a recording; choose a new directory")
        return 1
    try:
        return event_loop.run(_main(args, console, recipient))
    except MatrixRTCError as exc:
        console.error(str(exc))
        return 1


class _Progress:
    """Per-participant rates between two ticks."""

    def __init__(self, rec: CallRecording, console: Console) -> None:
        self.rec = rec
        self.console = console
        self.last: dict[str, tuple[float, int, int]] = {}

    def tick(self) -> None:
        now = time.monotonic()
        rows = []
        for pid, p in self.rec.recorder.participants.items():
            seg = p.current
            if seg is None or seg.writer is None:
                continue
            w = seg.writer
            frames, nbytes = w.stats.frames["video"], w.file.bytes_written
            t0, f0, b0 = self.last.get(pid, (now - 2.0, frames, nbytes))
            self.last[pid] = (now, frames, nbytes)
            dt = max(1e-3, now - t0)
            rows.append(
                {
                    "participant": pid,
                    "file": seg.file,
                    "fps": round((frames - f0) / dt, 1),
                    "kbps": round((nbytes - b0) * 8 / 1000 / dt),
                    "audio_frames": w.stats.frames["audio"],
                    "video_frames": frames,
                    "gaps": w.stats.gaps,
                    "error": w.stats.error,
                }
            )
        text = "\n".join(
            f"  {r['participant']}: {r['file']}  {r['fps']:4.1f} fps  {r['kbps']:5d} kbit/s  "
            f"audio {r['audio_frames']} video {r['video_frames']}  gaps {r['gaps']}"
            + (f"  ERROR {r['error']}" if r["error"] else "")
            for r in rows
        )
        self.console.event("progress", text or "  (nobody to record yet)", participants=rows)


async def _main(args: argparse.Namespace, console: Console, recipient: bytes | None) -> int:
    async with make_call(args) as call:
        rec = call.record(args.dir, encrypt_to=recipient)
        console.event(
            "ready",
            f"recording {call.room_id} into {args.dir}"
            + (" (sealed to the given key)" if recipient else ""),
            room_id=call.room_id,
            user_id=call.client.user_id,
            device_id=call.client.device_id,
            dir=str(args.dir),
            encrypted=recipient is not None,
        )
        progress = _Progress(rec, console)
        why = await run_until(duration=args.duration, done=None, tick=progress.tick)
        await rec.aclose()
    index = rec.recorder.index()
    _report(console, index, why)
    return 2 if rec.errors else 0


def _report(console: Console, index: dict[str, Any], why: str) -> None:
    lines = [f"recording stopped ({why}): {len(index['participants'])} participant(s)"]
    for p in index["participants"]:
        for s in p["segments"]:
            lines.append(
                f"  {s['file']}: {s['joined_at']} → {s['left_at']}, video {s['frames']['video']}"
                f" / audio {s['frames']['audio']} frames, {s['bytes']} bytes, "
                f"{s['audio_gaps']} audio gaps, {s['dropped_frames']} dropped"
                + (f", ERROR: {s['error']}" if s["error"] else "")
            )
    console.event("report", "\n".join(lines), stopped=why, index=index)
