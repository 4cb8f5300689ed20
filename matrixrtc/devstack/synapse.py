"""A real Synapse homeserver on a free loopback port, with helpers for tests and demos."""

from __future__ import annotations

import base64
import json
import os
import secrets
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from matrixrtc.devstack._process import ManagedProcess, deep_merge, free_tcp_port
from matrixrtc.devstack._service import Service
from matrixrtc.errors import RemoteError

__all__ = ["HomeserverRequestError", "Synapse", "UserCreds", "synapse_config"]

SERVER_NAME = "localhost"

# Every rate limit the homeserver applies to local users, raised out of reach of tests.
_UNLIMITED = {"per_second": 10000, "burst_count": 100000}
_RATE_LIMITS: dict[str, Any] = {
    **{
        k: _UNLIMITED
        for k in (
            "rc_message",
            "rc_registration",
            "rc_registration_token_validity",
            "rc_admin_redaction",
            "rc_joins_per_room",
            "rc_key_requests",
            "rc_3pid_validation",
            "rc_third_party_invite",
            "rc_media_create",
            "rc_delayed_event_mgmt",
            "rc_room_creation",
            "rc_reports",
            "rc_user_directory",
            "rc_profile",
        )
    },
    "rc_login": {"address": _UNLIMITED, "account": _UNLIMITED, "failed_attempts": _UNLIMITED},
    "rc_joins": {"local": _UNLIMITED, "remote": _UNLIMITED},
    "rc_invites": {"per_room": _UNLIMITED, "per_user": _UNLIMITED, "per_issuer": _UNLIMITED},
    "rc_presence": {"per_user": _UNLIMITED},
}

CALL_MEMBER_EVENT = "org.matrix.msc3401.call.member"
RTC_MEMBER_EVENT = "org.matrix.msc4143.rtc.member"


@dataclass(frozen=True, slots=True)
class UserCreds:
    """A registered local user with a live access token."""

    user_id: str
    password: str
    access_token: str
    device_id: str


class HomeserverRequestError(RemoteError):
    """The homeserver answered a devstack helper request with an error."""

    def __init__(self, method: str, path: str, status: int, body: Mapping[str, Any]) -> None:
        self.status = status
        self.errcode = str(body.get("errcode", ""))
        self.body = dict(body)
        super().__init__(f"{method} {path} -> {status} {self.errcode}: {body.get('error', body)}")


def synapse_config(
    data_dir: Path,
    port: int,
    livekit_service_url: str | None = None,
    extra_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The homeserver configuration: loopback only, MatrixRTC features on, limits raised."""
    base_url = f"http://127.0.0.1:{port}"
    experimental: dict[str, Any] = {
        "msc4143_enabled": True,
        "msc4354_enabled": True,
        "msc4222_enabled": True,
        "msc4140_max_delayed_events_per_user": 1000,
    }
    cfg: dict[str, Any] = {
        "server_name": SERVER_NAME,
        "public_baseurl": base_url + "/",
        "pid_file": str(data_dir / "homeserver.pid"),
        "listeners": [
            {
                "port": port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": False,
                "x_forwarded": False,
                # The federation resource carries the OpenID userinfo endpoint.
                "resources": [{"names": ["client", "federation"], "compress": False}],
            }
        ],
        "database": {"name": "sqlite3", "args": {"database": str(data_dir / "homeserver.db")}},
        "media_store_path": str(data_dir / "media_store"),
        "signing_key_path": str(data_dir / "signing.key"),
        "report_stats": False,
        "enable_metrics": False,
        "macaroon_secret_key": secrets.token_urlsafe(32),
        "form_secret": secrets.token_urlsafe(32),
        "registration_shared_secret": secrets.token_urlsafe(32),
        "trusted_key_servers": [],
        "suppress_key_server_warning": True,
        "enable_registration": True,
        "enable_registration_without_verification": True,
        "bcrypt_rounds": 4,
        "presence": {"enabled": False},
        "url_preview_enabled": False,
        "max_event_delay_duration": "24h",
        "experimental_features": experimental,
        **_RATE_LIMITS,
    }
    if livekit_service_url is not None:
        focus = {"type": "livekit", "livekit_service_url": livekit_service_url}
        cfg["matrix_rtc"] = {"transports": [focus]}
        # Older clients discover the focus from .well-known instead of rtc/transports.
        cfg["extra_well_known_client_content"] = {"org.matrix.msc4143.rtc_foci": [focus]}
    if extra_config:
        cfg = deep_merge(cfg, extra_config)
    return cfg


def _default_events_power_levels(room_version: str | None) -> dict[str, int]:
    # A power_level_content_override replaces Synapse's whole "events" map, so restate its
    # defaults. Rooms before v12 have no infinite-power creator: tombstone stays at 100 there.
    legacy = room_version is not None and (
        (room_version.isdigit() and int(room_version) < 12) or room_version.startswith("org.")
    )
    return {
        "m.room.name": 50,
        "m.room.power_levels": 100,
        "m.room.history_visibility": 100,
        "m.room.canonical_alias": 50,
        "m.room.avatar": 50,
        "m.room.tombstone": 100 if legacy else 150,
        "m.room.server_acl": 100,
        "m.room.encryption": 100,
        CALL_MEMBER_EVENT: 0,
        "org.matrix.msc4143.rtc.slot": 0,  # members may open the call slot (js-sdk 43)
        RTC_MEMBER_EVENT: 0,
    }


class Synapse(Service):
    """A Synapse process on 127.0.0.1 with its config, data and log under ``run_dir``.

    Use as ``async with Synapse(run_dir) as hs``. Client, federation (OpenID userinfo) and
    well-known are served on one plain-HTTP listener at ``base_url``.
    """

    start_timeout = 60.0

    def __init__(
        self,
        run_dir: Path,
        livekit_service_url: str | None = None,
        extra_config: Mapping[str, Any] | None = None,
        *,
        name: str = "synapse",
    ) -> None:
        self.dir = run_dir / name
        self.data_dir = self.dir / "data"
        self.port = free_tcp_port()
        self.server_name = SERVER_NAME
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.dir / "homeserver.log"
        self.config_path = self.dir / "homeserver.yaml"
        self._livekit_service_url = livekit_service_url
        self._extra_config = extra_config
        self._session: aiohttp.ClientSession | None = None
        self._proc = ManagedProcess(
            name=name,
            argv=[
                sys.executable,
                "-m",
                "synapse.app.homeserver",
                "--config-path",
                str(self.config_path),
            ],
            log_path=self.log_path,
            cwd=self.dir,
        )

    def _write_config(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        key_path = self.data_dir / "signing.key"
        if not key_path.exists():
            # Synapse's key file format: "<alg> <version> <unpadded base64 seed>".
            seed = base64.b64encode(os.urandom(32)).decode().rstrip("=")
            key_path.write_text(f"ed25519 a_{secrets.token_hex(2)} {seed}\n")
        cfg = synapse_config(
            self.data_dir, self.port, self._livekit_service_url, self._extra_config
        )
        # JSON is valid YAML, and needs no YAML library here.
        self.config_path.write_text(json.dumps(cfg, indent=2))

    async def _ready(self) -> bool:
        session = self._http()
        timeout = aiohttp.ClientTimeout(total=2)
        async with session.get(f"{self.base_url}/_matrix/client/versions", timeout=timeout) as resp:
            return resp.status == 200

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    def _prepare(self) -> None:
        # Written once: a restart keeps the signing key, port and data.
        if not self.config_path.exists():
            self._write_config()

    def _ready_fields(self) -> dict[str, object]:
        return {"url": self.base_url}

    async def aclose(self) -> None:
        """Stop the process and close the helper HTTP session."""
        try:
            await self.stop()
        finally:
            if self._session is not None:
                await self._session.close()
                self._session = None

    # --- client-API helpers -------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        user: UserCreds | None = None,
        json_body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """One client-API call; returns the JSON body or raises HomeserverRequestError."""
        headers = {"Authorization": f"Bearer {user.access_token}"} if user else {}
        session = self._http()
        async with session.request(
            method,
            self.base_url + path,
            json=dict(json_body) if json_body is not None else None,
            params=params,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=30),
        ) as resp:
            try:
                body = await resp.json(content_type=None)
            except (json.JSONDecodeError, aiohttp.ContentTypeError):
                body = {"error": (await resp.text())[:200]}
            if not isinstance(body, dict):
                body = {"body": body}
            if resp.status >= 400:
                raise HomeserverRequestError(method, path, resp.status, body)
            return body

    async def openid_token(self, user: UserCreds) -> dict[str, Any]:
        """A fresh OpenID token for ``user`` (``/openid/request_token``), as the token service
        takes it: ``access_token``, ``matrix_server_name``, ``expires_in``, ``token_type``."""
        path = f"/_matrix/client/v3/user/{quote(user.user_id, safe='')}/openid/request_token"
        return await self.request("POST", path, user=user, json_body={})

    async def register(self, username: str, password: str | None = None) -> UserCreds:
        """Register ``username`` (random password unless given) and return its login."""
        password = password or secrets.token_urlsafe(18)
        body = await self.request(
            "POST",
            "/_matrix/client/v3/register",
            json_body={
                "username": username,
                "password": password,
                "auth": {"type": "m.login.dummy"},
            },
        )
        return UserCreds(body["user_id"], password, body["access_token"], body["device_id"])

    async def login(self, username: str, password: str, device_id: str | None = None) -> UserCreds:
        """Log in with a password: a new device unless ``device_id`` is given."""
        req: dict[str, Any] = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": username},
            "password": password,
        }
        if device_id is not None:
            req["device_id"] = device_id
        body = await self.request("POST", "/_matrix/client/v3/login", json_body=req)
        return UserCreds(body["user_id"], password, body["access_token"], body["device_id"])

    async def create_call_room(
        self,
        creator: UserCreds,
        invite: Sequence[UserCreds] = (),
        room_version: str | None = None,
        encrypted: bool = False,
        name: str | None = None,
        *,
        public: bool = False,
    ) -> str:
        """Create a room where every member may send call memberships; invitees join it."""
        req: dict[str, Any] = {
            "preset": "public_chat" if public else "private_chat",
            "invite": [u.user_id for u in invite],
            "power_level_content_override": {"events": _default_events_power_levels(room_version)},
        }
        if room_version is not None:
            req["room_version"] = room_version
        if name is not None:
            req["name"] = name
        if encrypted:
            req["initial_state"] = [
                {
                    "type": "m.room.encryption",
                    "state_key": "",
                    "content": {"algorithm": "m.megolm.v1.aes-sha2"},
                }
            ]
        body = await self.request(
            "POST", "/_matrix/client/v3/createRoom", user=creator, json_body=req
        )
        room_id = str(body["room_id"])
        for u in invite:
            await self.join_room(u, room_id)
        return room_id

    async def join_room(self, user: UserCreds, room_id: str) -> None:
        """Join ``room_id`` as ``user``."""
        await self.request(
            "POST", f"/_matrix/client/v3/join/{quote(room_id, safe='')}", user=user, json_body={}
        )

    async def enable_encryption(self, user: UserCreds, room_id: str) -> None:
        """Turn on Megolm encryption in ``room_id``."""
        await self.put_state(
            user, room_id, "m.room.encryption", "", {"algorithm": "m.megolm.v1.aes-sha2"}
        )

    async def put_state(
        self,
        user: UserCreds,
        room_id: str,
        event_type: str,
        state_key: str,
        content: Mapping[str, Any],
        *,
        params: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Send a state event; ``params`` carries e.g. ``org.matrix.msc4140.delay``."""
        path = (
            f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/state/"
            f"{quote(event_type, safe='')}/{quote(state_key, safe='')}"
        )
        return await self.request("PUT", path, user=user, json_body=content, params=params)

    async def get_state(
        self, user: UserCreds, room_id: str, event_type: str, state_key: str
    ) -> dict[str, Any] | None:
        """The content of one state event, or None if the room has none."""
        path = (
            f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/state/"
            f"{quote(event_type, safe='')}/{quote(state_key, safe='')}"
        )
        try:
            return await self.request("GET", path, user=user)
        except HomeserverRequestError as e:
            if e.status == 404:
                return None
            raise
