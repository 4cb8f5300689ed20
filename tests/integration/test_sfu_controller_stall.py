"""Honest members through a homeserver stall and a homeserver restart are never removed: the
short form (about 45 s) of the 10-minute soak (`make soak-controller`, bench/controller.py).
Without the controller's burst patience it fails (the slow member below is removed; seen
with MATRIXRTC_SFU_CONTROLLER_BURST_COUNT=0).

A private stack (this test freezes and restarts its Synapse, which the session's other tests
share otherwise): Synapse, LiveKit, Redis and the service with the controller inside (its
/sync account joined to the call room, interval 1 s, grace 1 s, default burst settings).
Four members with state-form memberships and a 3 s delayed leave share one call; they
heartbeat and publish again when their membership is gone (by stream order or by the room's
resolved current state), one of them only 6 s after noticing (a slow client).

1. Synapse is frozen (SIGSTOP) for 5 s: not down, so the controller sees no outage; when it
   thaws, every delayed leave is overdue and fires at once. Without the burst patience the
   slow member's ended membership would be removed after the 1 s grace.
2. Synapse is stopped for 4 s and started again: the leaves fire at start-up.

No member may be removed at any time; each is still in LiveKit and holds an active
membership in the room's current state at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
from pathlib import Path
from urllib.parse import quote

from matrixrtc.devstack import LiveKit, Redis, Synapse
from matrixrtc.devstack._process import free_tcp_port
from tests.integration.test_sfu_controller import (
    CALL_MEMBER,
    STATUS_TOKEN,
    Member,
    Sfu,
    Stack,
    call_room,
    controller_env,
    join_call,
    present,
    time_until,
)


async def test_honest_members_are_kept_through_a_synapse_stall_and_restart(run_dir: Path) -> None:
    base = run_dir / f"stall-{secrets.token_hex(2)}"
    base.mkdir(parents=True)
    async with (
        Synapse(base, name="synapse-stall") as hs,
        LiveKit(base, name="livekit-stall") as lk,
        Redis(base, name="redis-stall") as redis,
    ):
        watcher = await hs.register("stallwatcher")
        port = free_tcp_port()
        env = controller_env(lk, hs, redis, watcher, port)
        sfu = await Sfu.serve(base, "sfu-stall", port, env)
        proc = sfu.proc
        members: list[Member] = []
        try:
            st = Stack(hs, lk, redis, sfu, watcher, base, watcher=watcher)
            owner = await hs.register("stallowner")
            room = await call_room(st, owner)
            members.extend(
                await asyncio.gather(
                    *(
                        join_call(st, owner, room, honest=True, lag_ms=6000 if i == 0 else 0)
                        for i in range(4)
                    )
                )
            )
            ids = {m.identity for m in members}

            async def all_ok() -> bool:
                status, snap = await sfu.get("/status", STATUS_TOKEN)
                rows = [
                    p
                    for r in (snap.get("rooms") or [] if status == 200 else [])
                    for p in r["participants"]
                    if p["identity"] in ids
                ]
                return len(rows) == len(ids) and all(p["matrix_state"] == "ok" for p in rows)

            assert await time_until(all_ok, 30) is not None, "the controller never saw them ok"

            async def nobody_removed(seconds: float) -> None:
                """Every member stays in LiveKit for ``seconds`` (checked twice a second)."""
                loop = asyncio.get_running_loop()
                end = loop.time() + seconds
                while loop.time() < end:
                    missing = ids - await present(lk, members[0].lk_room)
                    assert not missing, (missing, sfu.audit())
                    await asyncio.sleep(0.5)

            assert hs.pid is not None
            os.kill(hs.pid, signal.SIGSTOP)  # a stall: not down, just not answering
            try:
                await asyncio.sleep(5)  # the members' 3 s delayed leaves are overdue
            finally:
                os.kill(hs.pid, signal.SIGCONT)
            await nobody_removed(10)  # the slow member publishes again 6 s after noticing
            await hs.stop()
            await asyncio.sleep(4)
            await hs.start()
            await nobody_removed(10)

            assert not [a for a in sfu.audit() if a.get("identity") in ids], sfu.audit()
            for m in members:  # each membership active in the resolved current state
                key = f"_{m.user.user_id}_{m.user.device_id}_m.call"
                content = await hs.request(
                    "GET",
                    f"/_matrix/client/v3/rooms/{quote(m.room_id, safe='')}/state/"
                    f"{quote(CALL_MEMBER, safe='')}/{quote(key, safe='')}",
                    user=m.user,
                )
                assert content.get("device_id") == m.user.device_id, (m.identity, content)
        finally:
            await asyncio.gather(*(m.stop() for m in members))
            with contextlib.suppress(Exception):
                await proc.stop()
