"""The import-linter contracts of pyproject.toml hold (also run by `make test` and `make lint`):
the pure core imports no I/O library, each layer imports only the layers below it, and sfu and
matrixrtc meet only through matrixrtc.errors and matrixrtc.model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_import_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout
