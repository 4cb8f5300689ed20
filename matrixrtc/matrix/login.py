"""Logging a device in: restore the session saved in the state directory when its token still
works, else log in with the access token or the password given (same device id as before when
its crypto store is still there)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from matrixrtc.matrix.errors import HomeserverError, LoginError
from matrixrtc.matrix.state_dir import SavedSession, StateDir
from matrixrtc.matrix.types import JsonDict, Login

__all__ = ["Requester", "log_in", "mxid_matches"]

log = structlog.get_logger(__name__)

# ``request(method, path, body=..., auth=..., token=...)`` of the homeserver adapter.
Requester = Callable[..., Awaitable[JsonDict]]

_WHOAMI = "/_matrix/client/v3/account/whoami"


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
        session = SavedSession(base_url, user_id, device_id, token)
    elif login.password:
        body: dict[str, Any] = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": login.user},
            "password": login.password,
            "initial_device_display_name": login.device_name,
        }
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
        session = SavedSession(base_url, uid, dev, tok)
    else:
        raise LoginError(f"no saved session for {login.user} and no password or token")
    state.save(session)
    log.info("homeserver.logged_in", user_id=session.user_id, device_id=session.device_id)
    return session
