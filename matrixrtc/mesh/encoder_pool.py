"""One encoder per local track for the whole call, shared by every transport that sends it.

A make-before-break switch runs two transports side by side (the mesh and a LiveKit
connection) until every member is carried by the new one. Each used to open its own
:class:`~matrixrtc.mesh.fanout.SharedEncoder`, so for the length of the overlap every frame
was encoded (VP8 ≈ 3.6 ms at 320×240, a key frame at the new encoder's start costing more)
and encrypted twice, on the event loop, exactly while the switch itself (signalling, ICE,
DTLS, key delivery) needs it most. With an :class:`EncoderPool` the transport that starts
second subscribes to the encoder the first one opened, and the frames its peers get are the
same encrypted bytes (both transports carry LiveKit's frame format under the call's keys).

The pool encrypts with the call's own key ring (``CallKeys.rings`` at ``CallKeys.identity``),
which lives as long as the call, not with a transport's: the encoder outlives the transport
that opened it. It owns the source tracks of the encoders it opened and stops them with the
encoder, when the last transport lets go; a transport whose track was not taken (the pool
already encoded that kind) keeps it and stops it itself.

Which kinds are shared is the pool's ``kinds``; the switcher shares audio only by default
(``SwitchConfig.shared_encoders``). A video encoder shared across a switch sends every key
frame the new path asks for (LiveKit asks one per subscriber batch: three ≈ 17 KB key frames
in a mesh→SFU switch) to the old path's peers too, exactly while the old path carries the
call; an encoder of the new transport's own starts small (≈ 3.4 KB) and burdens only the new
path. Alternated on a noisy host (6 Dec, 18 switches each way), sharing video took the
members' CPU during a switch down ≈ 8 % but the mesh→SFU gap median up ≈ 8 ms; Opus has no
key frames, so audio is shared for nothing. For a kind not shared, :meth:`acquire` opens an
encoder for that caller alone (released and closed as the others).

Without a pool (``TransportContext.encoders`` None: a transport used on its own) each
transport opens and closes its own encoders as before.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import structlog
from aiortc.mediastreams import MediaStreamTrack

from matrixrtc.mesh.fanout import SharedEncoder
from matrixrtc.mesh.transform import FrameTransform

__all__ = ["EncoderPool"]

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class _Entry:
    encoder: SharedEncoder
    users: list[str]  # one label per acquire not yet released ("mesh", "sfu")


class EncoderPool:
    """The call's local encoders: one per kind in ``kinds``, shared; any other kind, one per
    caller. See the module docstring."""

    def __init__(
        self, transform: FrameTransform | None, *, kinds: Iterable[str] = ("audio", "video")
    ) -> None:
        self._transform = transform
        self.kinds = frozenset(kinds)
        self._entries: list[_Entry] = []

    def acquire(
        self, source: MediaStreamTrack, *, user: str, queue_frames: int = 8
    ) -> SharedEncoder:
        """For a shared kind, the running encoder of ``source.kind`` or a new one; for another
        kind, a new one. A new encoder reads ``source``, which the pool then owns (see
        :meth:`owns`). ``user`` names the transport (the encoder's trace label lists its
        users). Release it with :meth:`release`."""
        entry = None
        if source.kind in self.kinds:
            entry = next((e for e in self._entries if e.encoder.kind == source.kind), None)
        if entry is None:
            encoder = SharedEncoder(source, transform=self._transform, queue_frames=queue_frames)
            entry = _Entry(encoder, [])
            self._entries.append(entry)
        entry.users.append(user)
        entry.encoder.trace_label = "+".join(sorted(set(entry.users)))
        return entry.encoder

    def owns(self, track: MediaStreamTrack) -> bool:
        """Whether ``track`` feeds one of the pool's encoders (the pool stops it)."""
        return any(e.encoder.source is track for e in self._entries)

    async def release(self, encoder: SharedEncoder, *, user: str) -> None:
        """One user is done with ``encoder``; the last one closes it and stops its source.
        The caller stops its own subscriber tracks first (the others keep theirs)."""
        entry = next((e for e in self._entries if e.encoder is encoder), None)
        if entry is None or user not in entry.users:
            return
        entry.users.remove(user)
        if entry.users:
            encoder.trace_label = "+".join(sorted(set(entry.users)))
            return
        self._entries.remove(entry)
        try:
            await encoder.aclose()
        finally:
            encoder.source.stop()

    def __iter__(self) -> Iterator[SharedEncoder]:
        return iter([e.encoder for e in self._entries])

    async def aclose(self) -> None:
        """Close every encoder still held (the call is over)."""
        entries, self._entries = list(self._entries), []
        for entry in entries:
            try:
                await entry.encoder.aclose()
            except Exception as exc:  # every encoder is closed; the call is over anyway
                log.warning("encoder_pool.close_failed", kind=entry.encoder.kind, error=repr(exc))
            finally:
                entry.encoder.source.stop()
