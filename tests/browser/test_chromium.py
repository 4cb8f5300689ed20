"""Chromium (Debian) driven by playwright-core inside the namespace: fake camera is live."""

from __future__ import annotations

import json
from pathlib import Path

from matrixrtc.devstack import Chromium, leftover_processes
from tests.browser.helpers import BROWSER_DIR, run_node, serve_dir


async def test_fake_camera_yields_live_painted_video(chromium: Chromium) -> None:
    async with serve_dir(BROWSER_DIR) as base:
        out = await run_node(
            "eval_page.mjs", chromium.devtools_url, f"{base}/camera.html", "checkCamera", "1500"
        )
    result = json.loads(out.strip().splitlines()[-1])["result"]
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


async def test_host_candidates_are_real_namespace_addresses(chromium: Chromium) -> None:
    async with serve_dir(BROWSER_DIR) as base:
        out = await run_node(
            "eval_page.mjs", chromium.devtools_url, f"{base}/ice.html", "gatherCandidates"
        )
    addresses = json.loads(out.strip().splitlines()[-1])["result"]
    # No mDNS names (they cannot resolve here), and only addresses of this namespace.
    assert addresses, "no host candidate gathered"
    assert not [a for a in addresses if a.endswith(".local")], addresses
    assert set(addresses) <= {"127.0.0.1", "10.203.0.1", "::1"} | {
        a for a in addresses if a.startswith("fe80:")
    }, addresses


async def test_browser_stops_with_its_whole_group(run_dir: Path) -> None:
    async with Chromium(run_dir, name="chromium-short") as browser:
        pgid = browser.pid
        assert pgid is not None
        assert pgid in leftover_processes()
    assert pgid not in leftover_processes()
