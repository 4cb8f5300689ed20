"""Our own LiveKit client over aiortc (I/O adapter of :mod:`matrixrtc.livekit.signal`).

Why: the pinned livekit Python SDK (1.2.1) decodes every subscribed video track whether or not
it is rendered (issue 19). This client receives media on an aiortc peer connection, so what is
decoded is up to us.

This module: the signalling session, the subscriber and the publisher peer connections.

* ``RtcClient.connect()`` opens ``/rtc`` with the access token, waits for ``JoinResponse``,
  then keeps the link alive (``ping_req`` every ``ping_interval``; no pong within
  ``ping_timeout`` closes the client with :class:`SignalLost`).
* The server offers on the subscriber peer connection; we answer. Host candidates are gathered
  only on ``addresses`` (``matrixrtc.media.ice.gather_on``: 127.0.0.1 in tests) and travel in
  the answer SDP *and* as trickles; the server's trickled candidates are added to aiortc (kept
  until the remote description exists).
* ``tracks``: every received aiortc track by LiveKit track id (``mid_to_track_id`` of the offer,
  else the SDP msid), with its publisher's identity (from ``JoinResponse`` and participant
  updates) and its ``RTCRtpReceiver``. ``on_track`` sees each one before its receiver starts,
  which is when a decode path can still be replaced: the tested binding is the mesh's
  ``install_receive_hook`` (VP8 frame assembler, LiveKit-format frame decryptor with the
  server's ``sif_trailer``, per-track ``ReceiveStats``, ``decode=`` only for rendered video),
  see ``tests/integration/test_livekit_rtc_client.py``. The caller wires it (this package may
  not import ``matrixrtc.mesh``: sibling layers).
* ICE consent on both peer connections by ``media.ice.keep_consent_on`` (RFC 7675's 30 s rule):
  aioice's own check gives up after six unanswered 0.5 s checks, which a loaded box (n=12 in
  bench/sfu_engine) reached: LiveKit saw the subscriber go and closed the participant. An
  expiry sets ``error`` and ``closed``.
* No REMB from the subscriber (``remb=False``): aiortc's per-stream estimate would read as the
  whole downlink's capacity to LiveKit, which then pauses streams (``_track_arrived``).
* ``aclose()`` sends ``leave`` and closes the peer connection and the WebSocket.

Publishing (``publish()``): ``AddTrackRequest`` per track (cid = the aiortc track id, marked
GCM-encrypted), every ``TrackPublishedResponse`` awaited, then our offer on the publisher peer
connection and the server's answer; trickles both ways. Tracks may yield already encoded and
encrypted ``av.Packet`` s (the mesh's encode-once ``SharedEncoder`` with its LiveKit-format
``CryptorTransform``; ``on_sender=adopt_sender`` routes PLI/REMB to it): the tested path.

Simulcast (``publish(layers=...)``, :mod:`matrixrtc.livekit.simulcast`): the video track's
``AddTrackRequest`` lists the layers; the offer sent to the server is rewritten to send them
as RID layers of one m-section (aiortc's own local description stays as aiortc made it). The
top layer is the video track's own sender; each lower layer gets a sender of its own on the
same DTLS transport and mid, started with the top sender's negotiated parameters once aiortc
starts that one (the transport is up), on its own SSRC, so LiveKit's PLIs and NACKs for a
layer reach that layer's sender (and so its encoder), and each layer sends its own RTCP
sender reports (LiveKit maps timestamps between layers with them). Every packet of a layer
carries its RID. aiortc private internal used: ``RTCRtpSender.__rtp_header_extensions_map``
(replaced before the sender starts by a map that adds the RID extension and the RID). A
subscriber asks for a layer with ``set_quality``; dynacast's ``SubscribedQualityUpdate``
(which layers some subscriber takes) goes to ``on_qualities``. ``remote_videos`` is the
others' video tracks as the server lists them, subscribed or not yet (``on_learned`` runs on
each change): a joiner can ask for its layers before its subscriptions start.

Not yet here: the wiring as an engine of ``LiveKitTransport`` (keys from the call's
sender-key machinery, ``render_max``, stats in the transport's shape) and bench/scale.py cells.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import aiohttp
import structlog
from aiortc import (
    MediaStreamTrack,
    RTCIceCandidate,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.rtcrtpparameters import (
    RTCRtpHeaderExtensionParameters,
    RTCRtpParameters,
    RTCRtpSendParameters,
)
from aiortc.rtp import HeaderExtensions, HeaderExtensionsMap
from aiortc.sdp import candidate_from_sdp

from matrixrtc.errors import LocalError, RemoteError
from matrixrtc.livekit import signal
from matrixrtc.livekit.simulcast import RID_EXTENSION_URI, Quality, SimulcastLayer, simulcast_offer
from matrixrtc.media.ice import (
    IceServerConfig,
    batch_udp_reads,
    close_peer_connection,
    gather_on,
    keep_consent_on,
    rtc_configuration,
)
from matrixrtc.tasks import OwnedTasks

__all__ = ["ReceivedTrack", "RtcClient", "SignalLost"]

log = structlog.get_logger(__name__)

JOIN_TIMEOUT_S = 10.0
# How long a server offer waits for the subscriber connection's first handshake (see
# _offer_loop) before it is applied anyway.
OFFER_HOLD_S = 30.0


class SignalLost(RemoteError):
    """The signalling WebSocket closed, or stopped answering pings."""


@dataclass
class ReceivedTrack:
    """A subscribed track as it arrives (aiortc's ``track`` event), before its receiver starts:
    an ``on_track`` callback may still replace the receiver's decode path (e.g. the mesh's
    receive hook: assemble, decrypt, count, decode only when rendered)."""

    track_id: str  # LiveKit's track sid (TR_…)
    identity: str  # the publishing participant ("" when the server has not said yet)
    kind: str
    track: MediaStreamTrack
    receiver: RTCRtpReceiver


@dataclass
class _Subscriber:
    pc: RTCPeerConnection
    mid_to_track: dict[str, str] = field(default_factory=dict)
    pending: list[signal.Candidate] = field(default_factory=list)
    described: bool = False
    # Set once the connection is connected (or failed/closed): its DTLS handshake is over.
    settled: asyncio.Event = field(default_factory=asyncio.Event)


class RtcClient:
    def __init__(
        self,
        url: str,
        token: str,
        *,
        addresses: Sequence[str] = ("127.0.0.1",),
        ice_servers: Sequence[IceServerConfig] = (),
        on_track: Callable[[ReceivedTrack], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        remb: bool = False,
        adaptive_stream: bool = False,
    ) -> None:
        """``remb``: let aiortc's video receivers send REMB (off: see ``_track_arrived``).
        ``adaptive_stream``: new video subscriptions start at the low layer
        (``signal.rtc_url``)."""
        self._remb = remb
        self._url = signal.rtc_url(url, token, adaptive_stream=adaptive_stream)
        self._addresses = tuple(addresses)
        self._ice_servers = tuple(ice_servers)
        self._on_track = on_track
        self._clock = clock
        self._tasks = OwnedTasks("rtc_client", log, event_prefix="livekit.rtc")
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._sub: _Subscriber | None = None
        self._pub: _Subscriber | None = None  # same bookkeeping: candidates before the answer
        self._published: dict[str, asyncio.Future[str]] = {}  # cid -> track sid
        self._layer_senders: list[RTCRtpSender] = []  # simulcast layers below the top one
        self.on_qualities: Callable[[signal.QualitiesWanted], None] | None = None
        self._answered: asyncio.Future[signal.Answer] | None = None
        self._offers: asyncio.Queue[signal.Offer] = asyncio.Queue()
        self._last_pong = 0.0
        self._send_lock = asyncio.Lock()
        self.joined: signal.Joined | None = None
        self.tracks: dict[str, ReceivedTrack] = {}
        self.owners: dict[str, str] = {}  # track sid -> publishing identity
        # The other participants' video tracks as the server lists them (subscribed or not
        # yet): track sid -> identity; ``on_learned`` runs after each change of the list.
        self.remote_videos: dict[str, str] = {}
        self.on_learned: Callable[[], None] | None = None
        self.pongs = 0
        self.rtt_ms = 0
        self.closed = asyncio.Event()
        self.error: BaseException | None = None

    # ------------------------------------------------------------------------- lifecycle
    async def connect(self) -> signal.Joined:
        self._session = aiohttp.ClientSession()
        try:
            self._ws = await self._session.ws_connect(self._url, heartbeat=None)
            async with asyncio.timeout(JOIN_TIMEOUT_S):
                message = await self._ws.receive()
            if message.type != aiohttp.WSMsgType.BINARY:
                raise SignalLost(
                    f"expected JoinResponse, got {message.type.name}: {message.data!r}"
                )
            event = signal.decode(message.data)
            if not isinstance(event, signal.Joined):
                raise SignalLost(f"expected JoinResponse, got {type(event).__name__}")
        except BaseException:
            await self._close_io()
            raise
        self.joined = event
        self._learn(event.tracks)
        self._sub = _Subscriber(pc=self._new_pc())
        self._watch_settled(self._sub)
        self._last_pong = self._clock()
        self._tasks.spawn(self._read_loop(), "read")
        self._tasks.spawn(self._offer_loop(), "offers")
        self._tasks.spawn(self._ping_loop(event), "ping")
        log.info(
            "livekit.rtc_joined",
            identity=event.identity,
            room=event.room_name,
            server=event.server_version,
            subscriber_primary=event.subscriber_primary,
            others=len(event.others),
        )
        return event

    async def aclose(self) -> None:
        if self._ws is not None and not self._ws.closed:
            with contextlib.suppress(Exception):
                await self._send(signal.encode_leave())
        await self._tasks.cancel()
        for sender in self._layer_senders:
            with contextlib.suppress(Exception):
                await sender.stop()
        for side in (self._sub, self._pub):
            if side is not None:
                await close_peer_connection(side.pc)
        await self._close_io()
        self.closed.set()

    async def _close_io(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()

    def _new_pc(self) -> RTCPeerConnection:
        batch_udp_reads()  # one socket carries every publisher's packets
        pc = RTCPeerConnection(rtc_configuration(self._ice_servers))

        @pc.on("track")
        def _track(track: MediaStreamTrack) -> None:
            self._track_arrived(pc, track)

        return pc

    def _track_arrived(self, pc: RTCPeerConnection, track: MediaStreamTrack) -> None:
        assert self._sub is not None
        transceiver = next(t for t in pc.getTransceivers() if t.receiver.track is track)
        mid = transceiver.mid
        track_id = self._sub.mid_to_track.get(mid or "", "") or track.id
        received = ReceivedTrack(
            track_id=track_id,
            identity=self.owners.get(track_id, ""),
            kind=track.kind,
            track=track,
            receiver=transceiver.receiver,
        )
        self.tracks[track_id] = received
        if not self._remb:
            # aiortc estimates each video receiver on its own and sends that one stream's rate
            # (~0.3 Mbit/s) as REMB; LiveKit takes a subscriber's REMB as its whole downlink's
            # capacity and pauses every stream beyond it (bench/sfu_engine: n=12, 11 videos on
            # a 0.3 Mbit/s "channel", whole receivers at 0 fps). Without it LiveKit has no
            # estimate for this subscriber and forwards every subscribed stream.
            setattr(transceiver.receiver, "_RTCRtpReceiver__remote_bitrate_estimator", None)  # noqa: B010
        log.debug("livekit.rtc_track", track=track_id, kind=track.kind, mid=mid)
        if self._on_track is not None:
            self._on_track(received)

    async def set_quality(self, track_sids: Sequence[str], quality: Quality) -> None:
        """Ask the server for the ``quality`` layer of these subscribed video tracks."""
        await self._send(signal.encode_track_settings(track_sids, quality))

    # ------------------------------------------------------------------------- signalling
    async def _send(self, data: bytes) -> None:
        assert self._ws is not None
        async with self._send_lock:
            await self._ws.send_bytes(data)

    async def _read_loop(self) -> None:
        assert self._ws is not None
        try:
            async for message in self._ws:
                if message.type != aiohttp.WSMsgType.BINARY:
                    continue
                await self._handle(signal.decode(message.data))
            raise SignalLost("the signalling WebSocket closed")
        except BaseException as e:
            self._failed(e)
            raise

    def _failed(self, e: BaseException) -> None:
        if not isinstance(e, asyncio.CancelledError):
            self.error = e
            self.closed.set()

    @staticmethod
    def _watch_settled(sub: _Subscriber) -> None:
        pc = sub.pc

        @pc.on("connectionstatechange")
        def _changed() -> None:
            if pc.connectionState in ("connected", "failed", "closed"):
                sub.settled.set()

    async def _offer_loop(self) -> None:
        """Answer the server's subscriber offers in order, off the read loop (which must go on
        reading the trickled candidates the connection needs).

        An offer after the first waits until the connection's first handshake is over: aiortc
        starts a transceiver's receiver only from the negotiation that finds DTLS "new" (it
        runs the handshake) or "connected". An offer applied while the handshake runs finds it
        "connecting", so none of its tracks' receivers ever start: every packet for them is
        dropped, with the connection up and every track announced. LiveKit offers the data
        channels at join and the tracks already published once the connection is up on its
        side, which a busy client may reach before its own last handshake step: the last
        joiner of a busy room (bench/sfu_engine n=12: 22 tracks, 0 packets, for good)."""
        sub = self._sub
        assert sub is not None
        try:
            while True:
                offer = await self._offers.get()
                if sub.described and not sub.settled.is_set():
                    try:
                        async with asyncio.timeout(OFFER_HOLD_S):
                            await sub.settled.wait()
                    except TimeoutError:
                        log.warning("livekit.rtc_offer_unsettled", waited_s=OFFER_HOLD_S)
                await self._answer(offer)
        except BaseException as e:
            self._failed(e)
            raise

    def _learn(self, tracks: Sequence[signal.RemoteTrack], gone: Sequence[str] = ()) -> None:
        for t in tracks:
            self.owners[t.track_sid] = t.identity
        # A participant listed again lists all its tracks: replace what we knew of it.
        listed = {t.identity for t in tracks} | set(gone)
        own = self.joined.identity if self.joined is not None else None
        self.remote_videos = {
            sid: who for sid, who in self.remote_videos.items() if who not in listed
        } | {t.track_sid: t.identity for t in tracks if t.kind == "video" and t.identity != own}
        if self.on_learned is not None:
            self.on_learned()

    async def _handle(self, event: signal.SignalEvent) -> None:
        if isinstance(event, signal.ParticipantsUpdated):
            self._learn(event.tracks, event.gone)
        elif isinstance(event, signal.Offer):
            self._offers.put_nowait(event)
        elif isinstance(event, signal.Trickle):
            await self._remote_candidate(event)
        elif isinstance(event, signal.TrackPublished):
            waiter = self._published.get(event.cid)
            if waiter is not None and not waiter.done():
                waiter.set_result(event.track_sid)
        elif isinstance(event, signal.Answer):
            if self._answered is not None and not self._answered.done():
                self._answered.set_result(event)
        elif isinstance(event, signal.Pong):
            self.pongs += 1
            self._last_pong = self._clock()
            if event.last_ping_ms:
                self.rtt_ms = max(0, int(time.time() * 1000) - event.last_ping_ms)
        elif isinstance(event, signal.QualitiesWanted):
            if self.on_qualities is not None:
                self.on_qualities(event)
        elif isinstance(event, signal.Left):
            raise SignalLost(f"the server asked us to leave (reason {event.reason})")

    async def _answer(self, offer: signal.Offer) -> None:
        sub = self._sub
        assert sub is not None
        sub.mid_to_track.update(dict(offer.mid_to_track_id))
        await sub.pc.setRemoteDescription(RTCSessionDescription(sdp=offer.sdp, type="offer"))
        sub.described = True
        for candidate in sub.pending:
            await sub.pc.addIceCandidate(_to_aiortc(candidate))
        sub.pending.clear()
        answer = await sub.pc.createAnswer()
        await gather_on(sub.pc, self._addresses)
        keep_consent_on(sub.pc, on_expired=lambda: self._consent_expired("subscriber"))
        await sub.pc.setLocalDescription(answer)
        local = sub.pc.localDescription
        await self._send(signal.encode_answer(local.sdp, offer_id=offer.id))
        for candidate in _sdp_candidates(local.sdp):
            await self._send(signal.encode_trickle(candidate, "subscriber"))

    def _consent_expired(self, side: str) -> None:
        log.warning("livekit.rtc_consent_expired", side=side)
        self.error = SignalLost(f"ICE consent of the {side} connection expired")
        self.closed.set()

    async def _remote_candidate(self, trickle: signal.Trickle) -> None:
        sub = self._sub if trickle.target == "subscriber" else self._pub
        if sub is None or trickle.candidate is None:
            return
        if not sub.described:
            sub.pending.append(trickle.candidate)
            return
        await sub.pc.addIceCandidate(_to_aiortc(trickle.candidate))

    # ------------------------------------------------------------------------- publishing
    async def publish(
        self,
        tracks: Sequence[MediaStreamTrack],
        *,
        width: int = 320,
        height: int = 240,
        encrypted: bool = True,
        on_sender: Callable[[RTCRtpSender], None] | None = None,
        layers: Sequence[tuple[SimulcastLayer, MediaStreamTrack]] = (),
        timeout_s: float = 10.0,
    ) -> dict[str, str]:
        """Publish ``tracks`` (once): ``AddTrackRequest`` for each (cid = the aiortc track id,
        which is the msid track id in our SDP), wait for every ``TrackPublishedResponse``, then
        offer on the publisher peer connection and apply the server's answer. ``on_sender``
        sees each sender before the offer (e.g. the mesh's ``adopt_sender`` for an
        encode-once track).

        ``layers`` (two or more, smallest first): the video track is sent as simulcast; each
        entry is a layer and the track that yields it, the last one's track being the video
        track of ``tracks`` (module docstring, Simulcast). Returns {cid: LiveKit track sid}."""
        if self._pub is not None:
            raise LocalError("publish() runs once per client")
        top = layers[-1][1] if len(layers) > 1 else None
        if top is not None and top not in tracks:
            raise LocalError("the largest simulcast layer's track must be one of the tracks")
        batch_udp_reads()
        pub = self._pub = _Subscriber(pc=RTCPeerConnection(rtc_configuration(self._ice_servers)))
        loop = asyncio.get_running_loop()
        for track in tracks:
            self._published[track.id] = loop.create_future()
            kind: Literal["audio", "video"] = "video" if track.kind == "video" else "audio"
            await self._send(
                signal.encode_add_track(
                    cid=track.id,
                    name=kind,
                    kind=kind,
                    width=width if kind == "video" else 0,
                    height=height if kind == "video" else 0,
                    encrypted=encrypted,
                    layers=[layer for layer, _ in layers] if track is top else (),
                )
            )
        async with asyncio.timeout(timeout_s):
            sids = {cid: await f for cid, f in self._published.items()}
        top_sender: RTCRtpSender | None = None
        for track in tracks:
            sender = pub.pc.addTrack(track)
            if on_sender is not None:
                on_sender(sender)
            if track is top:
                top_sender = sender
        offer = await pub.pc.createOffer()
        await gather_on(pub.pc, self._addresses)
        keep_consent_on(pub.pc, on_expired=lambda: self._consent_expired("publisher"))
        await pub.pc.setLocalDescription(offer)
        self._answered = loop.create_future()
        local = pub.pc.localDescription
        sdp = local.sdp
        if top_sender is not None:
            sdp = self._offer_layers(pub.pc, top_sender, sdp, layers, on_sender)
        await self._send(signal.encode_offer(sdp))
        async with asyncio.timeout(timeout_s):
            answer = await self._answered
        await pub.pc.setRemoteDescription(RTCSessionDescription(sdp=answer.sdp, type="answer"))
        pub.described = True
        for candidate in pub.pending:
            await pub.pc.addIceCandidate(_to_aiortc(candidate))
        pub.pending.clear()
        for candidate in _sdp_candidates(local.sdp):
            await self._send(signal.encode_trickle(candidate, "publisher"))
        log.info("livekit.rtc_published", tracks=sids, layers=[la.rid for la, _ in layers])
        return sids

    def _offer_layers(
        self,
        pc: RTCPeerConnection,
        top_sender: RTCRtpSender,
        sdp: str,
        layers: Sequence[tuple[SimulcastLayer, MediaStreamTrack]],
        on_sender: Callable[[RTCRtpSender], None] | None,
    ) -> str:
        """The offer rewritten for simulcast; the top layer's sender tags its packets with its
        RID, and once aiortc starts it (the transport is up) a sender per lower layer starts
        with the same parameters on its own SSRC."""
        mid = next(t.mid for t in pc.getTransceivers() if t.sender is top_sender)
        assert mid is not None  # set by setLocalDescription
        try:
            sdp, ext_id = simulcast_offer(sdp, mid, tuple(layer.rid for layer, _ in layers))
        except ValueError as exc:  # our own offer: a bug or an aiortc change, not the peer
            raise LocalError(f"cannot offer simulcast: {exc}") from exc

        def start_lower(parameters: RTCRtpSendParameters) -> None:
            for layer, track in layers[:-1]:
                sender = RTCRtpSender(track, top_sender.transport)
                if on_sender is not None:
                    on_sender(sender)
                _tag_with_rid(sender, layer.rid, ext_id)
                own = dataclasses.replace(
                    parameters, rtcp=dataclasses.replace(parameters.rtcp, ssrc=sender._ssrc)
                )
                self._layer_senders.append(sender)
                self._tasks.spawn(sender.send(own), f"layer {layer.rid}")

        _tag_with_rid(top_sender, layers[-1][0].rid, ext_id, on_configured=start_lower)
        return sdp

    async def _ping_loop(self, joined: signal.Joined) -> None:
        interval = joined.ping_interval_s or 5
        timeout = joined.ping_timeout_s or 15
        while True:
            await self._send(signal.encode_ping(int(time.time() * 1000), rtt_ms=self.rtt_ms))
            await asyncio.sleep(interval)
            if self._clock() - self._last_pong > timeout + interval:
                self.error = SignalLost(f"no pong for {timeout} s")
                self.closed.set()
                raise self.error


class _RidExtensions(HeaderExtensionsMap):
    """A sender's header extensions plus the RID (RFC 8852) of its simulcast layer on every
    packet; ``on_configured`` sees the sender's parameters when aiortc starts it."""

    def __init__(
        self,
        rid: str,
        ext_id: int,
        on_configured: Callable[[RTCRtpSendParameters], None] | None = None,
    ) -> None:
        super().__init__()
        self._rid = rid
        self._ext = RTCRtpHeaderExtensionParameters(id=ext_id, uri=RID_EXTENSION_URI)
        self._on_configured = on_configured

    def configure(self, parameters: RTCRtpParameters) -> None:
        with_rid = dataclasses.replace(
            parameters, headerExtensions=[*parameters.headerExtensions, self._ext]
        )
        super().configure(with_rid)
        if self._on_configured is not None and isinstance(parameters, RTCRtpSendParameters):
            self._on_configured(parameters)

    def set(self, values: HeaderExtensions) -> tuple[int, bytes]:
        values.rtp_stream_id = self._rid
        return super().set(values)


def _tag_with_rid(
    sender: RTCRtpSender,
    rid: str,
    ext_id: int,
    on_configured: Callable[[RTCRtpSendParameters], None] | None = None,
) -> None:
    # aiortc private: the sender's header extension map, replaced before the sender starts
    # (send() configures it from the negotiated parameters, which lack the RID extension:
    # aiortc does not offer it).
    sender._RTCRtpSender__rtp_header_extensions_map = _RidExtensions(  # type: ignore[attr-defined]
        rid, ext_id, on_configured
    )


def _to_aiortc(candidate: signal.Candidate) -> RTCIceCandidate:
    c = candidate_from_sdp(candidate.candidate)
    c.sdpMid = candidate.sdp_mid
    c.sdpMLineIndex = candidate.sdp_mline_index
    return c


def _sdp_candidates(sdp: str) -> list[signal.Candidate]:
    """Our candidates from our SDP, per media section (mid, index), for trickling."""
    out: list[signal.Candidate] = []
    sections = sdp.split("\nm=")[1:]
    for index, section in enumerate(sections):
        lines = section.splitlines()
        mid = next(
            (x.removeprefix("a=mid:").strip() for x in lines if x.startswith("a=mid:")), None
        )
        out.extend(
            signal.Candidate(
                candidate=x.removeprefix("a=candidate:").strip(),
                sdp_mid=mid,
                sdp_mline_index=index,
            )
            for x in lines
            if x.startswith("a=candidate:")
        )
    return out
