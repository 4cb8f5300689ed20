"""Our media encoded once for every transport that carries it.

During a make-before-break switch two transports run at once. Each used to read its own
copy of our tracks and run its own encoders, so for the whole overlap a member encoded every
frame twice (a 320×240 VP8 frame costs 2.3–3.6 ms of the event loop, Opus ~1 % of a core),
on a box that is then busiest. :class:`LocalEncoders` holds one
:class:`~matrixrtc.mesh.fanout.SharedEncoder` per kind for the switcher's lifetime; a mesh
and an SFU connection on the aiortc engine each subscribe their own tracks to it (one per
peer, one per SFU publication) and drop them when they close. A transport that joins later
asks for a key frame through its track, as a new peer does.

Frames are encrypted once, with the call's sender key as :class:`~matrixrtc.call_keys.CallKeys`
keeps it (``keys.rings``, our identity): the ring both transports' own cryptors were fed
from, so the protected frame is the one each would have made. Subscribers that must get
clear frames (an SFU without E2EE, a peer without frame E2EE) subscribe ``plain``.

What does not share: a simulcast publisher (its lower layers are fed from its full layer's
encoder and dynacast pauses whole layers, which would pause the mesh too) and the LiveKit SDK
engine (it encodes in its own core). Those build their own encoders as before.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import structlog
from aiortc.mediastreams import MediaStreamTrack

from matrixrtc.call_keys import CallKeys
from matrixrtc.errors import LocalError, RemoteError
from matrixrtc.livekit.connection import MediaOptions
from matrixrtc.media.sources import SyntheticVideoTrack, ToneAudioTrack
from matrixrtc.mesh.fanout import SharedEncoder
from matrixrtc.mesh.transform import CryptorTransform

__all__ = ["LocalEncoders", "local_tracks"]

log = structlog.get_logger(__name__)


def local_tracks(
    media: MediaOptions, sources: Callable[[], Sequence[MediaStreamTrack]] | None
) -> list[MediaStreamTrack]:
    """The tracks a transport publishes: ``sources()``, or synthetic media from ``media``."""
    if sources is not None:
        return list(sources())
    tracks: list[MediaStreamTrack] = []
    if media.video:
        tracks.append(SyntheticVideoTrack(media.width, media.height, media.fps))
    if media.audio:
        tracks.append(ToneAudioTrack(media.tone_hz))
    return tracks


class LocalEncoders:
    """See the module docstring. Built empty; :meth:`get` makes the encoders on first use
    (nothing is read or encoded for a switcher whose transports never ask)."""

    def __init__(
        self,
        media: MediaOptions,
        *,
        sources: Callable[[], Sequence[MediaStreamTrack]] | None,
        keys: CallKeys | None,
        queue_frames: int = 8,
    ) -> None:
        """``queue_frames``: each subscriber's queue (``MeshConfig.send_queue_frames``)."""
        self._media = media
        self._queue_frames = queue_frames
        self._sources = sources
        self._keys = keys
        self._tracks: list[MediaStreamTrack] = []
        self._encoders: dict[str, SharedEncoder] | None = None
        self._closed = False

    def get(self) -> Mapping[str, SharedEncoder]:
        """The running encoders by kind ("audio", "video"); subscribe, never close them."""
        if self._closed:
            raise LocalError("the local encoders are closed")
        if self._encoders is None:
            transform = None
            if self._keys is not None:
                keys = self._keys
                own = keys.rings.cryptor(keys.identity)
                # Only encrypt() is used: each transport decrypts with its own rings.
                transform = CryptorTransform(own, lambda _: own)
            self._tracks = local_tracks(self._media, self._sources)
            encoders: dict[str, SharedEncoder] = {}
            for track in self._tracks:
                if track.kind in encoders:
                    raise LocalError(f"one local {track.kind} track only")
                e = encoders[track.kind] = SharedEncoder(
                    track, transform=transform, queue_frames=self._queue_frames
                )
                e.trace_label = "shared"
                e.start()
            self._encoders = encoders
            log.info("local_media.encoders_started", kinds=sorted(encoders))
        return self._encoders

    @property
    def started(self) -> bool:
        return self._encoders is not None

    async def aclose(self) -> None:
        """Stop the encoders (ending every subscriber still on them) and our tracks."""
        self._closed = True
        encoders, self._encoders = self._encoders or {}, None
        tracks, self._tracks = self._tracks, []
        failure: RemoteError | None = None
        for e in encoders.values():
            try:
                await e.aclose()
            except RemoteError as exc:  # every encoder is closed; the first failure is raised
                failure = failure or exc
        for t in tracks:
            t.stop()
        if failure is not None:
            raise failure
