"""LiveKit as a :class:`~matrixrtc.media_transport.base.MediaTransport`: a
:class:`~matrixrtc.livekit.transport.LiveKitTransport` for the call's agent, fed the call's
keys (every key so far when it starts, each later one as :class:`~matrixrtc.call_keys.CallKeys`
reports it)."""

from __future__ import annotations

from collections.abc import Sequence

import structlog

from matrixrtc.agent import Participant
from matrixrtc.call_keys import KeyEvent, KeyEventKind
from matrixrtc.livekit.transport import LiveKitTransport, OwnDevice
from matrixrtc.matrix import Subscription
from matrixrtc.media.frames import AvFrame, FrameTap
from matrixrtc.media_transport.base import FrameCounter, TransportContext
from matrixrtc.model import CallMembership, Dialect
from matrixrtc.session.media_policy import MediaKind
from matrixrtc.tasks import OwnedTasks

__all__ = ["LiveKitMedia"]

log = structlog.get_logger(__name__)


class LiveKitMedia:
    """See the module docstring. ``lk`` is the running :class:`LiveKitTransport`."""

    kind = MediaKind.SFU

    def __init__(self, ctx: TransportContext) -> None:
        self._ctx = ctx
        self.lk: LiveKitTransport | None = None
        self._key_events: Subscription[KeyEvent] | None = None
        self._tasks = OwnedTasks("livekit-media", log, event_prefix="livekit_media")

    def _own_membership(self) -> CallMembership | None:
        hs = self._ctx.agent.hs
        me = (hs.user_id, hs.device_id)
        return next((m for m in self._ctx.agent.memberships if (m.sender, m.device_id) == me), None)

    async def start(self) -> None:
        ctx = self._ctx
        agent = ctx.agent
        own = self._own_membership()
        member_id = own.member_id if own is not None else agent.member_id
        sticky = (own.dialect if own is not None else agent.config.dialect) is Dialect.STICKY
        tap: FrameTap[str] | None = None
        if ctx.frames is not None:
            frames = ctx.frames
            tap = FrameTap(self._frame, lambda: frames.listening)
        lk = LiveKitTransport(
            room_id=agent.room_id,
            own=OwnDevice(agent.hs.user_id, agent.hs.device_id, member_id, sticky=sticky),
            openid=agent.hs.request_openid_token,
            media=ctx.media,
            e2ee=ctx.keys is not None,
            slot_id=ctx.mesh.slot_id,
            clock=ctx.clock,
            sources=ctx.sources,
            frames=tap,
        )
        self.lk = lk
        keys = ctx.keys
        if keys is not None:
            # Listen first, then install every key so far: none falls in between. The transport
            # hands each key to all its connections, including those still opening.
            self._key_events = keys.events()
            for identity, ring in keys.remote_keys().items():
                for index, key in ring.items():
                    lk.set_remote_key(identity, index, key)
            if keys.own_key is not None:
                lk.use_own_key(*keys.own_key)
            self._tasks.spawn(self._key_loop(self._key_events), "keys")
        await self.update()

    async def _key_loop(self, events: Subscription[KeyEvent]) -> None:
        keys = self._ctx.keys
        assert keys is not None
        async for ev in events:
            lk = self.lk
            if lk is None:
                return
            if ev.kind is KeyEventKind.USED and keys.own_key is not None:
                lk.use_own_key(*keys.own_key)
            elif ev.kind is KeyEventKind.INSTALLED and ev.identity is not None:
                key = keys.remote_key(ev.identity, ev.index or 0)
                if key is not None:
                    lk.set_remote_key(ev.identity, ev.index or 0, key)

    async def update(self) -> None:
        if self.lk is not None:
            await self.lk.update(self._ctx.agent.memberships, self._own_membership())

    def carries(self, peer: Participant, since: float, *, video: bool) -> bool:
        if self.lk is None:
            return False
        for conn in self.lk.connections.values():
            stats = conn.stats.get(peer.rtc_backend_identity)
            if stats is None:
                continue
            if not video:
                if stats.audio_frames > 0:
                    return True
            elif (stats.last_video_at or 0.0) >= since:
                return True
        return False

    def video_counters(self, peer: Participant) -> Sequence[FrameCounter]:
        if self.lk is None:
            return ()
        out = []
        for conn in self.lk.connections.values():
            stats = conn.stats.get(peer.rtc_backend_identity)
            if stats is not None:
                out.append(FrameCounter(stats, stats.video_frames, stats.last_video_at))
        return out

    def _frame(self, identity: str, frame: AvFrame) -> None:
        tap = self._ctx.frames
        assert tap is not None
        agent = self._ctx.agent
        p = next((p for p in agent.participants if p.rtc_backend_identity == identity), None)
        if p is not None:
            tap((p, MediaKind.SFU), frame)

    async def aclose(self) -> None:
        failure = await self._tasks.cancel()
        if failure is not None:
            log.warning("livekit_media.key_loop_failed", error=str(failure))
        if self._key_events is not None:
            self._key_events.close()
            self._key_events = None
        lk, self.lk = self.lk, None
        if lk is not None:
            try:
                await lk.aclose()
            except Exception as exc:
                log.warning("livekit_media.close_failed", error=repr(exc))
