"""An agent whose access token expires mid-session (issue 18, MSC2918 refresh tokens).

A Synapse whose refreshable access tokens live 2 s: the token expires under the agent again
and again. With a refresh token the agent renews it and goes on (sync included); after a
soft logout without a refresh token it logs in again with its password as the same device;
with neither it stops with a clear :class:`SessionEnded` (soft logout) instead of retrying.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from matrixrtc.agent import AgentConfig, CallAgent, ParticipantsChanged
from matrixrtc.devstack import Synapse
from matrixrtc.errors import RemoteError
from matrixrtc.matrix import Homeserver, Login
from matrixrtc.matrix.errors import SessionEnded
from matrixrtc.model import LivekitTransport

TOKEN_LIFE_MS = 2_000
WHOAMI = "/_matrix/client/v3/account/whoami"


async def _refusals(
    raw: aiohttp.ClientSession, base_url: str, hs: Homeserver, seconds: float
) -> int:
    """How many of the agent's current access tokens the homeserver refused, asked directly
    (outside the agent) every 0.25 s for ``seconds``."""
    refused = 0
    for _ in range(round(seconds / 0.25)):
        async with raw.get(
            base_url + WHOAMI, headers={"Authorization": f"Bearer {hs.access_token}"}
        ) as r:
            refused += r.status == 401
        await asyncio.sleep(0.25)
    return refused


@pytest_asyncio.fixture(scope="module")
async def short_tokens(run_dir: Path) -> AsyncIterator[Synapse]:
    extra = {"refreshable_access_token_lifetime": TOKEN_LIFE_MS}
    async with Synapse(run_dir, extra_config=extra, name="synapse-short-tokens") as hs:
        yield hs


async def _refreshable_token(hs: Synapse, user: str, password: str) -> str:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            hs.base_url + "/_matrix/client/v3/login",
            json={
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": user},
                "password": password,
                "refresh_token": True,
            },
        ) as r,
    ):
        body = await r.json()
    assert "refresh_token" in body, body
    return str(body["access_token"])


async def test_refresh_token_keeps_the_agent_going(short_tokens: Synapse, tmp_path: Path) -> None:
    user = await short_tokens.register("refresher")
    login = Login(user.user_id, password=user.password, refresh_tokens=True)
    async with Homeserver(
        short_tokens.base_url, login, state_dir=tmp_path / "st", sync_timeout_ms=500
    ) as hs:
        first = hs.access_token
        for _ in range(2):  # each round outlives the token
            await asyncio.sleep(TOKEN_LIFE_MS / 1000 + 0.5)
            who = await hs.request("GET", WHOAMI)
            assert who["device_id"] == hs.device_id
        synced = hs.sync_count
        await hs.wait_synced(synced, timeout_s=10)  # the sync loop renews its token too
        assert hs.tokens_renewed >= 2
        assert hs.access_token != first
        saved = json.loads((tmp_path / "st" / "session.json").read_text())
        assert saved["access_token"] == hs.access_token
        assert saved["refresh_token"]


async def test_soft_logout_logs_in_again_as_the_same_device(
    short_tokens: Synapse, tmp_path: Path
) -> None:
    user = await short_tokens.register("relogin")
    token = await _refreshable_token(short_tokens, user.user_id, user.password)
    login = Login(user.user_id, password=user.password, access_token=token)  # no refresh token
    async with Homeserver(
        short_tokens.base_url, login, state_dir=tmp_path / "st", sync_timeout_ms=500
    ) as hs:
        device = hs.device_id
        await asyncio.sleep(TOKEN_LIFE_MS / 1000 + 0.5)
        who = await hs.request("GET", WHOAMI)
        assert who["device_id"] == device
        assert hs.tokens_renewed == 1


async def test_without_refresh_token_or_password_it_ends_with_a_clear_error(
    short_tokens: Synapse, tmp_path: Path
) -> None:
    user = await short_tokens.register("stranded")
    token = await _refreshable_token(short_tokens, user.user_id, user.password)
    login = Login(user.user_id, access_token=token)
    async with Homeserver(
        short_tokens.base_url, login, state_dir=tmp_path / "st", sync_timeout_ms=500
    ) as hs:
        updates = hs.room_updates()
        await asyncio.sleep(TOKEN_LIFE_MS / 1000 + 0.5)
        with pytest.raises(SessionEnded) as info:
            await hs.request("GET", WHOAMI)
        assert info.value.soft_logout
        assert "soft logout" in str(info.value)
        assert "no refresh token" in str(info.value)
        # The sync loop stops with the same error instead of retrying for ever.

        async def drain() -> None:
            async with asyncio.timeout(10):
                async for _ in updates:
                    pass

        with pytest.raises((RemoteError, SessionEnded)):
            await drain()


async def test_token_is_renewed_before_it_expires(short_tokens: Synapse, tmp_path: Path) -> None:
    # The server says how long a refreshable token lives (expires_in_ms); the adapter renews
    # it a fifth of its life ahead, so the token it hands out (nio's own requests use it as
    # is, and cannot renew it) is never one the server refuses.
    user = await short_tokens.register("ahead")
    login = Login(user.user_id, password=user.password, refresh_tokens=True)
    async with (
        Homeserver(
            short_tokens.base_url, login, state_dir=tmp_path / "st", sync_timeout_ms=500
        ) as hs,
        aiohttp.ClientSession() as raw,
    ):
        # two and a half token lives
        assert await _refusals(raw, short_tokens.base_url, hs, seconds=5.0) == 0
        assert hs.tokens_refreshed_ahead >= 2
        assert hs.tokens_renewed == hs.tokens_refreshed_ahead  # none after a refusal


async def test_a_restored_session_renews_its_token_ahead_from_the_start(
    short_tokens: Synapse, tmp_path: Path
) -> None:
    # An agent restarted with its state directory while its token still works: it knows the
    # token's expiry at once (saved with the session) and renews it ahead; before, it learnt
    # the expiry only from its first refusal.
    user = await short_tokens.register("restored")
    login = Login(user.user_id, password=user.password, refresh_tokens=True)
    state = tmp_path / "st"
    async with Homeserver(short_tokens.base_url, login, state_dir=state) as first:
        device = first.device_id
    async with (
        Homeserver(short_tokens.base_url, login, state_dir=state, sync_timeout_ms=500) as hs,
        aiohttp.ClientSession() as raw,
    ):
        assert hs.device_id == device
        # two token lives
        assert await _refusals(raw, short_tokens.base_url, hs, seconds=4.0) == 0
        assert hs.tokens_refreshed_ahead >= 1
        assert hs.tokens_renewed == hs.tokens_refreshed_ahead  # none after a refusal


async def test_agents_stay_in_the_call_across_token_lives(
    short_tokens: Synapse, tmp_path: Path
) -> None:
    # Two agents in a call on a homeserver whose tokens live 2 s, for three lives: their
    # memberships, heartbeats (delayed-leave restarts, 3 s delay) and sync go on with tokens
    # renewed ahead of time; nobody is ever reported gone, nobody re-joins.
    a, b = await short_tokens.register("tok-a"), await short_tokens.register("tok-b")
    room = await short_tokens.create_call_room(a, invite=[b])
    cfg = AgentConfig(
        transports=(LivekitTransport(livekit_service_url="http://127.0.0.1:9/livekit/jwt"),),
        delayed_leave_ms=3_000,
    )

    def login(u: object) -> Login:
        return Login(u.user_id, password=u.password, refresh_tokens=True)  # type: ignore[attr-defined]

    async with (
        Homeserver(short_tokens.base_url, login(a), state_dir=tmp_path / "a") as ha,
        Homeserver(short_tokens.base_url, login(b), state_dir=tmp_path / "b") as hb,
        CallAgent(ha, room, cfg) as agent_a,
        CallAgent(hb, room, cfg) as agent_b,
    ):
        async with asyncio.timeout(15):
            while True:
                if len(agent_a.participants) == len(agent_b.participants) == 2:
                    break
                await asyncio.sleep(0.05)
        seen: list[ParticipantsChanged] = []
        with agent_a.changes() as ca, agent_b.changes() as cb:
            beats = (agent_a.heartbeats, agent_b.heartbeats)
            await asyncio.sleep(3 * TOKEN_LIFE_MS / 1000)
            for sub in (ca, cb):
                while (item := sub.get_nowait()) is not None:
                    seen.append(item)
        assert all(len(c.participants) == 2 for c in seen), "someone was reported as left"
        assert len(agent_a.participants) == len(agent_b.participants) == 2
        assert agent_a.rejoins == agent_b.rejoins == 0
        assert agent_a.heartbeats >= beats[0] + 2
        assert agent_b.heartbeats >= beats[1] + 2
        for hs in (ha, hb):
            assert hs.tokens_refreshed_ahead >= 2
            assert hs.tokens_renewed == hs.tokens_refreshed_ahead  # none after a refusal
