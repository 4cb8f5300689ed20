"""The lifecycle every devstack service shares.

A subclass owns one :class:`ManagedProcess` (``_proc``), says how long a start may take
(``start_timeout``), writes what a start needs (``_prepare``) and says when the process
answers (``_ready``). Start, stop, restart and ``async with`` live here once.
"""

from __future__ import annotations

import abc
from types import TracebackType
from typing import ClassVar, Self

import structlog

from matrixrtc.devstack._process import ManagedProcess

__all__ = ["Service"]

log = structlog.get_logger(__name__)


class Service(abc.ABC):
    start_timeout: ClassVar[float] = 15.0
    _proc: ManagedProcess
    startup_seconds: float | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    @abc.abstractmethod
    async def _ready(self) -> bool:
        """True once the service answers; exceptions count as "not yet"."""

    def _prepare(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Runs before every start: directories, config files."""

    def _ready_fields(self) -> dict[str, object]:
        """Key-value pairs for the "ready" log line (URLs, ports)."""
        return {}

    async def start(self) -> None:
        """Start the process and wait until it is ready (ServiceStartError otherwise)."""
        self._prepare()
        self.startup_seconds = await self._proc.start(self._ready, self.start_timeout)
        log.info(
            f"{self._proc.name} ready",
            seconds=round(self.startup_seconds, 2),
            **self._ready_fields(),
        )

    async def stop(self) -> None:
        """Stop the process group (SIGTERM, then SIGKILL after a grace period)."""
        await self._proc.stop()

    async def restart(self) -> None:
        """Stop and start again with the same ports, credentials and data."""
        await self.stop()
        await self.start()

    async def aclose(self) -> None:
        """Stop and release everything the service holds."""
        await self.stop()

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
