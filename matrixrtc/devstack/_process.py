"""Child processes of the devstack: spawn, readiness, shutdown by process group, registry.

Every service runs in its own session (process group) so that a shutdown reaches any helper
it forks. The registry remembers every group started here, so a test session can assert that
nothing it started outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from matrixrtc.errors import ServiceStartError

__all__ = [
    "ManagedProcess",
    "deep_merge",
    "free_tcp_port",
    "free_udp_port",
    "leftover_processes",
    "log_tail",
]

log = structlog.get_logger(__name__)

# pgid -> description, for every process group this module has started.
_REGISTRY: dict[int, str] = {}


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie leader still counts for killpg; look at the real state in /proc.
    return any(_alive_member(pgid))


def _alive_member(pgid: int) -> list[int]:
    alive: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command: state is [0], pgrp is [2].
        rest = stat[stat.rfind(")") + 2 :].split()
        if len(rest) > 2 and int(rest[2]) == pgid and rest[0] != "Z":
            alive.append(int(entry))
    return alive


def leftover_processes() -> dict[int, str]:
    """Process groups started by the devstack that still have a live member (pgid -> name)."""
    return {pgid: name for pgid, name in _REGISTRY.items() if _group_alive(pgid)}


# Service ports come from below the kernel's ephemeral range (32768+ by default), so that a
# client socket's automatic local port can never take a service's port between choosing it
# and binding it, or while the service restarts.
_PORT_RANGE = (20000, 32000)
_HANDED_OUT: set[int] = set()


def _free_port(kind: socket.SocketKind, host: str) -> int:
    for _ in range(200):
        port = random.randrange(*_PORT_RANGE)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise ServiceStartError(f"no free port in {_PORT_RANGE} on {host}")


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now and not handed out before by this process."""
    return _free_port(socket.SOCK_STREAM, host)


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port free on ``host`` now and not handed out before by this process."""
    return _free_port(socket.SOCK_DGRAM, host)


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``extra``, recursing into mappings present in both."""
    out = dict(base)
    for k, v in extra.items():
        old = out.get(k)
        if isinstance(v, Mapping) and isinstance(old, Mapping):
            out[k] = deep_merge(old, v)
        else:
            out[k] = v
    return out


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file (empty if it does not exist)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16384))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


ReadyCheck = Callable[[], Awaitable[bool]]


@dataclass
class ManagedProcess:
    """One service process: started in its own session, output appended to ``log_path``."""

    name: str
    argv: Sequence[str]
    log_path: Path
    cwd: Path
    env: Mapping[str, str] | None = None
    stop_grace: float = 5.0
    _proc: asyncio.subprocess.Process | None = field(default=None, init=False, repr=False)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self, ready: ReadyCheck, start_timeout: float) -> float:
        """Spawn and poll ``ready`` until it returns True; returns the start-up time in s.

        Raises ServiceStartError (with the log tail) if the process exits or is not ready in
        time; on any failure, cancellation included, the process is stopped before raising.
        """
        if self.running:
            raise ServiceStartError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with self.log_path.open("ab") as logf:
            logf.write(f"=== {self.name} start {time.strftime('%H:%M:%S')} ===\n".encode())
            logf.flush()
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *self.argv,
                    cwd=self.cwd,
                    env=dict(self.env) if self.env is not None else None,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=logf,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as e:
                raise ServiceStartError(f"{self.name}: cannot execute {self.argv[0]}: {e}") from e
        _REGISTRY[self._proc.pid] = self.name
        try:
            await self._wait_ready(self._proc, ready, t0 + start_timeout, start_timeout)
        except BaseException:
            # Also on cancellation (Ctrl-C during start-up): never leave a half-started service.
            await self.stop()
            raise
        elapsed = time.monotonic() - t0
        log.debug("service ready", service=self.name, pid=self._proc.pid, seconds=elapsed)
        return elapsed

    async def _wait_ready(
        self,
        proc: asyncio.subprocess.Process,
        ready: ReadyCheck,
        deadline: float,
        start_timeout: float,
    ) -> None:
        last_error = ""
        while True:
            if proc.returncode is not None:
                raise ServiceStartError(
                    f"{self.name} exited with code {proc.returncode} during start-up; "
                    f"log {self.log_path}:\n{log_tail(self.log_path)}"
                )
            try:
                if await ready():
                    return
            except Exception as e:  # a probe: any failure just means "not ready yet"
                last_error = f"{type(e).__name__}: {e}"
            if time.monotonic() > deadline:
                raise ServiceStartError(
                    f"{self.name} not ready after {start_timeout:.0f} s "
                    f"(last probe error: {last_error or 'none'}); "
                    f"log {self.log_path}:\n{log_tail(self.log_path)}"
                )
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """SIGTERM the whole process group, SIGKILL it after the grace period; reap."""
        proc = self._proc
        if proc is None:
            return
        pgid = proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.stop_grace)
        except TimeoutError:
            log.warning("service ignored SIGTERM; killing", service=self.name, pid=pgid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            await proc.wait()
        # The leader is gone; anything it left in its group goes too.
        if _group_alive(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            for _ in range(100):
                if not _group_alive(pgid):
                    break
                await asyncio.sleep(0.02)
        self._proc = None
