"""Benchmark of the compose deployment (``make compose-test``'s scenario, timed).

    .venv/bin/python bench/compose.py [--json] [--cold]

Runs ``python -m tests.compose.run`` (as root: dockerd in a private namespace, see that module)
and reports:

- ``cold_s``: the whole run with an empty cache (``--cold``: the stand-ins' base root file
  system made from Debian packages, the wheelhouse, image import and builds, up, the call,
  down), in a fresh temporary cache directory that is removed afterwards; ``null`` without
  ``--cold``. A fresh machine adds apt-get install of docker.io (≈ 65 MB);
- ``warm_s``: the whole run again with the cache in place (images built, layers cached);
- ``warm_up_s``: ``docker-compose up`` until every service is healthy, on the warm run;
- ``image_mb``: the service image's size (on the Debian stand-in base; the layers it adds on
  top of its base in ``image_layers_mb``);
- ``call_first_frame_ms``: the later participant's first decrypted frame after joining.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def one_run(cache: Path | None) -> dict[str, Any]:
    env = dict(os.environ)
    if cache is not None:
        env["MATRIXRTC_COMPOSE_CACHE"] = str(cache)
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "tests.compose.run", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    wall = time.monotonic() - t0
    try:
        figures: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        figures = {"ok": False}
    figures["wall_s"] = round(wall, 1)
    if not figures.get("ok"):
        print(r.stderr[-3000:], file=sys.stderr)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--cold", action="store_true", help="also time a run with no cache")
    args = parser.parse_args()
    cold: dict[str, Any] | None = None
    if args.cold:
        tmp = Path(tempfile.mkdtemp(prefix="compose-cold-"))
        try:
            cold = one_run(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    warm = one_run(None)
    out = {
        "cold_s": cold["wall_s"] if cold else None,
        "warm_s": warm["wall_s"],
        "warm_up_s": warm.get("up_healthy_s"),
        "image_mb": warm.get("image_mb"),
        "image_layers_mb": warm.get("image_layers_mb"),
        "call_first_frame_ms": warm.get("call_first_frame_ms"),
        "sfu_sigterm_stop_s": warm.get("sfu_sigterm_stop_s"),
        "delegated_leave_after_kill_s": warm.get("delegated_leave_after_kill_s"),
        "ok": bool(warm.get("ok")) and (cold is None or bool(cold.get("ok"))),
    }
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:30} {v}")
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
