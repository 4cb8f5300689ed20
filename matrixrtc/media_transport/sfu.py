"""LiveKit as a :class:`~matrixrtc.media_transport.base.MediaTransport`: a
:class:`~matrixrtc.livekit.transport.LiveKitTransport` for the call's agent. The transport's key
table is registered as a sink of the call's :class:`~matrixrtc.call_keys.CallKeys`, which pushes
every key so far at once and each later one as it comes (to every connection, including those
still opening)."""

from __future__ import annotations

import collections
import functools
from collections.abc import Sequence

import aiohttp
import structlog

from matrixrtc.agent import Participant
from matrixrtc.errors import MatrixRTCError
from matrixrtc.livekit.connection import LiveKitConnection
from matrixrtc.livekit.token import Endpoint, request_credentials
from matrixrtc.livekit.transport import LiveKitTransport, OwnDevice, plan_connections
from matrixrtc.media.frames import FrameTap, TapFrame
from matrixrtc.media_transport.aiortc_engine import AiortcConnection
from matrixrtc.media_transport.base import FrameCounter, MediaEngine, TransportContext
from matrixrtc.model import CallMembership, Dialect
from matrixrtc.session.media_policy import MediaKind
from matrixrtc.session.mesh_signalling import DeviceRef

__all__ = ["LiveKitMedia", "probe_livekit"]

log = structlog.get_logger(__name__)

# How long a peer's audio must have been heard, with no video announced, before a switch
# settles on its audio alone (see LiveKitMedia.carries).
AUDIO_ONLY_GRACE_S = 0.5
# How long a peer must have been in the room, seen by us and announcing nothing (unmuted),
# before a switch counts it as publishing nothing. A peer announces its tracks right after
# joining (ours once each has its first frame); one already in the room when we connect has
# its tracks in the join response, so only a peer joining with us waits this long.
NOTHING_ANNOUNCED_GRACE_S = 1.0


def _newest(times: collections.deque[float], n: int) -> list[float]:
    return list(times)[-n:] if n > 0 else []


class LiveKitMedia:
    """See the module docstring. ``lk`` is the running :class:`LiveKitTransport`."""

    kind = MediaKind.SFU

    def __init__(self, ctx: TransportContext) -> None:
        self._ctx = ctx
        self.lk: LiveKitTransport | None = None

    @property
    def engine(self) -> MediaEngine:
        """The client the connections run on (all made by one factory); before the first
        one, the configured client."""
        for conn in self.lk.connections.values() if self.lk is not None else ():
            return conn.engine
        return self._ctx.media.engine

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
            # A joiner connects to LiveKit before the others' keys reach it: frames before
            # that could only fail. Our senders encrypt with the first key they send it.
            subscribe_when_keyed=True,
            connection_factory=(
                functools.partial(AiortcConnection, shared=ctx.encoders)
                if ctx.media.engine == "aiortc"
                else LiveKitConnection
            ),
        )
        self.lk = lk
        if ctx.keys is not None:
            ctx.keys.add_sink(lk.keys)
        await self.update()

    async def update(self) -> None:
        if self.lk is not None:
            await self.lk.update(self._ctx.agent.memberships, self._own_membership())

    def carries(self, peer: Participant, since: float, *, video: bool) -> bool:
        if self.lk is None:
            return False
        identity = peer.rtc_backend_identity
        for conn in self.lk.connections.values():
            kinds = conn.published_kinds(identity)
            if kinds is None:
                continue  # not in this room
            stats = conn.stats.get(identity)
            if "video" in kinds and (video or "audio" not in kinds):
                if stats is not None and (stats.last_video_at or 0.0) >= since:
                    return True
            elif "audio" in kinds and stats is not None and stats.first_audio_at is not None:
                # LiveKit announces each track once it is published, so a peer that also sends
                # video may show only its audio for a moment: its audio alone counts once heard
                # for AUDIO_ONLY_GRACE_S with still no video announced (at once when the call
                # carries no video). Audio frames keep coming (concealment) when nothing
                # decrypts: only while the peer's media decrypts do they show it reaches us.
                heard = (stats.last_audio_at or 0.0) - max(stats.first_audio_at, since)
                grace = AUDIO_ONLY_GRACE_S if video else 0.0
                if heard >= grace and conn.decrypting(identity):
                    return True
            elif not kinds:
                # In the room with nothing announced: not yet published, or publishing
                # nothing. The two look alike for a moment: once the peer has been in the
                # room for NOTHING_ANNOUNCED_GRACE_S (since the switch began) with still
                # nothing, there is nothing of it to wait for.
                seen = conn.seen_at.get(identity)
                if seen is not None:
                    quiet = self._ctx.clock() - max(seen, since)
                    if quiet >= NOTHING_ANNOUNCED_GRACE_S:
                        return True
        return False

    def video_counters(self, peer: Participant) -> Sequence[FrameCounter]:
        if self.lk is None:
            return ()
        out = []
        for conn in self.lk.connections.values():
            stats = conn.stats.get(peer.rtc_backend_identity)
            if stats is not None:
                out.append(
                    FrameCounter(
                        stats,
                        stats.video_frames,
                        stats.last_video_at,
                        times=functools.partial(_newest, stats.video_times),
                    )
                )
        return out

    def show(self, peer: DeviceRef, on: bool) -> None:
        """Nothing: the SDK's receivers decode whether or not anyone reads them (see
        matrixrtc.livekit.receive)."""

    def hush(self) -> None:
        if self.lk is not None:
            self.lk.hush()

    def refresh(self) -> None:
        if self.lk is not None:
            self.lk.refresh()

    def failing(self) -> bool:
        return self.lk is not None and self.lk.lost()

    def _frame(self, identity: str, frame: TapFrame) -> None:
        tap = self._ctx.frames
        assert tap is not None
        agent = self._ctx.agent
        p = next((p for p in agent.participants if p.rtc_backend_identity == identity), None)
        if p is not None:
            tap((p, MediaKind.SFU), frame)

    async def aclose(self) -> None:
        lk, self.lk = self.lk, None
        if lk is not None and self._ctx.keys is not None:
            self._ctx.keys.remove_sink(lk.keys)
        if lk is not None:
            try:
                await lk.aclose()
            except Exception as exc:
                log.warning("livekit_media.close_failed", error=repr(exc))


async def probe_livekit(ctx: TransportContext) -> bool:
    """Whether the SFU we would publish on answers again: its authorization service hands out
    credentials, which it does only once LiveKit has (re)created the call's room."""
    agent = ctx.agent
    me = (agent.hs.user_id, agent.hs.device_id)
    own = next((m for m in agent.memberships if (m.sender, m.device_id) == me), None)
    target = plan_connections(agent.memberships, own).publish_on
    if target is None or own is None:
        return False
    try:
        async with aiohttp.ClientSession() as http:
            await request_credentials(
                http,
                target.livekit_service_url,
                room_id=agent.room_id,
                user_id=agent.hs.user_id,
                device_id=agent.hs.device_id,
                member_id=own.member_id,
                openid=await agent.hs.request_openid_token(),
                endpoint=Endpoint.GET_TOKEN if own.dialect is Dialect.STICKY else Endpoint.SFU_GET,
                slot_id=ctx.mesh.slot_id,
                timeout_s=5.0,
            )
    except MatrixRTCError as exc:
        log.info("livekit_media.probe_failed", error=str(exc))
        return False
    return True
