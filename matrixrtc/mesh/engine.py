"""The full-mesh engine: :class:`MeshSignalling` driven over aiortc, one peer connection per
remote device, every local track encoded once (:mod:`matrixrtc.mesh.fanout`).

The engine is the I/O adapter of the pure signalling core: it feeds the core received
to-device events, SDP results, connection states and timer ticks, and carries out the actions
the core returns, in order, in one owned runner task. To-device delivery is behind the small
:class:`ToDeviceSender` protocol (the homeserver adapter in production, an in-process queue in
tests). Every task the engine starts is owned and cancelled by :meth:`MeshEngine.aclose`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import structlog
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import MediaStreamTrack
from aiortc.sdp import candidate_from_sdp

from matrixrtc.errors import LocalError, RemoteError
from matrixrtc.media.frames import AvFrame, EncodedFrame, FrameTap
from matrixrtc.media.ice import batch_udp_reads, close_peer_connection
from matrixrtc.media.sinks import CountingSink, ReceiveStats
from matrixrtc.mesh.fanout import (
    FanOutTrack,
    SharedEncoder,
    adopt_sender,
    install_receive_hook,
    set_receive_decoding,
)
from matrixrtc.mesh.ice import (
    CONSENT_EXPIRY_S,
    CONSENT_INTERVAL_S,
    IceServerConfig,
    candidate_allowed,
    filter_sdp_candidates,
    gather_on,
    keep_consent_on,
    parse_networks,
    rtc_configuration,
)
from matrixrtc.mesh.transform import FrameTransform
from matrixrtc.model.voip import HangupReason, IceCandidate, StreamMetadata, StreamPurpose
from matrixrtc.session.mesh_signalling import (
    AddIceCandidates,
    ClosePeerConnection,
    CreateOffer,
    DeviceRef,
    LocalDevice,
    MeshSignalling,
    RemoteStreamMetadata,
    SendToDevice,
    SetRemoteDescription,
    SignallingAction,
    SignallingConfig,
)
from matrixrtc.tasks import OwnedTasks

__all__ = ["MeshConfig", "MeshEngine", "PeerLink", "ToDeviceSender"]

log = structlog.get_logger(__name__)

TAP_POLL_S: Final = 0.05  # how soon remote audio decoding follows the frames tap (as SYNC_S)


class ToDeviceSender(Protocol):
    async def send_to_device(
        self, user_id: str, device_id: str, event_type: str, content: Mapping[str, Any]
    ) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class MeshConfig:
    ice_servers: tuple[IceServerConfig, ...] = ()
    # Host candidate addresses; None lets aioice choose (every address but 127.0.0.1).
    host_addresses: tuple[str, ...] | None = None
    relay_only: bool = False
    # Remote candidates outside these networks (CIDR) are ignored; None accepts any.
    remote_networks: tuple[str, ...] | None = None
    signalling: SignallingConfig = field(default_factory=SignallingConfig)
    send_queue_frames: int = 8
    # Decode the video of at most this many peers (the first to connect), as a client that
    # renders only that many tiles or a recorder of one; every other peer's video is still
    # received, decrypted and counted (ReceiveStats.encoded_frames), not decoded. None: all.
    decode_video: int | None = None
    # False: aiortc's own path, one encoder per peer fed through MediaRelay (no frame E2EE).
    # Only for comparison (bench/mesh.py).
    encode_once: bool = True
    # ICE consent (RFC 7675, mesh/ice.py keep_consent): a check every consent_interval_s; a link
    # with no answer for consent_expiry_s has failed (hang up, the caller calls again). A peer
    # connection the peer closed itself is given up after the same time unless its hangup came.
    consent_interval_s: float = CONSENT_INTERVAL_S
    consent_expiry_s: float = CONSENT_EXPIRY_S


@dataclass(slots=True, kw_only=True)
class PeerLink:
    """One remote device's peer connection and what flows over it."""

    call_id: str
    peer: DeviceRef
    pc: RTCPeerConnection
    created_at: float
    connected_at: float | None = None
    stream_id: str | None = None
    tracks: list[FanOutTrack] = field(default_factory=list)
    stats: dict[str, ReceiveStats] = field(default_factory=dict)  # by kind
    frame_e2ee: bool = False  # frames to and from this peer carry frame E2EE
    # The kinds the peer sends us (its remote description's sending m-lines), known once the
    # remote description is set and before any frame arrives.
    remote_kinds: set[str] = field(default_factory=set)
    sinks: list[CountingSink] = field(default_factory=list)
    hooked: set[int] = field(default_factory=set)  # id() of receivers with our hook
    consent_expired: bool = False  # our consent checks went unanswered: the link has failed


class MeshEngine:
    """Full-mesh calls for one local device (see module doc)."""

    def __init__(
        self,
        local: LocalDevice,
        sender: ToDeviceSender,
        *,
        sources: Sequence[MediaStreamTrack] = (),
        config: MeshConfig | None = None,
        transform: FrameTransform | None = None,
        clock: Callable[[], float] = time.monotonic,
        frames: FrameTap[DeviceRef] | None = None,
        key_sent: Callable[[DeviceRef, int], bool] | None = None,
        frame_e2ee: Callable[[DeviceRef], bool] | None = None,
        encoders: Mapping[str, SharedEncoder] | None = None,
    ) -> None:
        """``encoders``: running encoders to send from instead of ``sources`` (shared with
        another transport: see :mod:`matrixrtc.media_transport.local_media`); the engine
        subscribes each peer to them and never starts or closes them. Their transform must
        be ``transform``'s encryption (the same sender key).
        ``frames``: where every decoded remote frame goes, with the device it came from.
        ``key_sent(peer, index)``: whether ``peer`` has been sent our key at ``index``; with
        it, a protected frame goes to a peer only if so (it could not decrypt it otherwise:
        frames are held back, not sent undecryptable, and video resumes at a key frame).
        ``frame_e2ee(peer)``: whether frames to and from ``peer`` carry frame E2EE (with a
        ``transform``; default: every peer). A peer without gets our frames unencrypted
        (still DTLS-SRTP) and its frames are decoded without decryption."""
        self.local = local
        self._frames = frames
        self._key_sent = key_sent
        self._frame_e2ee = frame_e2ee
        self.config = config or MeshConfig()
        self._sender = sender
        self._transform = transform
        self._clock = clock
        self.signalling = MeshSignalling(local, clock=clock, config=self.config.signalling)
        self.encoders: dict[str, SharedEncoder] = dict(encoders or {})
        self._owns_encoders = encoders is None
        self._sources: dict[str, MediaStreamTrack] = {
            kind: e.source for kind, e in self.encoders.items()
        }
        if encoders is not None and (sources or not self.config.encode_once):
            raise LocalError("shared encoders replace sources, and need encode_once")
        self._relay: MediaRelay | None = None
        if not self.config.encode_once:
            if transform is not None:
                raise LocalError("frame E2EE needs encode_once (the shared encoder)")
            self._relay = MediaRelay()
        for source in sources:
            if source.kind in self._sources:
                raise LocalError(f"one local {source.kind} track only")
            self._sources[source.kind] = source
            if self.config.encode_once:
                self.encoders[source.kind] = SharedEncoder(
                    source, transform=transform, queue_frames=self.config.send_queue_frames
                )
                self.encoders[source.kind].trace_label = "mesh"
        self._networks = (
            None
            if self.config.remote_networks is None
            else parse_networks(self.config.remote_networks)
        )
        self.links: dict[str, PeerLink] = {}
        self._actions: asyncio.Queue[SignallingAction] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._tasks = OwnedTasks(f"mesh {self.local.device_id}", log, event_prefix="mesh")
        self._started = False
        self._closed = False
        self._hushed = False
        # Remote audio is decoded only while the frames tap listens: nothing else reads it
        # (as the aiortc SFU engine). Received, decrypted and counted either way.
        self._decoding_audio = self._tap_listening()
        for source in self._sources.values():
            listen = getattr(source, "on_publishing_changed", None)
            if callable(listen):  # a Call's published track: announce mutes (MSC3291)
                listen(self._local_media_changed)

    # -- lifetime --------------------------------------------------------------------------

    async def __aenter__(self) -> MeshEngine:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        for encoder in self.encoders.values() if self._owns_encoders else ():
            encoder.start()
        self._tasks.spawn(self._run_actions(), "actions")
        self._tasks.spawn(self._run_timer(), "timer")
        if self._frames is not None:
            self._tasks.spawn(self._follow_tap(), "tap")

    async def aclose(self) -> None:
        """Hang up every call, close every peer connection, stop every task; then raise the
        first failure of the engine's own tasks (logged when it happened)."""
        if self._closed:
            return
        self._closed = True
        final = self.signalling.close()
        failure = await self._tasks.cancel()
        for action in final:  # the hangups and closes, carried out directly now
            try:
                await asyncio.wait_for(self._execute(action), 5.0)
            except Exception as exc:
                log.warning(
                    "mesh.close_action_failed", action=type(action).__name__, error=repr(exc)
                )
        for link in list(self.links.values()):
            await self._close_link(link)
        for encoder in self.encoders.values() if self._owns_encoders else ():
            try:
                await encoder.aclose()
            except RemoteError as exc:  # every encoder is closed; the first failure is raised
                failure = failure or exc
        if failure is not None:
            raise failure

    # -- inputs ----------------------------------------------------------------------------

    def set_members(
        self, members: Mapping[DeviceRef, str], conf_ids: Mapping[DeviceRef, str] | None = None
    ) -> None:
        """The active members that advertise the mesh transport (device → session id)."""
        self._feed(self.signalling.set_members(members, conf_ids))

    def receive(
        self, sender_user_id: str, event_type: str, content: object, *, local_age_ms: int = 0
    ) -> None:
        """A to-device ``m.call.*`` event from ``sender_user_id`` (already decrypted)."""
        self._feed(
            self.signalling.receive(sender_user_id, event_type, content, local_age_ms=local_age_ms)
        )

    # -- views -----------------------------------------------------------------------------

    def link_for(self, peer: DeviceRef) -> PeerLink | None:
        call = self.signalling.call_for(peer)
        return None if call is None else self.links.get(call.call_id)

    def hush(self) -> None:
        """Send nothing more to any peer, linked now or later (we left the call); the
        links stay up. Our peers' tracks only: the encoders may be shared."""
        self._hushed = True
        for link in self.links.values():
            for track in link.tracks:
                track.paused = True

    def set_video_decoding(self, peer: DeviceRef, on: bool) -> bool:
        """Decode ``peer``'s video or only receive, decrypt and count it (back on: from the
        next key frame, asked for by PLI); False: no link to ``peer`` yet."""
        link = self.link_for(peer)
        if link is None:
            return False
        done = False
        for transceiver in link.pc.getTransceivers():
            if transceiver.kind == "video":
                done = set_receive_decoding(transceiver.receiver, on) or done
        return done

    def _tap_listening(self) -> bool:
        return self._frames is not None and self._frames.listening

    async def _follow_tap(self) -> None:
        """Decode remote audio from when the frames tap starts listening, stop when it stops."""
        while True:
            await asyncio.sleep(TAP_POLL_S)
            listening = self._tap_listening()
            if listening is self._decoding_audio:
                continue
            self._decoding_audio = listening
            for link in self.links.values():
                for transceiver in link.pc.getTransceivers():
                    if transceiver.kind == "audio":
                        set_receive_decoding(transceiver.receiver, listening)

    def connected_peers(self) -> set[DeviceRef]:
        return {link.peer for link in self.links.values() if link.connected_at is not None}

    # -- action runner ---------------------------------------------------------------------

    def _feed(self, actions: Sequence[SignallingAction]) -> None:
        if self._closed:
            return
        for action in actions:
            self._actions.put_nowait(action)
        self._wake.set()  # deadlines may have moved

    async def _run_actions(self) -> None:
        while True:
            action = await self._actions.get()
            try:
                await self._execute(action)
            except Exception:
                log.exception("mesh.action_failed", action=type(action).__name__)

    async def _run_timer(self) -> None:
        while True:
            self._wake.clear()
            deadline = self.signalling.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - self._clock())
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation that
            # coincides with the event being set, and this loop then never stops (a hung close).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            self._feed(self.signalling.tick())

    async def _execute(self, action: SignallingAction) -> None:
        if isinstance(action, SendToDevice):
            await self._sender.send_to_device(
                action.user_id, action.device_id, action.event_type, action.content
            )
        elif isinstance(action, CreateOffer):
            await self._create_offer(action)
        elif isinstance(action, SetRemoteDescription):
            await self._set_remote(action)
        elif isinstance(action, AddIceCandidates):
            await self._add_candidates(action)
        elif isinstance(action, ClosePeerConnection):
            link = self.links.pop(action.call_id, None)
            if link is not None:
                log.info("mesh.link_closed", peer=link.peer.device_id, reason=str(action.reason))
                await self._close_link(link)
        elif isinstance(action, RemoteStreamMetadata):
            log.info("mesh.remote_metadata", peer=action.peer.device_id)

    # -- peer connections ------------------------------------------------------------------

    def _metadata(self, link: PeerLink) -> Mapping[str, StreamMetadata]:
        # js-sdk keys stream metadata by the msid stream id; aiortc uses one per connection.
        if link.stream_id is None:
            return {}
        return {
            link.stream_id: StreamMetadata(
                purpose=StreamPurpose.USERMEDIA,
                audio_muted=not self._publishing("audio"),
                video_muted=not self._publishing("video"),
            )
        }

    def _local_media_changed(self) -> None:
        # A kind started or stopped being published: every peer hears the new metadata.
        for link in self.links.values():
            self._feed(self.signalling.metadata_changed(link.call_id, self._metadata(link)))

    def _publishing(self, kind: str) -> bool:
        # A source that can say it has nothing to send now (a Call's PublishedTrack with no
        # track published in that kind) is announced muted; any other source is live.
        source = self._sources.get(kind)
        return source is not None and bool(getattr(source, "publishing", True))

    def remote_muted(self, peer: DeviceRef) -> frozenset[str]:
        """The kinds ``peer`` announced muted in its stream metadata (MSC3291): it sends the
        m-line but no media in it."""
        call = self.signalling.call_for(peer)
        meta = list(call.remote_metadata.values()) if call is not None else []
        if not meta:
            return frozenset()
        muted = set()
        if all(m.audio_muted for m in meta):
            muted.add("audio")
        if all(m.video_muted for m in meta):
            muted.add("video")
        return frozenset(muted)

    def _new_link(self, call_id: str, peer: DeviceRef) -> PeerLink:
        cfg = self.config
        batch_udp_reads()  # before aioice makes this connection's sockets
        pc = RTCPeerConnection(rtc_configuration(cfg.ice_servers, relay_only=cfg.relay_only))
        link = PeerLink(call_id=call_id, peer=peer, pc=pc, created_at=self._clock())
        self.links[call_id] = link

        @pc.on("connectionstatechange")
        def _on_state() -> None:
            state = pc.connectionState
            if self.links.get(call_id) is not link:
                return
            if state == "connected" and link.connected_at is None:
                link.connected_at = self._clock()
                log.info("mesh.connected", peer=peer.device_id, call_id=call_id)
                self._feed(self.signalling.media_connected(call_id))
            elif state == "failed":
                self._feed(self.signalling.media_failed(call_id))
            elif state == "closed" and not link.consent_expired and not self._closed:
                # aiortc closes a peer connection by itself once its DTLS transport closes. Our
                # consent expiry is handled by _consent_expired and a link we close has left
                # self.links, so this is the peer's close_notify: it closed its end on purpose
                # and its hangup, or its leave, follows over signalling. Calling again now would
                # ring a device that is going (and replace the call it is hanging up). A browser
                # sees a peer's close only as consent failing later; so do we: the link is given
                # up after consent_expiry_s if nothing has ended it by then.
                log.info("mesh.closed_by_peer", peer=peer.device_id, call_id=call_id)
                self._tasks.spawn(self._give_up_closed(link), f"mesh-closed-{call_id}")

        @pc.on("track")
        def _on_track(track: MediaStreamTrack) -> None:
            link.remote_kinds.add(track.kind)
            stats = link.stats.setdefault(track.kind, ReceiveStats(kind=track.kind))
            sink = CountingSink(track, stats, clock=self._clock, on_frame=self._frame_hook(peer))
            link.sinks.append(sink)
            sink.start()

        return link

    def _consent_expired(self, link: PeerLink) -> None:
        link.consent_expired = True
        if self.links.get(link.call_id) is link:
            self._feed(self.signalling.media_failed(link.call_id))

    async def _give_up_closed(self, link: PeerLink) -> None:
        await asyncio.sleep(self.config.consent_expiry_s)
        if self.links.get(link.call_id) is link:
            log.info("mesh.closed_link_given_up", peer=link.peer.device_id, call_id=link.call_id)
            self._feed(self.signalling.media_failed(link.call_id))

    def _frame_hook(self, peer: DeviceRef) -> Callable[[AvFrame], None] | None:
        tap = self._frames
        if tap is None:
            return None

        def hand_on(frame: AvFrame) -> None:
            if tap.listening:
                tap(peer, frame)

        return hand_on

    def _encoded_hook(self, peer: DeviceRef) -> Callable[[EncodedFrame], None] | None:
        tap = self._frames
        if tap is None:
            return None

        def hand_on(frame: EncodedFrame) -> None:
            if tap.listening_encoded:
                tap(peer, frame)

        return hand_on

    def _attach_media(self, link: PeerLink, *, answering: bool) -> None:
        """Send our shared tracks and hook every receiver; before any transport connects.

        Offering, a kind we do not send gets a receive-only m-line, so the peer can still send
        it. Answering, only kinds the offer has are attached: an answer cannot add m-lines
        (a video-only offer gets a video-only answer; aiortc fails on an extra track)."""
        sending = {s.track.kind for s in link.pc.getSenders() if s.track is not None}
        e2ee = self._transform is not None and (
            self._frame_e2ee is None or self._frame_e2ee(link.peer)
        )
        link.frame_e2ee = e2ee
        offered = {t.kind for t in link.pc.getTransceivers()}
        if not answering:
            for kind in ("audio", "video"):
                if kind not in self._sources and kind not in offered:
                    link.pc.addTransceiver(kind, direction="recvonly")
        for kind, source in self._sources.items():
            if kind in sending or (answering and kind not in offered):
                continue
            if self._relay is not None:
                sender = link.pc.addTrack(self._relay.subscribe(source, buffered=False))
            else:
                track = self.encoders[kind].subscribe(plain=not e2ee)
                track.paused = self._hushed
                if self._key_sent is not None and e2ee:
                    track.admit = functools.partial(self._key_sent, link.peer)
                sender = link.pc.addTrack(track)
                adopt_sender(sender)
                link.tracks.append(track)
            link.stream_id = sender._stream_id
        decryptor = self._transform.decryptor(link.peer) if e2ee and self._transform else None
        for transceiver in link.pc.getTransceivers():
            receiver = transceiver.receiver
            if id(receiver) in link.hooked:
                continue
            stats = link.stats.setdefault(transceiver.kind, ReceiveStats(kind=transceiver.kind))
            install_receive_hook(
                receiver,
                decryptor=decryptor,
                stats=stats,
                on_encoded=self._encoded_hook(link.peer),
                decode=(
                    self._may_decode_video(link)
                    if transceiver.kind == "video"
                    else self._decoding_audio
                ),
                trace_label=f"mesh {link.peer.user_id}",
            )
            link.hooked.add(id(receiver))

    def _may_decode_video(self, link: PeerLink) -> bool:
        """Whether ``link``'s video is decoded, under ``MeshConfig.decode_video``."""
        limit = self.config.decode_video
        if limit is None:
            return True
        decoding = sum(
            1
            for other in self.links.values()
            if other is not link and "video" in other.stats and other.stats["video"].decoding
        )
        return decoding < limit

    async def _set_local(self, link: PeerLink, description: RTCSessionDescription) -> str:
        if self.config.host_addresses is not None:
            await gather_on(link.pc, self.config.host_addresses)
        keep_consent_on(
            link.pc,
            interval_s=self.config.consent_interval_s,
            expiry_s=self.config.consent_expiry_s,
            on_expired=functools.partial(self._consent_expired, link),
        )
        await link.pc.setLocalDescription(description)
        return str(link.pc.localDescription.sdp)

    async def _create_offer(self, action: CreateOffer) -> None:
        link = self._new_link(action.call_id, action.peer)
        try:
            self._attach_media(link, answering=False)
            sdp = await self._set_local(link, await link.pc.createOffer())
        except Exception as exc:
            log.warning("mesh.offer_failed", call_id=action.call_id, error=repr(exc))
            self._feed(self.signalling.local_failed(action.call_id, HangupReason.CREATE_OFFER))
            return
        self._feed(self.signalling.offer_created(action.call_id, sdp, self._metadata(link)))

    async def _set_remote(self, action: SetRemoteDescription) -> None:
        desc = action.description
        link = self.links.get(action.call_id)
        if link is None:
            if desc.type != "offer":
                return  # the call ended meanwhile
            link = self._new_link(action.call_id, action.peer)
        step = HangupReason.SET_REMOTE_DESCRIPTION
        sdp = desc.sdp
        if self._networks is not None:
            sdp = filter_sdp_candidates(sdp, self._networks)
        try:
            await link.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=desc.type))
            if desc.type == "offer":
                step = HangupReason.CREATE_ANSWER
                self._attach_media(link, answering=True)
                sdp = await self._set_local(link, await link.pc.createAnswer())
        except Exception as exc:
            # Garbage SDP from a peer ends up here: hang up that call, keep serving the rest.
            log.warning("mesh.remote_description_failed", call_id=action.call_id, error=repr(exc))
            self._feed(self.signalling.local_failed(action.call_id, step))
            return
        if desc.type == "offer":
            self._feed(self.signalling.answer_created(action.call_id, sdp, self._metadata(link)))

    async def _add_candidates(self, action: AddIceCandidates) -> None:
        link = self.links.get(action.call_id)
        if link is None:
            return
        for candidate in action.candidates:
            if (
                self._networks is not None
                and not candidate.end_of_candidates
                and not candidate_allowed(candidate.candidate, self._networks)
            ):
                log.info("mesh.remote_candidate_refused", call_id=action.call_id)
                continue
            try:
                await link.pc.addIceCandidate(_to_rtc_candidate(candidate))
            except Exception as exc:
                log.info("mesh.bad_candidate", call_id=action.call_id, error=repr(exc))

    async def _close_link(self, link: PeerLink) -> None:
        self.links.pop(link.call_id, None)
        for track in link.tracks:
            track.stop()
        try:
            await asyncio.wait_for(close_peer_connection(link.pc), 10.0)
        except Exception as exc:
            log.warning("mesh.close_failed", peer=link.peer.device_id, error=repr(exc))
        for sink in link.sinks:
            await sink.aclose()


def _to_rtc_candidate(candidate: IceCandidate) -> Any:
    if candidate.end_of_candidates:
        return None
    text = candidate.candidate
    if text.startswith("candidate:"):
        text = text.split(":", 1)[1]
    rtc = candidate_from_sdp(text)
    rtc.sdpMid = candidate.sdp_mid
    rtc.sdpMLineIndex = candidate.sdp_mline_index
    return rtc
