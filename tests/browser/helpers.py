"""Helpers for browser tests: serve files on loopback, run a node (playwright-core) script."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

__all__ = ["BROWSER_DIR", "run_node", "serve_dir"]

BROWSER_DIR = Path(__file__).resolve().parent


@contextlib.asynccontextmanager
async def serve_dir(directory: Path) -> AsyncIterator[str]:
    """Serve ``directory`` over HTTP on 127.0.0.1; yields the base URL."""
    app = web.Application()
    app.router.add_static("/", directory)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def run_node(script: str, *args: str, limit: float = 30) -> str:
    """Run ``node <script> args…`` from tests/browser/; return stdout, fail on non-zero exit."""
    proc = await asyncio.create_subprocess_exec(
        "node",
        script,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=BROWSER_DIR,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), limit)
    except (TimeoutError, asyncio.CancelledError):
        # (cancelled: a test that gave up on this run; the script must not outlive it)
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise AssertionError(f"node {script} exited {proc.returncode}: {err.decode()[-2000:]}")
    return out.decode()
