"""Request bodies of the lk-jwt-service API, decoded as strictly as its Rust port does.

lk-jwt-service's Go build decodes each body with ``json.NewDecoder(body).DisallowUnknownFields()``,
which folds key case, keeps the last of duplicate keys, ignores anything after the first value
and turns invalid UTF-8 and lone surrogates into U+FFFD. Its Rust port (branch
``johannes/rust``: ``serde_json::from_slice`` into ``#[serde(deny_unknown_fields)]`` structs
whose fields are ``#[serde(default)]``) rejects all of these, and a drop-in is never more lenient
than the service it replaces. So a body is refused when it has

- invalid UTF-8 anywhere, or a ``\\uD800``-``\\uDFFF`` escape not part of a surrogate pair;
- anything but JSON whitespace after the first value (trailing data, a second object);
- a key twice in one object, or a key that matches a field only in another case;
- a key matching no field (also in nested objects), the wrong JSON type, ``null`` where a
  string, integer or object is expected (``#[serde(default)]`` applies to absent fields only;
  a top-level ``null`` too), an integer written with a fraction or exponent or outside int64,
  ``NaN``/``Infinity``.

Absent fields keep their zero value. Every decode error is answered with 400 ``M_NOT_JSON``
"Error reading request"; validation errors (missing fields) with 400 ``M_BAD_JSON`` and
lk-jwt-service's messages.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final

import structlog

__all__ = [
    "ApiError",
    "ClaimedMember",
    "DelegateDelayedLeaveRequest",
    "LegacySFURequest",
    "OpenIDToken",
    "SFURequest",
    "decode_delegate",
    "decode_get_token",
    "decode_legacy",
    "validate_delegate",
    "validate_get_token",
    "validate_legacy",
]

log = structlog.get_logger(__name__)

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1


@dataclass(frozen=True, slots=True)
class ApiError:
    """A Matrix-style error answer: HTTP status, ``errcode`` and ``error``."""

    status: int
    errcode: str
    error: str


NOT_JSON: Final = ApiError(400, "M_NOT_JSON", "Error reading request")


@dataclass(frozen=True, slots=True)
class OpenIDToken:
    """``openid_token`` as returned by ``/openid/request_token``."""

    access_token: str = ""
    token_type: str = ""
    matrix_server_name: str = ""
    expires_in: int = 0


@dataclass(frozen=True, slots=True)
class ClaimedMember:
    """``member`` of an MSC4195 request: who the requester says it is in the call (checked
    against its OpenID identity). Not :class:`matrixrtc.e2ee.keys.Member`."""

    id: str = ""
    claimed_user_id: str = ""
    claimed_device_id: str = ""


@dataclass(frozen=True, slots=True)
class SFURequest:
    """Body of ``POST /get_token`` (MSC4195)."""

    room_id: str = ""
    slot_id: str = ""
    openid_token: OpenIDToken = OpenIDToken()
    member: ClaimedMember = ClaimedMember()
    delay_id: str = ""
    delay_timeout: int = 0
    delay_cs_api_url: str = ""  # accepted and ignored, as on lk-jwt-service main


@dataclass(frozen=True, slots=True)
class LegacySFURequest:
    """Body of ``POST /sfu/get`` (pre-Matrix-2.0)."""

    room: str = ""
    openid_token: OpenIDToken = OpenIDToken()
    device_id: str = ""
    delay_id: str = ""
    delay_timeout: int = 0
    delay_cs_api_url: str = ""


@dataclass(frozen=True, slots=True)
class DelegateDelayedLeaveRequest:
    """Body of ``POST /delegate_delayed_leave``."""

    room_id: str = ""
    slot_id: str = ""
    openid_token: OpenIDToken = OpenIDToken()
    member: ClaimedMember = ClaimedMember()
    delay_id: str = ""
    delay_timeout: int = 0
    delay_cs_api_url: str = ""


class _DecodeError(Exception):
    pass


# Field kinds: "s" string, "i" int, or a nested schema.
_Schema = dict[str, "str | tuple[type[Any], _Schema]"]

_OPENID: Final[_Schema] = {
    "access_token": "s",
    "token_type": "s",
    "matrix_server_name": "s",
    "expires_in": "i",
}
_MEMBER: Final[_Schema] = {"id": "s", "claimed_user_id": "s", "claimed_device_id": "s"}
_SFU: Final[_Schema] = {
    "room_id": "s",
    "slot_id": "s",
    "openid_token": (OpenIDToken, _OPENID),
    "member": (ClaimedMember, _MEMBER),
    "delay_id": "s",
    "delay_timeout": "i",
    "delay_cs_api_url": "s",
}
_LEGACY: Final[_Schema] = {
    "room": "s",
    "openid_token": (OpenIDToken, _OPENID),
    "device_id": "s",
    "delay_id": "s",
    "delay_timeout": "i",
    "delay_cs_api_url": "s",
}


class _Float(float):
    """A JSON number written with a fraction or exponent (Go's int fields reject these)."""


def _reject_constant(name: str) -> Any:
    raise _DecodeError(f"invalid JSON constant {name}")


_WS: Final = " \t\n\r"


_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DecodeError(f"duplicate key {key[:64]!r}")
        obj[key] = value
    return obj


_DECODER: Final = json.JSONDecoder(
    parse_float=_Float, parse_constant=_reject_constant, object_pairs_hook=_pairs
)


def _build(cls: type[Any], schema: _Schema, value: object) -> Any:
    if not isinstance(value, dict):
        raise _DecodeError(f"cannot decode {type(value).__name__} into {cls.__name__}")
    fields: dict[str, Any] = {}
    for name, item in value.items():
        kind = schema.get(name)
        if kind is None:
            raise _DecodeError(f"unknown field {name[:64]!r}")
        if kind == "s":
            if not isinstance(item, str):
                raise _DecodeError(f"field {name!r} is not a string")
            if _SURROGATE.search(item):
                raise _DecodeError(f"field {name!r} holds a lone surrogate")
            fields[name] = item
        elif kind == "i":
            if isinstance(item, bool) or not isinstance(item, int) or isinstance(item, _Float):
                raise _DecodeError(f"field {name!r} is not an integer")
            if not _INT64_MIN <= item <= _INT64_MAX:
                raise _DecodeError(f"field {name!r} overflows int64")
            fields[name] = item
        elif isinstance(kind, tuple):
            fields[name] = _build(kind[0], kind[1], item)
    return cls(**fields)


def _decode(raw: bytes, cls: type[Any], schema: _Schema) -> Any | None:
    try:
        text = raw.decode("utf-8")
        start = len(text) - len(text.lstrip(_WS))
        value, end = _DECODER.raw_decode(text, start)
        if text[end:].strip(_WS):
            raise _DecodeError(f"trailing data at offset {end}")
        return _build(cls, schema, value)
    except (ValueError, _DecodeError, RecursionError) as exc:
        log.info("request body rejected", reason=str(exc)[:200])
        return None


def decode_get_token(raw: bytes) -> SFURequest | None:
    """Decode a ``/get_token`` body; None when it is not strictly the request's JSON."""
    result: SFURequest | None = _decode(raw, SFURequest, _SFU)
    return result


def decode_delegate(raw: bytes) -> DelegateDelayedLeaveRequest | None:
    """Decode a ``/delegate_delayed_leave`` body; None on a decode error."""
    result: DelegateDelayedLeaveRequest | None = _decode(raw, DelegateDelayedLeaveRequest, _SFU)
    return result


def decode_legacy(raw: bytes) -> LegacySFURequest | None:
    """Decode a ``/sfu/get`` body; None on a decode error."""
    result: LegacySFURequest | None = _decode(raw, LegacySFURequest, _LEGACY)
    return result


def _bad(msg: str) -> ApiError:
    return ApiError(400, "M_BAD_JSON", msg)


def _validate_common(
    room_id: str, slot_id: str, member: ClaimedMember, token: OpenIDToken, member_article: str
) -> ApiError | None:
    if not room_id or not slot_id:
        return _bad("The request body is missing `room_id` or `slot_id`")
    if not member.id or not member.claimed_user_id or not member.claimed_device_id:
        return _bad(
            f"The request body `member` is missing {member_article}`id`, `claimed_user_id` "
            "or `claimed_device_id`"
        )
    if not token.access_token or not token.matrix_server_name:
        return _bad(
            f"The request body `openid_token` is missing {member_article}`access_token` "
            "or `matrix_server_name`"
        )
    return None


def _validate_delay(delay_id: str, delay_timeout: int) -> ApiError | None:
    if (bool(delay_id) or delay_timeout > 0) and not (delay_id and delay_timeout > 0):
        return _bad("The request body is missing `delay_id` or `delay_timeout`")
    return None


def validate_get_token(req: SFURequest) -> ApiError | None:
    """lk-jwt-service's ``SFURequest.Validate``."""
    return _validate_common(
        req.room_id, req.slot_id, req.member, req.openid_token, "a "
    ) or _validate_delay(req.delay_id, req.delay_timeout)


def validate_delegate(req: DelegateDelayedLeaveRequest) -> ApiError | None:
    """lk-jwt-service's ``DelegateDelayedLeaveRequest.Validate`` (delay fields mandatory)."""
    err = _validate_common(req.room_id, req.slot_id, req.member, req.openid_token, "")
    if err is not None:
        return err
    if not req.delay_id or req.delay_timeout <= 0:
        return _bad("The request body is missing `delay_id` or `delay_timeout`")
    return None


def validate_legacy(req: LegacySFURequest) -> ApiError | None:
    """lk-jwt-service's ``LegacySFURequest.Validate``."""
    if not req.room:
        return _bad("Missing room parameter")
    if not req.openid_token.access_token or not req.openid_token.matrix_server_name:
        return _bad("Missing OpenID token parameters")
    return _validate_delay(req.delay_id, req.delay_timeout)
