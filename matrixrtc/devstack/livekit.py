"""A real LiveKit server (v1.13.5) on free loopback ports, rooms created only explicitly."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from matrixrtc.devstack._paths import find_livekit_binary
from matrixrtc.devstack._process import (
    ManagedProcess,
    deep_merge,
    free_tcp_port,
    free_udp_port,
)
from matrixrtc.devstack._service import Service

__all__ = ["LiveKit", "livekit_config"]

# LiveKitServer.Start(): Serve(), then time.Sleep(100 ms), then running = true.
_RUNNING_DELAY = 0.15


def livekit_config(
    *,
    http_port: int,
    tcp_port: int,
    udp_port: int,
    api_key: str,
    api_secret: str,
    webhook_urls: Sequence[str] = (),
    extra_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Loopback-only config: every candidate is 127.0.0.1 and rooms are never auto-created."""
    cfg: dict[str, Any] = {
        "port": http_port,
        "bind_addresses": ["127.0.0.1"],
        "rtc": {
            "tcp_port": tcp_port,
            "udp_port": udp_port,
            "use_external_ip": False,
            "node_ip": "127.0.0.1",
            "enable_loopback_candidate": True,
            "ips": {"includes": ["127.0.0.1/32"]},
        },
        "keys": {api_key: api_secret},
        # Without this any token holder could create rooms (lk-jwt-service's model relies on it).
        "room": {"auto_create": False},
        # MATRIXRTC_LIVEKIT_LOG_LEVEL=debug: subscriptions, down tracks and key frames in the log.
        "logging": {"level": os.environ.get("MATRIXRTC_LIVEKIT_LOG_LEVEL", "info"), "json": False},
    }
    if webhook_urls:
        cfg["webhook"] = {"api_key": api_key, "urls": list(webhook_urls)}
    if extra_config:
        cfg = deep_merge(cfg, extra_config)
    return cfg


class LiveKit(Service):
    """A livekit-server process on 127.0.0.1; config and log under ``run_dir``.

    ``url`` is the signalling WebSocket URL for SDKs, ``http_url`` the Twirp API base.
    """

    start_timeout = 30.0

    def __init__(
        self,
        run_dir: Path,
        webhook_urls: Sequence[str] = (),
        extra_config: Mapping[str, Any] | None = None,
        *,
        name: str = "livekit",
    ) -> None:
        self.dir = run_dir / name
        self.http_port = free_tcp_port()
        self.tcp_port = free_tcp_port()
        self.udp_port = free_udp_port()
        self.url = f"ws://127.0.0.1:{self.http_port}"
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.api_key = "API" + secrets.token_hex(6)
        self.api_secret = secrets.token_urlsafe(36)
        self.log_path = self.dir / "livekit.log"
        self.config_path = self.dir / "livekit.yaml"
        self.webhook_urls = tuple(webhook_urls)
        self._webhook_lock = asyncio.Lock()  # services starting together add theirs in turn
        self._extra_config = extra_config
        self._binary = find_livekit_binary()
        self._proc = ManagedProcess(
            name=name,
            argv=[str(self._binary), "--config", str(self.config_path)],
            log_path=self.log_path,
            cwd=self.dir,
        )

    def _write_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        cfg = livekit_config(
            http_port=self.http_port,
            tcp_port=self.tcp_port,
            udp_port=self.udp_port,
            api_key=self.api_key,
            api_secret=self.api_secret,
            webhook_urls=self.webhook_urls,
            extra_config=self._extra_config,
        )
        # JSON is valid YAML; the secret makes this file private.
        self.config_path.write_text(json.dumps(cfg, indent=2))
        self.config_path.chmod(0o600)

    async def _ready(self) -> bool:
        timeout = aiohttp.ClientTimeout(total=2)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(self.http_url + "/") as resp,
        ):
            if resp.status != 200:
                return False
        # livekit-server serves HTTP 100 ms before it marks itself running, and a SIGTERM in
        # that window is ignored (Stop() returns early; the process never exits). Only call
        # it ready once a stop would work.
        await asyncio.sleep(_RUNNING_DELAY)
        return True

    def _prepare(self) -> None:
        self._write_config()

    @property
    def running(self) -> bool:
        return self._proc.running

    async def add_webhook_url(self, url: str) -> None:
        """Post webhooks to ``url`` too. livekit-server reads its webhook list only at start:
        a running server is restarted (same ports and keys; rooms are lost, so do this before
        anyone connects)."""
        async with self._webhook_lock:
            if url in self.webhook_urls:
                return
            self.webhook_urls = (*self.webhook_urls, url)
            if self.running:
                await self.restart()

    def _ready_fields(self) -> dict[str, object]:
        # A restart keeps ports and keys; rooms are lost (no Redis behind this server).
        return {"url": self.url}
