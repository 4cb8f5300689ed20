"""Run directories and the location of external binaries."""

from __future__ import annotations

import os
import time
from pathlib import Path

from matrixrtc.errors import ConfigError

__all__ = ["LIVEKIT_VERSION", "RUNS_ROOT", "find_livekit_binary", "new_run_dir", "repo_root"]

LIVEKIT_VERSION = "v1.13.5"
RUNS_ROOT = Path("/tmp/matrixrtc-runs")


def repo_root() -> Path:
    """The checkout this package is imported from."""
    return Path(__file__).resolve().parents[2]


def new_run_dir(prefix: str = "run") -> Path:
    """A fresh directory under /tmp/matrixrtc-runs/ for one run's configs, data and logs."""
    RUNS_ROOT.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    # mkdir with exist_ok=False makes the name unique even between parallel runs.
    for n in range(1000):
        path = RUNS_ROOT / f"{prefix}-{stamp}-{os.getpid()}-{n}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise ConfigError(f"cannot create a run directory under {RUNS_ROOT}")


def find_livekit_binary() -> Path:
    """The livekit-server binary: $MATRIXRTC_LIVEKIT_BIN, the checkout's cache, the user cache."""
    env = os.environ.get("MATRIXRTC_LIVEKIT_BIN")
    if env:
        path = Path(env)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ConfigError(f"MATRIXRTC_LIVEKIT_BIN={env} is not an executable file")
        return path
    cache = Path(
        os.environ.get("MATRIXRTC_CACHE_DIR")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "matrixrtc"
    )
    candidates = [
        repo_root() / ".cache" / "livekit-server",
        cache / f"livekit-{LIVEKIT_VERSION}" / "livekit-server",
    ]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise ConfigError(
        f"livekit-server {LIVEKIT_VERSION} not found (looked in $MATRIXRTC_LIVEKIT_BIN, "
        + ", ".join(str(c) for c in candidates)
        + "): run scripts/bootstrap.sh"
    )
