"""The stand-in images' shared base: a Debian bookworm root file system made in seconds.

``debootstrap`` followed by ``chroot apt-get install`` ran every package's maintainer scripts
one by one and took minutes on two cores (most of a cold ``make compose-test``). The stand-ins
need only files, so this builds the root file system the way an image build would, without
a package manager inside:

1. ``apt-get install --download-only`` against an *empty* dpkg status (the host's apt lists,
   nothing taken from what the host has installed) fetches the dependency closure of
   :data:`PACKAGES` into the cache (≈ 125 MB, ≈ 10 s);
2. each ``.deb``'s data is unpacked into the directory (``dpkg-deb --fsys-tarfile | tar``,
   documentation and translations left out, two at a time);
3. what maintainer scripts would have done and the stand-ins rely on is done here: users
   (``base-passwd``'s tables + ``postgres``), the loader cache (``ldconfig``), the CA bundle
   (Mozilla's certificates only: the host's bundle may carry a local interception CA and is
   never baked in);
4. Synapse in ``/opt/synapse``, a venv of the root file system's own Python (3.11.2), its
   distributions copied from the project's venv (the same PyPI wheels, pinned by
   ``requirements.lock``; requirement markers evaluated for 3.11.2), so nothing is
   downloaded or installed twice.

The directory is cached under the compose cache by its recipe; ``docker import`` reads it
as a tar stream (no tar file on disk).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
SYNAPSE_VERSION = "1.163.2"
VENV = Path("/opt/synapse")
BASE_PYTHON = {"python_version": "3.11", "python_full_version": "3.11.2"}

# Every program the stand-ins' entrypoints, healthchecks and compose.yaml's commands run.
PACKAGES = (
    # Debian's Essential set, minus what no stand-in runs (perl, init tools), plus passwd
    # (the service's Dockerfile runs useradd)
    "base-files", "base-passwd", "bash", "coreutils", "dash", "debianutils", "diffutils",
    "findutils", "grep", "gzip", "hostname", "libc-bin", "login", "ncurses-base", "sed",
    "tar", "util-linux", "passwd", "mawk",
    # the stand-ins
    "ca-certificates", "curl", "wget", "python3", "python3-venv", "python3-psycopg2",
    "redis-server", "redis-tools", "caddy", "postgresql-15", "coturn",
)  # fmt: skip
# Pulled in by dependencies, never used: PostgreSQL's JIT (LLVM and Z3, ~110 MB; PostgreSQL
# disables JIT silently when its provider cannot be loaded) and the locale data (C.UTF-8 is
# built into libc).
SKIP_PREFIXES = ("libllvm", "libz3-", "locales_")
EXCLUDE = (
    "./usr/share/doc/*", "./usr/share/man/*", "./usr/share/info/*", "./usr/share/locale/*",
    "./usr/share/lintian/*", "./usr/lib/postgresql/15/lib/llvmjit*",
    "./usr/lib/postgresql/15/lib/bitcode*",
)  # fmt: skip
RECIPE = 5  # bump when the steps below change (part of the cache key)
POSTGRES_UID = 999


def cache_key() -> str:
    lock = (ROOT / "requirements.lock").read_bytes()
    return hashlib.sha256(
        repr((RECIPE, PACKAGES, SKIP_PREFIXES, EXCLUDE, SYNAPSE_VERSION)).encode() + lock
    ).hexdigest()[:16]


def _sh(script: str, *, timeout: float = 900, env: dict[str, str] | None = None) -> None:
    r = subprocess.run(
        ["sh", "-ec", script], capture_output=True, text=True, timeout=timeout, env=env
    )
    if r.returncode != 0:
        raise RuntimeError(f"{script.strip()[:300]}\n-> {r.returncode}\n{r.stderr[-3000:]}")


def download(archives: Path) -> list[Path]:
    """The .deb files of PACKAGES' dependency closure, resolved as for an empty system."""
    state = archives / "state"
    (archives / "partial").mkdir(parents=True, exist_ok=True)
    state.mkdir(exist_ok=True)
    (state / "status").touch()
    argv = [
        "apt-get", "install", "--download-only", "-y", "-qq", "--no-install-recommends",
        "-o", "Debug::NoLocking=1",  # reads the host's lists, writes only into `archives`
        "-o", f"Dir::State::status={state / 'status'}",
        "-o", f"Dir::Cache={archives / 'apt'}",
        "-o", f"Dir::Cache::archives={archives}",
        *PACKAGES,
    ]  # fmt: skip
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
    if r.returncode != 0:  # lists missing or stale on a fresh machine: once more after update
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600, env=env)
        r = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"apt-get --download-only failed:\n{r.stderr[-3000:]}")
    return sorted(p for p in archives.glob("*.deb") if not p.name.startswith(SKIP_PREFIXES))


def unpack(debs: Sequence[Path], rootfs: Path) -> None:
    # Merged /usr (bookworm): packages still ship /bin, /lib, /sbin paths.
    for d in ("bin", "sbin", "lib", "lib64"):
        (rootfs / "usr" / d).mkdir(parents=True, exist_ok=True)
        (rootfs / d).symlink_to(f"usr/{d}")
    excludes = " ".join(f"--exclude='{e}'" for e in EXCLUDE)

    def one(deb: Path) -> None:
        _sh(
            f"dpkg-deb --fsys-tarfile '{deb}' | "
            f"tar -C '{rootfs}' -x --keep-directory-symlink --wildcards {excludes}"
        )

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(one, debs))


def configure(rootfs: Path) -> None:
    """What the maintainer scripts would have done that the stand-ins rely on."""
    etc = rootfs / "etc"
    share = rootfs / "usr" / "share" / "base-passwd"
    passwd = (share / "passwd.master").read_text()
    group = (share / "group.master").read_text()
    passwd += f"postgres:x:{POSTGRES_UID}:{POSTGRES_UID}::/var/lib/postgresql:/bin/sh\n"
    group += f"postgres:x:{POSTGRES_UID}:\n"
    (etc / "passwd").write_text(passwd)
    (etc / "group").write_text(group)
    users = [line.split(":")[0] for line in passwd.splitlines() if line]
    groups = [line.split(":")[0] for line in group.splitlines() if line]
    (etc / "shadow").write_text("".join(f"{u}:*:19000:0:99999:7:::\n" for u in users))
    (etc / "gshadow").write_text("".join(f"{g}:*::\n" for g in groups))
    (etc / "shadow").chmod(0o640)
    (etc / "gshadow").chmod(0o640)
    certs = sorted((rootfs / "usr/share/ca-certificates/mozilla").glob("*.crt"))
    (etc / "ssl/certs").mkdir(parents=True, exist_ok=True)
    (etc / "ssl/certs/ca-certificates.crt").write_text("".join(c.read_text() for c in certs))
    (rootfs / "usr/bin/awk").symlink_to("mawk")
    for link, target in (("var/run", "/run"), ("var/lock", "/run/lock")):
        (rootfs / link).rmdir()  # shipped empty; base-files' postinst makes them links
        (rootfs / link).symlink_to(target)
    (etc / "resolv.conf").write_text("")  # the engine mounts its own
    for d in ("tmp", "var/tmp"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
        (rootfs / d).chmod(0o1777)
    rootfs.chmod(0o755)  # it is the root directory: every user must traverse it
    # For the chroot steps only (a program writing to a missing /dev/null creates a file);
    # removed before the import: the engine gives each container its own /dev.
    os.mknod(rootfs / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    _sh(f"chroot '{rootfs}' /sbin/ldconfig")
    # py3compile's job: byte code for the standard library (else every Python process in a
    # container compiles what it imports, again for each container).
    _sh(
        f"chroot '{rootfs}' /usr/bin/python3 -m compileall -q "
        "-x 'lib2to3|/test/|idlelib|tkinter|turtledemo' /usr/lib/python3.11 "
        "/usr/lib/python3/dist-packages >/dev/null"
    )


def synapse_distributions() -> dict[str, metadata.Distribution]:
    """matrix-synapse and its requirement closure, as installed in the project's venv (the
    same PyPI wheels, pinned by requirements.lock), with markers evaluated for the base's
    Python 3.11.2, extras followed."""
    todo: list[tuple[str, str]] = [("matrix-synapse", "")]
    seen: set[tuple[str, str]] = set()
    found: dict[str, metadata.Distribution] = {}
    while todo:
        name, extra = todo.pop()
        if (canonicalize_name(name), extra) in seen:
            continue
        seen.add((canonicalize_name(name), extra))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError as exc:
            raise RuntimeError(f"{name} (needed by Synapse) is not in the project's venv") from exc
        found[canonicalize_name(name)] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({**BASE_PYTHON, "extra": extra}):
                todo.append((req.name, ""))
                todo.extend((req.name, e) for e in req.extras)
    return found


def install_synapse(rootfs: Path) -> int:
    """Synapse in the venv ``/opt/synapse`` of the base's own Python, its files copied from
    the project's venv (no second download and install: that took ~45-60 s with a warm pip
    cache). Wheels are tagged for CPython 3.11 on manylinux, the same for 3.11.2 and 3.11.7,
    and their byte code stays valid (3.11's magic number, modification times kept)."""
    _sh(f"chroot '{rootfs}' /usr/bin/python3 -m venv --without-pip --system-site-packages "
        f"{VENV}")  # fmt: skip
    site = rootfs / VENV.relative_to("/") / "lib/python3.11/site-packages"
    count = 0
    for dist in synapse_distributions().values():
        src_site = Path(str(dist.locate_file("")))
        for rel in dist.files or []:
            src = src_site / rel
            dst = Path(os.path.normpath(site / rel))
            if not src.is_file() or not dst.is_relative_to(rootfs / VENV.relative_to("/")):
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.parent.name == "bin":  # console scripts: the venv's own interpreter
                text = src.read_bytes()
                if text.startswith(b"#!"):
                    text = b"#!" + str(VENV / "bin/python").encode() + text[text.index(b"\n") :]
                dst.write_bytes(text)
                shutil.copystat(src, dst)
            else:
                shutil.copy2(src, dst)
            count += 1
    return count


def build_rootfs(cache: Path, log: Callable[[str], None]) -> Path:
    """The base root file system directory (cached by :func:`cache_key`)."""
    out = cache / f"base-{cache_key()}"
    done = out.with_suffix(".complete")
    if done.exists() and out.is_dir():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    for old in cache.glob("base-*"):  # other recipes, a half-made one, the old tar files
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
    t0 = time.monotonic()
    debs = download(cache / "debs")
    log(f"base: {len(debs)} packages downloaded ({time.monotonic() - t0:.1f} s)")
    tmp = Path(tempfile.mkdtemp(prefix="base-", dir=cache))
    unpack(debs, tmp)
    configure(tmp)
    log(f"base: unpacked and configured ({time.monotonic() - t0:.1f} s)")
    files = install_synapse(tmp)
    (tmp / "dev/null").unlink()
    log(f"base: Synapse {SYNAPSE_VERSION} installed, {files} files ({time.monotonic() - t0:.1f} s)")
    tmp.rename(out)
    done.touch()
    return out
