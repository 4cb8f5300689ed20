"""The full mesh as a :class:`~matrixrtc.media_transport.base.MediaTransport`: a
:class:`~matrixrtc.mesh.matrix_link.MatrixMesh` on the call's agent and keys."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import structlog
from aiortc.mediastreams import MediaStreamTrack

from matrixrtc.agent import Participant
from matrixrtc.media.frames import FrameTap, TapFrame
from matrixrtc.media_transport.base import FrameCounter, MediaEngine, TransportContext
from matrixrtc.media_transport.local_media import local_tracks
from matrixrtc.mesh.matrix_link import MatrixMesh
from matrixrtc.session.media_policy import MediaKind
from matrixrtc.session.mesh_signalling import DeviceRef

__all__ = ["MeshMedia"]

log = structlog.get_logger(__name__)


class MeshMedia:
    """See the module docstring. ``link`` is the running :class:`MatrixMesh` (after start)."""

    kind = MediaKind.MESH
    engine: Final[MediaEngine] = "mesh"

    def __init__(self, ctx: TransportContext) -> None:
        self._ctx = ctx
        self.link: MatrixMesh | None = None
        self._tracks: list[MediaStreamTrack] = []

    async def start(self) -> None:
        ctx = self._ctx
        shared = ctx.encoders.get() if ctx.encoders is not None else None
        if shared is None:
            self._tracks = local_tracks(ctx.media, ctx.sources)
        tap: FrameTap[DeviceRef] | None = None
        if ctx.frames is not None:
            frames = ctx.frames
            tap = FrameTap(self._frame, lambda: frames.listening, lambda: frames.listening_encoded)
        link = MatrixMesh(
            ctx.agent,
            keys=ctx.keys,
            sources=self._tracks,
            encoders=shared,
            config=ctx.mesh,
            frames=tap,
            admit_new=ctx.wants_mesh,
        )
        await link.__aenter__()
        self.link = link

    async def update(self) -> None:
        """The mesh follows the agent's participant changes itself; this is for a change of
        the policy alone (the SFU became unreachable: newcomers are linked after all)."""
        if self.link is not None:
            self.link.refresh_members()

    def carries(self, peer: Participant, since: float, *, video: bool) -> bool:
        engine = self.link.engine if self.link is not None else None
        link = engine.link_for(DeviceRef(peer.user_id, peer.device_id)) if engine else None
        if link is None:
            return False
        # What the peer actually sends (see MediaTransport.carries); nothing: once connected.
        assert engine is not None
        muted = engine.remote_muted(link.peer)
        order = ("video", "audio") if video else ("audio", "video")
        for kind in order:
            if kind in link.remote_kinds and kind not in muted:
                stats = link.stats.get(kind)
                if stats is None:
                    return False
                # Audio is decoded only for a frames tap: judged at decryption.
                last = stats.last_frame_at if kind == "video" else stats.last_received_at
                return (last or 0.0) >= since
        return link.connected_at is not None

    def video_counters(self, peer: Participant) -> Sequence[FrameCounter]:
        engine = self.link.engine if self.link is not None else None
        link = engine.link_for(DeviceRef(peer.user_id, peer.device_id)) if engine else None
        stats = link.stats.get("video") if link is not None else None
        if stats is None:
            return ()
        return (
            FrameCounter(
                stats, stats.frames_decoded, stats.last_frame_at, times=stats.decoded_times
            ),
        )

    def show(self, peer: DeviceRef, on: bool) -> None:
        """Decode ``peer``'s video or only receive, decrypt and count it (``carries`` holds
        either way: it is judged at decryption); back on from the next key frame."""
        engine = self.link.engine if self.link is not None else None
        if engine is not None:
            engine.set_video_decoding(peer, on)

    def refresh(self) -> None:
        """Nothing: the mesh's counters are its receivers' own, counted as frames decode."""

    def hush(self) -> None:
        engine = self.link.engine if self.link is not None else None
        if engine is not None:
            engine.hush()

    def failing(self) -> bool:
        """Never as a whole: each peer link repairs itself (a lost peer is that peer's gap)."""
        return False

    def _frame(self, peer: DeviceRef, frame: TapFrame) -> None:
        tap = self._ctx.frames
        assert tap is not None
        who = (peer.user_id, peer.device_id)
        p = next((p for p in self._ctx.agent.participants if (p.user_id, p.device_id) == who), None)
        if p is not None:
            tap((p, MediaKind.MESH), frame)

    async def aclose(self) -> None:
        link, self.link = self.link, None
        tracks, self._tracks = self._tracks, []
        if link is not None:
            try:
                await link.__aexit__(None, None, None)
            except Exception as exc:  # the old mesh is gone either way
                log.warning("mesh_media.close_failed", error=repr(exc))
        for t in tracks:
            t.stop()
