"""Chromium (Debian) driven by playwright-core inside the namespace: fake camera is live."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from aiohttp import web

from matrixrtc.devstack import Chromium, leftover_processes

HERE = Path(__file__).resolve().parent


async def _serve_dir(directory: Path) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_static("/", directory)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


async def _node(*args: str, limit: float = 30) -> str:
    proc = await asyncio.create_subprocess_exec(
        "node", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=HERE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), limit)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode()[-2000:]
    return out.decode()


async def test_fake_camera_yields_live_painted_video(chromium: Chromium) -> None:
    runner, base = await _serve_dir(HERE)
    try:
        out = await _node("gum.mjs", chromium.devtools_url, f"{base}/camera.html")
    finally:
        await runner.cleanup()
    result = json.loads(out.strip().splitlines()[-1])
    print(f"camera check: {result}")
    # playwright detached from the shared browser; it did not close it.
    assert chromium.pid in leftover_processes()
    assert result["origin"] == base
    assert result["kind"] == "video"
    assert result["readyState"] == "live"
    assert result["audioTracks"] == 1
    assert result["width"] > 0
    assert result["height"] > 0
    # 1.5 s at the fake device's 30 fps is ~45: frames really reach the page (with slack for a
    # loaded machine), not just a track object.
    assert result["frames"] >= 10, result


async def test_browser_stops_with_its_whole_group(run_dir: Path) -> None:
    async with Chromium(run_dir, name="chromium-short") as browser:
        pgid = browser.pid
        assert pgid is not None
        assert pgid in leftover_processes()
    assert pgid not in leftover_processes()
