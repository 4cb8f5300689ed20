"""Drive ``tests/jssdk/member.mjs`` (a matrix-js-sdk ``MatrixRTCSession`` member in Node).

``JsMember`` starts the process, collects its JSON lines, and lets a test wait for one that
satisfies a predicate; ``kill()`` is a real SIGKILL (no leave sent), ``leave()`` asks the SDK
to leave as Element Call does.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MEMBER_JS = ROOT / "tests" / "jssdk" / "member.mjs"
JS_SDK = ROOT / "node_modules" / "matrix-js-sdk" / "package.json"


def js_sdk_available() -> bool:
    return shutil.which("node") is not None and JS_SDK.exists()


def js_sdk_version() -> str:
    version: str = json.loads(JS_SDK.read_text())["version"]
    return version


class JsMember:
    def __init__(self, config: dict[str, Any], log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.lines: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self.user_id = ""
        self.device_id = ""
        self.member_id = ""

    async def start(self, timeout_s: float = 30.0) -> JsMember:
        with self.log_path.open("ab") as err:
            self._proc = await asyncio.create_subprocess_exec(
                "node",
                str(MEMBER_JS),
                cwd=ROOT,
                env={**os.environ, "MEMBER_CONFIG": json.dumps(self.config)},
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                start_new_session=True,
            )
        self._reader = asyncio.create_task(self._read())
        ready = await self.wait_for(lambda e: e["event"] == "ready", timeout_s)
        self.user_id, self.device_id = ready["user_id"], ready["device_id"]
        self.member_id = ready["member_id"]
        return self

    async def _read(self) -> None:
        assert self._proc is not None
        assert self._proc.stdout is not None
        while line := await self._proc.stdout.readline():
            async with self._changed:
                self.lines.append(json.loads(line))
                self._changed.notify_all()
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(
        self, pred: Callable[[dict[str, Any]], bool], timeout_s: float = 15.0, *, since: int = 0
    ) -> dict[str, Any]:
        """The first line from index ``since`` on that satisfies ``pred``."""

        def found() -> dict[str, Any] | None:
            return next((e for e in self.lines[since:] if pred(e)), None)

        async with asyncio.timeout(timeout_s), self._changed:
            while (hit := found()) is None:
                if self._proc is not None and self._proc.returncode is not None:
                    raise AssertionError(f"js member exited; see {self.log_path}")
                await self._changed.wait()
            return hit

    def members(self) -> list[dict[str, Any]]:
        """The member list js-sdk emitted last."""
        for e in reversed(self.lines):
            if e["event"] == "memberships":
                members: list[dict[str, Any]] = e["members"]
                return members
        return []

    async def wait_members(
        self, pred: Callable[[list[dict[str, Any]]], bool], timeout_s: float = 15.0
    ) -> list[dict[str, Any]]:
        if pred(self.members()):
            return self.members()
        since = len(self.lines)
        hit = await self.wait_for(
            lambda e: e["event"] == "memberships" and pred(e["members"]), timeout_s, since=since
        )
        members: list[dict[str, Any]] = hit["members"]
        return members

    def keys(self, identity: str) -> dict[int, str]:
        """Every key js-sdk handed its media layer for ``identity``: index → base64."""
        return {
            e["index"]: e["key"]
            for e in self.lines
            if e["event"] == "key" and e["identity"] == identity
        }

    async def send(self, cmd: dict[str, Any]) -> None:
        assert self._proc is not None
        assert self._proc.stdin is not None
        self._proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await self._proc.stdin.drain()

    async def leave(self) -> None:
        since = len(self.lines)
        await self.send({"cmd": "leave"})
        await self.wait_for(lambda e: e["event"] == "left", since=since)

    async def kill(self) -> None:
        """SIGKILL the whole process group: nothing more is sent to the homeserver."""
        if self._proc is not None and self._proc.returncode is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
            await self._proc.wait()

    async def close(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            try:
                await self.send({"cmd": "quit"})
                async with asyncio.timeout(8):
                    await self._proc.wait()
            except (TimeoutError, ConnectionError, OSError):
                await self.kill()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
