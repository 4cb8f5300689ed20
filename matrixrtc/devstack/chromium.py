"""Debian's Chromium, headless, as a devstack service that playwright-core attaches to.

The devstack starts the browser itself (rather than letting playwright launch it) so that it
runs in a process group the devstack owns: shutdown and the leftover-process check cover it.
Clients attach with ``chromium.connectOverCDP(devtools_url)``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from matrixrtc.devstack._process import ManagedProcess
from matrixrtc.devstack._service import Service
from matrixrtc.errors import ConfigError

__all__ = ["CHROMIUM_FLAGS", "Chromium", "find_chromium"]


# Fake camera/microphone without prompts, WebRTC on loopback, nothing phoning home.
CHROMIUM_FLAGS: tuple[str, ...] = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--password-store=basic",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream=fps=30",
    "--allow-loopback-in-peer-connection",
    "--autoplay-policy=no-user-gesture-required",
)


def find_chromium() -> Path:
    """$MATRIXRTC_CHROMIUM, else Debian's /usr/bin/chromium (never a downloaded browser)."""
    candidate = os.environ.get("MATRIXRTC_CHROMIUM") or shutil.which("chromium")
    if candidate is None or not os.access(candidate, os.X_OK):
        raise ConfigError("chromium not found: run scripts/bootstrap.sh (apt-get install chromium)")
    return Path(candidate)


class Chromium(Service):
    """A headless Chromium with a DevTools endpoint on 127.0.0.1 and a profile under run_dir."""

    start_timeout = 30.0

    def __init__(
        self, run_dir: Path, extra_args: Sequence[str] = (), *, name: str = "chromium"
    ) -> None:
        self.dir = run_dir / name
        self.profile_dir = self.dir / "profile"
        self.log_path = self.dir / "chromium.log"
        self.devtools_url: str = ""
        self._proc = ManagedProcess(
            name=name,
            argv=[
                str(find_chromium()),
                *CHROMIUM_FLAGS,
                *extra_args,
                # Port 0: Chromium picks one and writes it to DevToolsActivePort.
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={self.profile_dir}",
                "about:blank",
            ],
            log_path=self.log_path,
            cwd=self.dir,
        )

    async def _ready(self) -> bool:
        port_file = self.profile_dir / "DevToolsActivePort"
        try:
            port = int(port_file.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return False
        url = f"http://127.0.0.1:{port}"
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
            session.get(url + "/json/version") as resp,
        ):
            if resp.status != 200:
                return False
        self.devtools_url = url
        return True

    def _prepare(self) -> None:
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        # A stale port file from an earlier run would point at a dead browser.
        (self.profile_dir / "DevToolsActivePort").unlink(missing_ok=True)

    def _ready_fields(self) -> dict[str, object]:
        return {"devtools": self.devtools_url}
