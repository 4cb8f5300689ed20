"""``pip install .`` gives a wheel that works outside the checkout.

The wheel is built from a copy of the sources (``pip wheel --no-build-isolation``, with the
pinned setuptools, so no download) and installed with ``--no-deps`` into a fresh venv whose
only other path entry is the project venv's site-packages (the pinned dependencies, not the
checkout). From a directory outside the checkout: ``matrixrtc`` is imported from the wheel,
both console scripts answer ``--help``, and docs/api.md's bot joins a call and leaves.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from matrixrtc.devstack import Synapse
from tests.conftest import UserFactory
from tests.integration.test_api_docs import check_bot_in_call

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _run(*cmd: str | Path, cwd: Path) -> str:
    done = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, f"{cmd}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a fresh venv holding only the built wheel (and the pinned deps)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for pkg in ("matrixrtc", "sfu"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp / "dist"
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", dist, src, cwd=tmp)  # fmt: skip
    wheels = list(dist.glob("matrixrtc-*.whl"))
    assert len(wheels) == 1, wheels
    venv = tmp / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp)
    python = venv / "bin" / "python"
    _run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
         wheels[0], cwd=tmp)  # fmt: skip
    site = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp)
    # The dependencies only: a path line, so the checkout .pth in there is not processed.
    (Path(site.strip()) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def test_the_wheel_is_imported_from_the_venv_and_has_both_console_scripts(
    installed: Path, tmp_path: Path
) -> None:
    where = _run(installed, "-c", "import matrixrtc, sfu; print(matrixrtc.__file__, sfu.__file__)",
                 cwd=tmp_path).split()  # fmt: skip
    venv = installed.parents[1]
    assert all(Path(p).is_relative_to(venv) for p in where), where
    assert "Call" in _run(
        installed, "-c", "import matrixrtc; print(matrixrtc.__all__)", cwd=tmp_path
    )
    for script in ("matrixrtc", "matrixrtc-sfu"):
        assert "usage" in _run(venv / "bin" / script, "--help", cwd=tmp_path).lower()


async def test_the_api_doc_bot_runs_against_the_installed_wheel(
    installed: Path, tmp_path: Path, synapse: Synapse, user_factory: UserFactory
) -> None:
    await check_bot_in_call(str(installed), tmp_path, synapse, user_factory, tmp_path)
