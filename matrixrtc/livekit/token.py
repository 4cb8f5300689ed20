"""SFU credentials from a MatrixRTC authorization service (lk-jwt-service API, spec §3.4).

Public API::

    await request_credentials(session, service_url, room_id=…, user_id=…, device_id=…,
                              member_id=…, openid=…, endpoint=Endpoint.AUTO) -> SfuCredentials
    get_token_body(…) / sfu_get_body(…)     # pure request builders (MSC4195 / legacy)
    parse_credentials(obj, endpoint) -> SfuCredentials | None   # never raises
    jwt_claims(jwt) -> JwtClaims | None                         # payload only, no signature check

Endpoint choice (Element Call ``openIDSFU.ts``/``CallViewModel.ts``):

* the SFU we publish on is forced to the dialect we advertise: ``/get_token`` for the sticky
  form (``Endpoint.GET_TOKEN``), ``/sfu/get`` for the state form (``Endpoint.SFU_GET``);
* a remote, subscribe-only SFU gets ``/get_token`` first and ``/sfu/get`` when that is 404
  (``Endpoint.AUTO``: a service older than lk-jwt-service v0.4.0 has no ``/get_token``).

When delay fields are sent and the service answers 400 ``M_BAD_JSON`` (it refuses delegated
leave for this user, or cannot resolve our client-server API), the same endpoint is asked
again without them, as Element Call does. We also retry on ``M_NOT_JSON``: lk-jwt-service
decodes with ``DisallowUnknownFields``, so a version that predates the delay fields rejects
them that way.

The returned ``url`` is checked (``ws``/``wss``/``http``/``https`` with a host only): it is the
only address a remote party makes us connect to. The JWT payload is decoded for ``sub`` (our
LiveKit identity) and ``video.room`` (the LiveKit room name, which Element Call reads from
here rather than from ``livekit_alias``); LiveKit checks the signature, so we do not.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
import structlog

from matrixrtc.errors import RemoteError
from matrixrtc.matrix.homeserver import OpenIdToken
from matrixrtc.model.livekit_ids import DEFAULT_SLOT_ID

__all__ = [
    "Endpoint",
    "JwtClaims",
    "SfuCredentials",
    "TokenResponseError",
    "TokenServiceError",
    "TokenServiceUnreachable",
    "get_token_body",
    "jwt_claims",
    "parse_credentials",
    "request_credentials",
    "sfu_get_body",
    "valid_sfu_url",
]

log = structlog.get_logger(__name__)

GET_TOKEN_PATH: Final = "/get_token"
SFU_GET_PATH: Final = "/sfu/get"
DEFAULT_TIMEOUT_S: Final = 10.0
_SFU_URL_SCHEMES: Final = frozenset({"ws", "wss", "http", "https"})
_DELAY_REFUSED: Final = frozenset({"M_BAD_JSON", "M_NOT_JSON"})
_MAX_ERROR_TEXT: Final = 200
_MAX_BODY: Final = 64 * 1024


class Endpoint(StrEnum):
    """Which token endpoint to use (module docstring)."""

    GET_TOKEN = "get_token"  # MSC4195, sticky-form members
    SFU_GET = "sfu_get"  # legacy, state-form members
    AUTO = "auto"  # /get_token, then /sfu/get on 404


class TokenServiceError(RemoteError):
    """The authorization service answered with an error status."""

    def __init__(self, endpoint: Endpoint, status: int, errcode: str, error: str) -> None:
        super().__init__(f"{endpoint.value}: HTTP {status} {errcode or '-'}: {error}")
        self.endpoint = endpoint
        self.status = status
        self.errcode = errcode
        self.error = error


class TokenServiceUnreachable(RemoteError):
    """No HTTP answer from the authorization service (refused, reset, timed out)."""


class TokenResponseError(RemoteError):
    """A 200 answer we cannot use (not JSON, no url/jwt, bad URL scheme, unreadable JWT)."""


@dataclass(frozen=True, slots=True)
class JwtClaims:
    """The claims of a LiveKit access token we need (``sub``, ``video.room``)."""

    identity: str  # "sub"
    room: str  # "video.room"


@dataclass(frozen=True, slots=True)
class SfuCredentials:
    """``{"url","jwt"}`` from the service, with the claims read from the JWT."""

    url: str  # LiveKit signalling URL
    jwt: str = field(repr=False)
    identity: str  # our LiveKit participant identity (JWT "sub")
    room: str  # LiveKit room name (JWT "video.room")
    endpoint: Endpoint  # the endpoint that issued it (GET_TOKEN or SFU_GET)


def valid_sfu_url(url: str) -> bool:
    """True for a ``ws``/``wss``/``http``/``https`` URL with a host and no credentials."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError:
        return False
    return (
        parts.scheme.lower() in _SFU_URL_SCHEMES
        and bool(parts.hostname)
        and parts.username is None
        and parts.password is None
        and not any(c.isspace() or ord(c) < 0x20 for c in url)
    )


def _b64url_decode(part: str) -> bytes:
    if not part or not all(c.isalnum() or c in "-_" for c in part):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def jwt_claims(jwt: object) -> JwtClaims | None:
    """``sub`` and ``video.room`` of a compact JWS; None (logged) when unreadable."""
    try:
        if not isinstance(jwt, str):
            raise ValueError("jwt is not a string")
        parts = jwt.split(".")
        if len(parts) != 3:
            raise ValueError("jwt does not have three parts")
        payload = json.loads(_b64url_decode(parts[1]))
        if not isinstance(payload, dict):
            raise ValueError("jwt payload is not an object")
        sub, video = payload.get("sub"), payload.get("video")
        room = video.get("room") if isinstance(video, dict) else None
        if not isinstance(sub, str) or not sub:
            raise ValueError("jwt has no sub")
        if not isinstance(room, str) or not room:
            raise ValueError("jwt has no video.room")
        return JwtClaims(identity=sub, room=room)
    except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError) as exc:
        log.info("livekit.jwt_rejected", reason=str(exc))
    except Exception as exc:  # a parser never raises
        log.warning("livekit.jwt_parser_error", error=repr(exc))
    return None


def parse_credentials(obj: object, endpoint: Endpoint) -> SfuCredentials | None:
    """A token endpoint's 200 body; None (logged) when unusable. Extra fields are ignored."""
    try:
        if not isinstance(obj, dict):
            log.info("livekit.credentials_rejected", reason="body is not an object")
            return None
        url, jwt = obj.get("url"), obj.get("jwt")
        if not isinstance(url, str) or not valid_sfu_url(url):
            log.info("livekit.credentials_rejected", reason="url missing or not ws/wss/http/https")
            return None
        claims = jwt_claims(jwt)
        if claims is None or not isinstance(jwt, str):
            return None
        return SfuCredentials(url, jwt, claims.identity, claims.room, endpoint)
    except Exception as exc:  # a parser never raises
        log.warning("livekit.credentials_parser_error", error=repr(exc))
        return None


def _delay_fields(delay_id: str | None, delay_timeout_ms: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if delay_id is not None:
        out["delay_id"] = delay_id
    if delay_timeout_ms is not None:
        out["delay_timeout"] = delay_timeout_ms
    return out


def get_token_body(
    *,
    room_id: str,
    user_id: str,
    device_id: str,
    member_id: str,
    openid: OpenIdToken,
    slot_id: str = DEFAULT_SLOT_ID,
    delay_id: str | None = None,
    delay_timeout_ms: int | None = None,
) -> dict[str, Any]:
    """MSC4195 ``/get_token`` request body."""
    return {
        "room_id": room_id,
        "slot_id": slot_id,
        "openid_token": openid.as_json(),
        "member": {"id": member_id, "claimed_user_id": user_id, "claimed_device_id": device_id},
        **_delay_fields(delay_id, delay_timeout_ms),
    }


def sfu_get_body(
    *,
    room_id: str,
    device_id: str,
    openid: OpenIdToken,
    delay_id: str | None = None,
    delay_timeout_ms: int | None = None,
) -> dict[str, Any]:
    """Legacy ``/sfu/get`` request body."""
    return {
        "room": room_id,
        "openid_token": openid.as_json(),
        "device_id": device_id,
        **_delay_fields(delay_id, delay_timeout_ms),
    }


def _error_fields(text: str) -> tuple[str, str]:
    try:
        body = json.loads(text)
    except ValueError:
        return "", text[:_MAX_ERROR_TEXT]
    if not isinstance(body, dict):
        return "", text[:_MAX_ERROR_TEXT]
    errcode, error = body.get("errcode"), body.get("error")
    return (
        errcode if isinstance(errcode, str) else "",
        (error if isinstance(error, str) else "")[:_MAX_ERROR_TEXT],
    )


async def _post(
    session: aiohttp.ClientSession,
    url: str,
    endpoint: Endpoint,
    body: Mapping[str, Any],
    timeout_s: float,
) -> SfuCredentials:
    try:
        async with session.post(
            url,
            json=dict(body),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            allow_redirects=False,
        ) as resp:
            # A token answer is a few hundred bytes; do not buffer whatever a service sends.
            raw = await resp.content.read(_MAX_BODY)
            text = raw.decode("utf-8", errors="replace")
            status = resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        # The URL carries no secret (the token is in the body); the exception text may.
        raise TokenServiceUnreachable(f"{endpoint.value}: {type(exc).__name__}") from None
    if status != 200:
        errcode, error = _error_fields(text)
        raise TokenServiceError(endpoint, status, errcode, error)
    try:
        obj: object = json.loads(text)
    except ValueError:
        obj = None
    creds = parse_credentials(obj, endpoint)
    if creds is None:
        raise TokenResponseError(f"{endpoint.value}: unusable response from the service")
    return creds


async def _request_one(
    session: aiohttp.ClientSession,
    base: str,
    endpoint: Endpoint,
    body: dict[str, Any],
    timeout_s: float,
) -> SfuCredentials:
    path = GET_TOKEN_PATH if endpoint is Endpoint.GET_TOKEN else SFU_GET_PATH
    try:
        return await _post(session, base + path, endpoint, body, timeout_s)
    except TokenServiceError as err:
        has_delay = "delay_id" in body or "delay_timeout" in body
        if not (has_delay and err.status == 400 and err.errcode in _DELAY_REFUSED):
            raise
        log.info("livekit.token_retry_without_delay", endpoint=endpoint.value, errcode=err.errcode)
        plain = {k: v for k, v in body.items() if k not in ("delay_id", "delay_timeout")}
        return await _post(session, base + path, endpoint, plain, timeout_s)


async def request_credentials(
    session: aiohttp.ClientSession,
    service_url: str,
    *,
    room_id: str,
    user_id: str,
    device_id: str,
    member_id: str,
    openid: OpenIdToken,
    endpoint: Endpoint = Endpoint.AUTO,
    slot_id: str = DEFAULT_SLOT_ID,
    delay_id: str | None = None,
    delay_timeout_ms: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> SfuCredentials:
    """Ask ``service_url`` (a transport's ``livekit_service_url``) for LiveKit credentials.

    Raises :class:`TokenServiceError` (status + errcode), :class:`TokenServiceUnreachable` or
    :class:`TokenResponseError`; all are :class:`matrixrtc.errors.RemoteError`.
    """
    parts = urlsplit(service_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TokenResponseError("livekit_service_url is not an http(s) URL")
    base = service_url.rstrip("/")
    if endpoint is not Endpoint.SFU_GET:
        body = get_token_body(
            room_id=room_id,
            user_id=user_id,
            device_id=device_id,
            member_id=member_id,
            openid=openid,
            slot_id=slot_id,
            delay_id=delay_id,
            delay_timeout_ms=delay_timeout_ms,
        )
        try:
            return await _request_one(session, base, Endpoint.GET_TOKEN, body, timeout_s)
        except TokenServiceError as err:
            if endpoint is Endpoint.GET_TOKEN or err.status != 404:
                raise
            log.info("livekit.get_token_unsupported", service=base)
    legacy = sfu_get_body(
        room_id=room_id,
        device_id=device_id,
        openid=openid,
        delay_id=delay_id,
        delay_timeout_ms=delay_timeout_ms,
    )
    return await _request_one(session, base, Endpoint.SFU_GET, legacy, timeout_s)
