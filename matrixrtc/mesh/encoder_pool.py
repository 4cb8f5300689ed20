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

Without a pool (``TransportContext.encoders`` None: a transport used on its own) each
transport opens and closes its own encoders as before.
"""

from __future__ import annotations

from collections.abc import Iterator
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
    """The call's local encoders, one per kind; see the module docstring."""

    def __init__(self, transform: FrameTransform | None) -> None:
        self._transform = transform
        self._entries: dict[str, _Entry] = {}

    def acquire(
        self, source: MediaStreamTrack, *, user: str, queue_frames: int = 8
    ) -> SharedEncoder:
        """The running encoder for ``source.kind``, or a new one reading ``source`` (which
        the pool then owns: see :meth:`owns`). ``user`` names the transport (the encoder's
        trace label lists its users). Release it with :meth:`release`."""
        entry = self._entries.get(source.kind)
        if entry is None:
            encoder = SharedEncoder(source, transform=self._transform, queue_frames=queue_frames)
            entry = self._entries[source.kind] = _Entry(encoder, [])
        entry.users.append(user)
        entry.encoder.trace_label = "+".join(sorted(set(entry.users)))
        return entry.encoder

    def owns(self, track: MediaStreamTrack) -> bool:
        """Whether ``track`` feeds one of the pool's encoders (the pool stops it)."""
        return any(e.encoder.source is track for e in self._entries.values())

    async def release(self, encoder: SharedEncoder, *, user: str) -> None:
        """One user is done with ``encoder``; the last one closes it and stops its source.
        The caller stops its own subscriber tracks first (the others keep theirs)."""
        entry = self._entries.get(encoder.kind)
        if entry is None or entry.encoder is not encoder or user not in entry.users:
            return
        entry.users.remove(user)
        if entry.users:
            encoder.trace_label = "+".join(sorted(set(entry.users)))
            return
        del self._entries[encoder.kind]
        try:
            await encoder.aclose()
        finally:
            encoder.source.stop()

    def __iter__(self) -> Iterator[SharedEncoder]:
        return iter([e.encoder for e in self._entries.values()])

    async def aclose(self) -> None:
        """Close every encoder still held (the call is over)."""
        entries, self._entries = list(self._entries.values()), {}
        for entry in entries:
            try:
                await entry.encoder.aclose()
            except Exception as exc:  # every encoder is closed; the call is over anyway
                log.warning("encoder_pool.close_failed", kind=entry.encoder.kind, error=repr(exc))
            finally:
                entry.encoder.source.stop()
