"""Operators' deployment files: compose.yaml, .env.example, the Dockerfile, Caddy's config.

Fast checks without a Docker engine (the full stack runs in ``make compose-test``):
- ``docker-compose config -q`` (Compose v1, Debian's 1.29; v2 too when installed) accepts
  compose.yaml alone, with every profile, and with the test overlay;
- a missing required variable stops compose with a message naming it;
- every variable compose.yaml reads is documented in .env.example, every image is pinned;
- Dockerfile rules: non-root, exec-form entrypoint, healthcheck, no build-time network, no
  secrets baked in, and the files it copies are a self-sufficient `sfu` (imports checked);
- the service stops promptly on SIGTERM as PID 1 of its own PID namespace, as in a container.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
OVERLAY = ROOT / "deploy" / "test" / "compose.test.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"

# The smallest .env that starts the stack (what an operator must fill in).
REQUIRED = {
    "RTC_HOST": "rtc.example.org",
    "MATRIX_SERVER_NAME": "example.org",
    "MATRIX_HOMESERVER_URL": "https://matrix.example.org",
    "LIVEKIT_KEY": "matrixrtc",
    "LIVEKIT_SECRET": "0123456789abcdef0123456789abcdef",
    "LIVEKIT_FULL_ACCESS_HOMESERVERS": "example.org",
}

V1 = shutil.which("docker-compose")
# Compose v2 as scripts/compose-v2 builds it (not packaged in Debian bookworm); checked too
# when present.
V2 = (
    Path(os.environ.get("MATRIXRTC_CACHE_DIR") or Path.home() / ".cache" / "matrixrtc")
    / "compose-v2.40.3"
    / "docker-compose"
)


def _compose_tools() -> list[list[str]]:
    tools = [[V1]] if V1 else []
    if V2.is_file():
        tools.append([str(V2)])
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        tools.append([docker, "compose"])
    return tools


def _run_config(
    tool: list[str],
    tmp_path: Path,
    env: dict[str, str],
    *files: Path,
    profiles: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    env_file = tmp_path / "test.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    args = [*tool, "--project-directory", str(ROOT), "--env-file", str(env_file)]
    for f in files:
        args += ["-f", str(f)]
    for p in profiles:
        args += ["--profile", p]
    # Only PATH: a variable of the developer's shell must not satisfy a required one.
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    return subprocess.run(
        [*args, "config", "-q"], capture_output=True, text=True, env=clean, timeout=60
    )


def _tools_or_fail() -> list[list[str]]:
    tools = _compose_tools()
    if not tools:
        pytest.fail("docker-compose (Debian's 1.29) is missing: scripts/bootstrap.sh installs it")
    return tools


@pytest.mark.parametrize(
    ("files", "profiles"),
    [
        ((COMPOSE,), ()),
        ((COMPOSE,), ("turn", "demo")),
        ((COMPOSE, OVERLAY), ("turn", "demo")),
    ],
    ids=["alone", "profiles", "test-overlay"],
)
def test_compose_config_accepted(
    tmp_path: Path, files: tuple[Path, ...], profiles: tuple[str, ...]
) -> None:
    for tool in _tools_or_fail():
        r = _run_config(tool, tmp_path, REQUIRED, *files, profiles=profiles)
        assert r.returncode == 0, (tool, r.stderr)


@pytest.mark.parametrize("var", sorted(REQUIRED))
def test_missing_required_variable_is_named(tmp_path: Path, var: str) -> None:
    env = {k: v for k, v in REQUIRED.items() if k != var}
    for tool in _tools_or_fail():
        r = _run_config(tool, tmp_path, env, COMPOSE)
        assert r.returncode != 0, tool
        assert f"{var} must be set in .env" in r.stderr, r.stderr


def test_overlay_changes_only_images() -> None:
    """compose-test runs the operators' file: its overlay swaps images and polls health more
    often (timing, not wiring), nothing else."""
    overlay = yaml.safe_load(OVERLAY.read_text())
    assert set(overlay) == {"services", "x-fast-health"}
    assert set(overlay["services"]) == set(_services())
    for name, svc in overlay["services"].items():
        allowed = {"image", "build", "healthcheck"} if name == "sfu" else {"image", "healthcheck"}
        assert set(svc) <= allowed, name
        if "healthcheck" in svc:
            assert set(svc["healthcheck"]) == {"interval", "retries"}, name
            assert "healthcheck" in _services()[name], name
        assert str(svc["image"]).startswith("local/matrixrtc-test-"), name
        if name != "sfu":
            assert (ROOT / "deploy" / "test" / "standins" / name / "Dockerfile").exists()
    assert overlay["services"]["sfu"]["build"]["args"] == {
        "BASE_IMAGE": "local/matrixrtc-test-base:bookworm"
    }


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _services() -> dict[str, Any]:
    services = _compose()["services"]
    assert isinstance(services, dict)
    return services


def _env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.partition("=")
            out[k] = v
    return out


def test_every_variable_is_documented_in_env_example() -> None:
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", COMPOSE.read_text()))
    documented = _env_example()
    assert used - set(documented) == set()
    assert set(documented) - used == set(), "documented but unused"
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", COMPOSE.read_text()))
    assert required == set(REQUIRED)
    text = ENV_EXAMPLE.read_text()
    for var in required:
        # Each required variable is introduced by a comment that says so.
        block = text[: text.index(f"\n{var}=")]
        assert "REQUIRED" in block[block.rfind("\n\n") :], var


def test_images_are_pinned_public_images() -> None:
    expected = {
        "redis": "redis:",
        "livekit": "livekit/livekit-server:v1.13.5",
        "caddy": "caddy:",
        "coturn": "coturn/coturn:",
        "postgres": "postgres:",
        "synapse": "matrixdotorg/synapse:v1.163.2",
    }
    services = _services()
    for name, prefix in expected.items():
        image = str(services[name]["image"])
        assert image.startswith(prefix), (name, image)
        tag = image.rpartition(":")[2]
        assert re.match(r"v?\d+\.\d+(\.\d+)?(-[a-z]+)?$", tag), f"{name}: {image} is unpinned"
    assert "build" in services["sfu"]
    assert services["coturn"]["profiles"] == ["turn"]
    assert services["synapse"]["profiles"] == services["postgres"]["profiles"] == ["demo"]
    core = {n for n, s in services.items() if "profiles" not in s}
    assert core == {"redis", "livekit", "sfu", "caddy"}


def test_health_ordering_and_signals_declared() -> None:
    services = _services()
    for name, svc in services.items():
        if name != "coturn":
            assert "healthcheck" in svc, name

    def deps(name: str) -> dict[str, Any]:
        d = services[name].get("depends_on", {})
        assert isinstance(d, dict)
        return d

    want = {
        "livekit": {"redis"},
        "sfu": {"redis", "livekit"},
        "caddy": {"sfu", "livekit"},
        "synapse": {"postgres"},
    }
    for name, needs in want.items():
        d = deps(name)
        assert set(d) == needs, name
        assert all(v == {"condition": "service_healthy"} for v in d.values()), name
    assert services["sfu"]["init"] is True
    # LiveKit: rooms are created by the token service only; webhooks reach it.
    lk_config = yaml.safe_load(str(services["livekit"]["environment"]["LIVEKIT_CONFIG"]))
    assert lk_config["room"]["auto_create"] is False
    assert lk_config["webhook"]["urls"] == ["http://sfu:8080/sfu_webhook"]
    assert set(services["livekit"]["ports"]) == {"7881:7881/tcp", "7882:7882/udp"}


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_rules() -> None:
    ins = _dockerfile_instructions()
    ops = [op for op, _ in ins]
    assert ops[0] in ("ARG", "FROM")
    users = [rest for op, rest in ins if op == "USER"]
    assert users
    assert users[-1].split(":")[0] not in ("0", "root"), "must run as non-root"
    assert ops.index("USER") > max(i for i, op in enumerate(ops) if op == "RUN")
    assert "ADD" not in ops, "ADD can fetch URLs; COPY only"
    entry = dict(ins)["ENTRYPOINT"]
    assert entry.startswith("["), "exec form: the process gets SIGTERM itself"
    assert any(op == "HEALTHCHECK" and "/healthz" in rest for op, rest in ins)
    for op, rest in ins:
        if op in ("ARG", "ENV"):
            assert not re.search(r"SECRET|PASSWORD|TOKEN|LIVEKIT_KEY", rest), rest
        if op == "RUN" and "pip install" in rest:
            assert "--no-index" in rest, "the build must not need the network"
        if op == "RUN":
            assert not re.search(r"\b(curl|wget|apt-get|apk)\b", rest), rest
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    for op, rest in ins:
        if op == "COPY":
            *sources, _dest = rest.split()
            for src in sources:
                assert f"!{src}" in ignore, f".dockerignore hides {src}"
                if not src.startswith("deploy/wheels"):
                    assert (ROOT / src).exists(), src


def _lock_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].split(";")[0].strip()
        if "==" in line:
            name, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name).lower().strip()] = version.strip()
    return pins


def test_image_requirements_match_the_lock() -> None:
    image = _lock_pins(ROOT / "deploy" / "requirements-sfu.txt")
    lock = _lock_pins(ROOT / "requirements.lock")
    for name, version in image.items():
        if name == "async-timeout":  # only below Python 3.11.3 (Debian's 3.11.2)
            continue
        assert lock.get(name) == version, name


def _image_tree(tmp_path: Path) -> Path:
    """The /app tree the Dockerfile builds, copied from the checkout."""
    app = tmp_path / "app"
    for op, rest in _dockerfile_instructions():
        if op != "COPY" or not rest.split()[-1].startswith("/app/"):
            continue
        *sources, dest = rest.split()
        target = app / dest.removeprefix("/app/")
        for src in sources:
            s = ROOT / src
            if s.is_dir():
                shutil.copytree(s, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy(s, target / s.name)
    return app


# Top-level modules of deploy/requirements-sfu.txt's distributions.
IMAGE_MODULES = {
    "aiohttp", "structlog", "redis", "prometheus_client", "livekit", "dns", "jwt", "google",
    "multidict", "yarl", "aiosignal", "frozenlist", "attr", "attrs", "idna", "propcache",
    "aiohappyeyeballs", "typing_extensions", "async_timeout",
}  # fmt: skip


def _image_site_packages(tmp_path: Path) -> Path:
    """A site-packages holding only what the image installs (links into this venv's)."""
    import sysconfig

    real = Path(sysconfig.get_paths()["purelib"])
    site = tmp_path / "site"
    site.mkdir()
    dists = set(_lock_pins(ROOT / "deploy" / "requirements-sfu.txt"))
    for entry in real.iterdir():
        name = entry.name
        if name.endswith(".dist-info"):
            dist = re.sub(r"[-_.]+", "-", name.rsplit("-", 1)[0]).lower()
            keep = dist in dists
        else:
            keep = name.removesuffix(".py") in IMAGE_MODULES
        if keep:
            (site / name).symlink_to(entry)
    return site


def test_image_code_is_self_sufficient(tmp_path: Path) -> None:
    """The files the image copies import without the rest of the checkout and with only the
    packages the image installs (so optional imports fall back as in the image and a missing
    hard dependency fails)."""
    app = _image_tree(tmp_path)
    site = _image_site_packages(tmp_path)
    probe = (
        "import sys, json\n"
        "sys.path = [p for p in sys.path if 'site-packages' not in p]\n"
        f"sys.path[:0] = [{str(app)!r}, {str(site)!r}]\n"
        "import sfu.cli, sfu.auth.app, sfu.controller, redis.asyncio\n"
        "files = {m: getattr(sys.modules[m], '__file__', '') or '' for m in sys.modules\n"
        "         if m.split('.')[0] in ('sfu', 'matrixrtc')}\n"
        "print(json.dumps(files))\n"
    )
    r = subprocess.run(
        [sys.executable, "-I", "-S", "-c", probe], capture_output=True, text=True, cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    files = json.loads(r.stdout)
    assert "sfu.auth.app" in files
    assert all(f.startswith(str(app)) for f in files.values()), files


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def pid1_service(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.fail("needs root and unshare (the test suite runs as root)")
    app = _image_tree(tmp_path)
    port = _free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(app),
        "LIVEKIT_URL": "wss://rtc.example.org",
        "MATRIXRTC_SFU_LIVEKIT_API_URL": "http://127.0.0.1:9",
        "LIVEKIT_KEY": "k",
        "LIVEKIT_SECRET": "s" * 32,
        "LIVEKIT_FULL_ACCESS_HOMESERVERS": "example.org",
        "LIVEKIT_JWT_BIND": f"127.0.0.1:{port}",
    }
    # The Dockerfile's ENTRYPOINT + CMD, as PID 1 of a fresh PID namespace: the kernel drops
    # signals a PID 1 has no handler for, exactly as in a container without an init.
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-m", "sfu", "serve"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def _child_pid(parent: int) -> int:
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def test_service_stops_on_sigterm_as_pid1(
    pid1_service: tuple[subprocess.Popen[bytes], int],
) -> None:
    proc, port = pid1_service
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                assert r.status == 200
                break
        except OSError:
            assert time.monotonic() < deadline, "service never became healthy"
            time.sleep(0.1)
    pid1 = _child_pid(proc.pid)
    nspid = Path(f"/proc/{pid1}/status").read_text().split("NSpid:")[1].split("\n")[0].split()
    assert nspid[-1] == "1", "the service must be PID 1 in its namespace"
    start = time.monotonic()
    os.kill(pid1, signal.SIGTERM)
    proc.wait(timeout=10)
    took = time.monotonic() - start
    assert took < 5, f"stopping took {took:.1f} s"


def _caddy_adapt(site: str) -> Any:
    caddy = shutil.which("caddy")
    if caddy is None:
        pytest.fail("caddy (Debian's) is missing: scripts/bootstrap.sh installs it")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "RTC_HOST": "rtc.example.org",
        "MATRIX_SERVER_NAME": "example.org",
        "MATRIX_HOMESERVER_URL": "https://matrix.example.org",
        "CADDY_GLOBAL_OPTIONS": "local_certs",
        "CADDY_HOMESERVER_SITE": site,
    }
    r = subprocess.run(
        [caddy, "adapt", "--config", str(ROOT / "deploy" / "caddy" / "Caddyfile")],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


@pytest.mark.parametrize("site", ["none", "homeserver"])
def test_caddyfile_well_known_and_routes(site: str) -> None:
    config = _caddy_adapt(site)
    nodes = list(_walk(config))
    bodies = [
        json.loads(str(n["body"]))
        for n in nodes
        if n.get("handler") == "static_response" and str(n.get("body", "")).startswith("{")
    ]
    client = [b for b in bodies if "m.homeserver" in b]
    assert client
    for b in client:
        assert b == {
            "m.homeserver": {"base_url": "https://matrix.example.org"},
            "org.matrix.msc4143.rtc_foci": [
                {"type": "livekit", "livekit_service_url": "https://rtc.example.org/livekit/jwt"}
            ],
        }
    cors = [n for n in nodes if n.get("handler") == "headers"]
    assert any(n["response"]["set"]["Access-Control-Allow-Origin"] == ["*"] for n in cors)
    hosts = {h for n in nodes for h in n.get("host", [])}
    dials = {u["dial"] for n in nodes for u in n.get("upstreams", [])}
    if site == "none":
        assert hosts == {"rtc.example.org"}
        assert dials == {"sfu:8080", "livekit:7880"}
    else:
        assert hosts == {"rtc.example.org", "example.org"}
        assert dials == {"sfu:8080", "livekit:7880", "synapse:8008"}
        assert {"m.server": "example.org:443"} in bodies
    # /metrics of the token service is not reachable through the proxy.
    metrics = [n for n in nodes if "/livekit/jwt/metrics*" in n.get("path", [])]
    assert metrics


def test_the_controller_runs_by_default(tmp_path: Path) -> None:
    """The SFU controller is on in the operators' compose file unless .env turns it off, and
    every controller variable compose passes on is one the service reads."""
    from sfu.controller.config import CONTROLLER_VARIABLES

    sfu_env = _services()["sfu"]["environment"]
    passed = {k for k in sfu_env if k.startswith("MATRIXRTC_SFU_CONTROLLER")}
    assert passed <= set(CONTROLLER_VARIABLES)
    assert {
        "MATRIXRTC_SFU_CONTROLLER_ACCESS_TOKEN",
        "MATRIXRTC_SFU_CONTROLLER_ADMIN_TOKEN",
    } <= passed
    assert sfu_env["MATRIXRTC_SFU_CONTROLLER"] == "${MATRIXRTC_SFU_CONTROLLER:-1}"
    assert _env_example()["MATRIXRTC_SFU_CONTROLLER"] == "1"
    if V1:  # resolved by Compose itself, with no .env value for it
        env_file = tmp_path / "test.env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in REQUIRED.items()))
        clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
        args = [V1, "--project-directory", str(ROOT), "--env-file", str(env_file)]
        r = subprocess.run(
            [*args, "-f", str(COMPOSE), "config"],
            capture_output=True,
            text=True,
            env=clean,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        resolved = yaml.safe_load(r.stdout)["services"]["sfu"]["environment"]
        assert resolved["MATRIXRTC_SFU_CONTROLLER"] == "1"
