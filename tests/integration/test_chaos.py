"""make test's subset of the chaos suite (bench/chaos.py --fast, issue 18): a SIGKILLed SFU
participant, a 5 s partition of a mesh participant and a 20 s SIGSTOP of one (its delayed
leave fires; it must re-join by itself), each in a network namespace of its own, every
invariant checked. ``make chaos`` runs every scenario on both transports."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_chaos_fast_subset() -> None:
    # Outside scripts/in-netns the harness re-executes itself there (it needs root).
    assert shutil.which("ethtool"), "ethtool missing: run scripts/bootstrap.sh"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "chaos.py"), "--fast", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(r["name"], r["transport"]) for r in results] == [
        ("sigkill", "sfu"),
        ("partition-5s", "mesh"),
        ("sigstop-20s", "mesh"),
    ], proc.stderr[-3000:]
    failed = {
        f"{r['name']}/{r['transport']}": {k: v for k, v in r["invariants"].items() if not v}
        for r in results
        if not all(r["invariants"].values())
    }
    assert not failed, json.dumps(results, indent=1)[-6000:]
    assert proc.returncode == 0, proc.stderr[-3000:]
