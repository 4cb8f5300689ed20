"""LiveKit restarted under a running SFU call: media resumes, and Matrix never sees a leave.

The Matrix membership (CallAgent) and the media transport are separate on purpose: losing the
SFU must not look like leaving the call. Two in-process members in an encrypted room with
``mesh_max`` 1 (so the call runs on the SFU), their own LiveKit and authorization service (the
session's LiveKit is shared by other tests and must not be restarted).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from matrixrtc.agent import CallAgent, ParticipantsChanged
from matrixrtc.devstack import LiveKit, Synapse, UserCreds
from matrixrtc.session.media_policy import MediaKind
from tests.integration.test_livekit_transport import Service, service
from tests.integration.test_switching import flowing, join, settled

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def own_livekit(run_dir: Path) -> AsyncIterator[LiveKit]:
    async with LiveKit(run_dir, name="livekit-restart") as lk:
        yield lk


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def own_sfu(synapse: Synapse, own_livekit: LiveKit, run_dir: Path) -> AsyncIterator[Service]:
    svc = service(run_dir, "lk-sfu-restart", own_livekit, synapse, synapse.server_name)
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()


async def _record(agent: CallAgent, into: list[ParticipantsChanged]) -> None:
    async for change in agent.changes():
        into.append(change)


async def test_livekit_restart_resumes_media_and_nobody_leaves_in_matrix(
    synapse: Synapse,
    own_livekit: LiveKit,
    own_sfu: Service,
    user_factory: Callable[..., Awaitable[UserCreds]],
) -> None:
    users = [await user_factory(n) for n in ("lra", "lrb")]
    room_id = await synapse.create_call_room(users[0], invite=users[1:], encrypted=True)
    members = list(
        await asyncio.gather(
            *(
                join(synapse, u, room_id, own_sfu.url, n, mesh_max=1)
                for u, n in zip(users, "ab", strict=True)
            )
        )
    )
    recorders: list[asyncio.Task[None]] = []
    try:
        await settled(members, MediaKind.SFU)
        await flowing(members, MediaKind.SFU)
        before = [tuple(p.user_id for p in m.agent.participants) for m in members]
        assert all(len(ids) == 2 for ids in before), before

        changes: list[list[ParticipantsChanged]] = [[] for _ in members]
        recorders = [
            asyncio.create_task(_record(m.agent, c)) for m, c in zip(members, changes, strict=True)
        ]
        t_restart = time.monotonic()
        await own_livekit.restart()
        # New connections (fresh tokens; the service re-creates the room) and decrypted frames.
        await flowing(members, MediaKind.SFU, extra=30)
        resumed = time.monotonic() - t_restart
        print(f"\nmedia resumed {resumed:.1f} s after the LiveKit restart began")

        after = [tuple(p.user_id for p in m.agent.participants) for m in members]
        assert after == before
        for seen in changes:
            assert all(not c.left for c in seen), [c.left for c in seen]
        assert all(m.switcher.running(MediaKind.MESH) is None for m in members)  # still on the SFU
    finally:
        for t in recorders:
            t.cancel()
        await asyncio.gather(*recorders, return_exceptions=True)
        await asyncio.gather(*(m.stack.aclose() for m in members), return_exceptions=True)
