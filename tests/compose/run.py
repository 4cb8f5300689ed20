"""``make compose-test``: compose.yaml end to end, on this machine, with nothing pulled.

No image registry is reachable here, so (shared/notes/compose.md):

1. *Host side* (network allowed, cached under ``~/.cache/matrixrtc/compose``): Debian's
   docker.io + docker-compose 1.29 + debootstrap; a Debian bookworm root file system with every
   stand-in's programs (debootstrap, ``chroot apt-get``, Synapse from PyPI installed by the
   root file system's own Python); the service image's wheelhouse (``scripts/wheelhouse``).
2. *Inside a private network and mount namespace* (``unshare --net --mount``): a dockerd with
   its own data root (cached: a warm run reuses the images) and exec root, stopped by its pid
   file; the base image imported, stand-ins built from ``deploy/test/standins``, the service
   image built by compose from ``./Dockerfile``; ``/etc/hosts`` and the CA bundle replaced by
   bind mounts only inside the namespace.

Then, with ``compose.yaml`` + ``deploy/test/compose.test.yaml`` (images only) and the demo profile:

- ``up`` with a required variable missing fails, names it, and creates nothing;
- ``up``: every service healthy, each one started only after its dependencies were healthy;
- through Caddy: ``.well-known/matrix/client`` (rtc_foci, CORS), the token service
  (``/healthz``, CORS preflight, ``/metrics`` hidden), LiveKit, Synapse (``/rtc/transports``);
- the focus is discovered as a client does (``discover_transport``) and a real end-to-end
  encrypted call runs through it: ``python -m matrixrtc call-test --transport sfu`` with two
  participants that log in to the compose Synapse over HTTPS, get tokens through Caddy and
  exchange encrypted media through LiveKit, decrypting every frame;
- meanwhile a third member delegates its delayed leave (``/delegate_delayed_leave``); the token
  service container is stopped (SIGTERM, timed) and started again mid-call: the job is still
  in Redis and the call goes on; the member is SIGKILLed and its leave arrives in the room
  through the restarted service long before its own 60 s delay;
- ``down -v`` leaves no container, volume or network; dockerd stops; no process is left.

Prints a report and, with ``--json``, one JSON object (read by ``bench/compose.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
OVERLAY = ROOT / "deploy" / "test" / "compose.test.yaml"
STANDINS = ROOT / "deploy" / "test" / "standins"
CACHE = Path(os.environ.get("MATRIXRTC_CACHE_DIR") or Path.home() / ".cache" / "matrixrtc")
COMPOSE_CACHE = Path(os.environ.get("MATRIXRTC_COMPOSE_CACHE") or CACHE / "compose")
LIVEKIT_BIN = CACHE / "livekit-v1.13.5" / "livekit-server"
DOCKER = "/usr/bin/docker"  # Debian's client: the same API version as the engine
PROJECT = "mrtc-compose-test"
SYNAPSE_VERSION = "1.163.2"
HOST_PACKAGES = ("docker.io", "docker-compose", "debootstrap", "iptables")
ROOTFS_PACKAGES = (
    "ca-certificates", "curl", "wget", "python3", "python3-venv", "python3-psycopg2",
    "redis-server", "caddy", "postgresql-15", "coturn",
)  # fmt: skip
ROOTFS_RECIPE = 1  # bump when the recipe below changes (the cache key)
NODE_IP = "10.203.0.1"
SERVER_NAME = "example.test"
RTC_HOST = "rtc.example.test"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")

# A LiveKit participant that connects and stays (the rtc SDK, like the service's tests).
LK_PARTICIPANT = """
import asyncio, sys
from livekit import rtc

async def main() -> None:
    room = rtc.Room()
    await room.connect(sys.argv[1], sys.argv[2], rtc.RoomOptions(connect_timeout=20))
    print("connected", room.local_participant.identity, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


class Failed(Exception):
    """A check of the compose test failed."""


def log(msg: str) -> None:
    print(f"[compose-test {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
    input_: str | None = None,
) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        env=dict(env) if env is not None else None,
        timeout=timeout,
        input=input_,
    )
    if check and r.returncode != 0:
        raise Failed(f"{' '.join(map(str, argv))[:300]} -> {r.returncode}\n{r.stderr[-3000:]}")
    return r


def check(cond: bool, what: str) -> None:
    if not cond:
        raise Failed(what)
    log(f"ok: {what}")


# --- phase 1: host side ------------------------------------------------------------------


def ensure_host_packages() -> None:
    missing = [
        p
        for p in HOST_PACKAGES
        if "install ok installed"
        not in run(["dpkg-query", "-W", "-f=${Status}", p], check=False).stdout
    ]
    if missing:
        log(f"apt-get install {' '.join(missing)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run(["apt-get", "update", "-qq"], env=env)
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)
    # The packaged daemon must not run system-wide: the test starts its own, in a namespace.
    for unit in ("docker.service", "docker.socket", "containerd.service"):
        run(["systemctl", "disable", "--now", unit], check=False)


def _apt_mirror() -> str:
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for line in path.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    return "http://deb.debian.org/debian"


def rootfs_tar() -> Path:
    """The stand-ins' Debian root file system as a tar (cached by its recipe)."""
    key = hashlib.sha256(
        repr((ROOTFS_RECIPE, ROOTFS_PACKAGES, SYNAPSE_VERSION)).encode()
    ).hexdigest()[:16]
    tar = COMPOSE_CACHE / f"base-bookworm-{key}.tar"
    if tar.exists():
        return tar
    COMPOSE_CACHE.mkdir(parents=True, exist_ok=True)
    # Kept across a failed attempt (each step below is idempotent), removed once tarred.
    build = COMPOSE_CACHE / "rootfs-build"
    done = COMPOSE_CACHE / "rootfs-build.debootstrapped"
    if not done.exists():
        shutil.rmtree(build, ignore_errors=True)
        build.mkdir()
        log(f"debootstrap bookworm -> {build} (minutes; cached afterwards)")
        run(["debootstrap", "--variant=minbase", "bookworm", build, _apt_mirror()], timeout=1200)
        done.touch()
    # apt and pip run inside the root file system, so that packages and environment
    # markers are those of its own Python (3.11.2); proc, DNS and the host's CA bundle are
    # mounted only for the duration, in a private mount namespace, and never stored.
    build.chmod(0o755)  # it is the root directory: every user must traverse it
    chroot = f"chroot {build} env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8"
    script = f"""
set -e
R={build}
mount -t proc proc $R/proc
touch $R/etc/resolv.conf $R/tmp/host-ca.crt
mount --bind /etc/resolv.conf $R/etc/resolv.conf
mount --bind {HOST_CA} $R/tmp/host-ca.crt
printf '#!/bin/sh\\nexit 101\\n' > $R/usr/sbin/policy-rc.d && chmod +x $R/usr/sbin/policy-rc.d
{chroot} DEBIAN_FRONTEND=noninteractive apt-get update -qq
{chroot} DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \\
  {" ".join(ROOTFS_PACKAGES)} >/dev/null
{chroot} python3 -m venv --system-site-packages /opt/synapse
{chroot} PIP_CERT=/tmp/host-ca.crt PIP_DISABLE_PIP_VERSION_CHECK=1 \\
  /opt/synapse/bin/pip install -q matrix-synapse=={SYNAPSE_VERSION}
{chroot} apt-get clean
rm -rf $R/var/lib/apt/lists/* $R/usr/sbin/policy-rc.d $R/root/.cache
umount $R/tmp/host-ca.crt $R/etc/resolv.conf $R/proc
rm -f $R/tmp/host-ca.crt
: > $R/etc/resolv.conf
"""
    log("chroot: apt-get install stand-in programs, pip install matrix-synapse")
    run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], timeout=1800)
    part = tar.with_suffix(".part")
    run(["tar", "-C", build, "-cf", part, "."], timeout=600)
    part.rename(tar)
    for old in COMPOSE_CACHE.glob("base-bookworm-*.tar"):
        if old != tar:
            old.unlink()
    shutil.rmtree(build)
    done.unlink()
    return tar


# --- phase 2: inside the namespace ---------------------------------------------------------


@dataclass
class Docker:
    run_dir: Path
    data_root: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def sock(self) -> Path:
        return self.run_dir / "docker.sock"

    @property
    def env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": str(self.run_dir),
            "DOCKER_HOST": f"unix://{self.sock}",
            "DOCKER_BUILDKIT": "0",
            "COMPOSE_DOCKER_CLI_BUILD": "0",
        }

    def start(self) -> None:
        self.data_root.mkdir(parents=True, exist_ok=True)
        logf = open(self.run_dir / "dockerd.log", "wb")  # noqa: SIM115 (closed by the child)
        self.proc = subprocess.Popen(
            [
                "dockerd",
                f"--data-root={self.data_root}",
                f"--exec-root={self.run_dir / 'x'}",
                f"--pidfile={self.run_dir / 'docker.pid'}",
                f"--host=unix://{self.sock}",
                "--storage-driver=overlay2",
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        logf.close()
        deadline = time.monotonic() + 60
        while run([DOCKER, "version"], check=False, env=self.env).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.run_dir / "dockerd.log").read_text()[-3000:]
                raise Failed(f"dockerd did not start:\n{tail}")
            time.sleep(0.2)

    def stop(self) -> None:
        pidfile = self.run_dir / "docker.pid"
        if self.proc is None:
            return
        if pidfile.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def __call__(self, *args: str, check: bool = True, timeout: float = 600) -> str:
        return run([DOCKER, *args], env=self.env, check=check, timeout=timeout).stdout

    def has_image(self, ref: str) -> bool:
        return run([DOCKER, "image", "inspect", ref], env=self.env, check=False).returncode == 0


@dataclass
class Compose:
    docker: Docker
    env_file: Path

    def argv(self, env_file: Path | None = None) -> list[str]:
        return [
            "docker-compose", "-p", PROJECT, "--project-directory", str(ROOT),
            "-f", str(COMPOSE), "-f", str(OVERLAY),
            "--env-file", str(env_file or self.env_file), "--profile", "demo",
        ]  # fmt: skip

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 600, env_file: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        return run([*self.argv(env_file), *args], env=self.docker.env, check=check, timeout=timeout)

    def exec(self, service: str, *argv: str) -> str:
        return self("exec", "-T", service, *argv, timeout=60).stdout

    def containers(self) -> dict[str, str]:
        """service name -> container id, of every container of the project (any state)."""
        out = self.docker(
            "ps", "-a", "--filter", f"label=com.docker.compose.project={PROJECT}",
            "--format", '{{.ID}} {{.Label "com.docker.compose.service"}}',
        )  # fmt: skip
        return {line.split()[1]: line.split()[0] for line in out.splitlines() if line.strip()}


def _ts(stamp: str) -> float:
    """Docker's RFC 3339 timestamps (nanoseconds) as POSIX seconds."""
    m = re.fullmatch(r"(.*T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", stamp)
    if m is None:
        raise Failed(f"unexpected timestamp {stamp!r}")
    zone = "+00:00" if m[3] == "Z" else m[3]
    return datetime.fromisoformat(m[1] + zone).timestamp() + float("0." + (m[2] or "0"))


@dataclass
class HealthWatch:
    """When each container started and first passed its healthcheck (from docker inspect)."""

    started: dict[str, float] = field(default_factory=dict)
    healthy: dict[str, float] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)

    def poll(self, compose: Compose) -> None:
        ids = compose.containers()
        if not ids:
            return
        info = json.loads(compose.docker("inspect", *ids.values()))
        names = {v: k for k, v in ids.items()}
        for c in info:
            svc = names.get(c["Id"][:12]) or next(
                (n for i, n in names.items() if c["Id"].startswith(i)), c["Name"]
            )
            state = c["State"]
            if state.get("StartedAt", "").startswith("0001"):
                continue
            self.started.setdefault(svc, _ts(state["StartedAt"]))
            health = state.get("Health")
            self.status[svc] = health["Status"] if health else state["Status"]
            for entry in (health or {}).get("Log") or []:
                if entry.get("ExitCode") == 0:
                    end = _ts(entry["End"])
                    if svc not in self.healthy or end < self.healthy[svc]:
                        self.healthy[svc] = end


# --- HTTP through Caddy --------------------------------------------------------------------


def http(
    method: str,
    url: str,
    body: Any = None,
    *,
    token: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    ctx = ssl.create_default_context()  # the namespace's CA bundle includes Caddy's root
    try:
        with urllib.request.urlopen(req, timeout=20, context=ctx) as r:
            raw, status, hdrs = r.read(), r.status, dict(r.headers.items())
    except urllib.error.HTTPError as e:
        raw, status, hdrs = e.read(), e.code, dict(e.headers.items())
    try:
        parsed: Any = json.loads(raw) if raw else None
    except ValueError:
        parsed = raw.decode(errors="replace")
    return status, hdrs, parsed


HS = f"https://{SERVER_NAME}"
FOCUS = f"https://{RTC_HOST}/livekit/jwt"


@dataclass
class User:
    user_id: str
    device_id: str
    token: str


def login(name: str, password: str) -> User:
    status, _, body = http(
        "POST",
        f"{HS}/_matrix/client/v3/login",
        {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": name},
         "password": password},
    )  # fmt: skip
    if status != 200:
        raise Failed(f"login {name}: {status} {body}")
    return User(body["user_id"], body["device_id"], body["access_token"])


# --- the scenario ----------------------------------------------------------------------------


@dataclass
class Report:
    figures: dict[str, Any] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)


def write_env(path: Path, values: Mapping[str, str]) -> None:
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))


def test_env() -> dict[str, str]:
    return {
        "RTC_HOST": RTC_HOST,
        "MATRIX_SERVER_NAME": SERVER_NAME,
        "MATRIX_HOMESERVER_URL": HS,
        "LIVEKIT_KEY": "matrixrtc",
        "LIVEKIT_SECRET": secrets.token_hex(32),
        "LIVEKIT_FULL_ACCESS_HOMESERVERS": SERVER_NAME,
        "LIVEKIT_NODE_IP": NODE_IP,
        "LIVEKIT_USE_EXTERNAL_IP": "false",
        "LIVEKIT_CS_API_URL_OVERRIDES": f"{SERVER_NAME}=http://synapse:8008",
        "MATRIXRTC_SFU_HOMESERVER_OVERRIDES": f"{SERVER_NAME}=http://synapse:8008",
        "MATRIXRTC_SFU_CONTROLLER": "1",
        "CADDY_GLOBAL_OPTIONS": "local_certs",
        "CADDY_HOMESERVER_SITE": "homeserver",
        "POSTGRES_PASSWORD": secrets.token_hex(16),
        "SYNAPSE_REGISTRATION_SHARED_SECRET": secrets.token_hex(16),
    }


def setup_namespace(run_dir: Path) -> None:
    """Network: lo + a veth pair whose both ends stay here (NODE_IP, the 'public' address);
    names: the test domains -> NODE_IP, only in this mount namespace."""
    run(["mount", "--make-rprivate", "/"])
    run(["ip", "link", "set", "lo", "up"])
    run(["ip", "link", "add", "mrtc0", "type", "veth", "peer", "name", "mrtc1"])
    run(["ip", "addr", "add", f"{NODE_IP}/24", "dev", "mrtc0"])
    run(["ip", "link", "set", "mrtc0", "up"])
    run(["ip", "link", "set", "mrtc1", "up"])
    hosts = run_dir / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{NODE_IP} {SERVER_NAME} {RTC_HOST}\n")
    run(["mount", "--bind", hosts, "/etc/hosts"])


def trust_caddy(compose: Compose, run_dir: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        r = compose(
            "exec", "-T", "caddy", "cat", "/data/caddy/pki/authorities/local/root.crt",
            check=False, timeout=30,
        )  # fmt: skip
        if r.returncode == 0 and "BEGIN CERTIFICATE" in r.stdout:
            break
        if time.monotonic() > deadline:
            raise Failed(f"Caddy's local CA never appeared: {r.stderr}")
        time.sleep(0.5)
    bundle = run_dir / "ca-bundle.crt"
    bundle.write_text(HOST_CA.read_text() + "\n" + r.stdout)
    run(["mount", "--bind", bundle, str(HOST_CA)])


def build_images(docker: Docker, compose: Compose, tar: Path, report: Report) -> None:
    t0 = time.monotonic()
    if not docker.has_image("local/matrixrtc-test-base:bookworm"):
        log("docker import base image")
        docker("import", str(tar), "local/matrixrtc-test-base:bookworm", timeout=900)
    tags = {
        "redis": "local/matrixrtc-test-redis:1",
        "livekit": "local/matrixrtc-test-livekit:v1.13.5",
        "caddy": "local/matrixrtc-test-caddy:1",
        "postgres": "local/matrixrtc-test-postgres:1",
        "synapse": "local/matrixrtc-test-synapse:1",
        "coturn": "local/matrixrtc-test-coturn:1",
    }
    for name, tag in tags.items():
        ctx = STANDINS / name
        if name == "livekit":
            tmp = compose.docker.run_dir / "ctx-livekit"
            shutil.copytree(ctx, tmp)
            shutil.copy(LIVEKIT_BIN, tmp / "livekit-server")
            ctx = tmp
        docker("build", "-q", "-t", tag, str(ctx), timeout=900)
    log("docker-compose build sfu (./Dockerfile on the local base)")
    compose("build", "sfu", timeout=900)
    report.figures["build_s"] = round(time.monotonic() - t0, 1)
    size = int(docker("image", "inspect", "-f", "{{.Size}}", "local/matrixrtc-test-sfu:1"))
    base = int(docker("image", "inspect", "-f", "{{.Size}}", "local/matrixrtc-test-base:bookworm"))
    report.figures["image_mb"] = round(size / 1e6, 1)
    report.figures["image_layers_mb"] = round((size - base) / 1e6, 1)


def check_missing_variable(compose: Compose, env: Mapping[str, str], run_dir: Path) -> None:
    partial = run_dir / "missing.env"
    write_env(partial, {k: v for k, v in env.items() if k != "LIVEKIT_SECRET"})
    r = compose("up", "-d", check=False, env_file=partial, timeout=120)
    check(r.returncode != 0, "`up` with LIVEKIT_SECRET unset fails")
    check("LIVEKIT_SECRET must be set in .env" in r.stderr, "... naming the variable")
    check(compose.containers() == {}, "... and creates no container")


def up_and_watch(compose: Compose, report: Report) -> HealthWatch:
    watch = HealthWatch()
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [*compose.argv(), "up", "-d"],
        env=compose.docker.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    services = {"redis", "livekit", "sfu", "caddy", "postgres", "synapse"}
    deadline = time.monotonic() + 240
    while True:
        watch.poll(compose)
        done = proc.poll() is not None
        if done and proc.returncode != 0:
            _, err = proc.communicate()
            raise Failed(f"docker-compose up failed:\n{err[-3000:]}")
        if done and all(watch.status.get(s) == "healthy" for s in services):
            break
        if time.monotonic() > deadline:
            raise Failed(f"not healthy in time: {watch.status}")
        time.sleep(0.3)
    proc.communicate()
    report.figures["up_healthy_s"] = round(time.monotonic() - t0, 1)
    check(True, f"every service healthy: {sorted(watch.status.items())}")
    order = {
        "livekit": ["redis"],
        "sfu": ["redis", "livekit"],
        "caddy": ["sfu", "livekit"],
        "synapse": ["postgres"],
    }
    for svc, deps in order.items():
        for dep in deps:
            check(
                watch.started[svc] >= watch.healthy[dep],
                f"{svc} started {watch.started[svc] - watch.healthy[dep]:.1f} s after {dep} "
                "was healthy",
            )
    return watch


def check_proxy_routes() -> None:
    for host in (SERVER_NAME, RTC_HOST):
        status, hdrs, body = http("GET", f"https://{host}/.well-known/matrix/client")
        check(status == 200, f"https://{host}/.well-known/matrix/client answers")
        check(
            body.get("org.matrix.msc4143.rtc_foci")
            == [{"type": "livekit", "livekit_service_url": FOCUS}]
            and body["m.homeserver"]["base_url"] == HS,
            "... with the rtc_foci focus and the homeserver",
        )
        check(hdrs.get("Access-Control-Allow-Origin") == "*", "... and CORS")
    status, _, body = http("GET", f"https://{SERVER_NAME}/.well-known/matrix/server")
    check(body == {"m.server": f"{SERVER_NAME}:443"}, "server well-known")
    status, _, body = http("GET", f"{FOCUS}/healthz")
    check(status == 200, "token service /healthz through Caddy")
    status, _, _ = http("GET", f"{FOCUS}/metrics")
    check(status == 404, "token service /metrics hidden by Caddy")
    status, hdrs, _ = http(
        "OPTIONS",
        f"{FOCUS}/get_token",
        headers={
            "Origin": "https://call.example.test",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    check(
        status in (200, 204) and hdrs.get("Access-Control-Allow-Origin") == "*",
        f"CORS preflight of /get_token through Caddy ({status})",
    )
    status, _, body = http("GET", f"https://{RTC_HOST}/")
    check(status == 200, f"LiveKit through Caddy ({body!r})")
    status, _, body = http("GET", f"{HS}/_matrix/client/versions")
    unstable = body.get("unstable_features", {})
    check(
        status == 200 and unstable.get("org.matrix.msc4140") and unstable.get("org.matrix.msc4143"),
        "Synapse through Caddy with delayed events and MSC4143",
    )


def register(compose: Compose, name: str, password: str) -> None:
    compose.exec(
        "synapse", "register_new_matrix_user", "-c", "/data/homeserver.yaml",
        "-u", name, "-p", password, "--no-admin", "http://localhost:8008",
    )  # fmt: skip


def discover(user: User) -> str:
    """The focus, found as a client finds it (rtc/transports, then .well-known)."""
    from matrixrtc.session import discover_transport

    _, _, transports = http(
        "GET",
        f"{HS}/_matrix/client/unstable/org.matrix.msc4143/rtc/transports",
        token=user.token,
    )
    _, _, well_known = http("GET", f"{HS}/.well-known/matrix/client")
    found = discover_transport(rtc_transports=transports, well_known=well_known)
    check(
        found is not None and found.source.value == "rtc_transports", f"focus discovered: {found}"
    )
    only_wk = discover_transport(well_known=well_known)
    check(only_wk is not None and only_wk.transport == found.transport if found else False,
          "... the same one from .well-known alone")  # fmt: skip
    assert found is not None
    return found.transport.livekit_service_url


@dataclass
class Delegated:
    user: User
    room_id: str
    state_key: str
    delay_id: str
    proc: subprocess.Popen[str]
    alias: str
    identity: str


def delegated_member(user: User, run_dir: Path) -> Delegated:
    """A member whose delayed leave (60 s) is delegated to the token service after it
    connected to LiveKit (lk-jwt-service's MSC4140 flow)."""
    from matrixrtc.livekit.token import get_token_body
    from matrixrtc.matrix.homeserver import OpenIdToken
    from matrixrtc.model.livekit_ids import livekit_identity, livekit_room_alias

    status, _, body = http(
        "POST",
        f"{HS}/_matrix/client/v3/createRoom",
        {"preset": "private_chat",
         "power_level_content_override": {"events": {"org.matrix.msc3401.call.member": 0}}},
        token=user.token,
    )  # fmt: skip
    if status != 200:
        raise Failed(f"createRoom: {status} {body}")
    room_id = body["room_id"]
    key = f"_{user.user_id}_{user.device_id}_m.call"
    q = urllib.parse.quote
    state_url = (
        f"{HS}/_matrix/client/v3/rooms/{q(room_id)}/state/org.matrix.msc3401.call.member/{q(key)}"
    )
    member = {
        "application": "m.call", "call_id": "", "scope": "m.room", "device_id": user.device_id,
        "focus_active": {"type": "livekit", "focus_selection": "oldest_membership"},
        "foci_preferred": [{"type": "livekit", "livekit_service_url": FOCUS,
                            "livekit_alias": room_id}],
    }  # fmt: skip
    status, _, body = http("PUT", state_url, member, token=user.token)
    if status != 200:
        raise Failed(f"membership: {status} {body}")
    status, _, body = http(
        "PUT", state_url + "?org.matrix.msc4140.delay=60000", {}, token=user.token
    )
    if status != 200:
        raise Failed(f"delayed leave: {status} {body}")
    delay_id = body["delay_id"]
    status, _, oid = http(
        "POST", f"{HS}/_matrix/client/v3/user/{q(user.user_id)}/openid/request_token", {},
        token=user.token,
    )  # fmt: skip
    openid = OpenIdToken(
        oid["access_token"], oid["token_type"], oid["matrix_server_name"], oid["expires_in"]
    )
    req = get_token_body(
        room_id=room_id, user_id=user.user_id, device_id=user.device_id, member_id="m1",
        openid=openid,
    )  # fmt: skip
    status, _, tok = http("POST", f"{FOCUS}/get_token", req)
    check(
        status == 200 and tok.get("url") == f"wss://{RTC_HOST}", f"/get_token via Caddy ({status})"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", LK_PARTICIPANT, tok["url"], tok["jwt"]],
        stdout=subprocess.PIPE,
        stderr=open(run_dir / "dora.log", "w"),  # noqa: SIM115
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        check(line.startswith("connected"), "a LiveKit participant connected through Caddy")
        status, _, body = http(
            "POST",
            f"{FOCUS}/delegate_delayed_leave",
            {**req, "delay_id": delay_id, "delay_timeout": 60_000},
        )
        check((status, body) == (200, {}), "/delegate_delayed_leave accepted")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return Delegated(
        user, room_id, key, delay_id, proc,
        livekit_room_alias(room_id, "m.call#ROOM"),
        livekit_identity(user.user_id, user.device_id, "m1"),
    )  # fmt: skip


def job(compose: Compose, d: Delegated) -> dict[str, Any] | None:
    field_ = json.dumps([d.alias, d.identity], separators=(",", ":"))
    raw = compose.exec("redis", "redis-cli", "--raw", "HGET", "lk-jwt:jobs", field_).strip()
    return json.loads(raw) if raw else None


def wait_for(what: str, cond: Any, timeout: float, step: float = 0.5) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise Failed(f"timed out ({timeout} s): {what}")
        time.sleep(step)
    took = time.monotonic() - t0
    log(f"ok: {what} ({took:.1f} s)")
    return took


def restart_service(compose: Compose, watch: HealthWatch, report: Report) -> None:
    t0 = time.monotonic()
    compose("stop", "-t", "10", "sfu", timeout=60)
    stop_s = time.monotonic() - t0
    sfu = compose.containers()["sfu"]
    # Kept after the run (the run directory is removed when everything passed).
    (COMPOSE_CACHE / "last-sfu-stop.log").write_text(
        f"stop requested {time.time() - stop_s:.3f}, returned after {stop_s:.2f} s\n"
        + compose.docker("logs", "-t", "--tail", "40", sfu, check=False)
        + compose.docker("inspect", sfu, check=False)
    )
    report.figures["sfu_sigterm_stop_s"] = round(stop_s, 2)
    check(stop_s < 5, f"the token service stopped on SIGTERM in {stop_s:.2f} s (grace 10 s)")
    info = json.loads(compose.docker("inspect", sfu))[0]["State"]
    check(info["ExitCode"] in (0, 143), f"... exit code {info['ExitCode']}")
    compose("start", "sfu", timeout=120)

    def healthy() -> bool:
        watch.poll(compose)
        return watch.status.get("sfu") == "healthy"

    report.figures["sfu_restart_healthy_s"] = round(
        wait_for("the token service healthy again", healthy, 60), 1
    )


def membership_left(d: Delegated) -> bool:
    q = urllib.parse.quote
    status, _, body = http(
        "GET",
        f"{HS}/_matrix/client/v3/rooms/{q(d.room_id)}/state/"
        f"org.matrix.msc3401.call.member/{q(d.state_key)}",
        token=d.user.token,
    )
    return status == 200 and body == {}


def start_call(run_dir: Path, sfu_url: str, password: str, duration: int) -> subprocess.Popen[str]:
    env = {**os.environ, "MATRIXRTC_PASSWORD": password}
    return subprocess.Popen(
        [
            sys.executable, "-m", "matrixrtc", "call-test", "--transport", "sfu",
            "--homeserver", HS, "--sfu-url", sfu_url, "--participants", "2",
            "--user-prefix", "ct", "--duration", str(duration), "--json",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=open(run_dir / "call-test.log", "w"),
        text=True,
        cwd=run_dir,
    )  # fmt: skip


def check_call(out: str, report: Report, duration: int) -> None:
    try:
        result = json.loads(out)
    except ValueError as exc:
        raise Failed(f"call-test printed no JSON: {out[-2000:]!r}") from exc
    parts = result["participants"]
    check(len(parts) == 2, "two participants reported")
    firsts = []
    for p in parts:
        check("error" not in p, f"{p['id']} reported")
        (peer,) = p["peers"]
        check(peer["transport"] == "sfu", f"{p['id']} received over LiveKit")
        check(
            peer["frames_decoded"] >= duration * 2 and peer["fps_in"] >= 4,
            f"{p['id']} decrypted and decoded {peer['frames_decoded']} frames "
            f"({peer['fps_in']} fps)",
        )
        check(
            peer["decrypt_failures"] <= 2, f"{p['id']} decrypt failures: {peer['decrypt_failures']}"
        )
        if p.get("first_frame_ms") is not None:
            firsts.append(p["first_frame_ms"])
    check(bool(result["e2ee"]), "the call was end-to-end encrypted")
    report.figures["call_first_frame_ms"] = max(firsts) if firsts else None
    report.figures["call"] = [
        {"id": p["id"], **{k: p["peers"][0][k] for k in ("fps_in", "frames_decoded",
                                                           "decrypt_failures")}}
        for p in parts
    ]  # fmt: skip


def check_down(compose: Compose) -> None:
    compose("down", "-v", "--remove-orphans", timeout=180)
    label = f"label=com.docker.compose.project={PROJECT}"
    check(compose.docker("ps", "-aq").strip() == "", "`down -v`: no container left")
    check(compose.docker("volume", "ls", "-q", "--filter", label).strip() == "", "... no volume")
    check(compose.docker("network", "ls", "-q", "--filter", label).strip() == "", "... no network")


def leftover_processes() -> list[str]:
    """Processes in this network namespace other than this one and its parents."""
    mine = os.readlink("/proc/self/ns/net")
    keep = {os.getpid()}
    pid = os.getpid()
    while pid > 1:
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        keep.add(pid)
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in keep:
            continue
        with contextlib.suppress(OSError):
            if os.readlink(entry / "ns" / "net") == mine:
                out.append(f"{entry.name} {(entry / 'cmdline').read_bytes()[:80]!r}")
    return out


def inside(args: argparse.Namespace) -> int:
    report = Report()
    t_start = time.monotonic()
    run_dir = Path(args.run_dir)
    setup_namespace(run_dir)
    docker = Docker(run_dir, COMPOSE_CACHE / "docker")
    env = test_env()
    env_file = run_dir / "test.env"
    write_env(env_file, env)
    compose = Compose(docker, env_file)
    ok = False
    try:
        t0 = time.monotonic()
        docker.start()
        report.figures["dockerd_s"] = round(time.monotonic() - t0, 1)
        # A run that died half-way leaves its project in the cached data root.
        compose("down", "-v", "--remove-orphans", check=False, timeout=180)
        build_images(docker, compose, Path(args.rootfs), report)
        check_missing_variable(compose, env, run_dir)
        watch = up_and_watch(compose, report)
        trust_caddy(compose, run_dir)
        check_proxy_routes()
        password = secrets.token_hex(8)
        for name in ("ct1", "ct2", "dora"):
            register(compose, name, password)
        dora = login("dora", password)
        sfu_url = discover(dora)
        duration = args.call_seconds
        t_call = time.monotonic()
        call = start_call(run_dir, sfu_url, password, duration)
        d: Delegated | None = None
        try:
            d = delegated_member(dora, run_dir)
            wait_for("the delegated job is in Redis, seen connected",
                     lambda: (job(compose, d) or {}).get("SeenConnected") is True, 30)  # fmt: skip
            restart_service(compose, watch, report)
            check(job(compose, d) is not None, "the job survived the token service's restart")
            t_kill = time.monotonic()
            d.proc.kill()
            d.proc.wait()
            took = wait_for(
                "the SIGKILLed member's leave is in the room", lambda: membership_left(d), 50
            )
            report.figures["delegated_leave_after_kill_s"] = round(took, 1)
            check(
                time.monotonic() - t_kill < 55,
                "... sent by the token service, before the member's own 60 s delay",
            )
            remaining = duration + 90 - (time.monotonic() - t_call)
            out, _ = call.communicate(timeout=max(remaining, 30))
            if call.returncode != 0:
                raise Failed(f"call-test exited {call.returncode}: see {run_dir}/call-test.log")
            check_call(out, report, duration)
        finally:
            for proc in (call, d.proc if d else None):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
        compose("logs", "--no-color", check=False, timeout=60)  # kept below on failure
        check_down(compose)
        ok = True
    except Failed as exc:
        log(f"FAILED: {exc}")
        logs = compose("logs", "--no-color", "--tail", "60", check=False, timeout=60)
        (run_dir / "compose.log").write_text(logs.stdout + logs.stderr)
        log(f"logs in {run_dir}")
        compose("down", "-v", "--remove-orphans", check=False, timeout=180)
    finally:
        docker("image", "prune", "-f", check=False)
        docker.stop()
        left = leftover_processes()
        for line in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split()[0]), signal.SIGKILL)
        if left:
            log(f"FAILED: processes left after dockerd stopped: {left}")
            ok = False
        else:
            log("ok: dockerd stopped, no process left in the namespace")
    report.figures["inside_s"] = round(time.monotonic() - t_start, 1)
    (run_dir / "report.json").write_text(json.dumps(report.figures))
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.compose.run", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.add_argument("--call-seconds", type=int, default=45)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--rootfs", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inside:
        return inside(args)
    if os.geteuid() != 0:
        print("compose-test: needs root (dockerd, namespaces, debootstrap)", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    ensure_host_packages()
    if not LIVEKIT_BIN.exists():
        raise SystemExit(f"compose-test: {LIVEKIT_BIN} missing: run make bootstrap")
    run([ROOT / "scripts" / "wheelhouse"])
    tar = rootfs_tar()
    prepare_s = time.monotonic() - t0
    run_dir = Path(tempfile.mkdtemp(prefix="mrtc-ct-", dir="/tmp"))
    code = subprocess.call(
        [
            "unshare", "--net", "--mount", "--propagation", "private", "--fork", "--kill-child",
            sys.executable, "-m", "tests.compose.run", "--inside",
            f"--run-dir={run_dir}", f"--rootfs={tar}", f"--call-seconds={args.call_seconds}",
        ],
        cwd=ROOT,
    )  # fmt: skip
    figures: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        figures = json.loads((run_dir / "report.json").read_text())
    figures["prepare_s"] = round(prepare_s, 1)
    figures["total_s"] = round(time.monotonic() - t0, 1)
    figures["ok"] = code == 0
    if args.json:
        print(json.dumps(figures))
    else:
        for k, v in figures.items():
            print(f"{k:32} {v}")
    if code == 0:
        shutil.rmtree(run_dir, ignore_errors=True)
    else:
        print(f"compose-test FAILED; logs in {run_dir}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
