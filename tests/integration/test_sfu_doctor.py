"""``python -m sfu doctor`` against the real stack: passes on a good deployment, and on
deployments broken one way each it names exactly that check and no other.

A deployment here is Synapse (serving its own ``.well-known/matrix/client`` with the focus),
the authorization service and LiveKit (webhooks to the service). Broken variants: delayed
events off, no transports/foci, CORS stripped by a reverse proxy, service down, the service's
LiveKit secret wrong, LiveKit signing webhooks with another key, federation unreachable,
LiveKit behind a proxy that does not pass websocket upgrades, a dead TURN port.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest_asyncio
from aiohttp import web

from matrixrtc.devstack import Coturn, LiveKit, Synapse, UserCreds
from matrixrtc.devstack._process import ManagedProcess, free_tcp_port, free_udp_port
from sfu.doctor import Doctor, Row


def service(
    run_dir: Path, name: str, port: int, lk: LiveKit, hs: Synapse, **extra: str
) -> ManagedProcess:
    env = {
        **os.environ,
        "LIVEKIT_URL": lk.url,
        "LIVEKIT_KEY": lk.api_key,
        "LIVEKIT_SECRET": lk.api_secret,
        "LIVEKIT_JWT_BIND": f"127.0.0.1:{port}",
        "LIVEKIT_FULL_ACCESS_HOMESERVERS": hs.server_name,
        "MATRIXRTC_SFU_HOMESERVER_OVERRIDES": f"{hs.server_name}={hs.base_url}",
        "MATRIXRTC_SFU_RATE_LIMIT": "0",
        **extra,
    }
    return ManagedProcess(
        name=name,
        argv=[sys.executable, "-m", "sfu", "serve"],
        log_path=run_dir / name / "service.log",
        cwd=run_dir,
        env=env,
    )


async def start(proc: ManagedProcess, port: int) -> None:
    async def ready() -> bool:
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"http://127.0.0.1:{port}/healthz", timeout=aiohttp.ClientTimeout(total=1)) as r,
        ):
            return r.status == 200

    await proc.start(ready, 30)


def bad_proxy(upstream: str, *, strip_cors: bool) -> web.Application:
    """A reverse proxy configured a usual wrong way: plain HTTP only (no websocket upgrade:
    hop-by-hop headers are not passed on), and with ``strip_cors`` OPTIONS not passed on
    (405) and the upstream's Access-Control-* headers dropped."""
    hop = {"connection", "upgrade", "host", "content-length", "transfer-encoding"}

    async def handle(request: web.Request) -> web.StreamResponse:
        if strip_cors and request.method == "OPTIONS":
            return web.Response(status=405)
        async with (
            aiohttp.ClientSession(auto_decompress=False) as s,
            s.request(
                request.method,
                upstream + request.path_qs,
                data=await request.read(),
                headers={k: v for k, v in request.headers.items() if k.lower() not in hop},
            ) as r,
        ):
            body = await r.read()
            headers = {
                k: v
                for k, v in r.headers.items()
                if not (strip_cors and k.lower().startswith("access-control-"))
                and k.lower() not in hop
            }
            return web.Response(status=r.status, body=body, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


@dataclass
class Deployments:
    good_hs: Synapse
    no_delay_hs: Synapse
    bare_hs: Synapse  # no transports, no foci
    lk: LiveKit
    lk_webhook_mismatch: LiveKit
    good: str  # service URLs
    no_delay: str
    wrong_secret: str
    webhook_mismatch: str
    cors_proxy: str
    livekit_proxy: str  # plain HTTP in front of LiveKit: no websocket upgrades
    good_user: UserCreds
    no_delay_user: UserCreds
    bare_user: UserCreds


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def deps(synapse: Synapse, run_dir: Path) -> AsyncIterator[Deployments]:
    names = ("good", "nodelay", "wrong", "hook", "proxy", "lkproxy")
    ports = {n: free_tcp_port() for n in names}
    url = {n: f"http://127.0.0.1:{p}" for n, p in ports.items()}
    hook_key, hook_secret = "APIhook" + secrets.token_hex(3), secrets.token_urlsafe(30)
    async with (
        LiveKit(run_dir, webhook_urls=[url["good"] + "/sfu_webhook"], name="lk-doctor") as lk,
        LiveKit(
            run_dir,
            webhook_urls=[url["hook"] + "/sfu_webhook"],
            # a second key that the service does not know signs the webhooks
            extra_config={"keys": {hook_key: hook_secret}, "webhook": {"api_key": hook_key}},
            name="lk-doctor-hook",
        ) as lk2,
        Synapse(run_dir, livekit_service_url=url["good"], name="hs-doctor") as good_hs,
        Synapse(
            run_dir,
            livekit_service_url=url["nodelay"],
            extra_config={"max_event_delay_duration": None},
            name="hs-doctor-nodelay",
        ) as no_delay_hs,
    ):
        procs = {
            "good": service(run_dir, "sfu-doctor", ports["good"], lk, good_hs),
            "nodelay": service(run_dir, "sfu-doctor-nodelay", ports["nodelay"], lk, no_delay_hs),
            "wrong": service(
                run_dir,
                "sfu-doctor-wrong",
                ports["wrong"],
                lk,
                good_hs,
                LIVEKIT_SECRET=secrets.token_urlsafe(30),
            ),
            "hook": service(run_dir, "sfu-doctor-hook", ports["hook"], lk2, good_hs),
        }
        runner = web.AppRunner(bad_proxy(url["good"], strip_cors=True))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", ports["proxy"]).start()
        lk_runner = web.AppRunner(bad_proxy(lk.http_url, strip_cors=False))
        await lk_runner.setup()
        await web.TCPSite(lk_runner, "127.0.0.1", ports["lkproxy"]).start()
        try:
            await asyncio.gather(*(start(p, ports[n]) for n, p in procs.items()))
            users = await asyncio.gather(
                good_hs.register("doc" + secrets.token_hex(3)),
                no_delay_hs.register("doc" + secrets.token_hex(3)),
                synapse.register("doc" + secrets.token_hex(3)),
            )
            yield Deployments(
                good_hs,
                no_delay_hs,
                synapse,
                lk,
                lk2,
                url["good"],
                url["nodelay"],
                url["wrong"],
                url["hook"],
                url["proxy"],
                url["lkproxy"],
                *users,
            )
        finally:
            await lk_runner.cleanup()
            await runner.cleanup()
            await asyncio.gather(*(p.stop() for p in procs.values()))


async def doctor(hs: Synapse, user: UserCreds, lk: LiveKit, **kw: Any) -> list[Row]:
    args: dict[str, Any] = {
        "access_token": user.access_token,
        "federation_url": hs.base_url,
        "livekit_config": str(lk.config_path),
        **kw,
    }
    rows = await Doctor(hs.base_url, **args).run()
    print("\n".join(f"{r.status:4} {r.check}: {r.summary}" for r in rows))
    return rows


def failing(rows: list[Row]) -> set[str]:
    return {r.check for r in rows if r.status == "fail"}


async def test_good_deployment_passes_every_check(deps: Deployments) -> None:
    rows = await doctor(deps.good_hs, deps.good_user, deps.lk)
    assert failing(rows) == set()
    status = {r.check: r.status for r in rows}
    for check in (
        "well_known",
        "versions",
        "delayed_events",
        "msc4143",
        "sticky_events",
        "rtc_foci",
        "rtc_transports",
        "service_health",
        "cors_preflight",
        "token_errors",
        "openid_federation",
        "token_flow",
        "service_livekit",
        "livekit_reachable",
        "livekit_token",
        "livekit_websocket",
        "livekit_api",
        "webhook",
    ):
        assert status[check] == "pass", (check, status[check])
    assert status["turn"] == "skip"


async def test_cli_json_and_exit_status(deps: Deployments) -> None:
    async def run(*args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sfu",
            "doctor",
            *args,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "MATRIX_ACCESS_TOKEN": deps.good_user.access_token},
        )
        out, _ = await proc.communicate()
        return proc.returncode or 0, out.decode()

    code, out = await run(
        deps.good_hs.base_url, "--federation-url", deps.good_hs.base_url, "--json"
    )
    doc = json.loads(out)
    assert code == 0, out
    assert doc["ok"] is True
    assert {c["check"] for c in doc["checks"]} >= {"delayed_events", "cors_preflight"}
    code, out = await run(
        deps.good_hs.base_url,
        "--federation-url",
        deps.good_hs.base_url,
        "--service-url",
        deps.cors_proxy,
    )
    assert code == 1
    assert "FAIL  cors_preflight" in out
    assert "fix:" in out


async def test_delayed_events_off(deps: Deployments) -> None:
    rows = await doctor(deps.no_delay_hs, deps.no_delay_user, deps.lk)
    assert failing(rows) == {"delayed_events"}


async def test_no_transports_and_no_foci(deps: Deployments) -> None:
    rows = await doctor(deps.bare_hs, deps.bare_user, deps.lk)
    assert failing(rows) == {"rtc_foci", "rtc_transports"}


async def test_cors_missing(deps: Deployments) -> None:
    rows = await doctor(deps.good_hs, deps.good_user, deps.lk, service_url=deps.cors_proxy)
    assert failing(rows) == {"cors_preflight"}


async def test_service_down(deps: Deployments) -> None:
    dead = f"http://127.0.0.1:{free_tcp_port()}"
    rows = await doctor(deps.good_hs, deps.good_user, deps.lk, service_url=dead)
    assert failing(rows) == {"service_health"}


async def test_wrong_livekit_secret_in_the_service(deps: Deployments) -> None:
    rows = await doctor(deps.good_hs, deps.good_user, deps.lk, service_url=deps.wrong_secret)
    assert failing(rows) == {"service_livekit"}


async def test_webhook_key_mismatch(deps: Deployments) -> None:
    rows = await doctor(
        deps.good_hs, deps.good_user, deps.lk_webhook_mismatch, service_url=deps.webhook_mismatch
    )
    assert failing(rows) == {"webhook"}


async def test_federation_unreachable(deps: Deployments) -> None:
    dead = f"http://127.0.0.1:{free_tcp_port()}"
    rows = await doctor(deps.good_hs, deps.good_user, deps.lk, federation_url=dead)
    assert failing(rows) == {"openid_federation"}


async def test_turn_probe(deps: Deployments, coturn: Coturn) -> None:
    rows = await doctor(deps.good_hs, deps.good_user, deps.lk, turn=f"127.0.0.1:{coturn.port}")
    assert {r.check: r.status for r in rows}["turn"] == "pass"
    dead = f"127.0.0.1:{free_udp_port()}"
    rows = await doctor(deps.good_hs, deps.good_user, deps.lk, turn=dead, timeout=1.5)
    assert failing(rows) == {"turn"}


async def test_livekit_behind_a_proxy_without_websocket_upgrades(deps: Deployments) -> None:
    rows = await doctor(deps.good_hs, deps.good_user, deps.lk, livekit_url=deps.livekit_proxy)
    assert failing(rows) == {"livekit_websocket"}
