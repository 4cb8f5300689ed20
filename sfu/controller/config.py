"""The controller's settings, from the environment (documented in :data:`CONTROLLER_VARIABLES`).

The LiveKit and Redis settings are the service's own (``LIVEKIT_URL``, ``LIVEKIT_KEY*``,
``LIVEKIT_SECRET*``, ``LIVEKIT_REDIS_URL``), so one environment file configures both the
service and a stand-alone controller.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from matrixrtc.errors import ConfigError
from sfu.common.env import num, read_key_secret

__all__ = ["CONTROLLER_VARIABLES", "ControllerConfig"]

_C = "MATRIXRTC_SFU_CONTROLLER"

CONTROLLER_VARIABLES: dict[str, str] = {
    _C: "1 = run the controller inside `serve` (default 0; `python -m sfu controller` runs it "
    "alone)",
    _C + "_HOMESERVER_URL": "client-server API base URL of your homeserver, e.g. "
    "https://matrix.example.org (needed for any Matrix-based removal)",
    _C + "_ADMIN_TOKEN": "a Synapse server admin's access token: room state of every room "
    "(or _ADMIN_TOKEN_FILE); sticky memberships are not room state: nobody is removed for "
    "having no membership in rooms seen only this way",
    _C + "_ACCESS_TOKEN": "an ordinary account's access token (or _ACCESS_TOKEN_FILE): the "
    "rooms it has joined, followed live through /sync, state and MSC4354 sticky memberships; "
    "with an admin token too, the admin API covers the rooms it has not joined",
    _C + "_AUTO_JOIN": "1 = the _ACCESS_TOKEN account joins every room it is invited to "
    "(default 0: join it to the rooms yourself)",
    _C + "_INTERVAL": "seconds between two looks at LiveKit and Matrix (default 1)",
    _C + "_GRACE": "seconds a participant must stay without a valid membership before it is "
    "removed (default 2)",
    _C + "_JOIN_GRACE": "seconds a new participant has to join the Matrix room and publish its "
    "membership (default 30)",
    _C + "_ROOM_GRACE": "seconds an empty LiveKit room without Matrix members is kept after its "
    "creation or last token (default 60)",
    _C + "_OUTAGE_GRACE": "seconds after the homeserver last failed to answer during which an "
    "ending call membership is not acted on (delayed leaves fire when heartbeats cannot reach "
    "the homeserver; clients publish again) (default 30)",
    _C + "_BURST_COUNT": "this many or more LiveKit participants whose call memberships ended "
    "within _BURST_WINDOW seconds of each other are taken for a stalled or restarted "
    "homeserver firing every pending delayed leave at once, not for people hanging up: "
    "each then waits _BURST_GRACE before removal (default 3; 0 = never)",
    _C + "_BURST_WINDOW": "seconds between the endings that make a burst (default 10)",
    _C + "_BURST_GRACE": "seconds a membership that ended in a burst is given to be "
    "published again before its participant is removed (default 30)",
    _C + "_REQUIRE_MEMBERSHIP": "1 (default) = remove participants that never publish a call "
    "membership (only where the controller can read both forms: a room the access-token "
    "account has joined, and no unreadable encrypted sticky event of that user); 0 = never",
    _C + "_KICK_FOREIGN": "1 (default) = remove participants whose identity the service never "
    "issued; 0 = only report them",
    _C + "_ALLOW_IDENTITIES": "regular expression of identities never treated as foreign "
    "(bots with their own tokens); egress/ingress/SIP/agent participants always are",
    _C + "_DRY_RUN": "1 = log and count what would be removed or closed, act on nothing",
    _C + "_LEADER_TTL": "seconds the leader lock lives without renewal (default 5; failover "
    "takes at most 4/3 of it)",
    _C + "_STATUS_TOKEN": "bearer token for GET /status (or _STATUS_TOKEN_FILE); unset = "
    "/status answers 404",
    _C + "_BIND": "listen address of `python -m sfu controller` for /healthz, /metrics, "
    "/status (default 127.0.0.1:8090)",
}


@dataclass(frozen=True)
class ControllerConfig:
    livekit_url: str
    key: str
    secret: str
    redis_url: str = ""
    homeserver_url: str = ""
    admin_token: str = ""
    access_token: str = ""
    auto_join: bool = False
    interval: float = 1.0
    grace: float = 2.0
    join_grace: float = 30.0
    room_grace: float = 60.0
    outage_grace: float = 30.0
    burst_count: int = 3
    burst_window: float = 10.0
    burst_grace: float = 30.0
    require_membership: bool = True
    kick_foreign: bool = True
    allow_identities: re.Pattern[str] | None = None
    dry_run: bool = False
    leader_ttl: float = 5.0
    status_token: str = ""
    bind_host: str = "127.0.0.1"
    bind_port: int = 8090

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ControllerConfig:
        key, secret = read_key_secret(env)
        # Only LiveKit's API is used here: its internal URL when the service has one.
        url = env.get("MATRIXRTC_SFU_LIVEKIT_API_URL", "").strip() or env.get("LIVEKIT_URL", "")
        if not key or not secret or not url:
            raise ConfigError("LIVEKIT_KEY* / LIVEKIT_SECRET* and LIVEKIT_URL must be set")
        hs = env.get(_C + "_HOMESERVER_URL", "").strip().rstrip("/")
        if hs and not hs.startswith(("http://", "https://")):
            raise ConfigError(f"{_C}_HOMESERVER_URL must be an http(s) URL, got {hs!r}")
        admin = _secret(env, _C + "_ADMIN_TOKEN")
        access = _secret(env, _C + "_ACCESS_TOKEN")
        if (admin or access) and not hs:
            raise ConfigError(f"{_C}_HOMESERVER_URL must be set with a homeserver token")
        allow_raw = env.get(_C + "_ALLOW_IDENTITIES", "")
        try:
            allow = re.compile(allow_raw) if allow_raw else None
        except re.error as exc:
            raise ConfigError(f"{_C}_ALLOW_IDENTITIES is not a regular expression: {exc}") from exc
        bind = env.get(_C + "_BIND", "127.0.0.1:8090")
        host, sep, port = bind.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"{_C}_BIND: invalid listen address {bind!r}, expected host:port")
        return cls(
            livekit_url=url,
            key=key,
            secret=secret,
            redis_url=env.get("LIVEKIT_REDIS_URL", ""),
            homeserver_url=hs,
            admin_token=admin,
            access_token=access,
            auto_join=_flag(env, _C + "_AUTO_JOIN", False),
            interval=num(env, _C + "_INTERVAL", 1.0, float, positive=True),
            grace=num(env, _C + "_GRACE", 2.0, float),
            join_grace=num(env, _C + "_JOIN_GRACE", 30.0, float),
            room_grace=num(env, _C + "_ROOM_GRACE", 60.0, float),
            outage_grace=num(env, _C + "_OUTAGE_GRACE", 30.0, float),
            burst_count=num(env, _C + "_BURST_COUNT", 3, int),
            burst_window=num(env, _C + "_BURST_WINDOW", 10.0, float),
            burst_grace=num(env, _C + "_BURST_GRACE", 30.0, float),
            require_membership=_flag(env, _C + "_REQUIRE_MEMBERSHIP", True),
            kick_foreign=_flag(env, _C + "_KICK_FOREIGN", True),
            allow_identities=allow,
            dry_run=_flag(env, _C + "_DRY_RUN", False),
            leader_ttl=num(env, _C + "_LEADER_TTL", 5.0, float, positive=True),
            status_token=_secret(env, _C + "_STATUS_TOKEN"),
            bind_host=host.strip("[]") or "0.0.0.0",
            bind_port=int(port),
        )


def enabled_in_serve(env: Mapping[str, str]) -> bool:
    return _flag(env, _C, False)


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be 1 or 0, got {raw!r}")


def _secret(env: Mapping[str, str], name: str) -> str:
    if path := env.get(name + "_FILE", ""):
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{name}_FILE: {exc}") from exc
    return env.get(name, "").strip()
