"""The controller's configuration and its start-up report of what it cannot see."""

from __future__ import annotations

import re

import pytest

from matrixrtc.errors import ConfigError
from sfu.auth.config import Config
from sfu.controller.config import ControllerConfig
from sfu.controller.controller import build_controller
from sfu.controller.leader import LocalLeadership, RedisLeadership
from sfu.controller.matrix_source import AdminStateSource
from sfu.controller.sync_source import SyncAndAdminSource, SyncSource

BASE = {"LIVEKIT_URL": "ws://127.0.0.1:1", "LIVEKIT_KEY": "k", "LIVEKIT_SECRET": "s"}
C = "MATRIXRTC_SFU_CONTROLLER"


def test_defaults() -> None:
    c = ControllerConfig.from_env(BASE)
    assert (c.interval, c.grace, c.join_grace, c.room_grace, c.outage_grace) == (
        1.0,
        2.0,
        30.0,
        60.0,
        30.0,
    )
    assert c.require_membership
    assert c.kick_foreign
    assert not c.dry_run
    assert (c.bind_host, c.bind_port) == ("127.0.0.1", 8090)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({f"{C}_ADMIN_TOKEN": "t"}, "HOMESERVER_URL must be set"),
        ({f"{C}_HOMESERVER_URL": "matrix.example.org"}, "must be an http(s) URL"),
        ({f"{C}_ALLOW_IDENTITIES": "("}, "not a regular expression"),
        ({f"{C}_GRACE": "-1"}, "non-negative"),
        ({f"{C}_REQUIRE_MEMBERSHIP": "maybe"}, "must be 1 or 0"),
        ({f"{C}_BIND": "nowhere"}, "expected host:port"),
    ],
)
def test_errors_say_what_is_wrong(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        ControllerConfig.from_env({**BASE, **env})


def test_sources_and_leadership_follow_the_configuration() -> None:
    admin = build_controller(
        ControllerConfig.from_env(
            {
                **BASE,
                f"{C}_HOMESERVER_URL": "https://hs",
                f"{C}_ADMIN_TOKEN": "a",
                f"{C}_ACCESS_TOKEN": "b",
                "LIVEKIT_REDIS_URL": "redis://127.0.0.1:1/0",
            }
        )
    )
    both = admin.source
    assert isinstance(both, SyncAndAdminSource)  # joined rooms by /sync, the rest by admin API
    assert isinstance(both.sync, SyncSource)
    assert isinstance(both.admin, AdminStateSource)
    assert isinstance(admin.leadership, RedisLeadership)
    assert admin.registry_complete
    admin_only = build_controller(
        ControllerConfig.from_env(
            {**BASE, f"{C}_HOMESERVER_URL": "https://hs", f"{C}_ADMIN_TOKEN": "a"}
        )
    )
    assert isinstance(admin_only.source, AdminStateSource)
    member = build_controller(
        ControllerConfig.from_env(
            {**BASE, f"{C}_HOMESERVER_URL": "https://hs", f"{C}_ACCESS_TOKEN": "b"}
        )
    )
    assert isinstance(member.source, SyncSource)
    assert isinstance(member.leadership, LocalLeadership)
    assert not member.registry_complete  # a stand-alone controller without Redis sees no grants


def test_serve_switch() -> None:
    env = {**BASE, "LIVEKIT_FULL_ACCESS_HOMESERVERS": "hs"}
    assert Config.from_env(env).controller is None
    assert Config.from_env({**env, C: "1"}).controller is not None


async def test_start_up_names_what_it_cannot_see() -> None:
    ctl = build_controller(ControllerConfig.from_env({**BASE, f"{C}_DRY_RUN": "1"}))
    await ctl.start()
    try:
        text = " | ".join(ctl.limits)
        assert "no LIVEKIT_REDIS_URL" in text
        assert "whose identity the service never issued are NOT removed" in text
        assert "no homeserver access" in text
        assert "dry run" in text
    finally:
        await ctl.close()
