"""Logging a device in: restore the session saved in the state directory when its token still
works, else log in with the access token or the password given (same device id as before when
its crypto store is still there)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import structlog

from matrixrtc.matrix.errors import HomeserverError, HomeserverUnreachable, LoginError
from matrixrtc.matrix.state_dir import SavedSession, StateDir
from matrixrtc.matrix.types import JsonDict, Login

__all__ = [
    "Requester",
    "expires_in_ms",
    "log_in",
    "mxid_matches",
    "refresh",
    "refresh_ahead_s",
    "relogin",
]

log = structlog.get_logger(__name__)

# ``request(method, path, body=..., auth=..., token=...)`` of the homeserver adapter.
Requester = Callable[..., Awaitable[JsonDict]]

_WHOAMI = "/_matrix/client/v3/account/whoami"
_REFRESH = "/_matrix/client/v3/refresh"


async def refresh(request: Requester, session: SavedSession) -> SavedSession | None:
    """A new access token for ``session`` through its refresh token (spec v1.3 ``/refresh``,
    MSC2918); None when it has none or the server refuses it."""
    if not session.refresh_token:
        return None
    try:
        resp = await request(
            "POST", _REFRESH, body={"refresh_token": session.refresh_token}, auth=False
        )
    except HomeserverError as e:
        if e.status not in (400, 401, 403):
            raise
        log.warning("homeserver.refresh_refused", user_id=session.user_id, errcode=e.errcode)
        return None
    token, new_refresh = resp.get("access_token"), resp.get("refresh_token")
    if not isinstance(token, str) or not token:
        log.warning("homeserver.refresh_refused", user_id=session.user_id, errcode="no token")
        return None
    log.info("homeserver.token_refreshed", user_id=session.user_id, device_id=session.device_id)
    return replace(
        session,
        access_token=token,
        refresh_token=new_refresh if isinstance(new_refresh, str) else session.refresh_token,
        expires_in_ms=expires_in_ms(resp),
    )


def expires_in_ms(resp: JsonDict) -> int | None:
    """``expires_in_ms`` of a /login or /refresh answer: a positive integer, else None."""
    value = resp.get("expires_in_ms")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value


def refresh_ahead_s(life_ms: int) -> float:
    """How long after its issue to renew an access token that lives ``life_ms``: a fifth of
    its life before it expires, and never more than a minute before (a 5-minute Synapse token
    at 4 min, a 2 s one at 1.6 s)."""
    life = life_ms / 1000
    return life - min(life / 5, 60.0)


def mxid_matches(user: str, user_id: str) -> bool:
    """Whether ``user`` (a full mxid or a localpart) names ``user_id``."""
    if user.startswith("@"):
        return user == user_id
    return user_id.startswith(f"@{user}:")


def _has_crypto_store(state: StateDir) -> bool:
    return any(state.crypto_dir.glob("*.db"))


async def _restore(request: Requester, saved: SavedSession) -> SavedSession | None:
    try:
        who = await request("GET", _WHOAMI, token=saved.access_token)
    except HomeserverError as e:
        if e.status != 401:
            raise
        log.info("homeserver.saved_token_rejected", user_id=saved.user_id)
        return None
    if who.get("user_id") == saved.user_id and who.get("device_id") == saved.device_id:
        log.info("homeserver.restored", user_id=saved.user_id, device_id=saved.device_id)
        return saved
    return None


async def _learn_expiry(request: Requester, restored: SavedSession) -> SavedSession | None:
    """A restored session that has a refresh token but no known expiry (a file written before
    the expiry was saved, or one whose time passed on our clock): the token expires, and
    only a renewal says when. Renew it now, so that it is renewed ahead from the start
    instead of first being refused. None when the server refuses or does not answer (the
    token still works; its first refusal renews it)."""
    if not restored.refresh_token or restored.expires_in_ms is not None:
        return None
    try:
        return await refresh(request, restored)
    except (HomeserverError, HomeserverUnreachable) as e:
        log.warning("homeserver.refresh_at_restore_failed", user_id=restored.user_id, error=str(e))
        return None


async def log_in(request: Requester, base_url: str, login: Login, state: StateDir) -> SavedSession:
    """The session to use, saved in ``state`` (see the module docstring)."""
    saved = state.load()
    if saved is not None and (
        saved.homeserver != base_url
        or not mxid_matches(login.user, saved.user_id)
        # Reusing a device id without its crypto store would clash with the device keys
        # already uploaded for it; a new device is the honest outcome.
        or not _has_crypto_store(state)
    ):
        saved = None
    if saved is not None:
        restored = await _restore(request, saved)
        if restored is None:  # an expired token: its refresh token may still work
            renewed = await refresh(request, saved)
            restored = await _restore(request, renewed) if renewed is not None else None
            if restored is not None:
                state.save(restored)
        elif (renewed := await _learn_expiry(request, restored)) is not None:
            restored = renewed
            state.save(restored)
        if restored is not None:
            return restored
    if login.access_token:
        token = login.access_token
        who = await request("GET", _WHOAMI, token=token)
        user_id, device_id = who.get("user_id"), who.get("device_id")
        if not isinstance(user_id, str) or not isinstance(device_id, str):
            raise LoginError("whoami did not return user_id and device_id for the access token")
        if not mxid_matches(login.user, user_id):
            raise LoginError(f"access token belongs to {user_id}, not {login.user}")
        session = SavedSession(base_url, user_id, device_id, token, login.refresh_token)
    elif login.password:
        body: dict[str, Any] = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": login.user},
            "password": login.password,
            "initial_device_display_name": login.device_name,
        }
        if login.refresh_tokens:
            body["refresh_token"] = True
        old = state.load()
        if old is not None and mxid_matches(login.user, old.user_id) and _has_crypto_store(state):
            body["device_id"] = old.device_id  # same device, same crypto store
        try:
            resp = await request("POST", "/_matrix/client/v3/login", body=body, auth=False)
        except HomeserverError as e:
            raise LoginError(f"login as {login.user} failed: {e}") from e
        uid, dev, tok = resp.get("user_id"), resp.get("device_id"), resp.get("access_token")
        if not (isinstance(uid, str) and isinstance(dev, str) and isinstance(tok, str)):
            raise LoginError("login response lacks user_id/device_id/access_token")
        refresh_token = resp.get("refresh_token")
        session = SavedSession(
            base_url,
            uid,
            dev,
            tok,
            refresh_token if isinstance(refresh_token, str) else None,
            expires_in_ms(resp),
        )
    else:
        raise LoginError(f"no saved session for {login.user} and no password or token")
    state.save(session)
    log.info("homeserver.logged_in", user_id=session.user_id, device_id=session.device_id)
    return session


async def relogin(request: Requester, session: SavedSession, login: Login) -> SavedSession | None:
    """After a soft logout: log in again with the password as the same device (its crypto
    store and Olm sessions stay valid). None without a password or when refused."""
    if not login.password:
        return None
    body: dict[str, Any] = {
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": login.user},
        "password": login.password,
        "device_id": session.device_id,
    }
    if login.refresh_tokens:
        body["refresh_token"] = True
    try:
        resp = await request("POST", "/_matrix/client/v3/login", body=body, auth=False)
    except HomeserverError as e:
        log.warning("homeserver.relogin_refused", user_id=session.user_id, errcode=e.errcode)
        return None
    tok, dev, refresh_token = (
        resp.get("access_token"),
        resp.get("device_id"),
        resp.get("refresh_token"),
    )
    if not isinstance(tok, str) or dev != session.device_id:
        return None
    log.info("homeserver.logged_in_again", user_id=session.user_id, device_id=session.device_id)
    return replace(
        session,
        access_token=tok,
        refresh_token=refresh_token if isinstance(refresh_token, str) else None,
        expires_in_ms=expires_in_ms(resp),
    )
