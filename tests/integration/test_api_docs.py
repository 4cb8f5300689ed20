"""docs/api.md's bot, run as it stands against a real Synapse: it joins a call where Alice
already is, prints both members (itself marked), and leaves (its membership is gone from the
room). ``test_packaging.py`` runs the same block against the installed wheel."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import pytest

from matrixrtc import Call, CallOptions
from matrixrtc.devstack import Synapse, UserCreds
from tests.conftest import UserFactory

pytestmark = pytest.mark.integration

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
CALL_MEMBER = "org.matrix.msc3401.call.member"


def bot_source() -> str:
    """The first ```python block of docs/api.md: the bot."""
    match = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert match is not None, "docs/api.md has no python block"
    return match.group(1)


async def run_bot(
    python: str, script: Path, synapse: Synapse, bot: UserCreds, room: str, cwd: Path
) -> tuple[int, str, str]:
    env = {
        **os.environ,
        "MATRIXRTC_HOMESERVER": synapse.base_url,
        "MATRIXRTC_USER": bot.user_id,
        "MATRIXRTC_PASSWORD": bot.password,
        "MATRIXRTC_ROOM": room,
    }
    proc = await asyncio.create_subprocess_exec(
        python,
        str(script),
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def check_bot_in_call(
    python: str, tmp_path: Path, synapse: Synapse, user_factory: UserFactory, cwd: Path
) -> None:
    alice, bot = await user_factory("alice"), await user_factory("bot")
    room = await synapse.create_call_room(alice, invite=[bot], encrypted=True)
    script = tmp_path / "bot.py"
    script.write_text(bot_source())
    async with Call(
        room,
        homeserver=synapse.base_url,
        user=alice.user_id,
        password=alice.password,
        options=CallOptions(mesh_host_addresses=("127.0.0.1",), turn_from_homeserver=False),
    ) as call:
        events = call.events()
        code, out, err = await run_bot(python, script, synapse, bot, room, cwd)
        assert code == 0, err[-3000:]
        lines = out.splitlines()
        assert lines[-1] == "left", out
        printed = {line.split()[0]: line for line in lines[:-1]}
        assert set(printed) == {alice.user_id, bot.user_id}, out
        assert printed[bot.user_id].endswith("(me)"), out
        assert not printed[alice.user_id].endswith("(me)"), out
        # The bot left: its membership is gone, and Alice sees only herself.
        async with asyncio.timeout(10):
            while len(call.participants) != 1:
                await events.get()
        bot_device = printed[bot.user_id].split()[1]
        key = f"_{bot.user_id}_{bot_device}_m.call"
        assert await call.client.get_state_event(room, CALL_MEMBER, key) == {}


async def test_the_api_doc_bot_joins_prints_who_is_there_and_leaves(
    tmp_path: Path, synapse: Synapse, user_factory: UserFactory
) -> None:
    repo = DOC.parents[1]
    await check_bot_in_call(sys.executable, tmp_path, synapse, user_factory, repo)
