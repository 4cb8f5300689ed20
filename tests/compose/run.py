"""``make compose-test``: compose.yaml end to end, on this machine, with nothing pulled.

No image registry is reachable here, so (shared/notes/compose.md):

1. *Host side* (network allowed, cached under ``~/.cache/matrixrtc/compose`` or
   ``$MATRIXRTC_COMPOSE_CACHE``): Debian's docker.io + docker-compose 1.29; the stand-ins'
   shared base root file system (``tests/compose/base.py``: Debian packages unpacked without
   a package manager, Synapse copied from the project's venv; ~15-30 s cold); the service
   image's wheelhouse (``scripts/wheelhouse``).
2. *Inside a private network and mount namespace* (``unshare --net --mount``): a dockerd with
   its own data root (cached: a warm run reuses the images) and exec root, stopped by its pid
   file; the base image imported, stand-ins built from ``deploy/test/standins``, the service
   image built by compose from ``./Dockerfile``; ``/etc/hosts`` and the CA bundle replaced by
   bind mounts only inside the namespace. Interrupted (a timeout's SIGTERM), the test takes
   the stack down and stops dockerd; the outer process then kills whatever is left in the
   namespace, which disappears with its last process.

Then, with ``compose.yaml`` + ``deploy/test/compose.test.yaml`` (images, health polled every
second) and the demo and turn profiles:

- ``up`` with a required variable missing fails, names it, and creates nothing;
- ``up``: every service healthy, each one started only after its dependencies were healthy;
- through Caddy: ``.well-known/matrix/client`` (rtc_foci, CORS), the token service
  (``/healthz``, CORS preflight, ``/metrics`` hidden), LiveKit, Synapse (``/rtc/transports``);
- ``python -m sfu doctor example.test`` (with a user's token, the LiveKit keys and the TURN
  address): no check fails and the 18 it can make pass;
- TURN (tests/compose/turn.py): credentials from the homeserver's ``/voip/turnServer``, an
  allocation at coturn (a wrong password refused), a datagram relayed to a public peer and
  back, a relay into the stack's private network refused;
- the focus is discovered as a client does (``discover_transport``) and a real end-to-end
  encrypted call runs through it: ``python -m matrixrtc call-test --transport sfu`` with two
  participants that log in to the compose Synapse over HTTPS, get tokens through Caddy and
  exchange encrypted media through LiveKit, decrypting every frame;
- meanwhile a third member delegates its delayed leave (``/delegate_delayed_leave``); the token
  service container is stopped (SIGTERM, timed) and started again mid-call: the job is still
  in Redis and the call goes on; the SFU controller inside the service leads and keeps the
  member, before and after the restart (``/status`` through Caddy); the member is SIGKILLed
  and its leave arrives in the room through the restarted service long before its own 60 s
  delay;
- ``down -v`` leaves no container, volume or network; dockerd stops; no process is left.

Prints a report and, with ``--json``, one JSON object (read by ``bench/compose.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.compose.base import build_rootfs
from tests.compose.turn import PUBLIC_PEER, TurnCredentials, check_turn

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
OVERLAY = ROOT / "deploy" / "test" / "compose.test.yaml"
STANDINS = ROOT / "deploy" / "test" / "standins"
CACHE = Path(os.environ.get("MATRIXRTC_CACHE_DIR") or Path.home() / ".cache" / "matrixrtc")
COMPOSE_CACHE = Path(os.environ.get("MATRIXRTC_COMPOSE_CACHE") or CACHE / "compose")
LIVEKIT_BIN = CACHE / "livekit-v1.13.5" / "livekit-server"
DOCKER = "/usr/bin/docker"  # Debian's client: the same API version as the engine
PROJECT = "mrtc-compose-test"
STATUS_TOKEN = secrets.token_hex(16)  # the controller's /status bearer (this run only)
BASE_IMAGE = "local/matrixrtc-test-base:bookworm"
BASE_LABEL = "org.matrixrtc.test.base"
HOST_PACKAGES = ("docker.io", "docker-compose", "iptables")
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


@dataclass
class Compose:
    docker: Docker
    env_file: Path
    program: str = "docker-compose"  # Debian's v1.29, or a Compose v2 binary (--compose)

    def argv(self, env_file: Path | None = None) -> list[str]:
        return [
            self.program, "-p", PROJECT, "--project-directory", str(ROOT),
            "-f", str(COMPOSE), "-f", str(OVERLAY),
            "--env-file", str(env_file or self.env_file), "--profile", "demo",
            "--profile", "turn",
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
        "MATRIXRTC_SFU_CONTROLLER_STATUS_TOKEN": STATUS_TOKEN,
        "TURN_SECRET": secrets.token_hex(16),
        "TURN_REALM": "turn.example.test",
        "TURN_URIS": f"turn:{NODE_IP}:3478?transport=udp",
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
    # A "public" address for the TURN relay's peer (coturn refuses private ones).
    run(["ip", "addr", "add", f"{PUBLIC_PEER}/32", "dev", "mrtc1"])
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


def build_images(docker: Docker, compose: Compose, rootfs: Path, report: Report) -> None:
    t0 = time.monotonic()
    # The root file system's directory name carries its recipe's key (tests/compose/base.py);
    # a cached image made from another recipe is replaced (the stand-ins are rebuilt on it).
    label = f"{BASE_LABEL}={rootfs.name}"
    have = docker(
        "image", "inspect", "-f", f'{{{{index .Config.Labels "{BASE_LABEL}"}}}}', BASE_IMAGE,
        check=False,
    ).strip()  # fmt: skip
    if have != rootfs.name:
        log("docker import base image")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        r = subprocess.run(
            [DOCKER, "import", "--change", f"LABEL {label}", "-", BASE_IMAGE],
            stdin=tar.stdout, env=docker.env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        if tar.wait() != 0 or r.returncode != 0:
            raise Failed(f"docker import of {rootfs} failed: {r.stderr[-2000:]}")
        report.figures["import_s"] = round(time.monotonic() - t0, 1)
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
    base = int(docker("image", "inspect", "-f", "{{.Size}}", BASE_IMAGE))
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


DOCTOR_MUST_PASS = (
    "well_known", "versions", "delayed_events", "msc4143", "rtc_foci", "rtc_transports",
    "service_health", "cors_preflight", "token_errors", "openid_federation", "token_flow",
    "service_livekit", "livekit_reachable", "livekit_token", "livekit_websocket",
    "livekit_api", "webhook", "turn",
)  # fmt: skip


def run_doctor(user: User, env: Mapping[str, str], report: Report) -> None:
    """``python -m sfu doctor`` against the composed stack, as an operator runs it after
    ``up``: every check it can make with a user's token, the LiveKit keys and the TURN
    address must pass (a failing row names the fault)."""
    r = run(
        [
            sys.executable, "-m", "sfu", "doctor", SERVER_NAME, "--json",
            "--access-token", user.token, "--livekit-key", env["LIVEKIT_KEY"],
            "--livekit-secret", env["LIVEKIT_SECRET"], "--turn", f"{NODE_IP}:3478",
        ],
        check=False, timeout=120,
    )  # fmt: skip
    try:
        doc = json.loads(r.stdout)
    except ValueError as exc:
        raise Failed(f"sfu doctor printed no JSON ({r.returncode}): {r.stderr[-2000:]}") from exc
    rows = {row["check"]: row for row in doc["checks"]}
    report.figures["doctor"] = {k: v["status"] for k, v in rows.items()}
    bad = {k: f"{v['status']}: {v['summary']}" for k, v in rows.items() if v["status"] == "fail"}
    check(
        r.returncode == 0 and doc["ok"] and not bad,
        f"`sfu doctor {SERVER_NAME}`: no check failed {bad}",
    )
    missing = [c for c in DOCTOR_MUST_PASS if rows.get(c, {}).get("status") != "pass"]
    check(
        not missing,
        f"... {len(DOCTOR_MUST_PASS)} checks passed"
        + (f"; not passed: {[(c, rows.get(c)) for c in missing]}" if missing else ""),
    )


def turn_check(user: User, report: Report) -> None:
    """The turn profile's coturn with the credentials the homeserver hands out."""
    status, _, body = http("GET", f"{HS}/_matrix/client/v3/voip/turnServer", token=user.token)
    ok = status == 200 and isinstance(body, dict) and bool(body.get("uris"))
    check(ok, f"the homeserver hands out TURN credentials through Caddy ({status}: {body})")
    creds = TurnCredentials(list(body["uris"]), body["username"], body["password"])
    report.figures |= asyncio.run(check_turn(creds, NODE_IP, check))


def controller_status() -> dict[str, Any]:
    status, _, body = http(
        "GET", f"{FOCUS}/status", headers={"Authorization": f"Bearer {STATUS_TOKEN}"}
    )
    if status != 200 or not isinstance(body, dict):
        raise Failed(f"controller /status through Caddy: {status} {body!r}")
    return body


def controller_sees(alias: str, identity: str) -> bool:
    """The SFU controller (on by default in compose.yaml; the test's .env leaves it unset)
    leads and keeps the member (it has no homeserver access in this stack, so it judges only
    what the service issued and the delegated leaves)."""
    body = controller_status()
    for room in body.get("rooms") or []:
        if room.get("room") == alias:
            return any(
                p.get("identity") == identity and p.get("verdict") == "keep"
                for p in room.get("participants", [])
            )
    return False


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


def _terminated(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # a timeout's SIGTERM runs the clean-up below


def inside(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _terminated)
    report = Report()
    t_start = time.monotonic()
    run_dir = Path(args.run_dir)
    setup_namespace(run_dir)
    docker = Docker(run_dir, COMPOSE_CACHE / "docker")
    env = test_env()
    env_file = run_dir / "test.env"
    write_env(env_file, env)
    compose = Compose(docker, env_file, args.compose)
    ok = False
    try:
        t0 = time.monotonic()
        docker.start()
        report.figures["dockerd_s"] = round(time.monotonic() - t0, 1)
        version = run([args.compose, "version"], env=docker.env).stdout.strip()
        report.figures["compose"] = version.splitlines()[0] if version else args.compose
        log(f"compose: {report.figures['compose']}")
        # A run that died half-way leaves its project in the cached data root.
        compose("down", "-v", "--remove-orphans", check=False, timeout=180)
        build_images(docker, compose, Path(args.rootfs), report)
        check_missing_variable(compose, env, run_dir)
        watch = up_and_watch(compose, report)
        trust_caddy(compose, run_dir)
        check_proxy_routes()
        password = secrets.token_hex(8)
        t0 = time.monotonic()
        with ThreadPoolExecutor(3) as pool:  # each is a Python process in the container
            list(pool.map(lambda n: register(compose, n, password), ("ct1", "ct2", "dora")))
        report.figures["register_s"] = round(time.monotonic() - t0, 1)
        check(True, f"3 users registered ({report.figures['register_s']} s)")
        dora = login("dora", password)
        sfu_url = discover(dora)
        run_doctor(dora, env, report)
        turn_check(dora, report)
        duration = args.call_seconds
        t_call = time.monotonic()
        call = start_call(run_dir, sfu_url, password, duration)
        d: Delegated | None = None
        try:
            d = delegated_member(dora, run_dir)
            wait_for("the delegated job is in Redis, seen connected",
                     lambda: (job(compose, d) or {}).get("SeenConnected") is True, 30)  # fmt: skip
            wait_for("the SFU controller leads and keeps the delegated member (/status)",
                     lambda: controller_sees(d.alias, d.identity), 20)  # fmt: skip
            restart_service(compose, watch, report)
            check(job(compose, d) is not None, "the job survived the token service's restart")
            check(call.poll() is None, "... while the call went on")
            wait_for("the restarted service's controller leads and keeps the delegated member",
                     lambda: controller_sees(d.alias, d.identity), 30)  # fmt: skip
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
    except (Exception, SystemExit) as exc:  # Failed, a bug, SIGTERM: logs kept, stack down
        log(f"FAILED: {exc}" if isinstance(exc, Failed) else f"FAILED: {exc!r}")
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


def namespace_of(pid: int, timeout: float = 10) -> str:
    """The network namespace ``unshare`` made for ``pid`` (once it differs from ours)."""
    mine = os.readlink("/proc/self/ns/net")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            ns = os.readlink(f"/proc/{pid}/ns/net")
            if ns != mine:
                return ns
        time.sleep(0.01)
    raise Failed("unshare made no network namespace")


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def processes_in(netns: str) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(entry / "ns" / "net") == netns:
                    out.append(int(entry.name))
    return out


def reap_namespace(netns: str, grace: float) -> list[str]:
    """Waits up to ``grace`` s for the test's namespace to empty (its own clean-up stops
    dockerd), then SIGKILLs what is left (dockerd runs in its own session, so it outlives a
    killed test). The namespace, its veth pair and its mounts go with the last process."""
    deadline = time.monotonic() + grace
    while processes_in(netns) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = []
    for pid in processes_in(netns):
        with contextlib.suppress(OSError):
            left.append(f"{pid} {Path(f'/proc/{pid}/cmdline').read_bytes()[:60]!r}")
            os.kill(pid, signal.SIGKILL)
    return left


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.compose.run", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.add_argument("--call-seconds", type=int, default=35)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--rootfs", help=argparse.SUPPRESS)
    parser.add_argument(
        "--compose",
        default="docker-compose",
        help="the compose program: Debian's docker-compose 1.29 (default) or a Compose v2 "
        "binary (scripts/compose-v2 builds one)",
    )
    args = parser.parse_args(argv)
    if args.inside:
        return inside(args)
    if os.geteuid() != 0:
        # Never a silent skip: `make compose-test` (and CI) fail when it cannot run.
        print("compose-test: FAILED: needs root (dockerd, namespaces)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminated)
    t0 = time.monotonic()
    ensure_host_packages()
    if not LIVEKIT_BIN.exists():
        raise SystemExit(f"compose-test: {LIVEKIT_BIN} missing: run make bootstrap")
    run([ROOT / "scripts" / "wheelhouse"])
    rootfs = build_rootfs(COMPOSE_CACHE, log)
    prepare_s = time.monotonic() - t0
    run_dir = Path(tempfile.mkdtemp(prefix="mrtc-ct-", dir="/tmp"))
    proc = subprocess.Popen(
        [
            "unshare", "--net", "--mount", "--propagation", "private", "--fork",
            "--kill-child=SIGTERM",
            sys.executable, "-m", "tests.compose.run", "--inside",
            f"--run-dir={run_dir}", f"--rootfs={rootfs}", f"--call-seconds={args.call_seconds}",
            f"--compose={args.compose}",
        ],
        cwd=ROOT,
    )  # fmt: skip
    netns = namespace_of(proc.pid)
    try:
        code = proc.wait()
    except SystemExit as exc:  # our own SIGTERM (a timeout): clean up, then report
        code = int(exc.code or 1)
        log("interrupted: stopping the test inside the namespace")
    finally:
        if proc.poll() is None:  # interrupted (a timeout's SIGTERM): unshare ignores it, so
            for pid in processes_in(netns):  # the test inside gets it: down, dockerd stopped
                with contextlib.suppress(OSError):
                    if _parent(pid) == proc.pid:
                        os.kill(pid, signal.SIGTERM)
        reaped = reap_namespace(netns, grace=60)
        if reaped:
            log(f"killed what was left in the test's namespace: {reaped}")
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
