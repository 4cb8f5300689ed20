"""Configuration: lk-jwt-service's variables, validation and start-up messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from matrixrtc.errors import ConfigError
from sfu.auth.config import Config, parse_bind
from sfu.cli import main

BASE = {
    "LIVEKIT_URL": "wss://sfu.example.org",
    "LIVEKIT_KEY": "k",
    "LIVEKIT_SECRET": "s",
    "LIVEKIT_FULL_ACCESS_HOMESERVERS": "example.org",
}


def err(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as exc:
        Config.from_env(env)
    return str(exc.value)


def test_defaults() -> None:
    c = Config.from_env(BASE)
    assert (c.bind_host, c.bind_port) == (None, 8080)
    assert c.full_access_homeservers == ("example.org",)
    assert not c.skip_verify_tls
    assert c.redis_url == ""
    assert c.log_level == "info"


def test_required_variables() -> None:
    msg = "LIVEKIT_KEY* / LIVEKIT_SECRET* and LIVEKIT_URL must be set"
    for var in ("LIVEKIT_URL", "LIVEKIT_KEY", "LIVEKIT_SECRET"):
        assert err({k: v for k, v in BASE.items() if k != var}) == msg
    assert err({**BASE, "LIVEKIT_FULL_ACCESS_HOMESERVERS": ""}).startswith(
        "LIVEKIT_FULL_ACCESS_HOMESERVERS environment variable must be set"
    )


def test_key_files(tmp_path: Path) -> None:
    kf = tmp_path / "keyfile"
    kf.write_text("mykey:mysecret\n")
    c = Config.from_env({**BASE, "LIVEKIT_KEY_FILE": str(kf)})
    assert (c.key, c.secret) == ("mykey", "mysecret")
    kf.write_text("a:b:c")
    assert err({**BASE, "LIVEKIT_KEY_FILE": str(kf)}) == "invalid key secret file format!"
    (tmp_path / "k").write_text(" key\r\n")
    (tmp_path / "s").write_text("secret\n")
    env = {
        "LIVEKIT_URL": "ws://x",
        "LIVEKIT_FULL_ACCESS_HOMESERVERS": "*",
        "LIVEKIT_KEY_FROM_FILE": str(tmp_path / "k"),
        "LIVEKIT_SECRET_FROM_FILE": str(tmp_path / "s"),
    }
    c = Config.from_env(env)
    assert (c.key, c.secret) == ("key", "secret")
    assert c.is_full_access("anything.example")
    assert "No such file" in err({**env, "LIVEKIT_KEY_FROM_FILE": str(tmp_path / "missing")})


def test_full_access_rule() -> None:
    c = Config.from_env({**BASE, "LIVEKIT_FULL_ACCESS_HOMESERVERS": "a.org, b.org c.org"})
    assert c.full_access_homeservers == ("a.org", "b.org", "c.org")
    assert c.is_full_access("b.org")
    assert not c.is_full_access("d.org")
    # "*" means everyone only as the single entry, as in lk-jwt-service
    c = Config.from_env({**BASE, "LIVEKIT_FULL_ACCESS_HOMESERVERS": "*,a.org"})
    assert not c.is_full_access("d.org")


def test_bind_port_and_overrides() -> None:
    assert Config.from_env({**BASE, "LIVEKIT_JWT_PORT": "9000"}).bind_port == 9000
    c = Config.from_env({**BASE, "LIVEKIT_JWT_BIND": "127.0.0.1:8081"})
    assert (c.bind_host, c.bind_port) == ("127.0.0.1", 8081)
    assert parse_bind("[::1]:80") == ("::1", 80)
    both = {**BASE, "LIVEKIT_JWT_BIND": ":1", "LIVEKIT_JWT_PORT": "2"}
    assert err(both) == "LIVEKIT_JWT_BIND and LIVEKIT_JWT_PORT must not be set together"
    c = Config.from_env(
        {**BASE, "LIVEKIT_CS_API_URL_OVERRIDES": " a.org = https://hs.a.org ,b=http://b"}
    )
    assert c.cs_api_overrides == {"a.org": "https://hs.a.org", "b": "http://b"}
    assert err({**BASE, "LIVEKIT_CS_API_URL_OVERRIDES": "a.org"}).startswith(
        "failed parsing LIVEKIT_CS_API_URL_OVERRIDES: invalid entry"
    )
    assert "must be a non-negative integer" in err(
        {**BASE, "LIVEKIT_SANITY_CHECK_INTERVAL_SECONDS": "-1"}
    )
    skip = {**BASE, "LIVEKIT_INSECURE_SKIP_VERIFY_TLS": "YES_I_KNOW_WHAT_I_AM_DOING"}
    assert Config.from_env(skip).skip_verify_tls
    assert not Config.from_env({**BASE, "LIVEKIT_INSECURE_SKIP_VERIFY_TLS": "yes"}).skip_verify_tls
    assert Config.from_env({**BASE, "LIVEKIT_LOG_LEVEL": "WARN"}).log_level == "warning"
    assert "must be a number" in err({**BASE, "MATRIXRTC_SFU_RATE_LIMIT": "fast"})


def test_serve_exits_with_the_start_up_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for k in list(BASE):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("LIVEKIT_URL", "ws://x")
    assert main(["serve"]) == 1
    assert "LIVEKIT_KEY* / LIVEKIT_SECRET* and LIVEKIT_URL must be set" in capsys.readouterr().err


def test_help_lists_the_variables(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for name in (
        "LIVEKIT_FULL_ACCESS_HOMESERVERS",
        "MATRIXRTC_SFU_HOMESERVER_OVERRIDES",
        "--workers",
    ):
        assert name in out


def test_livekit_api_url() -> None:
    """LIVEKIT_URL is what clients get; the service's own API calls may take another route
    (compose: http://livekit:7880 instead of a hairpin through the public proxy)."""
    assert Config.from_env(BASE).livekit_api_url == ""
    c = Config.from_env({**BASE, "MATRIXRTC_SFU_LIVEKIT_API_URL": " http://livekit:7880 "})
    assert (c.livekit_url, c.livekit_api_url) == ("wss://sfu.example.org", "http://livekit:7880")
    assert "MATRIXRTC_SFU_LIVEKIT_API_URL must be an http(s) URL" in err(
        {**BASE, "MATRIXRTC_SFU_LIVEKIT_API_URL": "livekit:7880"}
    )


def test_controller_uses_the_livekit_api_url() -> None:
    from sfu.controller.config import ControllerConfig

    assert ControllerConfig.from_env(BASE).livekit_url == "wss://sfu.example.org"
    env = {**BASE, "MATRIXRTC_SFU_LIVEKIT_API_URL": "http://livekit:7880"}
    assert ControllerConfig.from_env(env).livekit_url == "http://livekit:7880"


def test_connection_limits() -> None:
    """Per-address cap on by default, off behind a proxy (every peer is then the proxy)."""
    c = Config.from_env(BASE)
    assert (c.header_timeout, c.body_timeout, c.idle_timeout) == (10.0, 10.0, 60.0)
    assert (c.max_conns_per_client, c.max_conns) == (64, 0)
    proxied = Config.from_env({**BASE, "MATRIXRTC_SFU_CLIENT_IP_HEADER": "X-Forwarded-For"})
    assert proxied.max_conns_per_client == 0
    both = {**BASE, "MATRIXRTC_SFU_CLIENT_IP_HEADER": "X-Real-IP"}
    both["MATRIXRTC_SFU_MAX_CONNS_PER_CLIENT"] = "500"
    assert Config.from_env(both).max_conns_per_client == 500
    assert "MATRIXRTC_SFU_HEADER_TIMEOUT must be positive" in err(
        {**BASE, "MATRIXRTC_SFU_HEADER_TIMEOUT": "0"}
    )


def test_log_throttle_once_per_key_per_interval() -> None:
    from sfu.common.httpserve import LogThrottle

    now = [0.0]
    t = LogThrottle(60.0, max_keys=2, clock=lambda: now[0])
    assert t.allow("a")
    assert t.allow("b")
    assert not t.allow("a")
    now[0] = 59.9
    assert not t.allow("b")
    now[0] = 60.0
    assert t.allow("a")
    assert t.allow("c")  # forgets the least recently logged key ("b")
    assert t.allow("b")
    assert t.suppressed == 2
