"""Configuration from the environment: lk-jwt-service's variables plus our own.

lk-jwt-service's variables keep their names, defaults, validation and start-up error messages
(config.go on main); everything we add is prefixed ``MATRIXRTC_SFU_`` and documented in
:data:`OUR_VARIABLES` (shown by ``python -m sfu serve --help``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from matrixrtc.errors import ConfigError
from sfu.common.env import num as _num
from sfu.common.env import parse_overrides
from sfu.common.env import read_key_secret as _read_key_secret
from sfu.controller.config import ControllerConfig, enabled_in_serve

__all__ = ["OUR_VARIABLES", "Config", "parse_bind", "parse_overrides"]

log = structlog.get_logger(__name__)

SKIP_TLS_MAGIC = "YES_I_KNOW_WHAT_I_AM_DOING"

OUR_VARIABLES: dict[str, str] = {
    "MATRIXRTC_SFU_HOMESERVER_OVERRIDES": (
        "server_name=base_url,... : federation API base URL per Matrix server name, used "
        "instead of server discovery (private networks, local stacks); these hosts pass the "
        "SSRF guard"
    ),
    "MATRIXRTC_SFU_PRIVATE_ALLOWLIST": (
        "host,ip,cidr,... : destinations that may resolve to non-global addresses (default: none)"
    ),
    "MATRIXRTC_SFU_CA_BUNDLE": "PEM file of extra CA certificates for outbound HTTPS",
    "MATRIXRTC_SFU_LIVEKIT_API_URL": (
        "http(s) URL of LiveKit's API (CreateRoom, presence checks) when it differs from "
        "LIVEKIT_URL, e.g. http://livekit:7880 inside a compose network (default: LIVEKIT_URL "
        "with ws->http); LIVEKIT_URL is still what clients get"
    ),
    "MATRIXRTC_SFU_OPENID_CACHE_SIZE": "validated OpenID tokens kept (default 10000; 0 = no cache)",
    "MATRIXRTC_SFU_OPENID_CACHE_MAX_TTL": "upper bound of a cached token's life, s (default 3600)",
    "MATRIXRTC_SFU_OPENID_FAILURE_TTL": "how long a failed lookup is remembered, s (default 5)",
    "MATRIXRTC_SFU_OPENID_TIMEOUT": "time limit of one OpenID validation, s (default 10)",
    "MATRIXRTC_SFU_RATE_LIMIT": (
        "POST requests per second per client (default 10; 0 = off); shared by all workers "
        "through LIVEKIT_REDIS_URL when it is set"
    ),
    "MATRIXRTC_SFU_RATE_BURST": "burst size of the per-client rate limit (default 30)",
    "MATRIXRTC_SFU_CLIENT_IP_HEADER": (
        "header holding the client address when behind a proxy, e.g. X-Forwarded-For (default: "
        "the peer address)"
    ),
    "MATRIXRTC_SFU_MAX_BODY": "largest accepted request body, bytes (default 16384)",
    "MATRIXRTC_SFU_ROOM_ENSURED_TTL": (
        "seconds a successful CreateRoom is trusted before asking LiveKit again (default 1; "
        "0 = every request, like lk-jwt-service); a room_finished webhook resets it"
    ),
    "MATRIXRTC_SFU_MAX_ROOM_PARTICIPANTS": (
        "participants per LiveKit room; a token for a full call is refused with 403 "
        "M_RESOURCE_LIMIT_EXCEEDED (default 0 = no limit)"
    ),
    "MATRIXRTC_SFU_MAX_HOMESERVER_ROOMS": (
        "LiveKit rooms the users of one homeserver may have open at once (a room counts for the "
        "homeserver whose user first got a token for it); beyond it a token that would open a "
        "new room is refused with 403 M_RESOURCE_LIMIT_EXCEEDED (default 0 = no limit)"
    ),
    "MATRIXRTC_SFU_HEADER_TIMEOUT": (
        "seconds a client has to send a request's headers (from its first byte, or from "
        "connecting); then 408 and the connection is closed (default 10)"
    ),
    "MATRIXRTC_SFU_BODY_TIMEOUT": (
        "seconds a client has to send a request's body once its headers are in (default 10; "
        "408 M_UNKNOWN)"
    ),
    "MATRIXRTC_SFU_IDLE_TIMEOUT": "seconds an idle keep-alive connection is kept (default 60)",
    "MATRIXRTC_SFU_MAX_CONNS_PER_CLIENT": (
        "open connections per client address; more are answered 503 and closed (default 64; "
        "0 = no cap; default 0 when MATRIXRTC_SFU_CLIENT_IP_HEADER is set, since the peer is "
        "then the proxy: let the proxy cap its clients)"
    ),
    "MATRIXRTC_SFU_MAX_CONNS": (
        "open connections in all (default 0 = the open-file limit minus 64; the soft limit is "
        "raised to the hard one at start-up)"
    ),
    "MATRIXRTC_SFU_METRICS_BIND": (
        "host:port of the Prometheus /metrics listener (default 127.0.0.1:9464, loopback only; "
        "'off' = none); with --workers, worker 0 serves every worker's figures"
    ),
    "MATRIXRTC_SFU_METRICS_TOKEN": (
        "also serve /metrics on the main listener to requests with 'Authorization: Bearer "
        "<token>' (default: the main listener has no /metrics)"
    ),
    "MATRIXRTC_SFU_LOG_FORMAT": "json (default) or console",
    "MATRIXRTC_SFU_WORKERS": "worker processes (default 1; --workers overrides)",
}


@dataclass(frozen=True)
class Config:
    """The service's settings, fully validated."""

    livekit_url: str
    key: str
    secret: str
    full_access_homeservers: tuple[str, ...]
    bind_host: str | None
    bind_port: int
    skip_verify_tls: bool = False
    log_level: str = "info"
    cs_api_overrides: Mapping[str, str] = field(default_factory=dict)
    redis_url: str = ""
    sanity_check_interval: float = 15.0
    homeserver_overrides: Mapping[str, str] = field(default_factory=dict)
    private_allowlist: tuple[str, ...] = ()
    ca_bundle: str = ""
    openid_cache_size: int = 10_000
    openid_cache_max_ttl: float = 3600.0
    openid_failure_ttl: float = 5.0
    openid_timeout: float = 10.0
    rate_limit: float = 10.0
    rate_burst: int = 30
    client_ip_header: str = ""
    max_body: int = 16 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_conns_per_client: int = 64
    max_conns: int = 0
    metrics_bind: tuple[str | None, int] | None = ("127.0.0.1", 9464)
    metrics_token: str = ""
    room_ensured_ttl: float = 1.0
    log_format: str = "json"
    workers: int = 1
    controller: ControllerConfig | None = None  # MATRIXRTC_SFU_CONTROLLER=1
    max_room_participants: int = 0
    max_homeserver_rooms: int = 0
    # LiveKit's server API, when it is not reached through the public LIVEKIT_URL.
    livekit_api_url: str = ""

    def is_full_access(self, server_name: str) -> bool:
        """lk-jwt-service's rule: ``*`` as the only entry means everyone."""
        fa = self.full_access_homeservers
        return (len(fa) == 1 and fa[0] == "*") or server_name in fa

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Config:
        """Read and validate; raises ConfigError with lk-jwt-service's message on failure."""
        key, secret = _read_key_secret(env)
        lk_url = env.get("LIVEKIT_URL", "")
        if not key or not secret or not lk_url:
            raise ConfigError("LIVEKIT_KEY* / LIVEKIT_SECRET* and LIVEKIT_URL must be set")
        full_access = env.get("LIVEKIT_FULL_ACCESS_HOMESERVERS", "")
        if not full_access:
            raise ConfigError(
                "LIVEKIT_FULL_ACCESS_HOMESERVERS environment variable must be set to the "
                "homeserver(s) you intend to serve — see README for guidance"
            )
        bind = env.get("LIVEKIT_JWT_BIND", "")
        port = env.get("LIVEKIT_JWT_PORT", "")
        if not bind:
            if port:
                log.warning("LIVEKIT_JWT_PORT is deprecated, use LIVEKIT_JWT_BIND")
            bind = f":{port or '8080'}"
        elif port:
            raise ConfigError("LIVEKIT_JWT_BIND and LIVEKIT_JWT_PORT must not be set together")
        bind_host, bind_port = parse_bind(bind)

        sanity = 15.0
        raw = env.get("LIVEKIT_SANITY_CHECK_INTERVAL_SECONDS", "")
        if raw:
            if not (raw.isascii() and raw.lstrip("+").isdigit()):
                raise ConfigError(
                    "LIVEKIT_SANITY_CHECK_INTERVAL_SECONDS must be a non-negative integer, "
                    f"got {raw!r}"
                )
            sanity = float(int(raw))
        try:
            cs_overrides = parse_overrides(env.get("LIVEKIT_CS_API_URL_OVERRIDES", ""))
        except ConfigError as exc:
            raise ConfigError(f"failed parsing LIVEKIT_CS_API_URL_OVERRIDES: {exc}") from exc
        try:
            hs_overrides = parse_overrides(env.get("MATRIXRTC_SFU_HOMESERVER_OVERRIDES", ""))
        except ConfigError as exc:
            raise ConfigError(f"failed parsing MATRIXRTC_SFU_HOMESERVER_OVERRIDES: {exc}") from exc
        for name, url in {**cs_overrides, **hs_overrides}.items():
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"override for {name!r} must be an http(s) URL, got {url!r}")

        ca = env.get("MATRIXRTC_SFU_CA_BUNDLE", "")
        if ca and not Path(ca).is_file():
            raise ConfigError(f"MATRIXRTC_SFU_CA_BUNDLE: no such file {ca!r}")
        log_format = env.get("MATRIXRTC_SFU_LOG_FORMAT", "json")
        if log_format not in ("json", "console"):
            raise ConfigError("MATRIXRTC_SFU_LOG_FORMAT must be json or console")
        api_url = env.get("MATRIXRTC_SFU_LIVEKIT_API_URL", "").strip()
        if api_url and not api_url.startswith(("http://", "https://", "ws://", "wss://")):
            raise ConfigError(
                f"MATRIXRTC_SFU_LIVEKIT_API_URL must be an http(s) URL, got {api_url!r}"
            )

        raw_metrics = env.get("MATRIXRTC_SFU_METRICS_BIND", "").strip() or "127.0.0.1:9464"
        metrics_bind = None if raw_metrics.lower() == "off" else parse_bind(raw_metrics)

        return cls(
            livekit_url=lk_url,
            key=key,
            secret=secret,
            full_access_homeservers=tuple(full_access.replace(",", " ").split()),
            bind_host=bind_host,
            bind_port=bind_port,
            skip_verify_tls=env.get("LIVEKIT_INSECURE_SKIP_VERIFY_TLS", "") == SKIP_TLS_MAGIC,
            log_level=_log_level(env.get("LIVEKIT_LOG_LEVEL", "")),
            cs_api_overrides=cs_overrides,
            redis_url=env.get("LIVEKIT_REDIS_URL", ""),
            sanity_check_interval=sanity,
            homeserver_overrides=hs_overrides,
            private_allowlist=tuple(
                e.strip()
                for e in env.get("MATRIXRTC_SFU_PRIVATE_ALLOWLIST", "").split(",")
                if e.strip()
            ),
            ca_bundle=ca,
            openid_cache_size=_num(env, "MATRIXRTC_SFU_OPENID_CACHE_SIZE", 10_000, int),
            openid_cache_max_ttl=_num(env, "MATRIXRTC_SFU_OPENID_CACHE_MAX_TTL", 3600.0, float),
            openid_failure_ttl=_num(env, "MATRIXRTC_SFU_OPENID_FAILURE_TTL", 5.0, float),
            openid_timeout=_num(env, "MATRIXRTC_SFU_OPENID_TIMEOUT", 10.0, float, positive=True),
            rate_limit=_num(env, "MATRIXRTC_SFU_RATE_LIMIT", 10.0, float),
            rate_burst=_num(env, "MATRIXRTC_SFU_RATE_BURST", 30, int, positive=True),
            client_ip_header=env.get("MATRIXRTC_SFU_CLIENT_IP_HEADER", "").strip(),
            max_body=_num(env, "MATRIXRTC_SFU_MAX_BODY", 16 * 1024, int, positive=True),
            room_ensured_ttl=_num(env, "MATRIXRTC_SFU_ROOM_ENSURED_TTL", 1.0, float),
            header_timeout=_num(env, "MATRIXRTC_SFU_HEADER_TIMEOUT", 10.0, float, positive=True),
            body_timeout=_num(env, "MATRIXRTC_SFU_BODY_TIMEOUT", 10.0, float, positive=True),
            idle_timeout=_num(env, "MATRIXRTC_SFU_IDLE_TIMEOUT", 60.0, float, positive=True),
            max_conns_per_client=_num(
                env,
                "MATRIXRTC_SFU_MAX_CONNS_PER_CLIENT",
                0 if env.get("MATRIXRTC_SFU_CLIENT_IP_HEADER", "").strip() else 64,
                int,
            ),
            max_conns=_num(env, "MATRIXRTC_SFU_MAX_CONNS", 0, int),
            metrics_bind=metrics_bind,
            metrics_token=env.get("MATRIXRTC_SFU_METRICS_TOKEN", "").strip(),
            log_format=log_format,
            workers=_num(env, "MATRIXRTC_SFU_WORKERS", 1, int, positive=True),
            controller=ControllerConfig.from_env(env) if enabled_in_serve(env) else None,
            max_room_participants=_num(env, "MATRIXRTC_SFU_MAX_ROOM_PARTICIPANTS", 0, int),
            max_homeserver_rooms=_num(env, "MATRIXRTC_SFU_MAX_HOMESERVER_ROOMS", 0, int),
            livekit_api_url=api_url,
        )


def _log_level(raw: str) -> str:
    low = raw.lower()
    if low in ("debug", "info", "error"):
        return low
    if low in ("warn", "warning"):
        return "warning"
    if low:
        log.warning("Invalid log level in LIVEKIT_LOG_LEVEL, defaulting to info", invalidValue=raw)
    return "info"


def parse_bind(bind: str) -> tuple[str | None, int]:
    """Go ``ListenAndServe`` address: ``host:port``, ``:port`` (all interfaces), ``[v6]:port``."""
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"invalid listen address {bind!r}, expected host:port")
    host = host.strip("[]")
    return (host or None), int(port)
