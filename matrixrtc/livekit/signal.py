"""LiveKit's signalling protocol, sans I/O: the ``/rtc`` URL, and typed events from and to the
binary protobuf messages of the WebSocket.

Protocol facts (from livekit-protocol's ``livekit_rtc.proto`` as pinned, and the client SDKs'
behaviour as read in client-sdk-js and the Rust SDK):

* The client opens ``ws(s)://host/rtc?access_token=…&auto_subscribe=1&protocol=N&sdk=…``. Each
  WebSocket *binary* message is exactly one serialized ``SignalResponse`` (server to client)
  or ``SignalRequest`` (client to server); there is no further framing.
* The first response is ``join`` (``JoinResponse``): our participant, the others, ICE servers,
  ``subscriber_primary`` and the keepalive (``ping_interval`` / ``ping_timeout``, seconds).
* Two peer connections: the server offers on the *subscriber* one (we answer), we offer on the
  *publisher* one (the server answers). ICE candidates are trickled both ways as
  ``TrickleRequest`` whose ``candidateInit`` is the JSON of a browser ``RTCIceCandidateInit``
  and whose ``target`` names the peer connection.
* Keepalive: ``ping_req`` (``Ping{timestamp, rtt}``, ms) is answered with ``pong_resp``
  (``Pong{last_ping_timestamp, timestamp}``); the older ``ping``/``pong`` int64 pair also exists.
  No pong for ``ping_timeout`` seconds means the signalling link is dead.
* ``leave`` from us ends the session; ``leave`` from the server carries a reason and an action
  (disconnect, resume, reconnect).

Nothing here does I/O: :func:`decode` turns bytes into one of the frozen event types below,
the ``encode_*`` functions turn intents into bytes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlencode, urlsplit, urlunsplit

from google.protobuf.message import DecodeError
from livekit.protocol import models as lk_models
from livekit.protocol import rtc as lk_rtc

from matrixrtc.errors import RemoteError
from matrixrtc.livekit.simulcast import Quality, SimulcastLayer

__all__ = [
    "PROTOCOL_VERSION",
    "Answer",
    "Candidate",
    "Joined",
    "Left",
    "Offer",
    "Other",
    "ParticipantsUpdated",
    "Pong",
    "QualitiesWanted",
    "RemoteTrack",
    "SignalDecodeError",
    "SignalEvent",
    "Target",
    "TrackPublished",
    "Trickle",
    "decode",
    "encode_add_track",
    "encode_answer",
    "encode_leave",
    "encode_offer",
    "encode_ping",
    "encode_track_settings",
    "encode_trickle",
    "parse_candidate_init",
    "rtc_url",
]

# The signalling protocol version we speak (client-sdk-js 2.x sends 16).
PROTOCOL_VERSION = 16

Target = Literal["publisher", "subscriber"]


class SignalDecodeError(RemoteError):
    """The server sent a message that is not a ``SignalResponse``."""


def rtc_url(
    base_url: str,
    token: str,
    *,
    auto_subscribe: bool = True,
    sdk: str = "python",
    adaptive_stream: bool = False,
) -> str:
    """The ``/rtc`` WebSocket URL for ``base_url`` (``ws``/``wss``/``http``/``https``).
    ``adaptive_stream``: the server forwards the low simulcast layer of a new video
    subscription until the client asks for another (else the full one)."""
    parts = urlsplit(base_url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"not a LiveKit URL: {base_url!r}")
    path = parts.path.rstrip("/") + "/rtc"
    query = urlencode(
        {
            "access_token": token,
            "auto_subscribe": "1" if auto_subscribe else "0",
            **({"adaptive_stream": "1"} if adaptive_stream else {}),
            "protocol": str(PROTOCOL_VERSION),
            "sdk": sdk,
            "version": "0.1.0",
        }
    )
    return urlunsplit((scheme, parts.netloc, path, query, ""))


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoteTrack:
    """One published track of a participant, as the server lists it."""

    participant_sid: str
    identity: str
    track_sid: str
    kind: Literal["audio", "video", "data"]
    name: str
    width: int
    height: int
    encrypted: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Joined:
    participant_sid: str
    identity: str
    room_name: str
    server_version: str
    subscriber_primary: bool
    ping_interval_s: int
    ping_timeout_s: int
    others: tuple[str, ...]  # identities of the participants already in the room
    tracks: tuple[RemoteTrack, ...]
    sif_trailer: bytes  # marks frames the server injects (not encrypted by a sender)


@dataclass(frozen=True, slots=True, kw_only=True)
class Offer:
    """The server's offer for the subscriber peer connection."""

    sdp: str
    id: int
    mid_to_track_id: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Answer:
    """The server's answer for the publisher peer connection."""

    sdp: str
    id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """An ``RTCIceCandidateInit``: ``candidate`` without its ``candidate:`` prefix is SDP."""

    candidate: str
    sdp_mid: str | None
    sdp_mline_index: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Trickle:
    target: Target
    candidate: Candidate | None  # None: end of candidates
    final: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Pong:
    last_ping_ms: int
    server_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Left:
    reason: int
    action: int
    can_reconnect: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class TrackPublished:
    cid: str
    track_sid: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ParticipantsUpdated:
    tracks: tuple[RemoteTrack, ...]
    gone: tuple[str, ...]  # identities that left


@dataclass(frozen=True, slots=True, kw_only=True)
class Other:
    """A message we do not act on; ``field`` is its oneof name."""

    field: str


@dataclass(frozen=True, slots=True, kw_only=True)
class QualitiesWanted:
    """Dynacast (``SubscribedQualityUpdate``): which layers of our track ``track_sid`` some
    subscriber takes now; a layer nobody takes need not be sent."""

    track_sid: str
    enabled: frozenset[str]  # "low", "medium", "high"


SignalEvent = (
    Joined
    | Offer
    | Answer
    | Trickle
    | Pong
    | Left
    | TrackPublished
    | ParticipantsUpdated
    | QualitiesWanted
    | Other
)

_QUALITY_NAMES: dict[int, str] = {
    lk_models.VideoQuality.LOW: "low",
    lk_models.VideoQuality.MEDIUM: "medium",
    lk_models.VideoQuality.HIGH: "high",
}
_QUALITIES: dict[str, int] = {name: value for value, name in _QUALITY_NAMES.items()}

_KINDS: dict[int, Literal["audio", "video", "data"]] = {
    lk_models.TrackType.AUDIO: "audio",
    lk_models.TrackType.VIDEO: "video",
    lk_models.TrackType.DATA: "data",
}


def _tracks(participant: lk_models.ParticipantInfo) -> list[RemoteTrack]:
    return [
        RemoteTrack(
            participant_sid=participant.sid,
            identity=participant.identity,
            track_sid=t.sid,
            kind=_KINDS.get(t.type, "data"),
            name=t.name,
            width=t.width,
            height=t.height,
            encrypted=t.encryption != lk_models.Encryption.NONE,
        )
        for t in participant.tracks
    ]


def _target(value: int) -> Target:
    return "publisher" if value == lk_rtc.SignalTarget.PUBLISHER else "subscriber"


def parse_candidate_init(text: str) -> Candidate | None:
    """Parse the JSON ``candidateInit`` of a trickle; ``None`` for an end-of-candidates marker
    (an empty candidate). Raises :class:`SignalDecodeError` on anything else malformed."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise SignalDecodeError(f"candidateInit is not JSON: {e}") from e
    if not isinstance(value, dict):
        raise SignalDecodeError("candidateInit is not an object")
    candidate = value.get("candidate", "")
    mid = value.get("sdpMid")
    index = value.get("sdpMLineIndex")
    if not isinstance(candidate, str) or not (mid is None or isinstance(mid, str)):
        raise SignalDecodeError("candidateInit has a malformed candidate or sdpMid")
    if index is not None and (type(index) is not int or index < 0):
        raise SignalDecodeError("candidateInit has a malformed sdpMLineIndex")
    candidate = candidate.removeprefix("candidate:")
    if not candidate.strip():
        return None
    return Candidate(candidate=candidate, sdp_mid=mid, sdp_mline_index=index)


def decode(data: bytes) -> SignalEvent:
    """One WebSocket binary message from the server as an event."""
    message = lk_rtc.SignalResponse()
    try:
        message.ParseFromString(data)
    except DecodeError as e:
        raise SignalDecodeError(f"not a SignalResponse: {e}") from e
    field = message.WhichOneof("message")
    if field == "join":
        j = message.join
        tracks = [t for p in j.other_participants for t in _tracks(p)]
        return Joined(
            participant_sid=j.participant.sid,
            identity=j.participant.identity,
            room_name=j.room.name,
            server_version=j.server_version,
            subscriber_primary=j.subscriber_primary,
            ping_interval_s=j.ping_interval,
            ping_timeout_s=j.ping_timeout,
            others=tuple(p.identity for p in j.other_participants),
            tracks=tuple(tracks),
            sif_trailer=j.sif_trailer,
        )
    if field == "offer":
        return Offer(
            sdp=message.offer.sdp,
            id=message.offer.id,
            mid_to_track_id=tuple(sorted(message.offer.mid_to_track_id.items())),
        )
    if field == "answer":
        return Answer(sdp=message.answer.sdp, id=message.answer.id)
    if field == "trickle":
        return Trickle(
            target=_target(message.trickle.target),
            candidate=parse_candidate_init(message.trickle.candidateInit),
            final=message.trickle.final,
        )
    if field == "pong_resp":
        return Pong(
            last_ping_ms=message.pong_resp.last_ping_timestamp,
            server_ms=message.pong_resp.timestamp,
        )
    if field == "pong":
        return Pong(last_ping_ms=message.pong, server_ms=0)
    if field == "leave":
        return Left(
            reason=message.leave.reason,
            action=message.leave.action,
            can_reconnect=message.leave.can_reconnect,
        )
    if field == "track_published":
        return TrackPublished(
            cid=message.track_published.cid, track_sid=message.track_published.track.sid
        )
    if field == "update":
        gone = tuple(
            p.identity
            for p in message.update.participants
            if p.state == lk_models.ParticipantInfo.State.DISCONNECTED
        )
        present = tuple(
            t
            for p in message.update.participants
            if p.state != lk_models.ParticipantInfo.State.DISCONNECTED
            for t in _tracks(p)
        )
        return ParticipantsUpdated(tracks=present, gone=gone)
    if field == "subscribed_quality_update":
        u = message.subscribed_quality_update
        # Newer servers list qualities per codec; older ones (and VP8-only tracks) also fill
        # the flat list. A quality counts as wanted if any codec's entry enables it.
        entries = list(u.subscribed_qualities) + [
            q for codec in u.subscribed_codecs for q in codec.qualities
        ]
        enabled = frozenset(
            _QUALITY_NAMES[q.quality] for q in entries if q.enabled and q.quality in _QUALITY_NAMES
        )
        return QualitiesWanted(track_sid=u.track_sid, enabled=enabled)
    return Other(field=field or "")


def _request(**fields: object) -> bytes:
    return lk_rtc.SignalRequest(**fields).SerializeToString()  # type: ignore[arg-type]


def encode_answer(sdp: str, *, offer_id: int = 0) -> bytes:
    return _request(answer=lk_rtc.SessionDescription(type="answer", sdp=sdp, id=offer_id))


def encode_offer(sdp: str, *, offer_id: int = 0) -> bytes:
    return _request(offer=lk_rtc.SessionDescription(type="offer", sdp=sdp, id=offer_id))


def encode_trickle(candidate: Candidate, target: Target) -> bytes:
    init = {
        "candidate": "candidate:" + candidate.candidate,
        "sdpMid": candidate.sdp_mid,
        "sdpMLineIndex": candidate.sdp_mline_index,
    }
    signal_target = (
        lk_rtc.SignalTarget.PUBLISHER if target == "publisher" else lk_rtc.SignalTarget.SUBSCRIBER
    )
    return _request(
        trickle=lk_rtc.TrickleRequest(candidateInit=json.dumps(init), target=signal_target)
    )


def encode_ping(now_ms: int, *, rtt_ms: int = 0) -> bytes:
    return _request(ping_req=lk_rtc.Ping(timestamp=now_ms, rtt=rtt_ms))


def encode_leave() -> bytes:
    return _request(
        leave=lk_rtc.LeaveRequest(
            reason=lk_models.DisconnectReason.CLIENT_INITIATED,
            action=lk_rtc.LeaveRequest.Action.DISCONNECT,
        )
    )


def encode_add_track(
    *,
    cid: str,
    name: str,
    kind: Literal["audio", "video"],
    width: int = 0,
    height: int = 0,
    encrypted: bool = True,
    layers: Sequence[SimulcastLayer] = (),
) -> bytes:
    """``AddTrackRequest``: announce a track before offering it on the publisher connection.
    ``encrypted`` marks it GCM (LiveKit's per-frame E2EE, the shape Element Call publishes);
    ``layers``: the simulcast layers a video track will send (smallest first)."""
    return _request(
        add_track=lk_rtc.AddTrackRequest(
            layers=[
                lk_models.VideoLayer(
                    quality=_QUALITIES[layer.quality],  # type: ignore[arg-type]
                    width=layer.width,
                    height=layer.height,
                    bitrate=layer.bitrate,
                    rid=layer.rid,
                )
                for layer in layers
            ],
            cid=cid,
            name=name,
            type=lk_models.TrackType.VIDEO if kind == "video" else lk_models.TrackType.AUDIO,
            width=width,
            height=height,
            source=(
                lk_models.TrackSource.CAMERA
                if kind == "video"
                else lk_models.TrackSource.MICROPHONE
            ),
            encryption=lk_models.Encryption.GCM if encrypted else lk_models.Encryption.NONE,
        )
    )


def encode_track_settings(track_sids: Sequence[str], quality: Quality) -> bytes:
    """``UpdateTrackSettings``: forward the ``quality`` layer of these remote video tracks
    (the nearest the publisher sends)."""
    return _request(
        track_setting=lk_rtc.UpdateTrackSettings(
            track_sids=list(track_sids),
            quality=_QUALITIES[quality],  # type: ignore[arg-type]
        )
    )
