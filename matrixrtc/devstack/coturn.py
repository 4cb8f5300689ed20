"""A private coturn TURN server on loopback, long-term credentials, relaying to loopback."""

from __future__ import annotations

import asyncio
import random
import secrets
import shutil
from pathlib import Path
from types import TracebackType
from typing import Self

import structlog

from matrixrtc.devstack._process import ManagedProcess, free_tcp_port
from matrixrtc.errors import ConfigError

__all__ = ["Coturn"]

log = structlog.get_logger(__name__)

START_TIMEOUT = 15.0
REALM = "matrixrtc.localhost"
RELAY_PORTS = 200


class Coturn:
    """turnserver on 127.0.0.1 (UDP and TCP on one port); ``uris`` for ICE configuration."""

    def __init__(self, run_dir: Path, *, name: str = "coturn") -> None:
        binary = shutil.which("turnserver")
        if binary is None:
            raise ConfigError("turnserver (coturn) not found: run scripts/bootstrap.sh")
        self.dir = run_dir / name
        self.port = free_tcp_port()
        self.uris = [
            f"turn:127.0.0.1:{self.port}?transport=udp",
            f"turn:127.0.0.1:{self.port}?transport=tcp",
        ]
        self.username = "turn-" + secrets.token_hex(4)
        self.password = secrets.token_urlsafe(18)
        self.realm = REALM
        self.log_path = self.dir / "turnserver.log"
        self.startup_seconds: float | None = None
        # Relay ports: a random slice below the ephemeral range and the devstack's own ports.
        relay_min = random.randrange(10000, 20000 - RELAY_PORTS)
        self._proc = ManagedProcess(
            name=name,
            argv=[
                binary,
                "-n",  # no config file: everything is on the command line
                "--listening-ip=127.0.0.1",
                "--relay-ip=127.0.0.1",
                f"--listening-port={self.port}",
                f"--min-port={relay_min}",
                f"--max-port={relay_min + RELAY_PORTS}",
                "--lt-cred-mech",
                f"--user={self.username}:{self.password}",
                f"--realm={self.realm}",
                # Peers are on loopback here; coturn refuses to relay to them otherwise.
                "--allow-loopback-peers",
                "--no-tls",
                "--no-dtls",
                "--no-cli",
                "--no-multicast-peers",
                "--fingerprint",
                f"--userdb={self.dir / 'turndb'}",
                f"--pidfile={self.dir / 'turnserver.pid'}",
                "--log-file=stdout",
                "--simple-log",
            ],
            log_path=self.log_path,
            cwd=self.dir,
        )

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    async def _ready(self) -> bool:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 2)
        writer.close()
        await writer.wait_closed()
        return True

    async def start(self) -> None:
        """Start turnserver and wait until its TCP listener accepts."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.startup_seconds = await self._proc.start(self._ready, START_TIMEOUT)
        log.info("coturn ready", uris=self.uris, seconds=round(self.startup_seconds, 2))

    async def stop(self) -> None:
        """Stop turnserver."""
        await self._proc.stop()

    async def restart(self) -> None:
        """Stop and start again with the same port and credentials."""
        await self.stop()
        await self.start()

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
