"""A private redis-server on a free loopback port whose data survives restarts."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from types import TracebackType
from typing import Self

import structlog

from matrixrtc.devstack._process import ManagedProcess, free_tcp_port
from matrixrtc.errors import ConfigError

__all__ = ["Redis"]

log = structlog.get_logger(__name__)

START_TIMEOUT = 15.0


class Redis:
    """redis-server on 127.0.0.1 with an append-only file under ``run_dir``."""

    def __init__(self, run_dir: Path, *, name: str = "redis") -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ConfigError("redis-server not found: run scripts/bootstrap.sh")
        self.dir = run_dir / name
        self.port = free_tcp_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_path = self.dir / "redis.log"
        self.startup_seconds: float | None = None
        self._proc = ManagedProcess(
            name=name,
            argv=[
                binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dir",
                str(self.dir),
                "--daemonize",
                "no",
                # Every write reaches the AOF before the reply: a restart keeps all data.
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--protected-mode",
                "yes",
                "--logfile",
                "",
            ],
            log_path=self.log_path,
            cwd=self.dir,
        )

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    async def _ready(self) -> bool:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 2)
        try:
            writer.write(b"PING\r\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 2)
            return line.startswith(b"+PONG")
        finally:
            writer.close()
            await writer.wait_closed()

    async def start(self) -> None:
        """Start redis-server and wait until it answers PING."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.startup_seconds = await self._proc.start(self._ready, START_TIMEOUT)
        log.info("redis ready", url=self.url, seconds=round(self.startup_seconds, 2))

    async def stop(self) -> None:
        """Stop redis-server (it flushes the AOF on SIGTERM)."""
        await self._proc.stop()

    async def restart(self) -> None:
        """Stop and start again on the same port; data is kept."""
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
