"""``python -m sfu doctor SERVER_NAME_OR_URL``: why calls on a deployment fail, in plain words.

Real requests against the deployment, one row per check (``pass``, ``fail``, ``warn`` or
``skip``) with what was seen and how to fix it. A check whose prerequisite failed is skipped
with the name of that prerequisite, so one fault shows as one failing row. Exit status 1
when any check fails; ``--json`` for machines.

What is checked (and what each needs):

- ``well_known``: ``/.well-known/matrix/client`` answers JSON with ``m.homeserver``.
- ``versions``: ``/_matrix/client/versions``; ``delayed_events`` (MSC4140), ``msc4143``
  (MatrixRTC transports), ``sticky_events`` (MSC4354, a warning: only Matrix 2.0 clients).
- ``rtc_foci``: the well-known's ``org.matrix.msc4143.rtc_foci`` names a LiveKit focus.
- ``rtc_transports``: ``GET …/org.matrix.msc4143/rtc/transports`` (needs ``--access-token``).
- ``service_health``: the authorization service's ``/healthz`` (its URL from the focus, or
  ``--service-url``).
- ``cors_preflight``: an ``OPTIONS`` preflight from a browser origin on ``/get_token`` and
  ``/sfu/get`` is allowed (``Access-Control-Allow-Origin``/``-Methods``/``-Headers``), and
  the POST's answer carries ``Access-Control-Allow-Origin`` too.
- ``token_errors``: a malformed body gets the Matrix error JSON (400 ``M_NOT_JSON``).
- ``openid_federation``: the homeserver's federation OpenID endpoint answers an unknown token
  with 401 ``M_UNKNOWN_TOKEN`` (port 8448 / ``.well-known/matrix/server`` / SRV, or
  ``--federation-url``), as the service will have to reach it.
- ``token_flow`` and ``service_livekit`` (need ``--access-token``): a real OpenID token is
  exchanged for a LiveKit token; a 500 "Unable to create room on SFU" blames the service's
  LiveKit URL or key.
- ``livekit_reachable``, ``livekit_token``, ``livekit_websocket``: LiveKit answers on the URL
  the service hands out, accepts the service's token (``/rtc/validate``), and a join over its
  signalling websocket gets a join response (proxies that drop the Upgrade header fail).
- ``livekit_api``: LiveKit's API accepts ``--livekit-key``/``--livekit-secret`` (or the
  keys in ``--livekit-config``, or ``LIVEKIT_KEY``/``LIVEKIT_SECRET``).
- ``webhook``: with ``--livekit-config``, LiveKit's ``webhook`` section posts to a
  ``/sfu_webhook`` and the service accepts a webhook signed with LiveKit's ``webhook.api_key``;
  with only a key, that the service accepts webhooks signed with it.
- ``turn``: with ``--turn host:port``, a STUN binding request over UDP is answered.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import secrets
import socket
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from livekit import api as lkapi

from sfu.common.servername import parse_server_name

__all__ = ["Doctor", "Row", "main"]

PASS, FAIL, WARN, SKIP = "pass", "fail", "warn", "skip"
ORIGIN = "https://app.element.io"
RTC_FOCI = "org.matrix.msc4143.rtc_foci"
TRANSPORTS = "/_matrix/client/unstable/org.matrix.msc4143/rtc/transports"


@dataclass(frozen=True)
class Row:
    check: str
    status: str
    summary: str
    fix: str = ""


@dataclass
class _Http:
    status: int
    headers: dict[str, str]
    text: str

    def json(self) -> Any:
        try:
            return json.loads(self.text)
        except ValueError:
            return None


@dataclass
class Doctor:
    """Runs every check against ``target`` (a server name or a URL)."""

    target: str
    access_token: str = ""
    service_url: str = ""
    federation_url: str = ""
    livekit_url: str = ""
    livekit_key: str = ""
    livekit_secret: str = ""
    livekit_config: str = ""
    turn: str = ""
    timeout: float = 5.0
    rows: list[Row] = field(default_factory=list)
    _session: aiohttp.ClientSession | None = None
    _jwt: str = ""

    # -- plumbing ------------------------------------------------------------------------

    def _add(self, check: str, status: str, summary: str, fix: str = "") -> str:
        self.rows.append(Row(check, status, summary, fix))
        return status

    def _failed(self, *checks: str) -> str | None:
        for row in self.rows:
            if row.check in checks and row.status == FAIL:
                return row.check
        return None

    def _skip_if(self, check: str, *deps: str) -> bool:
        bad = self._failed(*deps)
        if bad is not None:
            self._add(check, SKIP, f"not checked: `{bad}` failed")
            return True
        return False

    async def _req(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
    ) -> _Http:
        assert self._session is not None
        async with self._session.request(
            method, url, headers=headers or {}, data=data, allow_redirects=True
        ) as resp:
            text = await resp.text(errors="replace")
            return _Http(resp.status, {k.lower(): v for k, v in resp.headers.items()}, text)

    @staticmethod
    def _why(exc: BaseException) -> str:
        text = str(exc) or type(exc).__name__
        return text[:200]

    # -- the run -------------------------------------------------------------------------

    async def run(self) -> list[Row]:
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as self._session:
            base = self._base_url()
            hs, foci = await self._well_known(base)
            await self._versions(hs)
            service = await self._foci(foci)
            await self._transports(hs, service)
            service = self.service_url.rstrip("/") or service
            await self._service_health(service)
            await self._cors(service)
            await self._token_errors(service)
            await self._federation(hs)
            await self._token_flow(hs, service)
            await self._livekit()
            await self._livekit_api()
            await self._webhook(service)
            await self._turn()
        return self.rows

    def _base_url(self) -> str:
        if self.target.startswith(("http://", "https://")):
            return self.target.rstrip("/")
        return f"https://{self.target}"

    async def _well_known(self, base: str) -> tuple[str, list[Any]]:
        url = base + "/.well-known/matrix/client"
        fix = (
            "serve /.well-known/matrix/client as JSON with m.homeserver.base_url (and "
            "Access-Control-Allow-Origin: *)"
        )
        try:
            r = await self._req("GET", url)
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._add("well_known", FAIL, f"{url} unreachable: {self._why(exc)}", fix)
            return base, []
        body = r.json()
        if r.status != 200 or not isinstance(body, dict):
            self._add("well_known", FAIL, f"{url} answered {r.status}, not JSON", fix)
            return base, []
        hs_obj = body.get("m.homeserver")
        hs = hs_obj.get("base_url") if isinstance(hs_obj, dict) else None
        if not isinstance(hs, str) or not hs.startswith(("http://", "https://")):
            self._add("well_known", FAIL, "no m.homeserver.base_url in the well-known", fix)
            hs = base
        else:
            self._add("well_known", PASS, f"homeserver at {hs.rstrip('/')}")
        foci = body.get(RTC_FOCI)
        return hs.rstrip("/"), foci if isinstance(foci, list) else []

    async def _versions(self, hs: str) -> None:
        url = hs + "/_matrix/client/versions"
        try:
            r = await self._req("GET", url)
            body = r.json()
            if r.status != 200 or not isinstance(body, dict):
                raise ValueError(f"answered {r.status}")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self._add(
                "versions",
                FAIL,
                f"{url}: {self._why(exc)}",
                "make the client-server API reachable at m.homeserver.base_url",
            )
            for check in ("delayed_events", "msc4143", "sticky_events"):
                self._add(check, SKIP, "not checked: `versions` failed")
            return
        feats = body.get("unstable_features")
        feats = feats if isinstance(feats, dict) else {}
        self._add("versions", PASS, f"{len(body.get('versions', []))} spec versions")
        if feats.get("org.matrix.msc4140") is True:
            self._add("delayed_events", PASS, "MSC4140 delayed events are on")
        else:
            self._add(
                "delayed_events",
                FAIL,
                "MSC4140 delayed events are off: members who crash stay in calls for hours",
                "Synapse: set max_event_delay_duration: 24h in homeserver.yaml",
            )
        if feats.get("org.matrix.msc4143") is True:
            self._add("msc4143", PASS, "MSC4143 (MatrixRTC transports) is on")
        else:
            self._add(
                "msc4143",
                FAIL,
                "MSC4143 is off: Element X finds no transport (MISSING_MATRIX_RTC_TRANSPORT)",
                "Synapse: experimental_features: {msc4143_enabled: true} and "
                "matrix_rtc: {transports: [{type: livekit, livekit_service_url: ...}]}",
            )
        if feats.get("org.matrix.msc4354") is True:
            self._add("sticky_events", PASS, "MSC4354 sticky events are on")
        else:
            self._add(
                "sticky_events",
                WARN,
                "MSC4354 sticky events are off: only legacy/compatibility-mode clients work",
                "Synapse: experimental_features: {msc4354_enabled: true}",
            )

    async def _foci(self, foci: list[Any]) -> str:
        urls = [
            f.get("livekit_service_url")
            for f in foci
            if isinstance(f, dict) and f.get("type") == "livekit"
        ]
        urls = [u for u in urls if isinstance(u, str) and u]
        if urls:
            self._add("rtc_foci", PASS, f"LiveKit focus {urls[0]}")
            return str(urls[0]).rstrip("/")
        if any(r.check == "well_known" and r.status == FAIL for r in self.rows):
            self._add("rtc_foci", SKIP, "not checked: `well_known` failed")
            return ""
        self._add(
            "rtc_foci",
            FAIL,
            f"no LiveKit focus in the well-known's {RTC_FOCI}: Element Call shows "
            "MISSING_MATRIX_RTC_FOCUS",
            f'add "{RTC_FOCI}": [{{"type": "livekit", "livekit_service_url": '
            '"https://<host>/livekit/jwt"}] to /.well-known/matrix/client '
            "(Synapse: extra_well_known_client_content)",
        )
        return ""

    async def _transports(self, hs: str, service: str) -> None:
        if self._skip_if("rtc_transports", "versions", "msc4143"):
            return
        if not self.access_token:
            self._add("rtc_transports", SKIP, "needs --access-token (the endpoint needs a login)")
            return
        try:
            r = await self._req(
                "GET", hs + TRANSPORTS, headers={"Authorization": f"Bearer {self.access_token}"}
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._add("rtc_transports", FAIL, f"{TRANSPORTS}: {self._why(exc)}")
            return
        body = r.json()
        items = body.get("rtc_transports") if isinstance(body, dict) else None
        lk = [
            str(t.get("livekit_service_url"))
            for t in (items or [])
            if isinstance(t, dict) and t.get("type") == "livekit" and t.get("livekit_service_url")
        ]
        if r.status == 200 and lk:
            note = "" if not service or lk[0].rstrip("/") == service else f" (foci: {service})"
            self._add("rtc_transports", PASS, f"LiveKit transport {lk[0]}{note}")
        else:
            self._add(
                "rtc_transports",
                FAIL,
                f"{TRANSPORTS} answered {r.status} without a LiveKit transport",
                "Synapse: matrix_rtc: {transports: [{type: livekit, livekit_service_url: "
                "https://<host>/livekit/jwt}]}",
            )

    async def _service_health(self, service: str) -> None:
        if not service:
            self._add(
                "service_health",
                SKIP,
                "no service URL (no focus found; pass --service-url)",
            )
            return
        try:
            r = await self._req("GET", service + "/healthz")
            ok = r.status == 200
            why = f"answered {r.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            ok, why = False, self._why(exc)
        if ok:
            self._add("service_health", PASS, f"{service}/healthz answers")
        else:
            self._add(
                "service_health",
                FAIL,
                f"the authorization service at {service} does not answer: {why}",
                "start the service (python -m sfu serve or lk-jwt-service) and route the "
                "focus URL to it (reverse proxy: strip the path prefix)",
            )

    def _service_known(self, check: str) -> bool:
        if any(r.check == "service_health" and r.status == PASS for r in self.rows):
            return True
        bad = self._failed("service_health")
        self._add(check, SKIP, f"not checked: `{bad}` failed" if bad else "no service URL")
        return False

    async def _cors(self, service: str) -> None:
        if not self._service_known("cors_preflight"):
            return
        problems = []
        for path in ("/get_token", "/sfu/get"):
            headers = {
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            }
            try:
                r = await self._req("OPTIONS", service + path, headers=headers)
            except (aiohttp.ClientError, TimeoutError) as exc:
                problems.append(f"{path}: {self._why(exc)}")
                continue
            allow_origin = r.headers.get("access-control-allow-origin", "")
            methods = r.headers.get("access-control-allow-methods", "").upper()
            allow_headers = r.headers.get("access-control-allow-headers", "").lower()
            if r.status >= 300:
                problems.append(f"{path}: preflight answered {r.status}")
            elif allow_origin not in ("*", ORIGIN):
                problems.append(f"{path}: no Access-Control-Allow-Origin")
            elif "POST" not in methods and methods != "*":
                problems.append(f"{path}: POST not in Access-Control-Allow-Methods")
            elif "content-type" not in allow_headers and allow_headers != "*":
                problems.append(f"{path}: Content-Type not in Access-Control-Allow-Headers")
            else:
                try:
                    r = await self._req(
                        "POST",
                        service + path,
                        headers={"Origin": ORIGIN, "Content-Type": "application/json"},
                        data=b"{}",
                    )
                except (aiohttp.ClientError, TimeoutError) as exc:
                    problems.append(f"POST {path}: {self._why(exc)}")
                    continue
                if r.headers.get("access-control-allow-origin", "") not in ("*", ORIGIN):
                    problems.append(f"POST {path}: answer without Access-Control-Allow-Origin")
        if problems:
            self._add(
                "cors_preflight",
                FAIL,
                "browsers cannot call the token endpoint: " + "; ".join(problems),
                "let OPTIONS reach the service (or answer it in the proxy) and keep its "
                "Access-Control-Allow-* headers; do not strip them in the reverse proxy",
            )
        else:
            self._add("cors_preflight", PASS, f"preflight from {ORIGIN} allowed")

    async def _token_errors(self, service: str) -> None:
        if not self._service_known("token_errors"):
            return
        problems = []
        for path in ("/get_token", "/sfu/get"):
            try:
                r = await self._req(
                    "POST",
                    service + path,
                    headers={"Content-Type": "application/json", "Origin": ORIGIN},
                    data=b"{not json",
                )
            except (aiohttp.ClientError, TimeoutError) as exc:
                problems.append(f"{path}: {self._why(exc)}")
                continue
            body = r.json()
            code = body.get("errcode") if isinstance(body, dict) else None
            if r.status != 400 or code not in ("M_NOT_JSON", "M_BAD_JSON"):
                problems.append(f"{path}: {r.status} {code or r.text[:60]!r}")
        if problems:
            self._add(
                "token_errors",
                FAIL,
                "a malformed request does not get the Matrix error JSON: " + "; ".join(problems),
                "route POST /get_token and /sfu/get to the service unchanged (no proxy error "
                "pages, no path rewriting)",
            )
        else:
            self._add("token_errors", PASS, "malformed body → 400 M_NOT_JSON")

    async def _federation_url(self, hs: str) -> str | None:
        if self.federation_url:
            return self.federation_url.rstrip("/")
        name = None if self.target.startswith(("http://", "https://")) else self.target
        if name is None and self.access_token:
            try:
                r = await self._req(
                    "GET",
                    hs + "/_matrix/client/v3/account/whoami",
                    headers={"Authorization": f"Bearer {self.access_token}"},
                )
                user = r.json().get("user_id", "") if isinstance(r.json(), dict) else ""
                name = user.partition(":")[2] or None
            except (aiohttp.ClientError, TimeoutError):
                name = None
        if name is None:
            return None
        parsed = parse_server_name(name)
        if parsed is None:
            return None
        if parsed.port is not None or parsed.is_ip:
            return f"https://{parsed.url_host}:{parsed.port or 8448}"
        try:
            r = await self._req("GET", f"https://{name}/.well-known/matrix/server")
            body = r.json()
            if r.status == 200 and isinstance(body, dict) and isinstance(body.get("m.server"), str):
                target = parse_server_name(body["m.server"])
                if target is not None:
                    return f"https://{target.url_host}:{target.port or 8448}"
        except (aiohttp.ClientError, TimeoutError):
            pass
        return f"https://{parsed.url_host}:8448"

    async def _federation(self, hs: str) -> None:
        url = await self._federation_url(hs)
        if url is None:
            self._add(
                "openid_federation",
                SKIP,
                "server name unknown for a URL target: pass --federation-url or --access-token",
            )
            return
        token = f"doctor-{secrets.token_hex(8)}"
        probe = f"{url}/_matrix/federation/v1/openid/userinfo?access_token={token}"
        fix = (
            "the token service validates OpenID tokens on the homeserver's federation API: "
            "open port 8448 (or publish .well-known/matrix/server), and give a Synapse "
            "listener the `openid` or `federation` resource (federation may stay disabled); "
            "private networks: MATRIXRTC_SFU_HOMESERVER_OVERRIDES"
        )
        try:
            r = await self._req("GET", probe)
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._add("openid_federation", FAIL, f"{url} unreachable: {self._why(exc)}", fix)
            return
        body = r.json()
        code = body.get("errcode") if isinstance(body, dict) else None
        if r.status == 401 and code == "M_UNKNOWN_TOKEN":
            self._add("openid_federation", PASS, f"OpenID userinfo answers at {url}")
        else:
            self._add(
                "openid_federation",
                FAIL,
                f"{url}/_matrix/federation/v1/openid/userinfo answered {r.status} {code or ''}",
                fix,
            )

    async def _token_flow(self, hs: str, service: str) -> None:
        checks = ("token_flow", "service_livekit")
        if not self.access_token:
            for c in checks:
                self._add(c, SKIP, "needs --access-token (a real login to exchange)")
            return
        if not all(self._service_known(c) for c in checks[:1]):
            self._add("service_livekit", SKIP, "not checked: `token_flow` was not checked")
            return
        if self._skip_if("token_flow", "openid_federation"):
            self._add("service_livekit", SKIP, "not checked: `openid_federation` failed")
            return
        auth = {"Authorization": f"Bearer {self.access_token}"}
        try:
            who = (
                await self._req("GET", hs + "/_matrix/client/v3/account/whoami", headers=auth)
            ).json()
            user = who["user_id"]
            device = who.get("device_id") or "DOCTOR"
            oid = (
                await self._req(
                    "POST",
                    f"{hs}/_matrix/client/v3/user/{quote(user, safe='')}/openid/request_token",
                    headers={**auth, "Content-Type": "application/json"},
                    data=b"{}",
                )
            ).json()
            if not isinstance(oid, dict) or "access_token" not in oid:
                raise ValueError(f"no OpenID token: {oid}")
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as exc:
            self._add(
                "token_flow",
                FAIL,
                f"could not get an OpenID token from the homeserver: {self._why(exc)}",
                "check --access-token",
            )
            self._add("service_livekit", SKIP, "not checked: `token_flow` failed")
            return
        body = {
            "room_id": f"!matrixrtc-doctor:{user.partition(':')[2]}",
            "slot_id": "m.call#ROOM",
            "openid_token": oid,
            "member": {"id": "doctor", "claimed_user_id": user, "claimed_device_id": device},
        }
        try:
            r = await self._req(
                "POST",
                service + "/get_token",
                headers={"Content-Type": "application/json"},
                data=json.dumps(body).encode(),
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._add("token_flow", FAIL, f"/get_token: {self._why(exc)}")
            self._add("service_livekit", SKIP, "not checked: `token_flow` failed")
            return
        resp = r.json()
        resp = resp if isinstance(resp, dict) else {}
        if r.status == 200 and resp.get("jwt"):
            self._add("token_flow", PASS, f"OpenID token of {user} exchanged for a LiveKit token")
            self._add("service_livekit", PASS, "the service reaches LiveKit with its key")
            self._jwt = str(resp["jwt"])
            if not self.livekit_url:
                self.livekit_url = str(resp.get("url", ""))
            return
        err = f"{r.status} {resp.get('errcode', '')} {resp.get('error', r.text[:80])}".strip()
        if r.status == 500 and "create room" in str(resp.get("error", "")):
            self._add("token_flow", PASS, "the OpenID token was accepted")
            self._add(
                "service_livekit",
                FAIL,
                f"the service cannot create rooms on LiveKit ({err})",
                "check the service's LIVEKIT_URL (reachable from the service) and that "
                "LIVEKIT_KEY/LIVEKIT_SECRET are one of LiveKit's `keys`",
            )
            return
        self._add(
            "token_flow",
            FAIL,
            f"/get_token refused a valid OpenID token: {err}",
            "401: the service cannot validate at the homeserver (federation reachability "
            "from the service, MATRIXRTC_SFU_HOMESERVER_OVERRIDES); 403/400: see the error",
        )
        self._add("service_livekit", SKIP, "not checked: `token_flow` failed")

    def _lk_http(self) -> str:
        url = self.livekit_url.rstrip("/")
        if url.startswith("ws"):
            url = "http" + url[2:]
        return url

    async def _livekit(self) -> None:
        if not self.livekit_url:
            self._add("livekit_reachable", SKIP, "LiveKit URL unknown (--livekit-url)")
            self._add("livekit_token", SKIP, "LiveKit URL unknown")
            return
        base = self._lk_http()
        try:
            r = await self._req("GET", base + "/")
            ok, why = r.status == 200, f"answered {r.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            ok, why = False, self._why(exc)
        if not ok:
            self._add(
                "livekit_reachable",
                FAIL,
                f"LiveKit at {self.livekit_url} does not answer: {why}",
                "route the LiveKit URL handed to clients (LIVEKIT_URL) to LiveKit's port "
                "7880 (websocket upgrade allowed)",
            )
            self._add("livekit_token", SKIP, "not checked: `livekit_reachable` failed")
            return
        self._add("livekit_reachable", PASS, f"LiveKit answers at {self.livekit_url}")
        if not self._jwt:
            self._add("livekit_token", SKIP, "no token from the service to try")
            return
        r = await self._req("GET", base + "/rtc/validate?access_token=" + quote(self._jwt))
        if r.status == 200:
            self._add("livekit_token", PASS, "LiveKit accepts the service's token")
            await self._websocket()
        elif r.status == 404:
            self._add(
                "livekit_token",
                PASS,
                "LiveKit accepts the token's signature (room not created: restricted user)",
            )
        else:
            self._add(
                "livekit_token",
                FAIL,
                f"LiveKit rejects the service's token: {r.status} {r.text[:80]}",
                "the service's LIVEKIT_KEY/LIVEKIT_SECRET must be one of LiveKit's `keys`",
            )

    async def _websocket(self) -> None:
        """Join over LiveKit's signalling websocket with the service's token, as a client
        does (a reverse proxy that drops the Upgrade header fails here), then leave."""
        assert self._session is not None
        ws_url = self.livekit_url.rstrip("/")
        if ws_url.startswith("http"):
            ws_url = "ws" + ws_url[4:]
        url = f"{ws_url}/rtc?access_token={quote(self._jwt)}&auto_subscribe=0&protocol=15"
        fix = (
            "the reverse proxy in front of LiveKit must pass websocket upgrades "
            "(Upgrade/Connection headers, long read timeouts) on the LIVEKIT_URL path"
        )
        try:
            async with self._session.ws_connect(url, autoclose=True) as ws:
                msg = await ws.receive(timeout=self.timeout)
                await ws.close()
        except aiohttp.WSServerHandshakeError as exc:
            self._add("livekit_websocket", FAIL, f"websocket upgrade refused: {exc.status}", fix)
            return
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._add("livekit_websocket", FAIL, f"websocket: {self._why(exc)}", fix)
            return
        if msg.type is aiohttp.WSMsgType.BINARY:
            self._add("livekit_websocket", PASS, "joined over LiveKit's websocket and left")
        else:
            self._add(
                "livekit_websocket",
                FAIL,
                f"LiveKit's websocket answered {msg.type.name} instead of a join response",
                fix,
            )

    def _keys(self) -> tuple[str, str]:
        if self.livekit_key and self.livekit_secret:
            return self.livekit_key, self.livekit_secret
        cfg = self._read_lk_config()
        keys = cfg.get("keys") if isinstance(cfg, dict) else None
        if isinstance(keys, dict) and keys:
            k, s = next(iter(keys.items()))
            return str(k), str(s)
        return os.environ.get("LIVEKIT_KEY", ""), os.environ.get("LIVEKIT_SECRET", "")

    def _read_lk_config(self) -> Any:
        if not self.livekit_config:
            return None
        text = Path(self.livekit_config).read_text()
        try:
            return json.loads(text)
        except ValueError:
            import yaml  # type: ignore[import-untyped]  # PyYAML, a Synapse dependency

            return yaml.safe_load(text)

    async def _livekit_api(self) -> None:
        key, secret = self._keys()
        if not key or not self.livekit_url:
            self._add("livekit_api", SKIP, "needs --livekit-url and --livekit-key/--livekit-secret")
            return
        if self._skip_if("livekit_api", "livekit_reachable"):
            return
        assert self._session is not None
        api = lkapi.LiveKitAPI(self._lk_http(), key, secret, session=self._session)
        try:
            await api.room.list_rooms(lkapi.ListRoomsRequest())
        except lkapi.TwirpError as exc:
            self._add(
                "livekit_api",
                FAIL,
                f"LiveKit's API refuses key {key}: {exc.code} {exc.message[:80]}",
                "use a key/secret pair from LiveKit's `keys` section",
            )
            return
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._add("livekit_api", FAIL, f"LiveKit's API unreachable: {self._why(exc)}")
            return
        self._add("livekit_api", PASS, f"LiveKit's API accepts key {key}")

    async def _webhook(self, service: str) -> None:
        cfg = self._read_lk_config()
        urls: list[str] = []
        if isinstance(cfg, dict):
            raw_hook = cfg.get("webhook")
            hook: dict[str, Any] = raw_hook if isinstance(raw_hook, dict) else {}
            key = str(hook.get("api_key", ""))
            raw_keys = cfg.get("keys")
            keys: dict[str, Any] = raw_keys if isinstance(raw_keys, dict) else {}
            secret = str(keys.get(key, ""))
            urls = [str(u) for u in hook.get("urls", []) if str(u).endswith("/sfu_webhook")]
            if not urls:
                self._add(
                    "webhook",
                    WARN,
                    "LiveKit sends no webhook to the service: departures are noticed only by "
                    "the presence check (LIVEKIT_SANITY_CHECK_INTERVAL_SECONDS)",
                    "livekit.yaml: webhook: {api_key: <the service's LIVEKIT_KEY>, urls: "
                    "[https://<service>/sfu_webhook]}",
                )
                return
            if not secret:
                self._add(
                    "webhook",
                    FAIL,
                    f"webhook.api_key {key!r} is not one of LiveKit's keys: LiveKit cannot sign",
                    "set webhook.api_key to the service's LIVEKIT_KEY",
                )
                return
        else:
            key, secret = self.livekit_key, self.livekit_secret
            if not key or not secret:
                self._add("webhook", SKIP, "needs --livekit-config (or --livekit-key/-secret)")
                return
            if not self._service_known("webhook"):
                return
            urls = [service + "/sfu_webhook"]
        body = json.dumps(
            {
                "event": "room_started",
                "room": {"name": "matrixrtc-doctor", "sid": "RM_doctor"},
                "id": "EV_doctor" + secrets.token_hex(4),
                "createdAt": str(int(time.time())),
            }
        )
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        token = lkapi.AccessToken(key, secret).with_sha256(digest).to_jwt()
        bad = []
        for url in urls:
            try:
                r = await self._req(
                    "POST",
                    url,
                    headers={"Authorization": token, "Content-Type": "application/webhook+json"},
                    data=body.encode(),
                )
                if r.status != 200:
                    bad.append(f"{url} answered {r.status}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                bad.append(f"{url}: {self._why(exc)}")
        if bad:
            self._add(
                "webhook",
                FAIL,
                f"the service rejects webhooks signed with LiveKit's key {key}: " + "; ".join(bad),
                "LiveKit's webhook.api_key (and its secret) must equal the service's "
                "LIVEKIT_KEY/LIVEKIT_SECRET; the URL must reach the service",
            )
        else:
            self._add("webhook", PASS, f"the service accepts webhooks signed with key {key}")

    async def _turn(self) -> None:
        if not self.turn:
            self._add("turn", SKIP, "no --turn host:port given")
            return
        host, _sep, port = self.turn.rpartition(":")
        try:
            rtt = await stun_binding(host.strip("[]"), int(port), self.timeout)
        except (OSError, ValueError, TimeoutError) as exc:
            self._add(
                "turn",
                FAIL,
                f"no STUN answer from {self.turn} over UDP: {self._why(exc)}",
                "open the TURN port (LiveKit's turn.udp_port, default 3478) in the firewall "
                "and set turn.domain / external IP",
            )
            return
        self._add("turn", PASS, f"STUN binding answered in {rtt * 1000:.0f} ms")


async def stun_binding(host: str, port: int, wait: float) -> float:
    """Send one STUN Binding request (RFC 5389) over UDP; seconds until the answer."""
    loop = asyncio.get_running_loop()
    txid = secrets.token_bytes(12)
    request = struct.pack("!HHI", 0x0001, 0, 0x2112A442) + txid
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    family, _t, _p, _c, addr = infos[0]
    answered: asyncio.Future[float] = loop.create_future()
    start = time.monotonic()

    class _Proto(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, _addr: Any) -> None:
            if len(data) >= 20 and data[8:20] == txid and not answered.done():
                answered.set_result(time.monotonic() - start)

    transport, _ = await loop.create_datagram_endpoint(_Proto, family=family)
    try:
        for _ in range(3):
            transport.sendto(request, addr)
            try:
                return await asyncio.wait_for(asyncio.shield(answered), wait / 3)
            except TimeoutError:
                continue
        raise TimeoutError("no answer")
    finally:
        transport.close()


def render(rows: Sequence[Row]) -> str:
    width = max((len(r.check) for r in rows), default=0)
    out = []
    for r in rows:
        out.append(f"{r.status.upper():4}  {r.check:<{width}}  {r.summary}")
        if r.fix and r.status in (FAIL, WARN):
            out.append(f"{'':4}  {'':<{width}}  fix: {r.fix}")
    failed = sum(r.status == FAIL for r in rows)
    out.append(f"\n{failed} check(s) failed" if failed else "\nno check failed")
    return "\n".join(out)


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("target", help="server name (example.org) or base URL")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument(
        "--access-token",
        default=os.environ.get("MATRIX_ACCESS_TOKEN", ""),
        help="a Matrix access token (env MATRIX_ACCESS_TOKEN): enables rtc_transports "
        "and the real token exchange",
    )
    parser.add_argument("--service-url", default="", help="authorization service URL")
    parser.add_argument(
        "--federation-url", default="", help="federation API base URL (instead of discovery)"
    )
    parser.add_argument("--livekit-url", default="", help="LiveKit URL (else from the token)")
    parser.add_argument("--livekit-key", default=os.environ.get("LIVEKIT_KEY", ""))
    parser.add_argument("--livekit-secret", default=os.environ.get("LIVEKIT_SECRET", ""))
    parser.add_argument("--livekit-config", default="", help="LiveKit's config file (YAML)")
    parser.add_argument("--turn", default="", help="TURN/STUN host:port to probe over UDP")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per request")
    return parser


async def run_doctor(args: argparse.Namespace) -> list[Row]:
    doctor = Doctor(
        target=args.target,
        access_token=args.access_token,
        service_url=args.service_url,
        federation_url=args.federation_url,
        livekit_url=args.livekit_url,
        livekit_key=args.livekit_key,
        livekit_secret=args.livekit_secret,
        livekit_config=args.livekit_config,
        turn=args.turn,
        timeout=args.timeout,
    )
    return await doctor.run()


def main(args: argparse.Namespace) -> int:
    rows = asyncio.run(run_doctor(args))
    failed = any(r.status == FAIL for r in rows)
    if args.json:
        doc = {"target": args.target, "ok": not failed, "checks": [asdict(r) for r in rows]}
        print(json.dumps(doc, indent=1))
    else:
        print(render(rows))
    sys.stdout.flush()
    return 1 if failed else 0
