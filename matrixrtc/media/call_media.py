"""A :class:`~matrixrtc.media.recorder.Recorder` on a live call (``Call.record``).

:class:`CallRecording` is fed by the call (``Call.record`` wires it to the call's
``ParticipantsChanged`` and ``RemoteFrame`` callbacks: called inline, so no frame is lost in a
queue) and tells the recorder who joined and left and what each remote participant sent. It
sits below the call in the layers, so it knows participants only by the fields it reads.

A participant is one device (``user_id`` + ``device_id``); leaving and coming back starts its
next segment. Frames from someone who is not (or no longer) in the participant list are not
written. Finishing a segment (flushing the encoders, closing the file) runs in a worker
thread, so the event loop never waits for the disk.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import av
import structlog

from matrixrtc.media.frames import EncodedFrame
from matrixrtc.media.recorder import PASSTHROUGH_AUDIO, PASSTHROUGH_VIDEO, Recorder, SegmentWriter
from matrixrtc.model.participant import ParticipantView
from matrixrtc.tasks import OwnedTasks

__all__ = ["CallRecording", "participant_key"]

log = structlog.get_logger(__name__)


def participant_key(p: ParticipantView) -> str:
    """The recorder's key for a participant: one device of one user."""
    return f"{p.user_id}:{p.device_id}"


def _info(p: ParticipantView) -> dict[str, Any]:
    return {"user_id": p.user_id, "device_id": p.device_id, "member_id": p.member_id}


class CallRecording:
    """Records every remote participant under ``directory``; see the module doc.

    Made by ``Call.record``; ``await aclose()`` (also done when the call ends) finishes every
    file and ``index.json``."""

    def __init__(
        self,
        directory: Path,
        *,
        participants: Iterable[ParticipantView] = (),
        recipient: bytes | None = None,
        clock: Callable[[], float] = time.monotonic,
        passthrough: bool = True,
    ) -> None:
        self.recorder = Recorder(directory, recipient=recipient, clock=clock)
        self.passthrough = passthrough
        self.directory = directory
        self._present: set[str] = set()
        self._tasks = OwnedTasks("recording", log, event_prefix="recording")
        self._finishing: set[asyncio.Task[None]] = set()
        self._closed = False
        self._unsubscribe: list[Callable[[], object]] = []
        for p in participants:
            if not p.is_self:
                self._join(p)

    def on_close(self, unsubscribe: Callable[[], object]) -> None:
        """Call ``unsubscribe`` when the recording closes (the call's callback handles)."""
        self._unsubscribe.append(unsubscribe)

    @property
    def errors(self) -> list[str]:
        return self.recorder.errors

    def _join(self, p: ParticipantView) -> None:
        key = participant_key(p)
        self._present.add(key)
        self.recorder.joined(key, _info(p))

    def participants_changed(
        self, joined: Iterable[ParticipantView], left: Iterable[ParticipantView]
    ) -> None:
        """Some participants joined and left (a ``ParticipantsChanged``)."""
        if self._closed:
            return
        for p in left:
            key = participant_key(p)
            if p.is_self or key not in self._present:
                continue
            self._present.discard(key)
            writer = self.recorder.left(key)
            if writer is not None:
                task = self._tasks.spawn(self._finish(writer), f"finish-{key}")
                self._finishing.add(task)
                task.add_done_callback(self._finishing.discard)
        for p in joined:
            if not p.is_self:
                self._join(p)

    async def _finish(self, writer: SegmentWriter) -> None:
        await asyncio.to_thread(self.recorder.finish, writer)

    def frame(self, participant: ParticipantView, kind: str, frame: object) -> None:
        """One decoded remote frame (a ``RemoteFrame``)."""
        if self._closed:
            return
        key = participant_key(participant)
        if key not in self._present:
            return  # frames still in flight from someone who left
        if isinstance(frame, av.AudioFrame | av.VideoFrame):
            self.recorder.frame(key, kind, frame)

    def encoded_frame(self, participant: ParticipantView, frame: EncodedFrame) -> None:
        """One received encoded frame (a ``RemoteEncodedFrame``): VP8 video and Opus audio
        are written as they came (the recorder then ignores that participant's decoded
        frames of that kind)."""
        if self._closed or not self.passthrough:
            return
        key = participant_key(participant)
        copied = PASSTHROUGH_VIDEO if frame.kind == "video" else PASSTHROUGH_AUDIO
        if key in self._present and frame.codec in copied:
            self.recorder.frame(key, frame.kind, frame)

    async def aclose(self) -> None:
        """Stop recording; finish every file and index.json (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        # Segments already finishing complete first (their writers are mid-close).
        await asyncio.gather(*self._finishing, return_exceptions=True)
        await self._tasks.aclose()
        await asyncio.to_thread(self.recorder.close)
