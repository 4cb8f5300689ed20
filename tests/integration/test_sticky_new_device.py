"""Sticky memberships in an encrypted room reach devices that appear after they were sent.

The race this pins down (issue 12): two ``matrixrtc join`` processes started moments apart in
the sticky dialect; about one run in three the second never listed the first. Cause: the
sticky membership is a Megolm-encrypted room event, and the first member encrypted it before
the second's device existed (each ``join`` logs in a new device). Synapse delivers the event
to the newcomer (timeline or sticky section, measured), but the newcomer was never sent the
room key, and nio never shares an already-shared session with a later device. So the
newcomer held an undecryptable event and never listed the first member; in a plain room
(nothing to decrypt) the same timings always worked.

The fix, asserted here: a member whose membership a newer device cannot read re-sends it
once, under a new Megolm session shared with that device (``agent.membership_resent``); and
a held sticky event that could not be decrypted is tried again on every sync.

The deterministic case (the newcomer logs in only after the first membership was sent)
failed every time without the fix; the tight-timing cases cover the orders in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from matrixrtc.agent import AgentConfig, CallAgent
from matrixrtc.devstack import Synapse, UserCreds
from matrixrtc.matrix import Homeserver, Login
from matrixrtc.model import Dialect
from matrixrtc.model.transports import LivekitTransport

pytestmark = pytest.mark.integration

FOCUS = "http://127.0.0.1:9/livekit/jwt"  # advertised only
SEE_WITHIN_S = 10.0


@contextlib.asynccontextmanager
async def _member(synapse: Synapse, creds: UserCreds, room: str) -> AsyncIterator[CallAgent]:
    """A fresh device (new login) joining the call in the sticky dialect."""
    async with (
        Homeserver(synapse.base_url, Login(creds.user_id, password=creds.password)) as hs,
        CallAgent(
            hs,
            room,
            AgentConfig(
                dialect=Dialect.STICKY, transports=(LivekitTransport(livekit_service_url=FOCUS),)
            ),
        ) as agent,
    ):
        yield agent


def _sees(agent: CallAgent, user_id: str) -> bool:
    return any(p.user_id == user_id and not p.is_self for p in agent.participants)


async def _until_both_see(a: CallAgent, b: CallAgent) -> float:
    started = time.monotonic()
    deadline = started + SEE_WITHIN_S
    while not (_sees(a, b.hs.user_id) and _sees(b, a.hs.user_id)):
        if time.monotonic() > deadline:
            raise AssertionError(
                f"after {SEE_WITHIN_S} s: first sees second {_sees(a, b.hs.user_id)}, "
                f"second sees first {_sees(b, a.hs.user_id)}"
            )
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_a_device_created_after_the_membership_was_sent_lists_it(
    synapse: Synapse, user_factory: Any
) -> None:
    ann, bob = await user_factory("nd-a"), await user_factory("nd-b")
    room = await synapse.create_call_room(ann, invite=[bob], encrypted=True)
    async with _member(synapse, ann, room) as a:
        await a.wait_joined(10)
        # Bob's device does not exist yet: ann's membership went out without his room key.
        async with _member(synapse, bob, room) as b:
            await b.wait_joined(10)
            took = await _until_both_see(a, b)
            print(f"new device lists the earlier sticky member after {took:.2f} s")
            # Bob's device appeared after ann's send and got a new session with the re-send.
            assert a.machine.membership_event_id is not None
            assert not a.hs.devices_without_room_key(room, a.machine.membership_event_id)


@pytest.mark.parametrize("gap_s", [0.0, 0.05, 0.2, 0.5])
async def test_two_members_started_moments_apart_list_each_other(
    synapse: Synapse, user_factory: Any, gap_s: float
) -> None:
    ann, bob = await user_factory("gap-a"), await user_factory("gap-b")
    room = await synapse.create_call_room(ann, invite=[bob], encrypted=True)
    async with contextlib.AsyncExitStack() as stack:

        async def second() -> CallAgent:
            await asyncio.sleep(gap_s)
            return await stack.enter_async_context(_member(synapse, bob, room))

        first = asyncio.create_task(stack.enter_async_context(_member(synapse, ann, room)))
        try:
            b = await second()
        finally:
            a = await first
        took = await _until_both_see(a, b)
        print(f"gap {gap_s} s: both listed after {took:.2f} s")
