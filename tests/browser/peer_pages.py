"""Call peers from npm (Hydrogen, legacy js-sdk GroupCall) as pages in the devstack Chromium.

A page is served on loopback by :func:`peer_server`; :meth:`PeerServer.start` runs its
``window[fn](options)`` through ``eval_page.mjs``. While it runs the page posts its
per-remote-device WebRTC stats (``reportProgress`` in ``peer_loop.js``) to the server, so a
test waits for what the peer decoded instead of sleeping."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from matrixrtc.devstack import Chromium
from tests.browser.helpers import run_node

__all__ = ["PeerPage", "PeerServer", "peer_server", "poll_until"]

_keys = itertools.count(1)


async def poll_until(
    task: asyncio.Future[Any] | None, predicate: Callable[[], bool], within: float, what: str
) -> None:
    """Wait until ``predicate()``; fail after ``within`` s, or as soon as ``task`` ended (its
    error is raised)."""
    deadline = time.monotonic() + within
    while not predicate():
        if task is not None and task.done():
            task.result()
            raise AssertionError(f"the page finished before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


class PeerPage:
    """One run of a page function; ``stats`` is its latest report, keyed ``user|device``."""

    def __init__(self, task: asyncio.Task[dict[str, Any]], progress: dict[str, Any]) -> None:
        self.task = task
        self._progress = progress

    @property
    def stats(self) -> dict[str, dict[str, Any]]:
        stats: dict[str, dict[str, Any]] = self._progress.get("stats", {})
        return stats

    def decoded(self, peer: str, kind: str = "video") -> int:
        """What this page decoded from ``peer`` (``user|device``): frames, or audio samples."""
        return int(self.stats.get(peer, {}).get(kind, 0))

    def leave(self) -> None:
        """Ask the page to leave the call now (answered to its next report)."""
        self._progress["leave"] = True

    async def until(self, predicate: Callable[[], bool], within: float, what: str) -> None:
        await poll_until(self.task, predicate, within, what)

    async def result(self) -> dict[str, Any]:
        return await self.task


class PeerServer:
    def __init__(self, base: str, chromium: Chromium, fn: str, progress: dict[str, Any]) -> None:
        self.base = base
        self._chromium = chromium
        self._fn = fn
        self._progress = progress

    def start(self, options: dict[str, Any], limit: float = 60) -> PeerPage:
        key = str(next(_keys))
        progress: dict[str, Any] = {}
        self._progress[key] = progress
        opts = {**options, "progressUrl": f"{self.base}/progress/{key}"}
        task = asyncio.create_task(self._run(opts, limit))
        return PeerPage(task, progress)

    async def _run(self, options: dict[str, Any], limit: float) -> dict[str, Any]:
        out = await run_node(
            "eval_page.mjs",
            self._chromium.devtools_url,
            self.base + "/index.html",
            self._fn,
            json.dumps(options),
            limit=limit,
        )
        line = json.loads(out.strip().splitlines()[-1])
        # The peer's own call log lines, shown by pytest when a test fails.
        for text in line["console"]:
            if any(w in text.lower() for w in ("call", "error", "warn")) and "sync" not in text:
                print("page:", text[:400])
        result: dict[str, Any] = line["result"]
        return result


@contextlib.asynccontextmanager
async def peer_server(directory: Path, chromium: Chromium, fn: str) -> AsyncIterator[PeerServer]:
    """Serve a built page on 127.0.0.1 (its own port: its own origin, so two servers of one
    page keep separate storage) with a ``POST /progress/<key>`` sink for its reports."""
    progress: dict[str, dict[str, Any]] = {}

    async def report(request: web.Request) -> web.Response:
        sink = progress.get(request.match_info["key"])
        if sink is None:
            return web.json_response({"leave": False})
        sink["stats"] = (await request.json())["stats"]
        return web.json_response({"leave": sink.get("leave", False)})

    app = web.Application()
    app.router.add_post("/progress/{key}", report)
    app.router.add_static("/", directory)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield PeerServer(f"http://127.0.0.1:{runner.addresses[0][1]}", chromium, fn, progress)
    finally:
        await runner.cleanup()
