"""MSC2746 call events as MatrixRTC full-mesh signalling sends them over to-device messages.

Every ``m.call.*`` content carries the envelope of :class:`CallEnvelope` (matrix-js-sdk
``sendVoipEvent``): ``call_id``, ``party_id`` (the sender's device id), ``version`` ("1"),
``conf_id`` (the group call), ``device_id``, ``sender_session_id``, ``dest_session_id`` and
``seq`` (per call_id, from 0). The parsers are pure and never raise: invalid content is logged
with its reason and ``None`` is returned.

Interop choices (shared/spec/mesh.md §1.3-1.4):

* ``version``: we write ``"1"``; we read ``"1"``, integer ``0`` (a v0 peer) and treat any other
  value as ``"1"``, as the MSC asks.
* stream metadata: js-sdk writes ``sdp_stream_metadata`` and reads either key; Hydrogen only
  knows ``org.matrix.msc3077.sdp_stream_metadata``. We write both and read the stable one
  first. Mute changes arrive as ``m.call.sdp_stream_metadata_changed`` (js-sdk) or
  ``org.matrix.call.sdp_stream_metadata_changed`` (Hydrogen); both parse to
  :class:`CallSdpStreamMetadataChanged`, which we send under the stable name (both read it).
* size limits: SDP bodies, candidate lists and id strings are bounded so that one to-device
  message cannot make us parse or hand aiortc megabytes.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

import structlog

from matrixrtc.model._json import TolerantStrEnum

__all__ = [
    "CALL_ID_RE",
    "DEFAULT_INVITE_LIFETIME_MS",
    "MAX_CANDIDATES",
    "MAX_CANDIDATE_LENGTH",
    "MAX_ID_LENGTH",
    "MAX_SDP_LENGTH",
    "MAX_SEQ",
    "STREAM_METADATA_KEY",
    "UNSTABLE_STREAM_METADATA_KEY",
    "CallAnswer",
    "CallCandidates",
    "CallEnvelope",
    "CallEvent",
    "CallEventType",
    "CallHangup",
    "CallInvite",
    "CallNegotiate",
    "CallReject",
    "CallSdpStreamMetadataChanged",
    "CallSelectAnswer",
    "Capabilities",
    "HangupReason",
    "IceCandidate",
    "SessionDescription",
    "StreamMetadata",
    "StreamPurpose",
    "parse_call_event",
]

log = structlog.get_logger(__name__)

DEFAULT_INVITE_LIFETIME_MS: Final = 60_000
# Chromium's SDP for audio+video with a data channel is ~6-8 KB; 64 KiB is the whole
# to-device event limit, so anything bigger cannot be legitimate anyway.
MAX_SDP_LENGTH: Final = 48 * 1024
MAX_CANDIDATES: Final = 64
MAX_CANDIDATE_LENGTH: Final = 1024
MAX_ID_LENGTH: Final = 255
MAX_SEQ: Final = 2**53 - 1  # the largest integer canonical JSON allows
MAX_STREAMS: Final = 16
CALL_ID_RE: Final = re.compile(r"[0-9A-Za-z._~-]{1,255}")
STREAM_METADATA_KEY: Final = "sdp_stream_metadata"
UNSTABLE_STREAM_METADATA_KEY: Final = "org.matrix.msc3077.sdp_stream_metadata"


class CallEventType(enum.StrEnum):
    INVITE = "m.call.invite"
    ANSWER = "m.call.answer"
    SELECT_ANSWER = "m.call.select_answer"
    CANDIDATES = "m.call.candidates"
    NEGOTIATE = "m.call.negotiate"
    HANGUP = "m.call.hangup"
    REJECT = "m.call.reject"
    SDP_STREAM_METADATA_CHANGED = "m.call.sdp_stream_metadata_changed"
    # Hydrogen sends only this prefixed name; js-sdk sends the stable one; both read both.
    SDP_STREAM_METADATA_CHANGED_UNSTABLE = "org.matrix.call.sdp_stream_metadata_changed"


class HangupReason(TolerantStrEnum):
    """js-sdk ``CallErrorCode`` plus MSC2746's additions; unknown codes are kept as they are."""

    USER_HANGUP = "user_hangup"
    LOCAL_OFFER_FAILED = "local_offer_failed"
    NO_USER_MEDIA = "no_user_media"
    UNKNOWN_DEVICES = "unknown_devices"
    SEND_INVITE = "send_invite"
    CREATE_ANSWER = "create_answer"
    CREATE_OFFER = "create_offer"
    SEND_ANSWER = "send_answer"
    SET_REMOTE_DESCRIPTION = "set_remote_description"
    SET_LOCAL_DESCRIPTION = "set_local_description"
    ANSWERED_ELSEWHERE = "answered_elsewhere"
    ICE_FAILED = "ice_failed"
    ICE_TIMEOUT = "ice_timeout"
    INVITE_TIMEOUT = "invite_timeout"
    REPLACED = "replaced"
    SIGNALLING_TIMEOUT = "signalling_timeout"
    USER_BUSY = "user_busy"
    TRANSFERRED = "transferred"
    NEW_SESSION = "new_session"
    USER_MEDIA_FAILED = "user_media_failed"
    UNKNOWN_ERROR = "unknown_error"


class StreamPurpose(TolerantStrEnum):
    USERMEDIA = "m.usermedia"
    SCREENSHARE = "m.screenshare"


class _Invalid(Exception):
    """Internal: raised by field readers, caught in :func:`parse_call_event`."""


def _str(content: Mapping[str, Any], key: str, *, max_len: int = MAX_ID_LENGTH) -> str:
    value = content.get(key)
    if not isinstance(value, str) or not value:
        raise _Invalid(f"{key} must be a non-empty string")
    if len(value) > max_len:
        raise _Invalid(f"{key} longer than {max_len}")
    return value


def _opt_str(content: Mapping[str, Any], key: str, *, max_len: int = MAX_ID_LENGTH) -> str | None:
    if content.get(key) is None:
        return None
    return _str(content, key, max_len=max_len)


def _opt_int(content: Mapping[str, Any], key: str, *, lo: int, hi: int) -> int | None:
    value = content.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _Invalid(f"{key} must be an integer in [{lo}, {hi}]")
    return value


def _mapping(content: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = content.get(key)
    if not isinstance(value, Mapping):
        raise _Invalid(f"{key} must be an object")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class CallEnvelope:
    """The fields every to-device ``m.call.*`` event carries (shared/spec/mesh.md §1.3)."""

    call_id: str
    party_id: str
    version: str = "1"
    conf_id: str | None = None
    device_id: str | None = None
    sender_session_id: str | None = None
    dest_session_id: str | None = None
    seq: int | None = None
    msgid: str | None = None

    @classmethod
    def _parse(cls, content: Mapping[str, Any]) -> CallEnvelope:
        call_id = content.get("call_id")
        if not isinstance(call_id, str) or CALL_ID_RE.fullmatch(call_id) is None:
            raise _Invalid("call_id must match [0-9A-Za-z._~-]{1,255}")
        raw_version = content.get("version")
        if raw_version is None:
            raise _Invalid("version is missing")
        # int 0 is a v0 peer; everything else is read as "1" (MSC2746).
        version = "0" if (raw_version == 0 and not isinstance(raw_version, bool)) else "1"
        return cls(
            call_id=call_id,
            party_id=_str(content, "party_id"),
            version=version,
            conf_id=_opt_str(content, "conf_id"),
            device_id=_opt_str(content, "device_id"),
            sender_session_id=_opt_str(content, "sender_session_id"),
            dest_session_id=_opt_str(content, "dest_session_id"),
            seq=_opt_int(content, "seq", lo=0, hi=MAX_SEQ),
            msgid=_opt_str(content, "org.matrix.msgid"),
        )

    def to_content(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "call_id": self.call_id,
            "party_id": self.party_id,
            # A v0 peer wrote the integer 0; keep it so the value reads back the same.
            "version": 0 if self.version == "0" else self.version,
        }
        for key, value in (
            ("conf_id", self.conf_id),
            ("device_id", self.device_id),
            ("sender_session_id", self.sender_session_id),
            ("dest_session_id", self.dest_session_id),
            ("seq", self.seq),
            ("org.matrix.msgid", self.msgid),
        ):
            if value is not None:
                out[key] = value
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionDescription:
    """``{"type": "offer"|"answer", "sdp": ...}``."""

    type: str
    sdp: str

    @classmethod
    def _parse(cls, raw: object, allowed: tuple[str, ...]) -> SessionDescription:
        if not isinstance(raw, Mapping):
            raise _Invalid("session description must be an object")
        sdp_type = raw.get("type")
        if sdp_type not in allowed:
            raise _Invalid(f"session description type must be one of {allowed}")
        sdp = raw.get("sdp")
        if not isinstance(sdp, str) or not sdp:
            raise _Invalid("sdp must be a non-empty string")
        if len(sdp) > MAX_SDP_LENGTH:
            raise _Invalid(f"sdp longer than {MAX_SDP_LENGTH}")
        return cls(type=str(sdp_type), sdp=sdp)

    def to_content(self) -> dict[str, Any]:
        return {"type": self.type, "sdp": self.sdp}


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamMetadata:
    purpose: StreamPurpose
    audio_muted: bool = False
    video_muted: bool = False

    def to_content(self) -> dict[str, Any]:
        return {
            "purpose": str(self.purpose),
            "audio_muted": self.audio_muted,
            "video_muted": self.video_muted,
        }


def _parse_metadata(content: Mapping[str, Any]) -> Mapping[str, StreamMetadata]:
    raw = content.get(STREAM_METADATA_KEY)
    if raw is None:
        raw = content.get(UNSTABLE_STREAM_METADATA_KEY)
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or len(raw) > MAX_STREAMS:
        raise _Invalid(f"sdp_stream_metadata must be an object of at most {MAX_STREAMS}")
    out: dict[str, StreamMetadata] = {}
    for stream_id, entry in raw.items():
        if not isinstance(stream_id, str) or not 0 < len(stream_id) <= MAX_ID_LENGTH:
            raise _Invalid("sdp_stream_metadata key must be a short string")
        if not isinstance(entry, Mapping):
            raise _Invalid("sdp_stream_metadata entry must be an object")
        purpose = entry.get("purpose")
        if not isinstance(purpose, str) or not 0 < len(purpose) <= MAX_ID_LENGTH:
            raise _Invalid("sdp_stream_metadata purpose must be a string")
        audio_muted = entry.get("audio_muted", False)
        video_muted = entry.get("video_muted", False)
        if not isinstance(audio_muted, bool) or not isinstance(video_muted, bool):
            raise _Invalid("sdp_stream_metadata mute flags must be booleans")
        out[stream_id] = StreamMetadata(
            purpose=StreamPurpose(purpose), audio_muted=audio_muted, video_muted=video_muted
        )
    return out


def _metadata_content(metadata: Mapping[str, StreamMetadata]) -> dict[str, Any]:
    body = {k: v.to_content() for k, v in metadata.items()}
    # js-sdk reads the stable key, Hydrogen only the unstable one.
    return {STREAM_METADATA_KEY: body, UNSTABLE_STREAM_METADATA_KEY: body}


@dataclass(frozen=True, slots=True, kw_only=True)
class Capabilities:
    transferee: bool = False
    dtmf: bool = False

    @classmethod
    def _parse(cls, content: Mapping[str, Any]) -> Capabilities:
        raw = content.get("capabilities")
        if not isinstance(raw, Mapping):
            return cls()
        return cls(
            transferee=raw.get("m.call.transferee") is True, dtmf=raw.get("m.call.dtmf") is True
        )

    def to_content(self) -> dict[str, Any]:
        return {"m.call.transferee": self.transferee, "m.call.dtmf": self.dtmf}


@dataclass(frozen=True, slots=True, kw_only=True)
class IceCandidate:
    """One entry of ``m.call.candidates``; ``candidate == ""`` marks end-of-candidates."""

    candidate: str
    sdp_mid: str | None = None
    sdp_mline_index: int | None = None

    @property
    def end_of_candidates(self) -> bool:
        return self.candidate == ""

    @classmethod
    def _parse(cls, raw: object) -> IceCandidate:
        if not isinstance(raw, Mapping):
            raise _Invalid("candidate must be an object")
        candidate = raw.get("candidate")
        if not isinstance(candidate, str) or len(candidate) > MAX_CANDIDATE_LENGTH:
            raise _Invalid("candidate.candidate must be a short string")
        mid = raw.get("sdpMid")
        if mid is not None and (not isinstance(mid, str) or len(mid) > MAX_ID_LENGTH):
            raise _Invalid("candidate.sdpMid must be a short string")
        index = _opt_int(raw, "sdpMLineIndex", lo=0, hi=1023)
        return cls(candidate=candidate, sdp_mid=mid, sdp_mline_index=index)

    def to_content(self) -> dict[str, Any]:
        out: dict[str, Any] = {"candidate": self.candidate}
        if self.sdp_mid is not None:
            out["sdpMid"] = self.sdp_mid
        if self.sdp_mline_index is not None:
            out["sdpMLineIndex"] = self.sdp_mline_index
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class CallEvent:
    """Base of the typed ``m.call.*`` contents."""

    event_type: ClassVar[CallEventType]
    envelope: CallEnvelope

    @property
    def call_id(self) -> str:
        return self.envelope.call_id

    def to_content(self) -> dict[str, Any]:
        return {**self.envelope.to_content(), **self._body()}

    def _body(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True, slots=True, kw_only=True)
class CallInvite(CallEvent):
    event_type: ClassVar[CallEventType] = CallEventType.INVITE
    offer: SessionDescription
    lifetime: int = DEFAULT_INVITE_LIFETIME_MS
    invitee: str | None = None
    capabilities: Capabilities = field(default_factory=Capabilities)
    stream_metadata: Mapping[str, StreamMetadata] = field(default_factory=dict)

    def _body(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "offer": self.offer.to_content(),
            "lifetime": self.lifetime,
            "capabilities": self.capabilities.to_content(),
            **_metadata_content(self.stream_metadata),
        }
        if self.invitee is not None:
            out["invitee"] = self.invitee
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class CallAnswer(CallEvent):
    event_type: ClassVar[CallEventType] = CallEventType.ANSWER
    answer: SessionDescription
    capabilities: Capabilities = field(default_factory=Capabilities)
    stream_metadata: Mapping[str, StreamMetadata] = field(default_factory=dict)

    def _body(self) -> dict[str, Any]:
        return {
            "answer": self.answer.to_content(),
            "capabilities": self.capabilities.to_content(),
            **_metadata_content(self.stream_metadata),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class CallSelectAnswer(CallEvent):
    event_type: ClassVar[CallEventType] = CallEventType.SELECT_ANSWER
    selected_party_id: str

    def _body(self) -> dict[str, Any]:
        return {"selected_party_id": self.selected_party_id}


@dataclass(frozen=True, slots=True, kw_only=True)
class CallCandidates(CallEvent):
    event_type: ClassVar[CallEventType] = CallEventType.CANDIDATES
    candidates: tuple[IceCandidate, ...]

    def _body(self) -> dict[str, Any]:
        return {"candidates": [c.to_content() for c in self.candidates]}


@dataclass(frozen=True, slots=True, kw_only=True)
class CallNegotiate(CallEvent):
    event_type: ClassVar[CallEventType] = CallEventType.NEGOTIATE
    description: SessionDescription
    lifetime: int = DEFAULT_INVITE_LIFETIME_MS
    stream_metadata: Mapping[str, StreamMetadata] = field(default_factory=dict)

    def _body(self) -> dict[str, Any]:
        return {
            "description": self.description.to_content(),
            "lifetime": self.lifetime,
            **_metadata_content(self.stream_metadata),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class CallHangup(CallEvent):
    event_type: ClassVar[CallEventType] = CallEventType.HANGUP
    reason: HangupReason = HangupReason.USER_HANGUP

    def _body(self) -> dict[str, Any]:
        return {"reason": str(self.reason)}


@dataclass(frozen=True, slots=True, kw_only=True)
class CallReject(CallEvent):
    event_type: ClassVar[CallEventType] = CallEventType.REJECT


@dataclass(frozen=True, slots=True, kw_only=True)
class CallSdpStreamMetadataChanged(CallEvent):
    event_type: ClassVar[CallEventType] = CallEventType.SDP_STREAM_METADATA_CHANGED
    stream_metadata: Mapping[str, StreamMetadata]

    def _body(self) -> dict[str, Any]:
        return _metadata_content(self.stream_metadata)


def _lifetime(content: Mapping[str, Any]) -> int:
    value = _opt_int(content, "lifetime", lo=0, hi=MAX_SEQ)
    return DEFAULT_INVITE_LIFETIME_MS if value is None else value


def _parse_invite(env: CallEnvelope, c: Mapping[str, Any]) -> CallEvent:
    return CallInvite(
        envelope=env,
        offer=SessionDescription._parse(c.get("offer"), ("offer",)),
        lifetime=_lifetime(c),
        invitee=_opt_str(c, "invitee"),
        capabilities=Capabilities._parse(c),
        stream_metadata=_parse_metadata(c),
    )


def _parse_answer(env: CallEnvelope, c: Mapping[str, Any]) -> CallEvent:
    return CallAnswer(
        envelope=env,
        answer=SessionDescription._parse(c.get("answer"), ("answer",)),
        capabilities=Capabilities._parse(c),
        stream_metadata=_parse_metadata(c),
    )


def _parse_select_answer(env: CallEnvelope, c: Mapping[str, Any]) -> CallEvent:
    return CallSelectAnswer(envelope=env, selected_party_id=_str(c, "selected_party_id"))


def _parse_candidates(env: CallEnvelope, c: Mapping[str, Any]) -> CallEvent:
    raw = c.get("candidates")
    if not isinstance(raw, list) or not raw or len(raw) > MAX_CANDIDATES:
        raise _Invalid(f"candidates must be a list of 1..{MAX_CANDIDATES}")
    return CallCandidates(envelope=env, candidates=tuple(IceCandidate._parse(x) for x in raw))


def _parse_negotiate(env: CallEnvelope, c: Mapping[str, Any]) -> CallEvent:
    return CallNegotiate(
        envelope=env,
        description=SessionDescription._parse(c.get("description"), ("offer", "answer")),
        lifetime=_lifetime(c),
        stream_metadata=_parse_metadata(c),
    )


def _parse_hangup(env: CallEnvelope, c: Mapping[str, Any]) -> CallEvent:
    reason = c.get("reason")
    if reason is None:
        return CallHangup(envelope=env)  # a missing reason means user_hangup (MSC2746)
    if not isinstance(reason, str) or not 0 < len(reason) <= MAX_ID_LENGTH:
        raise _Invalid("reason must be a short string")
    return CallHangup(envelope=env, reason=HangupReason(reason))


def _parse_reject(env: CallEnvelope, c: Mapping[str, Any]) -> CallEvent:
    return CallReject(envelope=env)


def _parse_metadata_changed(env: CallEnvelope, c: Mapping[str, Any]) -> CallEvent:
    if c.get(STREAM_METADATA_KEY) is None and c.get(UNSTABLE_STREAM_METADATA_KEY) is None:
        raise _Invalid("sdp_stream_metadata is missing")
    return CallSdpStreamMetadataChanged(envelope=env, stream_metadata=_parse_metadata(c))


_PARSERS = {
    CallEventType.INVITE: _parse_invite,
    CallEventType.ANSWER: _parse_answer,
    CallEventType.SELECT_ANSWER: _parse_select_answer,
    CallEventType.CANDIDATES: _parse_candidates,
    CallEventType.NEGOTIATE: _parse_negotiate,
    CallEventType.HANGUP: _parse_hangup,
    CallEventType.REJECT: _parse_reject,
    CallEventType.SDP_STREAM_METADATA_CHANGED: _parse_metadata_changed,
    CallEventType.SDP_STREAM_METADATA_CHANGED_UNSTABLE: _parse_metadata_changed,
}


def parse_call_event(event_type: object, content: object) -> CallEvent | None:
    """Parse one to-device ``m.call.*`` content; ``None`` (and a log line) if invalid."""
    if not isinstance(event_type, str) or event_type not in _PARSERS:
        log.info("voip.drop", reason="unknown event type", event_type=str(event_type)[:64])
        return None
    if not isinstance(content, Mapping):
        log.info("voip.drop", reason="content is not an object", event_type=event_type)
        return None
    try:
        envelope = CallEnvelope._parse(content)
        return _PARSERS[CallEventType(event_type)](envelope, content)
    except _Invalid as exc:
        log.info("voip.drop", reason=str(exc), event_type=event_type)
        return None
    except (TypeError, ValueError, RecursionError) as exc:
        # Defensive: an odd Mapping implementation must not escape as an exception.
        log.info("voip.drop", reason=f"malformed: {type(exc).__name__}", event_type=event_type)
        return None
