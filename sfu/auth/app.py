"""The aiohttp application: lk-jwt-service's HTTP API, plus metrics and hardening.

Routes (as lk-jwt-service main): ``/sfu/get``, ``/get_token``, ``/delegate_delayed_leave``
(CORS headers on every answer, ``OPTIONS`` → 200, methods other than POST → 405 with an empty
body), ``/sfu_webhook`` (POST; a bad signature → 401, where lk-jwt-service answers 200),
``/healthz`` (GET/HEAD → 200, else 405) and ``/metrics`` (Prometheus, GET: on the public
listener only with the ``MATRIXRTC_SFU_METRICS_TOKEN`` bearer token, else 404; without
credentials on the metrics listener, :func:`create_metrics_app`, loopback by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import re
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

import structlog
from aiohttp import web
from livekit import api as lkapi

from matrixrtc.errors import ConfigError
from matrixrtc.model import livekit_ids
from sfu.auth.config import Config
from sfu.auth.livekit import JoinTokenSigner, LiveKitRooms
from sfu.auth.openid import OpenIDValidator
from sfu.auth.ratelimit import ClientLimiter, RateLimiter, RedisRateLimiter
from sfu.auth.wire import (
    NOT_JSON,
    ApiError,
    OpenIDToken,
    decode_delegate,
    decode_get_token,
    decode_legacy,
    validate_delegate,
    validate_get_token,
    validate_legacy,
)
from sfu.common import metrics
from sfu.common.netguard import AddressPolicy, GuardedHttp, HostResolver, SystemResolver
from sfu.controller.bus import WebhookBus
from sfu.controller.controller import Controller, build_controller
from sfu.controller.csapi import CsApi
from sfu.controller.delayed_leave import DelayedLeaveManager, Signal
from sfu.controller.http import status_response
from sfu.controller.registry import Grant, GrantRegistry, MemoryRegistry, RedisRegistry
from sfu.controller.store import JobParams, JobStore, MemoryStore, RedisStore

__all__ = ["SERVICE_KEY", "AuthService", "create_app", "create_metrics_app"]

log = structlog.get_logger(__name__)

CORS_HEADERS: Final = {
    "Content-Type": "application/json",
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "POST",
    "Access-Control-Allow-Headers": (
        "Accept, Content-Type, Content-Length, Accept-Encoding, X-CSRF-Token"
    ),
}
UNAUTHORIZED: Final = ApiError(401, "M_UNAUTHORIZED", "The request could not be authorised.")
DELEGATION_RESTRICTED: Final = (
    "Delegation of delayed events is only supported for full access users"
)
# Reconnects and multi-SFU subscribes repeat the same inputs: keep recent hashes.
livekit_room_alias = functools.lru_cache(maxsize=4096)(livekit_ids.livekit_room_alias)
livekit_identity = functools.lru_cache(maxsize=4096)(livekit_ids.livekit_identity)
legacy_identity = livekit_ids.legacy_identity
_RID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class _Reject(Exception):
    def __init__(self, err: ApiError) -> None:
        super().__init__(err.error)
        self.err = err


def go_json_string(s: str) -> str:
    """A JSON string as Go's encoder writes it (HTML-escaped ``<``, ``>``, ``&``)."""
    out = json.dumps(s, ensure_ascii=False)
    return (
        out.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def error_response(err: ApiError, *, cors: bool = True) -> web.Response:
    body = '{"errcode":' + go_json_string(err.errcode) + ',"error":' + go_json_string(err.error)
    return web.Response(
        status=err.status,
        body=(body + "}\n").encode(),
        headers=CORS_HEADERS if cors else {"Content-Type": "application/json"},
    )


def _ssl_context(config: Config) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if config.ca_bundle:
        ctx.load_verify_locations(cafile=config.ca_bundle)
    if config.skip_verify_tls:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


@dataclass(frozen=True, slots=True)
class _Grant:
    room: str
    identity: str
    full_access: bool


class AuthService:
    """Everything a worker owns: outbound clients, caches, the job manager."""

    def __init__(
        self,
        config: Config,
        *,
        resolver: HostResolver | None = None,
        store: JobStore | None = None,
        worker_index: int = 0,
        worker_count: int = 1,
        address_policy: AddressPolicy | None = None,
        registry: GrantRegistry | None = None,
    ) -> None:
        self.config = config
        self.worker_index = worker_index
        resolver = resolver or SystemResolver()
        override_hosts = {
            urlsplit(u).hostname or ""
            for u in [*config.homeserver_overrides.values(), *config.cs_api_overrides.values()]
        }
        policy = address_policy or AddressPolicy.from_entries(config.private_allowlist)
        policy = policy.with_hosts(override_hosts)
        self.http = GuardedHttp(resolver, policy, _ssl_context(config))
        self.openid = OpenIDValidator(
            self.http,
            resolver,
            overrides=config.homeserver_overrides,
            cache_size=config.openid_cache_size,
            max_ttl=config.openid_cache_max_ttl,
            failure_ttl=config.openid_failure_ttl,
            timeout=config.openid_timeout,
        )
        self.signer = JoinTokenSigner(config.key, config.secret)
        self.rooms = LiveKitRooms(
            config.livekit_api_url or config.livekit_url,
            config.key,
            config.secret,
            ensured_ttl=config.room_ensured_ttl,
        )
        self.csapi = CsApi(self.http, config.cs_api_overrides)
        if store is None:
            store = RedisStore(config.redis_url) if config.redis_url else MemoryStore()
        self.store = store
        if registry is None:
            registry = RedisRegistry(config.redis_url) if config.redis_url else MemoryRegistry()
        self.registry = registry
        self.controller: Controller | None = None
        # With Redis every worker stands for election; without, only worker 0 runs one, and
        # it knows only its own worker's grants when there are several.
        if config.controller is not None and (config.redis_url or worker_index == 0):
            self.controller = build_controller(
                config.controller,
                registry=registry,
                registry_complete=bool(config.redis_url) or worker_count == 1,
            )
        self.jobs = DelayedLeaveManager(
            self.rooms,
            self.csapi,
            store,
            check_interval=config.sanity_check_interval,
            on_gone=self._membership_gone,
        )
        self.webhooks = lkapi.WebhookReceiver(lkapi.TokenVerifier(config.key, config.secret))
        self.limiter: ClientLimiter = (
            RedisRateLimiter(config.redis_url, config.rate_limit, config.rate_burst)
            if config.redis_url and config.rate_limit > 0
            else RateLimiter(config.rate_limit, config.rate_burst)
        )
        self.bus: WebhookBus | None = None
        if worker_count > 1 and config.redis_url:
            self.bus = WebhookBus(config.redis_url, self._route)
        elif worker_count > 1:
            log.warning(
                "several workers without LIVEKIT_REDIS_URL: a webhook reaches one worker; "
                "departures elsewhere are noticed by the presence check",
                interval=config.sanity_check_interval,
            )
        self._url_json = go_json_string(config.livekit_url)

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise

    async def _start(self) -> None:
        await self.http.start()
        await self.rooms.start()
        if isinstance(self.store, RedisStore):
            try:
                await self.store.ping()
            except Exception as exc:  # lk-jwt-service's start-up message
                raise ConfigError(f"Could not connect Redis store: {exc}") from exc
        else:
            log.warning("LIVEKIT_REDIS_URL not set. Using in-memory store.")
        if self.bus is not None:
            await self.bus.start()
        if self.worker_index == 0:  # one worker resumes the stored jobs
            await self.jobs.start()
        if self.controller is not None:
            await self.controller.start()

    async def close(self) -> None:
        """Close every part, in this order, even when one fails: a failure (an owned task's,
        logged when it happened) is raised once all are closed."""
        closes = [self.jobs.close, self.registry.close, self.openid.close, self.rooms.close]
        closes += [self.http.close, self.store.close, self.limiter.close]
        if self.bus is not None:
            closes.insert(0, self.bus.close)
        if self.controller is not None:
            closes.insert(0, self.controller.close)
        async with contextlib.AsyncExitStack() as stack:
            for close in reversed(closes):  # the stack runs them last in, first out
                stack.push_async_callback(close)

    # -- the three POST endpoints -------------------------------------------------------

    async def _verify(self, token: OpenIDToken, claimed_user_id: str) -> str:
        sub = await self.openid.user_id(
            token.access_token, token.matrix_server_name, token.expires_in
        )
        if sub is None:
            raise _Reject(UNAUTHORIZED)
        if claimed_user_id and claimed_user_id != sub:
            log.warning("claimed_user_id does not match the token's subject", matrix_id=sub)
            raise _Reject(UNAUTHORIZED)
        return sub

    async def _grant(
        self,
        server_name: str,
        room: str,
        identity: str,
        delay_id: str,
        delay_timeout: int,
        record: Grant,
    ) -> _Grant:
        full = self.config.is_full_access(server_name)
        if delay_id and not full:
            raise _Reject(ApiError(400, "M_BAD_JSON", DELEGATION_RESTRICTED))
        await self._check_limits(server_name, room, identity, full)
        if full:
            if delay_id and await self.jobs.resolve(server_name) is None:
                raise _Reject(ApiError(400, "M_BAD_JSON", "Unable to resolve client-server API"))
            try:
                await self.rooms.create_room(room)
            except Exception as exc:
                log.error("CreateRoom failed", room=room, reason=str(exc)[:200])
                raise _Reject(ApiError(500, "M_UNKNOWN", "Unable to create room on SFU")) from exc
            if delay_id:
                await self._add_job(server_name, delay_id, delay_timeout, room, identity)
        try:  # before the token exists: the controller must never see it unrecorded
            await self.registry.record(record)
        except Exception as exc:
            log.error("could not record the grant", room=room, reason=str(exc)[:200])
            raise _Reject(ApiError(503, "M_UNKNOWN", "Unable to record the grant")) from exc
        return _Grant(room, identity, full)

    async def _check_limits(self, server: str, room: str, identity: str, full: bool) -> None:
        """The operator's limits, answered with a Matrix error before anything is created."""
        cfg = self.config
        try:
            if cfg.max_room_participants:
                others = await self.rooms.participant_count(room, other_than=identity)
                if others >= cfg.max_room_participants:
                    metrics.TOKEN_LIMITS.labels("room_participants").inc()
                    raise _Reject(
                        ApiError(
                            403,
                            "M_RESOURCE_LIMIT_EXCEEDED",
                            f"This call is full: at most {cfg.max_room_participants} "
                            "participants per call on this SFU",
                        )
                    )
            if cfg.max_homeserver_rooms and full:
                existing = await self.rooms.room_names()
                if room not in existing:
                    owners = await self.registry.room_servers(existing)
                    held = sum(1 for r in existing if owners.get(r) == server)
                    if held >= cfg.max_homeserver_rooms:
                        metrics.TOKEN_LIMITS.labels("homeserver_rooms").inc()
                        raise _Reject(
                            ApiError(
                                403,
                                "M_RESOURCE_LIMIT_EXCEEDED",
                                f"Too many calls from {server}: at most "
                                f"{cfg.max_homeserver_rooms} at once on this SFU",
                            )
                        )
        except _Reject:
            raise
        except Exception as exc:  # LiveKit or Redis down: the limit cannot be checked
            log.error("limit check failed", room=room, reason=str(exc)[:200])
            raise _Reject(ApiError(500, "M_UNKNOWN", "Unable to check the SFU's limits")) from exc

    async def _membership_gone(self, room: str, identity: str) -> None:
        await self.registry.mark_ended(room, identity, time.time())

    async def _add_job(
        self, server_name: str, delay_id: str, delay_timeout: int, room: str, identity: str
    ) -> None:
        if self.jobs.closing:
            raise _Reject(ApiError(503, "M_UNKNOWN", "Service is shutting down"))
        await self.registry.clear_ended(room, identity)  # a new delegation: a live membership
        await self.jobs.add(JobParams(server_name, delay_id, delay_timeout, room, identity))
        if self.bus is not None:  # an older job for this participant may live in another worker
            await self.bus.publish("replace", room, identity, delay_id)

    def _token_response(self, endpoint: str, grant: _Grant, user: str) -> web.Response:
        jwt = self.signer.sign(grant.room, grant.identity)
        access = "full" if grant.full_access else "restricted"
        metrics.TOKENS_ISSUED.labels(endpoint, access).inc()
        log.info(
            "token issued", matrix_id=user, access=access, room=grant.room, identity=grant.identity
        )
        body = '{"url":' + self._url_json + ',"jwt":"' + jwt + '"}\n'
        return web.Response(body=body.encode(), headers=CORS_HEADERS)

    async def get_token(self, raw: bytes) -> web.Response:
        req = decode_get_token(raw)
        if req is None:
            return error_response(NOT_JSON)
        if err := validate_get_token(req):
            return error_response(err)
        sub = await self._verify(req.openid_token, req.member.claimed_user_id)
        room = livekit_room_alias(req.room_id, req.slot_id)
        identity = livekit_identity(sub, req.member.claimed_device_id, req.member.id)
        server = req.openid_token.matrix_server_name
        record = Grant(
            room=room,
            identity=identity,
            matrix_room=req.room_id,
            slot_id=req.slot_id,
            user_id=sub,
            device_id=req.member.claimed_device_id,
            member_id=req.member.id,
            server_name=server,
            endpoint="get_token",
            issued_at=time.time(),
        )
        grant = await self._grant(server, room, identity, req.delay_id, req.delay_timeout, record)
        return self._token_response("get_token", grant, sub)

    async def sfu_get(self, raw: bytes) -> web.Response:
        req = decode_legacy(raw)
        if req is None:
            return error_response(NOT_JSON)
        if err := validate_legacy(req):
            return error_response(err)
        sub = await self._verify(req.openid_token, "")
        room = livekit_room_alias(req.room)
        identity = legacy_identity(sub, req.device_id)
        server = req.openid_token.matrix_server_name
        record = Grant(
            room=room,
            identity=identity,
            matrix_room=req.room,
            slot_id=livekit_ids.DEFAULT_SLOT_ID,
            user_id=sub,
            device_id=req.device_id,
            member_id=identity,
            server_name=server,
            endpoint="sfu_get",
            issued_at=time.time(),
        )
        grant = await self._grant(server, room, identity, req.delay_id, req.delay_timeout, record)
        return self._token_response("sfu_get", grant, sub)

    async def delegate(self, raw: bytes) -> web.Response:
        req = decode_delegate(raw)
        if req is None:
            return error_response(NOT_JSON)
        if err := validate_delegate(req):
            return error_response(err)
        server = req.openid_token.matrix_server_name
        await self._verify(req.openid_token, req.member.claimed_user_id)
        if not self.config.is_full_access(server):
            raise _Reject(ApiError(403, "M_FORBIDDEN", DELEGATION_RESTRICTED))
        sub = req.member.claimed_user_id
        room = livekit_room_alias(req.room_id, req.slot_id)
        identity = livekit_identity(sub, req.member.claimed_device_id, req.member.id)
        if await self.jobs.resolve(server) is None:
            raise _Reject(ApiError(400, "M_BAD_JSON", "Unable to resolve client-server API"))
        await self._add_job(server, req.delay_id, req.delay_timeout, room, identity)
        return web.Response(body=b"{}\n", headers=CORS_HEADERS)

    async def webhook(self, body: str, auth: str) -> web.Response:
        if auth.lower().startswith("bearer "):
            auth = auth[7:]
        try:
            event = self.webhooks.receive(body, auth)
        except Exception as exc:
            metrics.WEBHOOKS.labels("bad_signature").inc()
            log.warning("webhook rejected", reason=str(exc)[:200])
            return error_response(
                ApiError(401, "M_UNAUTHORIZED", "Invalid webhook signature"), cors=False
            )
        metrics.WEBHOOKS.labels("ok").inc()
        kind = event.event
        signal = ""
        if kind in ("participant_left", "participant_connection_aborted"):
            client_initiated = event.participant.disconnect_reason == 1  # CLIENT_INITIATED
            signal = Signal.LEFT.value if client_initiated else Signal.ABORTED.value
        elif kind == "participant_joined":
            signal = Signal.JOINED.value
        elif kind != "room_finished":
            return web.Response(status=200)
        room, identity = event.room.name, event.participant.identity
        if self.bus is not None:
            await self.bus.publish(kind, room, identity, signal)
        else:
            self._route(kind, room, identity, signal)
        return web.Response(status=200)

    def _route(self, kind: str, room: str, identity: str, signal: str) -> None:
        if kind == "replace":  # from the bus: signal carries the new delay id
            self.jobs.superseded(room, identity, signal)
            return
        if kind == "room_finished":
            self.rooms.forget(room)
            return
        routed = self.jobs.on_webhook(room, identity, Signal(signal))
        log.debug("webhook", webhook_event=kind, routed=routed)


SERVICE_KEY: Final = web.AppKey("service", AuthService)

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _client_key(request: web.Request, header: str) -> str:
    if header:
        value = request.headers.get(header, "")
        if value:
            return value.split(",", 1)[0].strip()
    return request.remote or "?"


@web.middleware
async def _middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
    rid = request.headers.get("X-Request-Id", "")
    if not _RID.match(rid):
        rid = uuid.uuid4().hex[:16]
    info = request.match_info.route.resource
    endpoint = info.canonical if info is not None else "unmatched"
    with structlog.contextvars.bound_contextvars(request_id=rid):
        try:
            resp = await handler(request)
        except _Reject as rej:
            resp = error_response(rej.err)
        except web.HTTPRequestEntityTooLarge:
            resp = error_response(ApiError(413, "M_TOO_LARGE", "Request body too large"))
        except web.HTTPException as exc:
            resp = exc
        except Exception:
            log.exception("unhandled error")
            resp = error_response(ApiError(500, "M_UNKNOWN", "Internal Server Error"))
    resp.headers["X-Request-Id"] = rid
    metrics.REQUESTS.labels(endpoint, str(resp.status)).inc()
    return resp


def _post_endpoint(
    name: str, call: Callable[[AuthService, bytes], Awaitable[web.Response]]
) -> _Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        if request.method == "OPTIONS":
            return web.Response(status=200, headers=CORS_HEADERS)
        if request.method != "POST":
            return web.Response(status=405, headers=CORS_HEADERS)
        service = request.app[SERVICE_KEY]
        wait = await service.limiter.acquire(_client_key(request, service.config.client_ip_header))
        if wait > 0:
            resp = error_response(ApiError(429, "M_LIMIT_EXCEEDED", "Too many requests"))
            resp.headers["Retry-After"] = str(max(1, round(wait)))
            return resp
        raw = await _read_body(request, service.config.body_timeout)
        if raw is None:
            return _body_timeout_response(request)
        return await call(service, raw)

    handler.__name__ = name
    return handler


async def _read_body(request: web.Request, limit_s: float) -> bytes | None:
    """The whole body, or None when it did not arrive within ``limit_s`` seconds."""
    try:
        async with asyncio.timeout(limit_s):
            return await request.read()
    except TimeoutError:
        return None


def _body_timeout_response(request: web.Request) -> web.Response:
    metrics.SLOW_BODIES.inc()
    log.warning("request body not received in time", client=request.remote)
    resp = error_response(ApiError(408, "M_UNKNOWN", "Request body not received in time"))
    resp.force_close()
    return resp


async def _healthz(request: web.Request) -> web.StreamResponse:
    if request.method in ("GET", "HEAD"):
        return web.Response(status=200)
    return web.Response(status=405)


async def _metrics_anyone(request: web.Request) -> web.StreamResponse:
    """``/metrics`` on the metrics listener (loopback by default): no credentials."""
    if request.method not in ("GET", "HEAD"):
        return web.Response(status=405)
    return web.Response(body=metrics.render(), content_type="text/plain", charset="utf-8")


async def _metrics(request: web.Request) -> web.StreamResponse:
    """``/metrics`` on the public listener: only with MATRIXRTC_SFU_METRICS_TOKEN as bearer."""
    token = request.app[SERVICE_KEY].config.metrics_token
    if not token:
        return web.Response(status=404)
    given = request.headers.get("Authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        return web.Response(status=401, headers={"WWW-Authenticate": "Bearer"})
    return await _metrics_anyone(request)


def create_metrics_app() -> web.Application:
    """The metrics listener's application (``MATRIXRTC_SFU_METRICS_BIND``)."""
    app = web.Application()
    app.router.add_route("*", "/metrics", _metrics_anyone)
    return app


async def _status(request: web.Request) -> web.StreamResponse:
    controller = request.app[SERVICE_KEY].controller
    if controller is None:
        return web.Response(status=404)
    return await status_response(request, controller)


async def _webhook(request: web.Request) -> web.StreamResponse:
    if request.method != "POST":
        return web.Response(status=405)
    raw = await _read_body(request, request.app[SERVICE_KEY].config.body_timeout)
    if raw is None:
        return _body_timeout_response(request)
    return await request.app[SERVICE_KEY].webhook(
        raw.decode("utf-8", errors="replace"), request.headers.get("Authorization", "")
    )


def create_app(
    config: Config,
    *,
    resolver: HostResolver | None = None,
    store: JobStore | None = None,
    worker_index: int = 0,
    worker_count: int = 1,
    address_policy: AddressPolicy | None = None,
) -> web.Application:
    """The application; the service starts and stops with it (``cleanup_ctx``)."""
    app = web.Application(middlewares=[_middleware], client_max_size=config.max_body)
    service = AuthService(
        config,
        resolver=resolver,
        store=store,
        worker_index=worker_index,
        worker_count=worker_count,
        address_policy=address_policy,
    )
    app[SERVICE_KEY] = service

    async def lifetime(_app: web.Application) -> AsyncIterator[None]:
        await service.start()
        yield
        await service.close()

    app.cleanup_ctx.append(lifetime)
    app.router.add_route("*", "/sfu/get", _post_endpoint("sfu_get", AuthService.sfu_get))
    app.router.add_route("*", "/get_token", _post_endpoint("get_token", AuthService.get_token))
    app.router.add_route(
        "*", "/delegate_delayed_leave", _post_endpoint("delegate", AuthService.delegate)
    )
    app.router.add_route("*", "/sfu_webhook", _webhook)
    app.router.add_route("*", "/healthz", _healthz)
    app.router.add_route("*", "/metrics", _metrics)
    app.router.add_route("GET", "/status", _status)
    return app
