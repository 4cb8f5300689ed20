"""A private redis-server on a free loopback port whose data survives restarts."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from matrixrtc.devstack._process import ManagedProcess, free_tcp_port
from matrixrtc.devstack._service import Service
from matrixrtc.errors import ConfigError

__all__ = ["Redis"]


class Redis(Service):
    """redis-server on 127.0.0.1 with an append-only file under ``run_dir``."""

    def __init__(self, run_dir: Path, *, name: str = "redis") -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ConfigError("redis-server not found: run scripts/bootstrap.sh")
        self.dir = run_dir / name
        self.port = free_tcp_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_path = self.dir / "redis.log"
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

    def _prepare(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)

    def _ready_fields(self) -> dict[str, object]:
        return {"url": self.url}
