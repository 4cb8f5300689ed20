"""CallAgent against a real Synapse: agents in separate processes (the ``join`` CLI) and in
process, both membership dialects, delayed-leave liveness, a homeserver restart, forged
overwrites, ring and decline."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from structlog.testing import capture_logs

from matrixrtc.agent import AgentConfig, CallAgent, ParticipantsChanged, RingState
from matrixrtc.devstack import Synapse, UserCreds
from matrixrtc.matrix import Homeserver, Login, RoomUpdate
from matrixrtc.model import Dialect, LivekitTransport
from matrixrtc.session.membership_machine import MembershipStatus, SendDelayedLeaveNow, SendJoin

pytestmark = pytest.mark.integration

CALL_MEMBER = "org.matrix.msc3401.call.member"
FOCUS = "http://127.0.0.1:9/livekit/jwt"  # advertised only, never contacted
DELAY_MS = 3_000  # short delayed leave: same semantics, shorter tests

Snapshot = list[dict[str, Any]]


class AgentProcess:
    """``python -m matrixrtc join --output json`` in its own process."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self.user_id = ""
        self.device_id = ""
        self.history: list[tuple[float, Snapshot]] = []
        self.left = False
        self._changed = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(
        cls,
        hs: Synapse,
        user: UserCreds,
        room_id: str,
        state_dir: Path,
        log_path: Path,
        *extra: str,
    ) -> AgentProcess:
        env = {**os.environ, "MATRIXRTC_PASSWORD": user.password}
        env.pop("MATRIXRTC_ACCESS_TOKEN", None)
        with log_path.open("ab") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "matrixrtc",
                "--log-level",
                "warning",
                "join",
                "--homeserver",
                hs.base_url,
                "--user",
                user.user_id,
                "--room",
                room_id,
                "--state-dir",
                str(state_dir),
                "--livekit-service-url",
                FOCUS,
                "--delayed-leave-ms",
                str(DELAY_MS),
                "--output",
                "json",
                *extra,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                env=env,
            )
        return cls(proc, user.user_id)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            async with self._changed:
                if obj.get("event") == "ready":
                    self.user_id, self.device_id = obj["user_id"], obj["device_id"]
                elif obj.get("event") == "participants":
                    # The agent's own clock reading (Linux CLOCK_MONOTONIC is shared by all
                    # processes), so our read delays under load do not count.
                    seen_at = float(obj.get("monotonic", time.monotonic()))
                    self.history.append((seen_at, obj["participants"]))
                elif obj.get("event") == "left":
                    self.left = True
                self._changed.notify_all()

    @property
    def current(self) -> Snapshot:
        return self.history[-1][1] if self.history else []

    def members(self) -> set[tuple[str, str]]:
        return {(p["user_id"], p["device_id"]) for p in self.current}

    async def wait(self, pred: Callable[[AgentProcess], bool], within: float) -> float:
        """Until ``pred(self)`` holds; returns the monotonic time it first held."""

        async def _wait() -> float:
            async with self._changed:
                await self._changed.wait_for(lambda: pred(self))
            return self.history[-1][0] if self.history else time.monotonic()

        return await asyncio.wait_for(_wait(), within)

    async def stop(self, sig: int = signal.SIGINT, within: float = 10.0) -> int:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), within)
        await self._reader
        return code


@pytest_asyncio.fixture(loop_scope="session")
async def procs() -> AsyncIterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for p in started:
        if p.proc.returncode is None:
            await p.stop(signal.SIGKILL)


async def _start_all(
    synapse: Synapse, users: list[UserCreds], room: str, run_dir: Path, tag: str
) -> list[AgentProcess]:
    return list(
        await asyncio.gather(
            *(
                AgentProcess.start(
                    synapse,
                    u,
                    room,
                    run_dir / f"{tag}-{i}",
                    run_dir / f"{tag}-{i}.log",
                )
                for i, u in enumerate(users)
            )
        )
    )


def _first_seen(p: AgentProcess, who: tuple[str, str]) -> float | None:
    for t, snap in p.history:
        if who in {(x["user_id"], x["device_id"]) for x in snap}:
            return t
    return None


async def test_three_agent_processes_converge_agree_and_see_a_clean_leave(
    synapse: Synapse, user_factory: Any, run_dir: Path, procs: list[AgentProcess]
) -> None:
    users = [await user_factory(n) for n in ("ann", "ben", "cat")]
    room = await synapse.create_call_room(users[0], invite=users[1:])
    procs += await _start_all(synapse, users, room, run_dir, "converge")
    for p in procs:
        await p.wait(lambda p: len(p.members()) == 3, within=30.0)
    everyone = {(p.user_id, p.device_id) for p in procs}
    # Each agent's own join (when it first saw itself) reached the other two within 2 s.
    for joiner in procs:
        me = (joiner.user_id, joiner.device_id)
        t_self = _first_seen(joiner, me)
        assert t_self is not None
        for other in procs:
            if other is not joiner:
                t_other = _first_seen(other, me)
                assert t_other is not None
                assert t_other - t_self < 2.0, f"{other.name} saw {joiner.name} late"
    # They agree on the order, hence on the oldest member, and on every member's transport.
    views = [[(x["user_id"], x["device_id"], x["created_ts"]) for x in p.current] for p in procs]
    assert all(v == views[0] for v in views)
    assert {(u, d) for u, d, _ in views[0]} == everyone
    transports = [[x["transport"] for x in p.current] for p in procs]
    assert all(t == transports[0] for t in transports)
    assert transports[0][0] == {
        "type": "livekit",
        "livekit_service_url": FOCUS,
        "livekit_alias": room,
    }

    leaver, stayers = procs[2], procs[:2]
    gone = (leaver.user_id, leaver.device_id)
    t0 = time.monotonic()
    assert await leaver.stop(signal.SIGINT) == 0
    assert leaver.left
    for p in stayers:
        t = await p.wait(lambda p: gone not in p.members(), within=5.0)
        assert t - t0 < 2.0, f"{p.name} saw the clean leave after {t - t0:.2f} s"
        assert len(p.members()) == 2


async def test_sigkilled_agent_is_seen_leaving_by_its_delayed_event(
    synapse: Synapse, user_factory: Any, run_dir: Path, procs: list[AgentProcess]
) -> None:
    users = [await user_factory(n) for n in ("dan", "eve")]
    room = await synapse.create_call_room(users[0], invite=users[1:])
    procs += await _start_all(synapse, users, room, run_dir, "kill")
    for p in procs:
        await p.wait(lambda p: len(p.members()) == 2, within=30.0)
    victim, watcher = procs
    gone = (victim.user_id, victim.device_id)
    t0 = time.monotonic()
    await victim.stop(signal.SIGKILL)
    t = await watcher.wait(lambda p: gone not in p.members(), within=DELAY_MS / 1000 + 6)
    assert t - t0 < DELAY_MS / 1000 + 3.0
    assert not victim.left  # it never got to leave by itself
    # The homeserver sent the scheduled leave: the state content is now {}.
    async with Homeserver(
        synapse.base_url, Login(users[1].user_id, password=users[1].password)
    ) as hs:
        key = f"_{victim.user_id}_{victim.device_id}_m.call"
        assert await hs.get_state_event(room, CALL_MEMBER, key) == {}


async def test_join_cli_leaves_and_exits_when_its_ring_goes_unanswered(
    synapse: Synapse, user_factory: Any, run_dir: Path, procs: list[AgentProcess]
) -> None:
    a, b = await user_factory("zed"), await user_factory("abe")
    room = await synapse.create_call_room(a, invite=[b])
    caller = await AgentProcess.start(
        synapse,
        a,
        room,
        run_dir / "ring-cli",
        run_dir / "ring-cli.log",
        "--ring",
        "--leave-when-unanswered",
        "--ring-lifetime-ms",
        "1500",
    )
    procs.append(caller)
    await caller.wait(lambda p: len(p.members()) == 1, within=30.0)  # it started the call
    await caller.wait(lambda p: p.left, within=15.0)  # nobody joined: it left by itself
    assert await asyncio.wait_for(caller.proc.wait(), 10.0) == 0
    async with Homeserver(synapse.base_url, Login(b.user_id, password=b.password)) as hb:
        key = f"_{caller.user_id}_{caller.device_id}_m.call"
        assert await hb.get_state_event(room, CALL_MEMBER, key) == {}


# -------------------------------------------------------------------------- in process


def _config(**kw: Any) -> AgentConfig:
    kw.setdefault("transports", (LivekitTransport(livekit_service_url=FOCUS),))
    kw.setdefault("delayed_leave_ms", DELAY_MS)
    return AgentConfig(**kw)


async def _until(pred: Callable[[], bool], within: float, what: str) -> None:
    """Poll ``pred`` (state held by another task) until it holds, or fail saying ``what``."""
    deadline = time.monotonic() + within
    while True:
        if pred():
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def _wait_members(agent: CallAgent, n: int, within: float = 10.0) -> None:
    await _until(lambda: len(agent.participants) == n, within, f"{n} participants")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def own_synapse(run_dir: Path) -> AsyncIterator[Synapse]:
    """A homeserver this module may restart without disturbing other tests."""
    async with Synapse(run_dir, name="synapse-agent") as hs:
        yield hs


def _reconnected(hs: Homeserver, failures_before: int) -> Callable[[], bool]:
    return lambda: hs.connected and hs.sync_failures > failures_before


def _beating(agent: CallAgent, beats_before: int) -> Callable[[], bool]:
    return lambda: agent.heartbeats > beats_before + 1


async def test_homeserver_restart_mid_call(own_synapse: Synapse, run_dir: Path) -> None:
    hs_ = own_synapse
    a, b = await hs_.register("fay"), await hs_.register("gus")
    room = await hs_.create_call_room(a, invite=[b])
    cfg = _config(delayed_leave_ms=8_000)  # js-sdk's default: outlasts a Synapse restart
    async with (
        Homeserver(hs_.base_url, Login(a.user_id, password=a.password)) as ha,
        Homeserver(hs_.base_url, Login(b.user_id, password=b.password)) as hb,
        CallAgent(ha, room, cfg) as agent_a,
        CallAgent(hb, room, cfg) as agent_b,
    ):
        await _wait_members(agent_a, 2)
        await _wait_members(agent_b, 2)
        seen: list[ParticipantsChanged] = []
        with agent_a.changes() as ca, agent_b.changes() as cb:
            beats = (agent_a.heartbeats, agent_b.heartbeats)
            failures = (ha.sync_failures, hb.sync_failures)
            await hs_.restart()
            # Both sync loops reconnect and both heartbeats resume.
            for hs, agent, before, failed in (
                (ha, agent_a, beats[0], failures[0]),
                (hb, agent_b, beats[1], failures[1]),
            ):
                await _until(_reconnected(hs, failed), 15.0, "the sync loop to reconnect")
                await _until(_beating(agent, before), 12.0, "the heartbeat to resume")
            # Past the point where a lost heartbeat would have fired the delayed leave.
            await asyncio.sleep(1.0)
            for sub in (ca, cb):
                while (item := sub.get_nowait()) is not None:
                    seen.append(item)
        assert all(len(c.participants) == 2 for c in seen), "someone was reported as left"
        assert len(agent_a.participants) == len(agent_b.participants) == 2
        assert agent_a.rejoins == agent_b.rejoins == 0
        # No duplicate membership: one non-empty call.member state event per device.
        state = await ha.fetch_room_state(room)
        active = [e for e in state if e["type"] == CALL_MEMBER and e["content"]]
        assert sorted(e["state_key"] for e in active) == sorted(
            f"_{h.user_id}_{h.device_id}_m.call" for h in (ha, hb)
        )


async def test_forged_overwrite_is_ignored_and_the_owner_reasserts(
    synapse: Synapse, user_factory: Any
) -> None:
    a, b, m = [await user_factory(n) for n in ("hal", "ida", "mallory")]
    room = await synapse.create_call_room(a, invite=[b, m])
    async with (
        Homeserver(synapse.base_url, Login(a.user_id, password=a.password)) as ha,
        Homeserver(synapse.base_url, Login(b.user_id, password=b.password)) as hb,
        Homeserver(synapse.base_url, Login(m.user_id, password=m.password)) as hm,
        CallAgent(ha, room, _config()) as agent_a,
        CallAgent(hb, room, _config()) as agent_b,
    ):
        await _wait_members(agent_a, 2)
        await _wait_members(agent_b, 2)
        key = agent_a.membership_state_key
        assert key is not None
        original = await hb.get_state_event(room, CALL_MEMBER, key)
        assert original is not None
        created = next(p.created_ts for p in agent_b.participants if p.user_id == ha.user_id)
        # Mallory writes a membership claiming hal's device at hal's key (Synapse allows it).
        forged = {
            **original,
            "foci_preferred": [{"type": "livekit", "livekit_service_url": "https://evil.example"}],
        }
        with agent_b.changes() as changes:
            await hm.put_state(room, CALL_MEMBER, key, forged)

            # The owner notices and writes its own membership back, with its created_ts.
            async def reasserted() -> dict[str, Any]:
                while True:
                    ev = ha.room_state(room).get((CALL_MEMBER, key))
                    if ev is not None and ev["sender"] == ha.user_id and agent_a.rejoins >= 1:
                        return ev
                    await asyncio.sleep(0.05)

            ev = await asyncio.wait_for(reasserted(), 10.0)
            assert ev["content"]["device_id"] == ha.device_id
            assert ev["content"]["foci_preferred"] == original["foci_preferred"]
            await _until(
                lambda: {p.user_id for p in agent_b.participants} == {ha.user_id, hb.user_id},
                5.0,
                "ida to list hal again",
            )
            views: list[ParticipantsChanged] = []
            while (item := changes.get_nowait()) is not None:
                views.append(item)
        # No receiver ever listed the forged membership.
        for view in views:
            for p in view.participants:
                assert p.transport is None or "evil" not in json.dumps(p.transport.to_json())
        # js-sdk re-joins as a new membership (no created_ts carried), so hal now sorts last.
        assert [p.user_id for p in agent_b.participants] == [hb.user_id, ha.user_id]
        assert next(p for p in agent_b.participants if p.user_id == ha.user_id).created_ts > created


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
async def test_sticky_member_and_state_member_see_each_other(
    synapse: Synapse, user_factory: Any, encrypted: bool
) -> None:
    # In an encrypted room the sticky join is a Megolm-encrypted room event (the delayed
    # leave is not: the server sends it); the state member must decrypt it to see the join.
    a, b = await user_factory("jay"), await user_factory("kim")
    room = await synapse.create_call_room(a, invite=[b], encrypted=encrypted)
    async with (
        Homeserver(synapse.base_url, Login(a.user_id, password=a.password)) as ha,
        Homeserver(synapse.base_url, Login(b.user_id, password=b.password)) as hb,
        CallAgent(ha, room, _config(dialect=Dialect.STICKY, intent="audio")) as sticky,
        CallAgent(hb, room, _config(dialect=Dialect.STATE, intent="video")) as state,
    ):
        await _wait_members(sticky, 2)
        await _wait_members(state, 2)
        for agent in (sticky, state):
            forms = {(p.user_id, p.dialect) for p in agent.participants}
            assert forms == {(ha.user_id, Dialect.STICKY), (hb.user_id, Dialect.STATE)}
            assert [p.event_id for p in agent.participants] == [
                p.event_id for p in state.participants
            ]
        # The sticky member's LiveKit identity is the hash form, the state member's the legacy one.
        ids = {p.user_id: p.rtc_backend_identity for p in state.participants}
        assert ids[hb.user_id] == f"{hb.user_id}:{hb.device_id}"
        assert not ids[ha.user_id].startswith("@")
        # Each agent's own identity is the one the others derive from its membership.
        assert sticky.rtc_backend_identity == ids[ha.user_id]
        assert state.rtc_backend_identity == ids[hb.user_id]
        await sticky.leave()
        await _wait_members(state, 1, within=5.0)


async def _notifications_until(updates: Any, marker: str) -> list[dict[str, Any]]:
    """The ring notifications in the room timeline up to the event ``marker``."""
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(10):
        while True:
            u: RoomUpdate = await updates.get()
            for ev in u.timeline:
                if ev.get("event_id") == marker:
                    return seen
                if ev.get("type") == "org.matrix.msc4075.rtc.notification":
                    seen.append(ev)


def _ring(agent: CallAgent) -> RingState:
    return agent.ring_state  # read through a call: mypy would keep the earlier narrowing


async def test_ring_when_starting_a_call_and_decline_ends_it(
    synapse: Synapse, user_factory: Any
) -> None:
    a, b = await user_factory("lee"), await user_factory("max")
    room = await synapse.create_call_room(a, invite=[b])
    async with (
        Homeserver(synapse.base_url, Login(a.user_id, password=a.password)) as ha,
        Homeserver(synapse.base_url, Login(b.user_id, password=b.password)) as hb,
    ):
        with hb.room_updates() as updates:
            async with CallAgent(ha, room, _config(ring=True, intent="video")) as caller:
                await caller.wait_joined()

                async def notification() -> dict[str, Any]:
                    while True:
                        u: RoomUpdate = await updates.get()
                        for ev in u.timeline:
                            if ev["type"] == "org.matrix.msc4075.rtc.notification":
                                return ev

                ev = await asyncio.wait_for(notification(), 5.0)
                own = next(p for p in caller.participants if p.is_self)
                content = ev["content"]
                assert ev["sender"] == ha.user_id
                assert content["notification_type"] == "ring"
                assert content["m.relates_to"] == {
                    "event_id": own.event_id,
                    "rel_type": "m.reference",
                }
                # The room, and the rung users by name (js-sdk 43 receivers refuse a room
                # mention from a sender without the room-notification power level).
                assert content["m.mentions"] == {"user_ids": [hb.user_id], "room": True}
                assert content["slot_id"] == content["msc4354_sticky_key"] == "m.call#ROOM"
                assert content["lifetime"] == 30_000
                assert isinstance(content["sender_ts"], int)
                assert content["m.call.intent"] == "video"
                assert caller.ring_state is RingState.RINGING

                # A second ringing agent joining a call that already has members sends nothing:
                # its decision is made when it sees its own membership, so once the caller has
                # seen it too, a ring would be in the room before a marker the caller sends now.
                async with CallAgent(hb, room, _config(ring=True)) as second:
                    await second.wait_joined()
                    await _wait_members(caller, 2)
                    marker = await ha.send_event(
                        room, "m.room.message", {"msgtype": "m.text", "body": "."}
                    )
                    notes = await _notifications_until(updates, marker)
                    assert [n for n in notes if n["sender"] == hb.user_id] == []
                    assert second.ring_state is RingState.IDLE
                    assert second.notification_event_id is None
                assert _ring(caller) is RingState.ANSWERED

        # A fresh call: the rung user declines, and the caller stops ringing.
        async with CallAgent(ha, room, _config(ring=True, restart_interval_ms=1_000)) as caller:
            await caller.wait_joined()
            await _until(lambda: caller.notification_event_id is not None, 5.0, "the ring")
            assert caller.notification_event_id is not None
            await hb.send_event(
                room,
                "org.matrix.msc4310.rtc.decline",
                {
                    "m.relates_to": {
                        "rel_type": "m.reference",
                        "event_id": caller.notification_event_id,
                    }
                },
            )
            assert await caller.wait_ring_ended(timeout_s=5.0) is RingState.DECLINED
            # By default the caller stays in the call it started: its membership keeps being
            # refreshed after the decline (a leave would stop the heartbeat).
            beats = caller.heartbeats
            await _until(lambda: caller.heartbeats > beats, 5.0, "a heartbeat after the decline")
            assert caller.in_call
            assert _status(caller) is MembershipStatus.CONNECTED


async def test_a_group_ring_ends_only_when_every_rung_user_declined(
    synapse: Synapse, user_factory: Any
) -> None:
    a, b, c = [await user_factory(n) for n in ("wes", "xia", "yul")]
    room = await synapse.create_call_room(a, invite=[b, c])
    async with (
        Homeserver(synapse.base_url, Login(a.user_id, password=a.password)) as ha,
        Homeserver(synapse.base_url, Login(b.user_id, password=b.password)) as hb,
        Homeserver(synapse.base_url, Login(c.user_id, password=c.password)) as hc,
        CallAgent(ha, room, _config(ring=True)) as caller,
    ):
        await caller.wait_joined()
        await _until(lambda: caller.notification_event_id is not None, 5.0, "the ring")
        relation = {"rel_type": "m.reference", "event_id": caller.notification_event_id}
        with capture_logs() as logs:
            await hb.send_event(room, "org.matrix.msc4310.rtc.decline", {"m.relates_to": relation})
            # The caller has handled xia's decline: one of two rung users declined.
            await _until(
                lambda: any(
                    e["event"] == "ring.declined" and e.get("by") == hb.user_id for e in logs
                ),
                10.0,
                "the caller to handle the first decline",
            )
        assert caller.ring_state is RingState.RINGING
        await hc.send_event(room, "org.matrix.msc4310.rtc.decline", {"m.relates_to": relation})
        assert await caller.wait_ring_ended(timeout_s=5.0) is RingState.DECLINED


class _MovableClock:
    """Wall-clock milliseconds plus an offset the test moves forward."""

    offset_ms = 0

    def __call__(self) -> int:
        return int(time.time() * 1000) + self.offset_ms


async def test_caller_leaves_when_the_ring_is_declined_or_expires(
    synapse: Synapse, user_factory: Any
) -> None:
    a, b = await user_factory("uma"), await user_factory("vic")
    room = await synapse.create_call_room(a, invite=[b])
    async with (
        Homeserver(synapse.base_url, Login(a.user_id, password=a.password)) as ha,
        Homeserver(synapse.base_url, Login(b.user_id, password=b.password)) as hb,
    ):
        for ending in (RingState.DECLINED, RingState.EXPIRED):
            # The agent's clock is injected: the expiry case moves it past the ring's lifetime
            # instead of waiting for the lifetime to pass.
            clock = _MovableClock()
            cfg = _config(ring=True, leave_when_ring_unanswered=True, ring_lifetime_ms=30_000)
            async with CallAgent(ha, room, cfg, clock_ms=clock) as caller:
                await caller.wait_joined()
                await _until(lambda: caller.notification_event_id is not None, 5.0, "the ring")
                key = caller.membership_state_key
                assert key is not None
                assert await hb.get_state_event(room, CALL_MEMBER, key)  # in the call
                assert caller.ring_state is RingState.RINGING
                if ending is RingState.DECLINED:
                    relation = {"rel_type": "m.reference", "event_id": caller.notification_event_id}
                    await hb.send_event(
                        room, "org.matrix.msc4310.rtc.decline", {"m.relates_to": relation}
                    )
                else:
                    clock.offset_ms = 30_000
                    caller.clock_moved()
                assert await caller.wait_ring_ended(timeout_s=5.0) is ending
                await _until(lambda: not caller.in_call, 5.0, "the caller to leave")
                await _until(
                    lambda: _status(caller) is MembershipStatus.DISCONNECTED,
                    5.0,
                    "the leave to be sent",
                )
                assert await hb.get_state_event(room, CALL_MEMBER, key) == {}, ending


async def test_without_msc4140_or_msc4354_the_agent_still_joins(run_dir: Path) -> None:
    """A homeserver with neither delayed events nor sticky events: the agent joins in the
    state form (sticky was asked for) and without a delayed leave, and still leaves cleanly."""
    extra = {
        "max_event_delay_duration": None,
        "experimental_features": {"msc4354_enabled": False},
    }
    async with Synapse(run_dir, extra_config=extra, name="synapse-plain") as plain:
        a, b = await plain.register("nia"), await plain.register("oli")
        room = await plain.create_call_room(a, invite=[b])
        async with (
            Homeserver(plain.base_url, Login(a.user_id, password=a.password)) as ha,
            Homeserver(plain.base_url, Login(b.user_id, password=b.password)) as hb,
        ):
            assert not await ha.supports("org.matrix.msc4140")
            assert not await ha.supports("org.matrix.msc4354")
            async with CallAgent(hb, room, _config()) as watcher:
                async with CallAgent(ha, room, _config(dialect=Dialect.STICKY)) as agent:
                    await _wait_members(watcher, 2)
                    assert agent.config.dialect is Dialect.STATE
                    assert not agent.machine.delayed_events_in_use
                    mine = next(p for p in watcher.participants if p.user_id == ha.user_id)
                    assert mine.dialect is Dialect.STATE
                await _wait_members(watcher, 1, within=5.0)


# ------------------------------------------------------------------ long homeserver outages

# Gives up after one failed retry (the default budget is 10): an outage of a few seconds is
# then "longer than the budget" without making the test long.
_FRAGILE = {"network_retries": 1, "network_retry_ms": 200}
# The watcher outlasts the outage, and its own delayed leave does not fire meanwhile.
_STURDY = {"delayed_leave_ms": 30_000, "network_retries": 60}


@contextlib.asynccontextmanager
async def _watched_pair(
    hs_: Synapse, a: UserCreds, b: UserCreds, room: str, config_a: AgentConfig
) -> AsyncIterator[tuple[Homeserver, Homeserver, CallAgent, CallAgent]]:
    """a (the agent under test, ``config_a``) and b, a sturdy watcher, both in the call."""
    async with (
        Homeserver(hs_.base_url, Login(a.user_id, password=a.password)) as ha,
        Homeserver(hs_.base_url, Login(b.user_id, password=b.password)) as hb,
        CallAgent(ha, room, config_a) as agent_a,
        CallAgent(hb, room, _config(**_STURDY)) as agent_b,
    ):
        await _wait_members(agent_a, 2)
        await _wait_members(agent_b, 2)
        yield ha, hb, agent_a, agent_b


@contextlib.contextmanager
def _frozen(hs_: Synapse) -> Iterator[None]:
    """Synapse stopped (SIGSTOP) for the block: requests hang rather than fail."""
    assert hs_.pid is not None
    pid = hs_.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _status(agent: CallAgent) -> MembershipStatus:
    return agent.membership_status  # read through a call: mypy keeps no stale narrowing


async def _state_of(hs: Homeserver, room: str, key: str) -> dict[str, Any] | None:
    return next(
        (
            e
            for e in await hs.fetch_room_state(room)
            if e["type"] == CALL_MEMBER and e["state_key"] == key
        ),
        None,
    )


async def test_agent_rejoins_after_an_outage_longer_than_its_retry_budget(
    own_synapse: Synapse,
) -> None:
    hs_ = own_synapse
    a, b = await hs_.register("pia"), await hs_.register("quin")
    room = await hs_.create_call_room(a, invite=[b])
    fragile = _config(**_FRAGILE, rejoin_backoff_ms=250, rejoin_max_backoff_ms=1_000)
    async with _watched_pair(hs_, a, b, room, fragile) as (ha, hb, agent_a, agent_b):
        key = agent_a.membership_state_key
        assert key is not None
        before = await _state_of(ha, room, key)
        assert before is not None
        t0 = time.monotonic()
        with capture_logs() as logs:
            await hs_.stop()
            try:
                await _until(
                    lambda: _status(agent_a) is MembershipStatus.FAILED, 15.0, "a to give up"
                )
                assert agent_a.in_call  # gave up on the membership, not on the call
                # Stay down past a's delayed leave: Synapse sends it when it starts again.
                await asyncio.sleep(max(0.0, DELAY_MS / 1000 + 0.5 - (time.monotonic() - t0)))
            finally:
                await hs_.start()
            # a joins again by itself once the homeserver answers, and keeps its heartbeat going.
            await _until(lambda: agent_a.recoveries >= 1, 20.0, "a to join again")
        # A failure a re-join recovers from is a warning; error is for giving up.
        failed = [e for e in logs if e["event"] == "agent.membership_failed"]
        assert failed
        assert {(e["log_level"], e["will_rejoin"]) for e in failed} == {("warning", True)}
        await _until(
            lambda: _status(agent_a) is MembershipStatus.CONNECTED, 15.0, "a to be connected"
        )
        beats = agent_a.heartbeats
        await _until(_beating(agent_a, beats), 10.0, "a's heartbeat to resume")
        # Past a's delay again: had nothing restarted the new delayed leave, it would fire now.
        await asyncio.sleep(DELAY_MS / 1000 + 1.0)
        ha_ids = [p for p in agent_b.participants if p.user_id == ha.user_id]
        assert len(ha_ids) == 1, "b does not list a exactly once"
        assert [p.user_id for p in agent_a.participants].count(ha.user_id) == 1
        after = await _state_of(hb, room, key)
        assert after is not None
        assert after["content"], "a's membership is still the fired delayed leave"
        assert after["event_id"] != before["event_id"]
        # No duplicate membership: one non-empty call.member state event per device.
        state = await ha.fetch_room_state(room)
        active = [e for e in state if e["type"] == CALL_MEMBER and e["content"]]
        assert sorted(e["state_key"] for e in active) == sorted(
            f"_{h.user_id}_{h.device_id}_m.call" for h in (ha, hb)
        )
        assert agent_b.recoveries == 0


async def test_leave_after_the_membership_gave_up_still_takes_it_back(
    own_synapse: Synapse,
) -> None:
    hs_ = own_synapse
    a, b = await hs_.register("rue"), await hs_.register("sol")
    room = await hs_.create_call_room(a, invite=[b])
    # A long delayed leave (it must not be what removes a) and no re-join during the test.
    fragile = _config(
        **_FRAGILE, delayed_leave_ms=30_000, restart_interval_ms=1_000, rejoin_backoff_ms=60_000
    )
    async with _watched_pair(hs_, a, b, room, fragile) as (ha, hb, agent_a, agent_b):
        key = agent_a.membership_state_key
        assert key is not None
        await hs_.stop()
        try:
            await _until(lambda: _status(agent_a) is MembershipStatus.FAILED, 15.0, "a to give up")
        finally:
            await hs_.start()
        await _until(lambda: ha.connected, 15.0, "a's sync loop to reconnect")
        assert len(agent_b.participants) == 2  # a's membership is still in the room
        assert agent_a.in_call
        t0 = time.monotonic()
        await agent_a.leave()
        assert not agent_a.in_call
        assert _status(agent_a) is MembershipStatus.DISCONNECTED
        await _wait_members(agent_b, 1, within=5.0)
        assert time.monotonic() - t0 < 5.0
        assert await hb.get_state_event(room, CALL_MEMBER, key) == {}


async def test_leave_on_a_hung_homeserver_does_not_wait_for_the_request_in_flight(
    own_synapse: Synapse,
) -> None:
    """Chaos finding: with Synapse stopped (SIGSTOP), a leave waited for the state PUT in
    flight until its 20 s timeout, longer than the leave waits, so the leave never went out.
    Now the PUT is abandoned and the leave is on the wire at once; answered as soon as the
    homeserver runs again, and the abandoned PUT does not bring the membership back."""
    hs_ = own_synapse
    a, b = await hs_.register("tia"), await hs_.register("uma")
    room = await hs_.create_call_room(a, invite=[b])
    # a's delayed leave is long: within this test only a's leave can remove it.
    long_leave = _config(delayed_leave_ms=30_000, restart_interval_ms=1_000)
    async with _watched_pair(hs_, a, b, room, long_leave) as (_ha, hb, agent_a, agent_b):
        key = agent_a.membership_state_key
        assert key is not None
        with _frozen(hs_):
            # A state PUT on the wire (our membership re-sent) that gets no answer.
            agent_a.machine.resend(int(time.time() * 1000))
            await _until(
                lambda: isinstance(agent_a.machine.in_flight, SendJoin), 10.0, "a PUT in flight"
            )
            t0 = time.monotonic()
            leaving = asyncio.create_task(agent_a.leave(timeout_s=15.0))
            await _until(
                lambda: isinstance(agent_a.machine.in_flight, SendDelayedLeaveNow),
                2.0,
                "the leave to go out while the PUT hangs",
            )
            on_the_wire_s = time.monotonic() - t0
            await asyncio.sleep(1.0)
        await asyncio.wait_for(leaving, 15.0)
        left_s = time.monotonic() - t0
        assert on_the_wire_s < 1.0
        assert left_s < 8.0, left_s
        assert _status(agent_a) is MembershipStatus.DISCONNECTED
        await _wait_members(agent_b, 1, within=10.0)
        await asyncio.sleep(1.0)  # the abandoned PUT, if Synapse ran it, came before the leave
        assert len(agent_b.participants) == 1
        assert await hb.get_state_event(room, CALL_MEMBER, key) == {}


async def test_a_slow_homeserver_does_not_make_the_agent_give_up_or_rejoin(
    own_synapse: Synapse,
) -> None:
    """Chaos finding: a slow Synapse made every member's restart abort locally until the retry
    budget was spent; each gave up and re-joined (a new membership to everyone, new keys)
    while the room still held its membership. Timeouts no longer count (js-sdk 43): frozen
    (SIGSTOP) for many local timeouts, a keeps its membership and its heartbeat resumes."""
    hs_ = own_synapse
    a, b = await hs_.register("vic"), await hs_.register("wes")
    room = await hs_.create_call_room(a, invite=[b])
    # 0.3 s local timeouts, a budget of 3: 4 s frozen is over ten timeouts in a row. The
    # delayed leave (30 s) outlasts the freeze: the membership stays in the room.
    fragile = _config(
        delayed_leave_ms=30_000,
        restart_interval_ms=1_000,
        restart_timeout_ms=300,
        network_retries=3,
        rejoin_backoff_ms=250,
    )
    async with _watched_pair(hs_, a, b, room, fragile) as (_ha, _hb, agent_a, agent_b):
        created = {p.user_id: p.created_ts for p in agent_b.participants}
        with _frozen(hs_):
            await asyncio.sleep(4.0)
            assert _status(agent_a) is not MembershipStatus.FAILED
        beats = agent_a.heartbeats
        await _until(_beating(agent_a, beats), 10.0, "a's heartbeat to resume")
        assert _status(agent_a) is MembershipStatus.CONNECTED
        assert agent_a.recoveries == 0
        assert agent_a.rejoins == 0
        assert {p.user_id: p.created_ts for p in agent_b.participants} == created


async def test_a_join_abandoned_for_a_leave_that_lands_late_is_swept(
    own_synapse: Synapse,
) -> None:
    """The join PUT abandoned for the leave can land after it (a cancelled request Synapse
    had already taken, or TCP retransmitting it after a partition): the delayed leave was
    sent, so nothing would remove it until it expires. The leave's late-join sweep does.
    Which of the two Synapse runs first after SIGCONT is not up to the test, so the late
    landing is played by re-sending the abandoned PUT's own content after the leave."""
    hs_ = own_synapse
    a, b = await hs_.register("vea"), await hs_.register("wyn")
    room = await hs_.create_call_room(a, invite=[b])
    sweep_ms = 5_000
    async with (
        Homeserver(hs_.base_url, Login(a.user_id, password=a.password)) as ha,
        Homeserver(hs_.base_url, Login(b.user_id, password=b.password)) as hb,
        CallAgent(ha, room, _config(delayed_leave_ms=30_000, late_join_sweep_ms=sweep_ms)) as a_,
        CallAgent(hb, room, _config(**_STURDY)) as agent_b,
    ):
        await _wait_members(a_, 2)
        await _wait_members(agent_b, 2)
        key = a_.membership_state_key
        assert key is not None
        assert hs_.pid is not None
        pid = hs_.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            a_.machine.resend(int(time.time() * 1000))
            await _until(lambda: isinstance(a_.machine.in_flight, SendJoin), 10.0, "a PUT")
            hung = a_.machine.in_flight
            assert isinstance(hung, SendJoin)
            leaving = asyncio.create_task(a_.leave(timeout_s=15.0))
            await _until(
                lambda: isinstance(a_.machine.in_flight, SendDelayedLeaveNow), 2.0, "the leave"
            )
        finally:
            os.kill(pid, signal.SIGCONT)
        await asyncio.wait_for(leaving, 15.0)
        t_left = time.monotonic()
        assert _status(a_) is MembershipStatus.DISCONNECTED
        # The abandoned PUT lands now, after the leave (the sweep is due in sweep_ms).
        await ha.put_state(room, CALL_MEMBER, key, hung.content)
        assert time.monotonic() - t_left < sweep_ms / 1000 / 2
        assert await hb.get_state_event(room, CALL_MEMBER, key) == hung.content
        # The sweep (scheduled when the leave was answered) takes it back.
        deadline = t_left + sweep_ms / 1000 + 10.0
        while await hb.get_state_event(room, CALL_MEMBER, key) != {}:
            assert time.monotonic() < deadline, "a's late join is still in the room"
            await asyncio.sleep(0.5)
        await _wait_members(agent_b, 1, within=10.0)
