"""OwnMembershipMachine driven through hours of simulated time (exact actions and timings).

``FakeDelayedEventsServer`` below is a *fake* (named so): it models only what the machine's
contract needs — delayed events that fire at their time, restart/cancel/send by id, our
membership at one key, old-Synapse behaviour (an overwrite cancels delayed state), outages
and scripted answers. The adapter's integration tests cover the real path against Synapse.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pytest
from structlog.testing import capture_logs

from matrixrtc.errors import ConfigError, LocalError
from matrixrtc.model import (
    CallMembership,
    Dialect,
    FullMeshTransport,
    LivekitTransport,
    RtcMemberData,
    SessionMembershipData,
)
from matrixrtc.session.membership_machine import (
    CancelDelayedLeave,
    DelayedEventsUnsupported,
    LocalTimeout,
    MaxDelayExceeded,
    MembershipAction,
    MembershipConfig,
    MembershipStatus,
    NetworkError,
    NotFound,
    Ok,
    OwnMembershipExpiredLocally,
    OwnMembershipMachine,
    OwnMembershipMissing,
    OwnMembershipSeen,
    ProbablyLeftChanged,
    Rejected,
    Request,
    RestartDelayedLeave,
    Result,
    RetryAfter,
    ScheduleDelayedLeave,
    SendDelayedLeaveNow,
    SendJoin,
    SendLeave,
    StatusChanged,
    StopOutcome,
    Stopped,
    Wait,
    stop_outcome,
)

ALICE = "@alice:example.org"
DEV = "ABCDEFGH"
LK = LivekitTransport(
    livekit_service_url="https://rtc.example.org/livekit/jwt", livekit_alias="!r:example.org"
)
KEY = f"_{ALICE}_{DEV}_m.call"
HOUR = 3_600_000
T0 = 1_753_000_000_000  # a realistic epoch so created_ts values look like the real thing


# ------------------------------------------------------------------------ the fake server


@dataclass
class _Delayed:
    fire_at: int
    delay_ms: int
    content: dict[str, Any]


@dataclass
class FakeDelayedEventsServer:
    supports_delayed: bool = True
    overwrite_cancels_delayed: bool = False  # Synapse before #17810
    # Requests in [start, end) fail: restarts time out locally, the rest get NetworkError.
    outages: list[tuple[int, int]] = field(default_factory=list)
    # A stopped homeserver (connection refused) instead of an unreachable or hung one: every
    # request of an outage gets NetworkError at once, restarts too.
    refuses: bool = False
    # Scripted answers, consumed in order per request class name.
    script: dict[str, deque[Result]] = field(default_factory=dict)
    delayed: dict[str, _Delayed] = field(default_factory=dict)
    content: dict[str, Any] | None = None  # what is at our key
    content_ts: int = 0
    event_seq: int = 0
    delay_seq: int = 0
    fired: list[int] = field(default_factory=list)

    def down(self, now: int) -> bool:
        return any(a <= now < b for a, b in self.outages)

    def next_fire(self) -> int | None:
        return min((d.fire_at for d in self.delayed.values()), default=None)

    def tick(self, now: int) -> bool:
        """Fire due delayed events; True if the content at our key changed."""
        changed = False
        for delay_id, d in sorted(self.delayed.items(), key=lambda kv: kv[1].fire_at):
            if d.fire_at <= now:
                del self.delayed[delay_id]
                self.set_content(d.content, d.fire_at)
                self.fired.append(d.fire_at)
                changed = True
        return changed

    def set_content(self, content: dict[str, Any], ts: int) -> None:
        self.content = content
        self.content_ts = ts
        self.event_seq += 1

    def answer(self, request: Request, now: int) -> Result:
        queued = self.script.get(type(request).__name__)
        if queued:
            return queued.popleft()
        if self.down(now):
            return NetworkError("connection refused")
        match request:
            case ScheduleDelayedLeave(delay_ms=delay, content=content):
                if not self.supports_delayed:
                    return DelayedEventsUnsupported()
                self.delay_seq += 1
                delay_id = f"d{self.delay_seq}"
                self.delayed[delay_id] = _Delayed(now + delay, delay, dict(content))
                return Ok(delay_id=delay_id)
            case CancelDelayedLeave(delay_id=delay_id):
                return Ok() if self.delayed.pop(delay_id, None) else NotFound()
            case RestartDelayedLeave(delay_id=delay_id):
                d = self.delayed.get(delay_id)
                if d is None:
                    return NotFound()
                d.fire_at = now + d.delay_ms
                return Ok()
            case SendDelayedLeaveNow(delay_id=delay_id):
                d = self.delayed.pop(delay_id, None)
                if d is None:
                    return NotFound()
                self.set_content(d.content, now)
                return Ok()
            case SendJoin(content=content) | SendLeave(content=content):
                if self.overwrite_cancels_delayed:
                    self.delayed.clear()
                self.set_content(dict(content), now)
                return Ok(event_id=f"$ev{self.event_seq}")
        raise AssertionError(f"unexpected request {request!r}")


@dataclass
class Sim:
    """Drives a machine against the fake server on simulated milliseconds, like an adapter."""

    machine: OwnMembershipMachine
    server: FakeDelayedEventsServer = field(default_factory=FakeDelayedEventsServer)
    now: int = T0
    latency_ms: int = 0
    observe: bool = True  # feed OwnMembershipSeen/Missing as the RTC session would
    skew_ms: int = 0  # the device's clock runs this far ahead of the homeserver's
    log: list[tuple[int, Request]] = field(default_factory=list)
    results: list[tuple[int, Result]] = field(default_factory=list)
    _seen_seq: int = 0

    def _observe(self) -> None:
        # During an outage sync is down too: changes are seen once the server is back.
        if not self.observe or self.server.event_seq == self._seen_seq:
            return
        if self.server.down(self.now):
            return
        self._seen_seq = self.server.event_seq
        content = self.server.content or {}
        if "application" in content:
            created = content.get("created_ts", self.server.content_ts - self.skew_ms)
            event_id = f"$ev{self.server.event_seq}"
            self.machine.observe(OwnMembershipSeen(created_ts=created, event_id=event_id), self.now)
        else:
            self.machine.observe(OwnMembershipMissing(), self.now)

    def _advance(self, until: int) -> None:
        # Stop at each delayed-event firing so the machine observes it when it happens.
        while True:
            fire = self.server.next_fire()
            if fire is None or fire > until:
                break
            self.now = max(self.now, fire)
            self.server.tick(self.now)
            self._observe()
        self.now = max(self.now, until)

    def run_until(self, end_ms: int) -> Stopped | None:
        for _ in range(2_000_000):
            action: MembershipAction = self.machine.next_action(self.now)
            if isinstance(action, Stopped):
                return action
            if isinstance(action, Wait):
                if action.until_ms > end_ms:
                    self._advance(end_ms)
                    return None
                self._advance(action.until_ms)
                continue
            self.log.append((self.now, action))
            hung = self.server.down(self.now) and not self.server.refuses
            if isinstance(action, RestartDelayedLeave) and hung:
                self._advance(self.now + action.timeout_ms)
                result: Result = LocalTimeout()
            else:
                result = self.server.answer(action, self.now)
                self._advance(self.now + self.latency_ms)
            self.results.append((self.now, result))
            self.machine.receive_result(result, self.now)
            self._observe()
            # Invariant: never two copies of a step queued (no parallel heartbeat loops).
            steps = [step for _, step in self.machine.scheduled]
            assert len(steps) == len(set(steps)), steps
        raise AssertionError("simulation did not settle")

    def run_for(self, ms: int) -> Stopped | None:
        return self.run_until(self.now + ms)

    def of(self, kind: type[Any], since: int = 0) -> list[tuple[int, Any]]:
        return [(t - T0, a) for t, a in self.log if isinstance(a, kind) and t - T0 >= since]

    def kinds(self) -> list[str]:
        return [type(a).__name__ for _, a in self.log]


def status(m: OwnMembershipMachine) -> MembershipStatus:
    """Read through a function so mypy does not narrow the property across calls."""
    return m.status


def machine(**kw: Any) -> OwnMembershipMachine:
    return OwnMembershipMachine(user_id=ALICE, device_id=DEV, **kw)


def joined_sim(server: FakeDelayedEventsServer | None = None, **kw: Any) -> Sim:
    sim = Sim(machine(**kw), server or FakeDelayedEventsServer())
    sim.machine.join(sim.now, transports=[LK], intent="video")
    return sim


# ----------------------------------------------------------------------------- join path


def test_join_sequence_and_heartbeat_cadence() -> None:
    sim = joined_sim()
    assert status(sim.machine) is MembershipStatus.CONNECTING
    sim.run_for(30_000)
    first = sim.log[:3]
    assert [type(a).__name__ for _, a in first] == [
        "ScheduleDelayedLeave",
        "SendJoin",
        "RestartDelayedLeave",
    ]
    sched = first[0][1]
    assert sched == ScheduleDelayedLeave(
        event_type="org.matrix.msc3401.call.member",
        state_key=KEY,
        content={},
        delay_ms=8000,
        sticky_duration_ms=None,
    )
    join = first[1][1]
    assert isinstance(join, SendJoin)
    assert join.state_key == KEY
    assert (
        join.content
        == SessionMembershipData.for_join(
            user_id=ALICE, device_id=DEV, transports=[LK], intent="video"
        ).to_json()
    )
    assert "created_ts" not in join.content
    assert join.content["expires"] == 14_400_000
    # Restart at once after the join, then every 5 s, each with a 2 s local timeout.
    restarts = sim.of(RestartDelayedLeave)
    assert [t for t, _ in restarts] == list(range(0, 30_001, 5000))
    assert all(r.delay_id == "d1" and r.timeout_ms == 2000 for _, r in restarts)
    assert sim.machine.status is MembershipStatus.CONNECTED
    assert sim.server.fired == []  # the heartbeat kept the delayed leave from firing
    assert sim.machine.expected_leave_ms == T0 + 30_000 + 8000
    assert status(sim.machine) is MembershipStatus.CONNECTED


def test_heartbeat_with_latency_keeps_5s_after_each_answer() -> None:
    sim = joined_sim()
    sim.latency_ms = 120
    sim.run_for(20_000)
    times = [t for t, _ in sim.of(RestartDelayedLeave)]
    # schedule answered at 120, join at 240, restart sent at 240, answered 360, next 5360…
    assert times == [240, 5360, 10480, 15600]


def test_hours_of_refreshes_carry_created_ts_and_grow_expires() -> None:
    sim = joined_sim()
    sim.run_for(5 * HOUR)
    joins = sim.of(SendJoin)
    assert [t for t, _ in joins] == [0] + [k * HOUR - 5000 for k in range(1, 6)]
    assert [j.refresh for _, j in joins] == [False] + [True] * 5
    assert [j.content["expires"] for _, j in joins] == [14_400_000 * k for k in range(1, 7)]
    # The first join's origin_server_ts (T0) is carried into every refresh.
    assert [j.content.get("created_ts") for _, j in joins] == [None] + [T0] * 5
    # Heartbeat: every 5 s for 5 h, never interrupted.
    restarts = sim.of(RestartDelayedLeave)
    assert len(restarts) == 5 * HOUR // 5000 + 1
    assert sim.server.fired == []
    assert sim.machine.status is MembershipStatus.CONNECTED


def test_old_synapse_cancels_delayed_on_overwrite_and_we_reschedule() -> None:
    sim = joined_sim(FakeDelayedEventsServer(overwrite_cancels_delayed=True))
    sim.run_for(12_000)
    assert sim.kinds()[:5] == [
        "ScheduleDelayedLeave",
        "SendJoin",
        "RestartDelayedLeave",  # -> NotFound: the join cancelled it
        "ScheduleDelayedLeave",
        "RestartDelayedLeave",
    ]
    assert sim.of(ScheduleDelayedLeave)[1][0] == 0
    assert sim.of(RestartDelayedLeave)[1] == (
        5000,
        RestartDelayedLeave(delay_id="d2", timeout_ms=2000),
    )
    assert sim.machine.status is MembershipStatus.CONNECTED
    # Each hourly refresh cancels it again and the machine recovers the same way.
    sim.run_for(HOUR)
    refresh_t = HOUR - 5000
    after = [type(a).__name__ for t, a in sim.log if t - T0 >= refresh_t][:4]
    assert after == [
        "SendJoin",
        "RestartDelayedLeave",
        "ScheduleDelayedLeave",
        "RestartDelayedLeave",
    ]
    assert sim.server.fired == []


def test_max_delay_exceeded_lowers_the_delay() -> None:
    server = FakeDelayedEventsServer(
        script={"ScheduleDelayedLeave": deque([MaxDelayExceeded(6000)])}
    )
    sim = joined_sim(server)
    sim.run_for(30_000)
    scheds = sim.of(ScheduleDelayedLeave)
    assert [s.delay_ms for _, s in scheds] == [8000, 6000]
    assert sim.machine.delay_ms == 6000
    assert sim.machine.expected_leave_ms == T0 + 30_000 + 6000
    # The local timeout is cut to the 1 s left before the server would send our leave.
    assert [(t, r.timeout_ms) for t, r in sim.of(RestartDelayedLeave)][:3] == [
        (0, 2000),
        (5000, 1000),
        (10_000, 1000),
    ]
    assert sim.server.fired == []


def test_max_delay_exceeded_without_a_usable_limit_joins_without_delayed_leave() -> None:
    server = FakeDelayedEventsServer(
        script={"ScheduleDelayedLeave": deque([MaxDelayExceeded(None)])}
    )
    sim = joined_sim(server)
    sim.run_for(20_000)
    assert sim.kinds() == ["ScheduleDelayedLeave", "SendJoin"]
    assert not sim.machine.delayed_events_in_use


# ----------------------------------------------------------------------- without MSC4140


def test_unsupported_delayed_events_join_anyway_and_refresh_only() -> None:
    sim = joined_sim(FakeDelayedEventsServer(supports_delayed=False))
    sim.run_for(3 * HOUR)
    assert sim.kinds() == ["ScheduleDelayedLeave", "SendJoin", "SendJoin", "SendJoin", "SendJoin"]
    assert [t for t, _ in sim.of(SendJoin)] == [0, HOUR - 5000, 2 * HOUR - 5000, 3 * HOUR - 5000]
    assert sim.machine.status is MembershipStatus.CONNECTED
    sim.machine.leave(sim.now)
    assert sim.run_for(1000) == Stopped(None)
    assert sim.log[-1][1] == SendLeave(
        event_type="org.matrix.msc3401.call.member",
        state_key=KEY,
        content={},
        sticky_duration_ms=None,
    )
    assert sim.server.content == {}


def test_first_schedule_rejected_joins_without_delayed_leave() -> None:
    server = FakeDelayedEventsServer(
        script={"ScheduleDelayedLeave": deque([Rejected("M_FORBIDDEN", "no")])}
    )
    sim = joined_sim(server)
    sim.run_for(60_000)
    assert sim.kinds() == ["ScheduleDelayedLeave", "SendJoin"]
    assert sim.machine.status is MembershipStatus.CONNECTED


# --------------------------------------------------------------------- errors and retries


def test_rate_limit_waits_retry_after_then_default() -> None:
    server = FakeDelayedEventsServer(
        script={"RestartDelayedLeave": deque([RetryAfter(1234), RetryAfter(None)])}
    )
    sim = joined_sim(server)
    sim.run_for(15_000)
    times = [t for t, _ in sim.of(RestartDelayedLeave)]
    # 0 -> 429 (1234 ms) -> 1234 -> 429 (default 5000) -> 6234 ok -> 11234
    assert times == [0, 1234, 6234, 11234]


def test_rate_limit_on_join_is_retried() -> None:
    server = FakeDelayedEventsServer(script={"SendJoin": deque([RetryAfter(700)])})
    sim = joined_sim(server)
    sim.run_for(1000)
    assert [t for t, _ in sim.of(SendJoin)] == [0, 700]
    assert [t for t, _ in sim.of(RestartDelayedLeave)] == [700]


def test_rate_limit_budget_exhausted_stops_with_error() -> None:
    server = FakeDelayedEventsServer(script={"SendJoin": deque([RetryAfter(100)] * 11)})
    sim = joined_sim(server)
    stopped = sim.run_for(10_000)
    assert isinstance(stopped, Stopped)
    assert stopped.error is not None
    assert "rate limited 10 times" in stopped.error
    assert len(sim.of(SendJoin)) == 11
    assert sim.machine.status is MembershipStatus.FAILED


def test_network_errors_retry_every_3s_and_budget_resets_on_success() -> None:
    server = FakeDelayedEventsServer(script={"SendJoin": deque([NetworkError("refused")] * 10)})
    sim = joined_sim(server)
    sim.run_for(40_000)
    assert [t for t, _ in sim.of(SendJoin)] == [3000 * k for k in range(11)]
    assert sim.machine.status is MembershipStatus.CONNECTED
    # Budget was reset by the success: ten more failures later are survivable again.
    sim.server.script["RestartDelayedLeave"] = deque([NetworkError()] * 10)
    sim.run_for(60_000)
    assert sim.machine.status is MembershipStatus.CONNECTED


def test_network_error_budget_exhausted_fails() -> None:
    server = FakeDelayedEventsServer(script={"SendJoin": deque([NetworkError()] * 11)})
    sim = joined_sim(server)
    stopped = sim.run_for(60_000)
    assert stopped is not None
    assert stopped.error is not None
    assert "network errors" in stopped.error
    assert sim.machine.status is MembershipStatus.FAILED
    assert sim.machine.next_action(sim.now) == stopped


# ---------------------------------------------------------- network loss and ProbablyLeft


def test_local_timeout_shrinks_to_expected_leave_then_probably_left() -> None:
    sim = joined_sim()
    sim.server.outages.append((T0 + 4000, T0 + 9000))
    sim.run_for(4999)
    sim.machine.drain_events()
    sim.run_until(T0 + 11_000)
    restarts = [(t, r) for t, r in sim.of(RestartDelayedLeave, since=5000) if t < 10_000]
    # 5000: min(2000, 8000-5000); 7000: min(2000, 1000); 8000: probably left -> plain 2000
    assert [(t, r.timeout_ms) for t, r in restarts] == [(5000, 2000), (7000, 1000), (8000, 2000)]
    assert sim.machine.drain_events() == [
        ProbablyLeftChanged(True),  # at 8 s, when the restart at 7 s timed out
        StatusChanged(MembershipStatus.CONNECTED, MembershipStatus.RECONNECTING),
        ProbablyLeftChanged(False),  # a new delayed leave is scheduled (re-join)
        StatusChanged(MembershipStatus.RECONNECTING, MembershipStatus.CONNECTING),
        StatusChanged(MembershipStatus.CONNECTING, MembershipStatus.CONNECTED),
    ]
    # Back online at 10 s: the delayed leave fired at 8 s and sync shows our membership
    # gone, so the machine re-joins as a new membership (the old delay id is cancelled first).
    assert sim.server.fired == [T0 + 8000]
    after = [(t - T0, type(a).__name__) for t, a in sim.log if t - T0 >= 10_000]
    assert after == [
        (10_000, "CancelDelayedLeave"),  # -> NotFound: it has fired
        (10_000, "ScheduleDelayedLeave"),
        (10_000, "SendJoin"),
        (10_000, "RestartDelayedLeave"),
    ]
    assert not sim.machine.probably_left
    assert sim.machine.status is MembershipStatus.CONNECTED
    assert "created_ts" not in sim.of(SendJoin)[-1][1].content


def test_network_loss_then_rejoin_as_new_membership() -> None:
    sim = joined_sim()
    sim.run_for(20_000)  # connected, created_ts seen = T0
    assert sim.machine.created_ts == T0
    outage = (T0 + 21_000, T0 + 40_000)
    sim.server.outages.append(outage)
    sim.run_until(T0 + 60_000)
    # The server fired our delayed leave 8 s after the last successful restart (at 20 s).
    assert sim.server.fired == [T0 + 28_000]
    # After the outage: the restart finds the delayed event gone, and the session showed our
    # membership missing, so the machine re-joined: cancel/schedule, then a fresh join.
    after = [(t - T0, type(a).__name__) for t, a in sim.log if t >= outage[1]]
    names = [n for _, n in after]
    assert names[:4] == [
        "CancelDelayedLeave",
        "ScheduleDelayedLeave",
        "SendJoin",
        "RestartDelayedLeave",
    ]
    # During the outage restarts were aborted locally and retried (8 of the 10 allowed).
    during = [t - T0 for t, a in sim.log if outage[0] <= t < outage[1]]
    assert during == [25_000, 27_000, 28_000, 30_000, 32_000, 34_000, 36_000, 38_000]
    rejoin = next(a for t, a in sim.log if t >= outage[1] and isinstance(a, SendJoin))
    # No created_ts: to everyone else this is a new membership (and a key rotation).
    assert "created_ts" not in rejoin.content
    assert sim.machine.status is MembershipStatus.CONNECTED
    assert not sim.machine.probably_left
    # Network errors during the outage were retried (restarts time out, then keep trying).
    assert sim.machine.error is None


def test_probably_left_set_exactly_when_expected_leave_passes() -> None:
    m = machine()
    m.join(T0, transports=[LK])
    for result in (Ok(delay_id="d1"), Ok(event_id="$j"), Ok()):
        m.next_action(T0)
        m.receive_result(result, T0)
    assert m.expected_leave_ms == T0 + 8000
    assert m.next_action(T0) == Wait(T0 + 5000)
    assert m.next_action(T0 + 5000) == RestartDelayedLeave(delay_id="d1", timeout_ms=2000)
    m.receive_result(LocalTimeout(), T0 + 7000)
    assert m.next_action(T0 + 7000) == RestartDelayedLeave(delay_id="d1", timeout_ms=1000)
    m.receive_result(LocalTimeout(), T0 + 7999)
    assert not m.probably_left
    assert m.next_action(T0 + 7999) == RestartDelayedLeave(delay_id="d1", timeout_ms=1)
    m.receive_result(LocalTimeout(), T0 + 8000)
    assert m.probably_left
    assert m.status is MembershipStatus.RECONNECTING
    assert m.next_action(T0 + 8000) == RestartDelayedLeave(delay_id="d1", timeout_ms=2000)
    m.receive_result(Ok(), T0 + 8100)  # the server had not fired it yet after all
    assert not m.probably_left
    assert m.status is MembershipStatus.CONNECTED


# -------------------------------------------------------------- disappearance / overwrite


def test_overwritten_membership_is_reasserted() -> None:
    sim = joined_sim()
    sim.run_for(10_000)
    before = len(sim.log)
    # Someone else writes {} (or a forged membership the session ignores) at our key.
    sim.server.set_content({}, sim.now)
    sim.machine.observe(OwnMembershipMissing(), sim.now)
    sim.run_for(3000)
    after = [type(a).__name__ for _, a in sim.log[before:]]
    # Our old delayed leave is cancelled first, then the usual join sequence.
    assert after[:4] == [
        "CancelDelayedLeave",
        "ScheduleDelayedLeave",
        "SendJoin",
        "RestartDelayedLeave",
    ]
    assert sim.server.content is not None
    assert sim.server.content.get("device_id") == DEV
    assert "created_ts" not in sim.server.content


def test_missing_seen_while_rescheduling_a_fired_leave_rejoins_without_another_sync() -> None:
    # The process was frozen (SIGSTOP) past its delayed leave, which fired. On resuming, the
    # restart finds it gone (a new one is scheduled) and, meanwhile, sync shows our membership
    # missing. Nothing else changes in the room: the machine must re-join by itself (it used to
    # wait for the next room update, up to a 30 s long-poll later; seen in bench/chaos.py).
    sim = joined_sim()
    sim.run_for(10_000)
    sim.observe = False  # from here on only the syncs this test feeds
    frozen_until = sim.now + 20_000
    sim.server.tick(frozen_until)
    assert sim.server.fired
    sim.now = frozen_until
    action = sim.machine.next_action(sim.now)
    assert isinstance(action, RestartDelayedLeave)
    sim.machine.receive_result(sim.server.answer(action, sim.now), sim.now)  # NotFound
    sim.machine.observe(OwnMembershipMissing(after_join=True), sim.now)
    before = len(sim.log)
    sim.run_for(3000)
    names = [type(a).__name__ for _, a in sim.log[before:]]
    assert names[:3] == ["ScheduleDelayedLeave", "SendJoin", "RestartDelayedLeave"]
    assert sim.server.content is not None
    assert sim.server.content.get("device_id") == DEV
    assert "created_ts" not in sim.server.content  # a new membership to the others
    assert len(sim.server.delayed) == 1  # exactly one delayed leave armed


def test_missing_before_our_join_is_seen_is_ignored_within_grace() -> None:
    sim = joined_sim()
    sim.observe = False  # sync has not delivered our join yet
    sim.run_for(1000)
    assert sim.machine.status is MembershipStatus.CONNECTED
    sim.machine.observe(OwnMembershipMissing(), sim.now)  # another member joined meanwhile
    sim.run_for(1000)
    assert "CancelDelayedLeave" not in sim.kinds()
    # After the grace period without ever seeing it, missing is believed.
    sim.run_until(T0 + 10_000)
    sim.machine.observe(OwnMembershipMissing(), sim.now)
    sim.run_for(10)
    assert "CancelDelayedLeave" in sim.kinds()


def test_missing_reported_by_a_sync_asked_for_after_the_join_is_believed_at_once() -> None:
    # The homeserver fired our old delayed leave after our re-join (it had been down): the
    # sync that shows it began after the join was answered, so it cannot be stale.
    sim = joined_sim()
    sim.observe = False
    sim.run_for(1000)
    assert sim.machine.status is MembershipStatus.CONNECTED
    sim.machine.observe(OwnMembershipMissing(after_join=True), sim.now)
    sim.run_for(10)
    assert "CancelDelayedLeave" in sim.kinds()


def test_missing_while_not_joined_or_while_joining_is_ignored() -> None:
    m = machine()
    m.observe(OwnMembershipMissing(), T0)
    assert m.next_action(T0) == Stopped(None)
    m.join(T0, transports=[LK])
    m.observe(OwnMembershipMissing(), T0)
    assert isinstance(m.next_action(T0), ScheduleDelayedLeave)


# ----------------------------------------------------------------------------- leave


def test_leave_sends_the_scheduled_delayed_leave() -> None:
    sim = joined_sim()
    sim.run_for(7000)
    sim.machine.leave(sim.now)
    assert status(sim.machine) is MembershipStatus.DISCONNECTING
    assert sim.run_for(1000) == Stopped(None)
    assert sim.log[-1] == (T0 + 7000, SendDelayedLeaveNow(delay_id="d1"))
    assert sim.server.content == {}
    assert status(sim.machine) is MembershipStatus.DISCONNECTED
    assert sim.machine.delay_id is None


def test_leave_falls_back_to_plain_leave_when_delayed_is_gone() -> None:
    sim = joined_sim()
    sim.run_for(7000)
    sim.server.delayed.clear()
    sim.machine.leave(sim.now)
    assert sim.run_for(1000) == Stopped(None)
    assert sim.kinds()[-2:] == ["SendDelayedLeaveNow", "SendLeave"]
    assert sim.server.content == {}


def test_leave_retries_after_network_error_with_plain_leave() -> None:
    sim = joined_sim()
    sim.run_for(7000)
    sim.server.script["SendDelayedLeaveNow"] = deque([NetworkError()])
    sim.machine.leave(sim.now)
    assert sim.run_for(5000) == Stopped(None)
    assert sim.of(SendLeave) == [(10_000, sim.log[-1][1])]


def test_leave_while_join_in_flight_still_leaves() -> None:
    m = machine()
    m.join(T0, transports=[LK])
    sched = m.next_action(T0)
    assert isinstance(sched, ScheduleDelayedLeave)
    m.receive_result(Ok(delay_id="d1"), T0 + 10)
    assert isinstance(m.next_action(T0 + 10), SendJoin)
    m.leave(T0 + 20)  # the join is on the wire
    m.receive_result(Ok(event_id="$j"), T0 + 30)  # it landed: we must take it back
    assert m.next_action(T0 + 30) == SendDelayedLeaveNow(delay_id="d1")
    m.receive_result(Ok(), T0 + 40)
    assert m.next_action(T0 + 40) == Stopped(None)


def test_leave_after_failure_still_takes_our_membership_back() -> None:
    server = FakeDelayedEventsServer(script={"SendJoin": deque([Rejected("M_FORBIDDEN")])})
    sim = joined_sim(server)
    sim.run_for(HOUR)
    # The join was refused: nothing of ours is in the room, leave has nothing to do.
    assert status(sim.machine) is MembershipStatus.FAILED
    sim.machine.leave(sim.now)
    assert sim.machine.next_action(sim.now) == Stopped(
        "could not send the join: Rejected(M_FORBIDDEN)"
    )
    # A refresh refused after a successful join: the membership is there; leave removes it.
    server = FakeDelayedEventsServer(supports_delayed=False)
    sim = joined_sim(server)
    sim.run_for(HOUR - 5001)
    server.script["SendJoin"] = deque([Rejected("M_FORBIDDEN")])
    stopped = sim.run_for(HOUR)
    assert stopped is not None
    assert stopped.error is not None
    assert server.content is not None
    assert "application" in server.content
    sim.machine.leave(sim.now)
    assert status(sim.machine) is MembershipStatus.DISCONNECTING
    assert sim.run_for(1000) == Stopped(None)
    assert server.content == {}
    assert status(sim.machine) is MembershipStatus.DISCONNECTED


def test_leave_before_anything_was_sent_sends_nothing() -> None:
    m = machine()
    m.join(T0, transports=[LK])
    m.leave(T0)
    assert m.next_action(T0) == Stopped(None)


def test_rejoin_after_leave() -> None:
    sim = joined_sim()
    sim.run_for(6000)
    sim.machine.leave(sim.now)
    sim.run_for(100)
    sim.machine.join(sim.now, transports=[LK])
    sim.run_for(100)
    assert sim.kinds()[-3:] == ["ScheduleDelayedLeave", "SendJoin", "RestartDelayedLeave"]
    assert sim.machine.status is MembershipStatus.CONNECTED


# ------------------------------------------------------------------------- sticky dialect


def test_sticky_dialect_actions() -> None:
    sim = joined_sim(dialect=Dialect.STICKY, member_id="uuid-1")
    sim.run_for(2 * HOUR)
    sched = sim.of(ScheduleDelayedLeave)[0][1]
    assert sched.event_type == "org.matrix.msc4143.rtc.member"
    assert sched.state_key is None
    # js-sdk 43's sticky (delayed) leave: the slot and the sticky key.
    assert sched.content == {"slot_id": "m.call#ROOM", "msc4354_sticky_key": "uuid-1"}
    assert sched.sticky_duration_ms == HOUR
    joins = sim.of(SendJoin)
    assert [t for t, _ in joins] == [0, HOUR - 5000, 2 * HOUR - 5000]
    first = RtcMemberData.from_json(joins[0][1].content)
    assert first is not None
    assert first.member.id == "uuid-1"
    assert first.relates_to is None
    second = RtcMemberData.from_json(joins[1][1].content)
    assert second is not None
    assert second.relates_to == "$ev1"  # a refresh references our current membership event
    third = RtcMemberData.from_json(joins[2][1].content)
    assert third is not None
    assert third.relates_to == "$ev2"
    # LiveKit transports carry no alias in the sticky form.
    assert third.published == (LivekitTransport(livekit_service_url=LK.livekit_service_url),)
    assert all(j.sticky_duration_ms == HOUR for _, j in joins)
    sim.machine.leave(sim.now)
    sim.run_for(10)
    assert sim.server.content == {"slot_id": "m.call#ROOM", "msc4354_sticky_key": "uuid-1"}


def test_sticky_needs_member_id() -> None:
    with pytest.raises(LocalError):
        machine(dialect=Dialect.STICKY)


def test_msc3757_room_uses_unprefixed_state_key() -> None:
    m = machine(room_version="org.matrix.msc3757.11")
    assert m.state_key == f"{ALICE}_{DEV}_m.call"


# ------------------------------------------------------------------------- API misuse


def test_misuse_raises_local_error_and_changes_nothing() -> None:
    m = machine()
    with pytest.raises(LocalError):
        m.receive_result(Ok(), T0)
    m.join(T0, transports=[LK])
    with pytest.raises(LocalError):
        m.join(T0, transports=[LK])
    req = m.next_action(T0)
    with pytest.raises(LocalError):
        m.next_action(T0)
    assert m.in_flight == req
    m.receive_result(Ok(delay_id="d"), T0)
    assert isinstance(m.next_action(T0), SendJoin)


def test_status_events_sequence() -> None:
    sim = joined_sim()
    sim.run_for(1000)
    sim.machine.leave(sim.now)
    sim.run_for(1000)
    statuses = [e for e in sim.machine.drain_events() if isinstance(e, StatusChanged)]
    assert [(e.old, e.new) for e in statuses] == [
        (MembershipStatus.DISCONNECTED, MembershipStatus.CONNECTING),
        (MembershipStatus.CONNECTING, MembershipStatus.CONNECTED),
        (MembershipStatus.CONNECTED, MembershipStatus.DISCONNECTING),
        (MembershipStatus.DISCONNECTING, MembershipStatus.DISCONNECTED),
    ]


def test_config_validation() -> None:
    with pytest.raises(ConfigError):
        MembershipConfig(delayed_leave_delay_ms=0)
    with pytest.raises(ConfigError):
        MembershipConfig(max_network_retries=-1)
    with pytest.raises(ConfigError):
        MembershipConfig(expiry_ms=4000, expiry_headroom_ms=5000)


def test_element_call_timings() -> None:
    cfg = MembershipConfig(delayed_leave_delay_ms=10_000, network_error_retry_ms=1000)
    sim = joined_sim(config=cfg)
    sim.server.script["SendJoin"] = deque([NetworkError()])
    sim.run_for(11_000)
    assert sim.of(ScheduleDelayedLeave)[0][1].delay_ms == 10_000
    assert [t for t, _ in sim.of(SendJoin)] == [0, 1000]
    assert [t for t, _ in sim.of(RestartDelayedLeave)] == [1000, 6000, 11000]


def _connected_machine() -> OwnMembershipMachine:
    m = machine()
    m.join(T0, transports=[LK])
    for result in (Ok(delay_id="d1"), Ok(event_id="$j"), Ok()):
        m.next_action(T0)
        m.receive_result(result, T0)
    return m


def test_restart_due_after_expected_leave_sets_probably_left_at_once() -> None:
    m = _connected_machine()
    # The adapter could not run for 9 s (e.g. the process was suspended).
    action = m.next_action(T0 + 9000)
    assert action == RestartDelayedLeave(delay_id="d1", timeout_ms=2000)
    assert m.probably_left
    assert status(m) is MembershipStatus.RECONNECTING


def test_unsupported_delayed_send_on_leave_falls_back_to_plain_leave() -> None:
    m = _connected_machine()
    m.leave(T0 + 100)
    assert m.next_action(T0 + 100) == SendDelayedLeaveNow(delay_id="d1")
    m.receive_result(DelayedEventsUnsupported(), T0 + 110)
    leave = m.next_action(T0 + 110)
    assert isinstance(leave, SendLeave)
    assert leave.content == {}
    m.receive_result(Ok(), T0 + 120)
    assert m.next_action(T0 + 120) == Stopped(None)


def test_update_membership_resends_join_with_same_created_ts() -> None:
    sim = joined_sim()
    sim.run_for(20_000)
    before = len(sim.log)
    mesh = FullMeshTransport()
    sim.machine.update_membership(sim.now, transports=[LK, mesh], intent="audio")
    sim.run_for(6_000)
    names = [type(a).__name__ for _, a in sim.log[before:]]
    assert names[:2] == ["SendJoin", "RestartDelayedLeave"]
    join = sim.log[before][1]
    assert isinstance(join, SendJoin)
    assert join.content["created_ts"] == T0
    assert join.content["m.call.intent"] == "audio"
    assert join.content["foci_preferred"] == [
        LK.to_json(),
        {"type": "org.matrix.msc3401.full_mesh"},
    ]
    # The refresh schedule restarts from the re-send, and the heartbeat keeps its cadence.
    assert sim.machine.scheduled[-1][1].value == "update_expiry"
    sim.machine.update_membership(sim.now, intent="audio")  # no change: nothing sent
    n = len(sim.log)
    sim.run_for(1)
    assert all(not isinstance(a, SendJoin) for _, a in sim.log[n:])


def test_update_membership_requires_joined() -> None:
    with pytest.raises(LocalError):
        machine().update_membership(T0, intent="audio")


def test_update_membership_while_join_on_the_wire_is_resent() -> None:
    m = machine()
    m.join(T0, transports=[LK], intent="video")
    m.next_action(T0)
    m.receive_result(Ok(delay_id="d1"), T0)
    first = m.next_action(T0)
    assert isinstance(first, SendJoin)
    m.update_membership(T0 + 1, intent="audio")  # the video join is in flight
    m.receive_result(Ok(event_id="$j1"), T0 + 2)
    kinds = []
    for _ in range(2):
        action = m.next_action(T0 + 2)
        kinds.append(action)
        m.receive_result(Ok(event_id="$j2"), T0 + 3)
    resend = next(a for a in kinds if isinstance(a, SendJoin))
    assert resend.content["m.call.intent"] == "audio"


def test_join_again_after_giving_up_cancels_the_old_delay_then_joins_anew() -> None:
    """What the agent does after the machine gave up in a long outage: ``join`` again once the
    homeserver answers. The old delay id is cancelled first (it may still be pending), then
    the join runs from the first step and the heartbeat resumes."""
    cfg = MembershipConfig(max_network_retries=1, network_error_retry_ms=200)
    sim = joined_sim(FakeDelayedEventsServer(refuses=True), config=cfg)
    sim.run_for(6000)
    old_delay = sim.machine.delay_id
    assert old_delay is not None
    outage = (sim.now, sim.now + 30_000)
    sim.server.outages.append(outage)
    stopped = sim.run_for(30_000)
    assert stopped is not None
    assert stopped.error is not None
    assert status(sim.machine) is MembershipStatus.FAILED
    assert sim.run_for(1000) == stopped  # stopped: nothing is sent until the adapter joins
    sim._advance(outage[1])
    assert sim.server.content == {}  # the delayed leave fired meanwhile
    sim.machine.join(sim.now, transports=[LK])
    assert sim.machine.next_action(sim.now) == CancelDelayedLeave(delay_id=old_delay)
    sim.machine.receive_result(NotFound(), sim.now)
    sim.run_for(10_000)
    after = [type(a).__name__ for t, a in sim.log if t >= outage[1]]
    assert after[:3] == ["ScheduleDelayedLeave", "SendJoin", "RestartDelayedLeave"]
    assert status(sim.machine) is MembershipStatus.CONNECTED
    assert sim.server.content is not None
    assert "application" in sim.server.content


def test_resend_sends_the_same_membership_again() -> None:
    """The agent re-sends its sticky membership for a device that appeared after the send
    (encrypted rooms): same member, same transports, and the new event id is reported."""
    sim = joined_sim(dialect=Dialect.STICKY, member_id="uuid-1")
    sim.run_for(20_000)
    assert len(sim.of(SendJoin)) == 1
    first_id = sim.machine.membership_event_id
    assert first_id is not None
    sim.machine.resend(sim.now)
    sim.run_for(6_000)
    joins = [RtcMemberData.from_json(j.content) for _, j in sim.of(SendJoin)]
    assert len(joins) == 2
    a, b = joins
    assert a is not None
    assert b is not None
    assert (b.member, b.published, b.slot_id) == (a.member, a.published, a.slot_id)
    assert b.relates_to == "$ev1"  # references the membership it repeats
    assert sim.machine.membership_event_id not in (None, first_id)
    # Not joined: nothing to re-send.
    m = machine()
    m.resend(T0)
    assert isinstance(m.next_action(T0), Stopped)
    assert m.membership_event_id is None


# ----------------------------------------------------------------------------- clock skew


def _own_view_gaps(sim: Sim, created: int) -> list[int]:
    """Device times at which our own clock judged our membership expired before the next send
    (``created_ts`` + the ``expires`` last sent <= the time of the following send)."""
    joins = sim.of(SendJoin)
    gaps = []
    for (_, a), (t_next, _) in itertools.pairwise(joins):
        if created + a.content["expires"] <= T0 + t_next:
            gaps.append(t_next)
    last = joins[-1][1]
    if created + last.content["expires"] <= sim.now:
        gaps.append(sim.now - T0)
    return gaps


@pytest.mark.parametrize("skew_ms", [30_000, 59_000])
def test_clock_ahead_refreshes_before_our_own_view_expires(skew_ms: int) -> None:
    # created_ts is the homeserver's clock and every member compares it with its own (spec
    # "Clock"). A device 30 s ahead with the 5 s headroom saw its own membership expire 25 s
    # before each refresh, and re-joined (a new membership, new keys for everyone).
    cfg = MembershipConfig(expiry_ms=60_000)
    sim = joined_sim(config=cfg)
    sim.skew_ms = skew_ms
    sim.run_for(10 * 60_000)
    joins = sim.of(SendJoin)
    assert [j.refresh for _, j in joins] == [False] + [True] * (len(joins) - 1)
    assert "ScheduleDelayedLeave" not in sim.kinds()[1:]  # never a re-join
    created = T0 - skew_ms  # the first join's origin_server_ts, on the device's clock
    assert all(j.content.get("created_ts", created) == created for _, j in joins[1:])
    assert _own_view_gaps(sim, created) == []
    # First refresh: headroom before the device's own view of the expiry, not a period in.
    assert joins[1][0] == max(0, 60_000 - skew_ms - 5_000)


def test_clock_ahead_refresh_schedule_without_the_fix_would_leave_gaps() -> None:
    # The same run with the device's clock right: refreshes one period in (the old schedule),
    # which a device 30 s ahead would judge 25 s too late. Shows the check above can fail.
    cfg = MembershipConfig(expiry_ms=60_000)
    sim = joined_sim(config=cfg)
    sim.run_for(5 * 60_000)
    joins = sim.of(SendJoin)
    assert joins[1][0] == 55_000
    assert _own_view_gaps(sim, T0 - 30_000) != []
    assert _own_view_gaps(sim, T0) == []


def test_clock_behind_keeps_the_period_schedule() -> None:
    # Behind the homeserver: our own view expires later than everyone else's; the period
    # schedule (which keeps it alive for members with a sound clock) stays.
    cfg = MembershipConfig(expiry_ms=60_000)
    sim = joined_sim(config=cfg)
    sim.skew_ms = -30_000
    sim.run_for(5 * 60_000)
    joins = sim.of(SendJoin)
    assert [t for t, _ in joins[:3]] == [0, 55_000, 115_000]


def test_expired_only_on_our_clock_refreshes_at_once_and_never_rejoins() -> None:
    # A clock far ahead (2.5 periods): our membership looks expired as soon as it is seen.
    cfg = MembershipConfig(expiry_ms=60_000)
    sim = joined_sim(config=cfg)
    sim.observe = False
    sim.run_for(1_000)
    assert sim.kinds() == ["ScheduleDelayedLeave", "SendJoin", "RestartDelayedLeave"]
    created = T0 - 150_000
    sim.machine.observe(OwnMembershipExpiredLocally(created_ts=created, event_id="$ev1"), sim.now)
    sim.run_for(100)
    # Refreshed at once, period by period, until our own view is alive again (3 periods =
    # 180 s > 150 s ahead), with the first join's created_ts: no re-join.
    refreshes = sim.of(SendJoin)[1:]
    assert [(t, a.refresh, a.content["expires"]) for t, a in refreshes] == [
        (1_000, True, 120_000),
        (1_000, True, 180_000),
    ]
    assert all(a.content["created_ts"] == created for _, a in refreshes)
    # The session still shows an old event until sync catches up: nothing more for it.
    sim.machine.observe(OwnMembershipExpiredLocally(created_ts=created, event_id="$ev2"), sim.now)
    sim.run_for(100)
    assert len(sim.of(SendJoin)) == 3
    sim.machine.observe(OwnMembershipSeen(created_ts=created, event_id="$ev3"), sim.now)
    sim.run_for(20_000)
    assert len(sim.of(SendJoin)) == 3  # next one at created + 180 s - 5 s = T0 + 25 s
    sim.run_for(5_000)
    assert [t for t, _ in sim.of(SendJoin)][3:] == [25_000]
    assert "ScheduleDelayedLeave" not in sim.kinds()[1:]
    assert status(sim.machine) is MembershipStatus.CONNECTED


# ----------------------------------------------------------- a slow homeserver (chaos)


def test_slow_homeserver_never_gives_up_nor_rejoins() -> None:
    """Chaos finding: a slow Synapse answered every 2 s restart too late, the local timeouts
    used up the 10-retry budget and every member re-joined as a new membership (new
    created_ts, key rotation) while the room still held the old one. js-sdk 43 retries a
    local timeout at once without counting it; so do we."""
    sim = joined_sim()
    sim.run_for(20_000)
    assert sim.machine.created_ts == T0
    slow_from, slow_to = sim.now, sim.now + 60_000
    # The homeserver takes each restart (the delayed leave is reset) but answers after our
    # 2 s local timeout: about 30 timeouts in a row, three times the network budget.
    while sim.now < slow_to:
        action = sim.machine.next_action(sim.now)
        if isinstance(action, Wait):
            sim._advance(action.until_ms)
            continue
        assert isinstance(action, RestartDelayedLeave), action
        sim.log.append((sim.now, action))
        sim.server.answer(action, sim.now)
        sim._advance(sim.now + action.timeout_ms)
        sim.machine.receive_result(LocalTimeout(), sim.now)
    timeouts = [t for t, a in sim.log if slow_from <= t < slow_to]
    assert len(timeouts) > 2 * MembershipConfig().max_network_retries
    assert sim.server.fired == []  # the slow restarts still reached the server
    sim.run_for(30_000)
    assert sim.machine.error is None
    assert status(sim.machine) is MembershipStatus.CONNECTED
    # One join in all, no re-join: the membership (and its created_ts) is the first one.
    assert [a.refresh for _, a in sim.of(SendJoin)] == [False]
    assert sim.machine.created_ts == T0
    assert "CancelDelayedLeave" not in sim.kinds()


def test_refresh_that_times_out_is_retried_and_keeps_created_ts() -> None:
    """A refresh (PUT state) that gets no answer in time, many times in a row: retried at
    once, never counted, never a re-join."""
    sim = joined_sim(config=MembershipConfig(expiry_ms=60_000))
    sim.run_for(1_000)
    sim.server.script["SendJoin"] = deque([LocalTimeout()] * 15)
    sim.run_for(70_000)
    joins = sim.of(SendJoin)
    assert [a.refresh for _, a in joins] == [False] + [True] * 16
    assert all(a.content["created_ts"] == T0 for _, a in joins[1:])
    assert sim.machine.error is None
    assert status(sim.machine) is MembershipStatus.CONNECTED
    assert "ScheduleDelayedLeave" not in sim.kinds()[1:]


def test_connection_refused_still_uses_the_network_budget() -> None:
    """A stopped homeserver (refused connections, not timeouts) still makes the machine give
    up after its budget, as before: the agent then recovers with a join."""
    cfg = MembershipConfig(max_network_retries=2, network_error_retry_ms=200)
    sim = joined_sim(FakeDelayedEventsServer(refuses=True), config=cfg)
    sim.run_for(6_000)
    sim.server.outages.append((sim.now, sim.now + 60_000))
    stopped = sim.run_for(60_000)
    assert stopped is not None
    assert stopped.error is not None
    assert "network errors in a row" in stopped.error


def test_resend_late_in_a_call_keeps_created_ts_and_covers_the_call_so_far() -> None:
    """A join re-sent with the first created_ts (new transports, or a join again after giving
    up while the room still holds ours) carries enough periods that it is not already
    expired, and the refreshes go on from there."""
    sim = joined_sim(config=MembershipConfig(expiry_ms=60_000))
    sim.run_for(200_000)  # refreshes at 55, 115 and 175 s
    assert [a.content["expires"] for _, a in sim.of(SendJoin)] == [
        60_000,
        120_000,
        180_000,
        240_000,
    ]
    sim.machine.update_membership(sim.now, transports=[LK, FullMeshTransport()])
    sim.run_for(40_000)
    joins = sim.of(SendJoin)[4:]
    assert [(t, a.refresh, a.content["expires"]) for t, a in joins] == [
        (200_000, False, 240_000),  # created_ts + 240 s is still ahead at 200 s
        (235_000, True, 300_000),
    ]
    assert all(a.content["created_ts"] == T0 for _, a in joins)


def test_join_again_after_giving_up_keeps_a_membership_the_room_still_holds() -> None:
    """The machine gave up (refused connections) before the delayed leave fired: the room
    still shows our membership when the agent joins again, so the join keeps its created_ts
    (no new membership for the others) and covers the call's age."""
    cfg = MembershipConfig(max_network_retries=1, network_error_retry_ms=200, expiry_ms=60_000)
    sim = joined_sim(FakeDelayedEventsServer(refuses=True), config=cfg)
    sim.run_for(130_000)
    sim.server.outages.append((sim.now, sim.now + 6_000))
    assert sim.run_for(6_000) is not None  # gave up at the restart due at 135 s
    sim._advance(T0 + 136_500)
    assert sim.server.fired == []
    sim.machine.join(sim.now, transports=[LK])
    sim.machine.observe(OwnMembershipSeen(created_ts=T0, event_id="$ev3"), sim.now)
    sim.run_for(5_000)
    rejoin = sim.of(SendJoin)[-1][1]
    assert not rejoin.refresh
    assert rejoin.content["created_ts"] == T0
    assert rejoin.content["expires"] == 180_000  # 136.5 s into the call: three periods
    assert status(sim.machine) is MembershipStatus.CONNECTED


# ------------------------------------------------- rules the agent takes from the machine


def test_for_timings_caps_the_restart_period_at_five_eighths_of_the_delay() -> None:
    def cfg(delay: int, restart: int, sticky: int = HOUR) -> MembershipConfig:
        return MembershipConfig.for_timings(
            delay_ms=delay,
            restart_interval_ms=restart,
            restart_timeout_ms=2_000,
            expires_ms=4 * HOUR,
            sticky_duration_ms=sticky,
            network_retry_ms=1_000,
            network_retries=7,
        )

    assert cfg(8_000, 5_000).delayed_leave_restart_ms == 5_000  # js-sdk's pair
    assert cfg(3_000, 5_000).delayed_leave_restart_ms == 1_875  # capped: 5/8 of 3 s
    assert cfg(30_000, 1_000).delayed_leave_restart_ms == 1_000  # below the cap: kept
    assert cfg(8_000, 5_000, sticky=5 * HOUR).sticky_duration_ms == HOUR  # MSC4354's limit
    c = cfg(8_000, 5_000)
    assert (c.delayed_leave_delay_ms, c.restart_local_timeout_ms, c.expiry_ms) == (
        8_000,
        2_000,
        4 * HOUR,
    )
    assert (c.network_error_retry_ms, c.max_network_retries) == (1_000, 7)


def _membership(dialect: Dialect, *, state_key: str | None, member_id: str) -> CallMembership:
    data: SessionMembershipData | RtcMemberData
    if dialect is Dialect.STATE:
        data = SessionMembershipData.for_join(user_id=ALICE, device_id=DEV, transports=[LK])
    else:
        data = RtcMemberData.for_join(
            user_id=ALICE, device_id=DEV, member_id=member_id, transports=[LK]
        )
    return CallMembership(
        dialect=dialect,
        event_id="$m",
        sender=ALICE,
        origin_server_ts=T0,
        data=data,
        state_key=state_key,
    )


def test_owns_matches_our_dialect_and_key_or_member_id() -> None:
    state = machine()
    ours = _membership(Dialect.STATE, state_key=KEY, member_id="")
    assert state.owns(ours)
    assert not state.owns(_membership(Dialect.STATE, state_key=KEY + "x", member_id=""))
    assert not state.owns(_membership(Dialect.STICKY, state_key=None, member_id="m1"))
    sticky = machine(dialect=Dialect.STICKY, member_id="m1")
    assert sticky.owns(_membership(Dialect.STICKY, state_key=None, member_id="m1"))
    # Another join of ours (another member id), or our state-form membership: not this one.
    assert not sticky.owns(_membership(Dialect.STICKY, state_key=None, member_id="m2"))
    assert not sticky.owns(ours)


# ------------------------------------------------- leave does not wait for a hung request


def test_leave_abandons_a_hung_join_and_still_takes_it_back() -> None:
    """Chaos finding: a leave waited up to 20 s for a state PUT on a stopped homeserver. The
    adapter abandons the request instead; the join may still land, so the delayed leave is
    sent at once, and the machine stops when that is answered."""
    m = machine()
    m.join(T0, transports=[LK])
    assert isinstance(m.next_action(T0), ScheduleDelayedLeave)
    m.receive_result(Ok(delay_id="d1"), T0 + 10)
    assert isinstance(m.next_action(T0 + 10), SendJoin)
    m.leave(T0 + 20)  # the join is on the wire, and will not be answered
    assert m.abandon(T0 + 20)
    assert m.in_flight is None
    assert m.next_action(T0 + 20) == SendDelayedLeaveNow(delay_id="d1")
    m.receive_result(Ok(), T0 + 30)
    assert isinstance(m.next_action(T0 + 30), ScheduleDelayedLeave)  # the late-join sweep
    m.receive_result(Ok(delay_id="d2"), T0 + 40)
    assert m.next_action(T0 + 40) == Stopped(None)


def test_leave_abandons_a_hung_restart_or_refresh() -> None:
    for hung in (RestartDelayedLeave, SendJoin):
        sim = joined_sim(config=MembershipConfig(expiry_ms=60_000))
        sim.run_for(50_000)
        while True:  # answer restarts until the request of the kind under test is sent
            now = sim.now
            action = sim.machine.next_action(now)
            if isinstance(action, Wait):
                sim._advance(action.until_ms)
                continue
            if isinstance(action, hung):
                break
            assert not isinstance(action, Stopped)
            sim.machine.receive_result(sim.server.answer(action, now), now)
        sim.machine.leave(now + 1_000)
        assert sim.machine.abandon(now + 1_000)
        assert sim.machine.next_action(now + 1_000) == SendDelayedLeaveNow(delay_id="d1")
        assert status(sim.machine) is MembershipStatus.DISCONNECTING


def test_a_request_of_the_current_plan_is_never_abandoned() -> None:
    m = machine()
    m.join(T0, transports=[LK])
    assert not m.abandon(T0)  # nothing in flight
    sched = m.next_action(T0)
    assert not m.abandon(T0)  # still needed: its answer drives the join
    assert m.in_flight == sched
    m.receive_result(Ok(delay_id="d1"), T0)
    assert isinstance(m.next_action(T0), SendJoin)
    m.leave(T0)
    assert m.abandon(T0)
    leave_now = m.next_action(T0)
    assert not m.abandon(T0)  # the leave's own request
    assert m.in_flight == leave_now


def test_expired_only_when_the_held_membership_is_ours_and_past_its_expiry() -> None:
    m = machine()
    ours = _membership(Dialect.STATE, state_key=KEY, member_id="")
    expiry = T0 + 14_400_000  # origin_server_ts + the default 4 h
    assert not m.expired_only(ours, expiry - 1)
    assert m.expired_only(ours, expiry)
    assert not m.expired_only(None, expiry)
    other_device = CallMembership(
        dialect=Dialect.STATE,
        event_id="$o",
        sender=ALICE,
        origin_server_ts=T0,
        data=SessionMembershipData.for_join(user_id=ALICE, device_id="OTHER", transports=[LK]),
        state_key=KEY,
    )
    assert not m.expired_only(other_device, expiry)
    assert not m.expired_only(_membership(Dialect.STICKY, state_key=None, member_id="m"), expiry)
    sticky = machine(dialect=Dialect.STICKY, member_id="m1")
    assert not sticky.expired_only(ours, expiry)  # the sticky form has no state to hold


def test_a_failure_is_final_only_once_the_caller_left() -> None:
    """The agent logs a give-up it re-joins after (partition-30s) as a warning, not an error."""
    server = FakeDelayedEventsServer(script={"SendJoin": deque([Rejected("M_FORBIDDEN")])})
    sim = joined_sim(server)
    with capture_logs() as logs:
        stopped = sim.run_for(HOUR)
    # The machine cannot know whether its caller joins again: never an error of its own.
    failed = [e for e in logs if e["event"] == "membership_machine_failed"]
    assert [e["log_level"] for e in failed] == ["warning"]
    assert stopped is not None
    assert stopped.error is not None
    assert stop_outcome(stopped, in_call=True) is StopOutcome.REJOIN
    assert stop_outcome(stopped, in_call=False) is StopOutcome.GAVE_UP
    # leave() after the failure: the machine still says why it stopped, and nothing re-joins.
    sim.machine.leave(sim.now)
    after_leave = sim.machine.next_action(sim.now)
    assert isinstance(after_leave, Stopped)
    assert stop_outcome(after_leave, in_call=False) is StopOutcome.GAVE_UP
    # A clean stop is never a failure, whether or not the caller still counts itself in.
    assert stop_outcome(Stopped(None), in_call=False) is StopOutcome.LEFT
    assert stop_outcome(Stopped(None), in_call=True) is StopOutcome.LEFT


# ----------------------------------------- a join abandoned for a leave may land after it


def _leave_with_a_join_on_the_wire(**kw: Any) -> OwnMembershipMachine:
    m = machine(**kw)
    m.join(T0, transports=[LK])
    assert isinstance(m.next_action(T0), ScheduleDelayedLeave)
    m.receive_result(Ok(delay_id="d1"), T0 + 10)
    assert isinstance(m.next_action(T0 + 10), SendJoin)
    m.leave(T0 + 20)
    assert m.abandon(T0 + 20)
    return m


def test_a_leave_that_abandoned_a_join_schedules_a_sweep_for_it() -> None:
    """The abandoned PUT may land after the leave (the sent delayed leave is gone by then):
    a ghost until it expires, hours later. The leave ends by scheduling a delayed leave
    that overwrites it, and the sweep is never the leave itself: that is sent first."""
    m = _leave_with_a_join_on_the_wire(config=MembershipConfig(late_join_sweep_ms=25_000))
    assert m.next_action(T0 + 20) == SendDelayedLeaveNow(delay_id="d1")
    m.receive_result(Ok(), T0 + 30)
    assert m.status is MembershipStatus.DISCONNECTING  # leave() waits for the sweep too
    sweep = m.next_action(T0 + 30)
    assert sweep == ScheduleDelayedLeave(
        event_type=m.event_type,
        state_key=m.state_key,
        content={},
        delay_ms=25_000,
        sticky_duration_ms=None,
    )
    m.receive_result(Ok(delay_id="sweep"), T0 + 40)
    assert m.next_action(T0 + 40) == Stopped(None)
    # Read through a call: mypy keeps m.status narrowed to DISCONNECTING from above.
    assert getattr(m, "status") is MembershipStatus.DISCONNECTED  # noqa: B009
    # A join on this machine within the sweep cancels it first, so it cannot remove it.
    m.join(T0 + 50, transports=[LK])
    assert m.next_action(T0 + 50) == CancelDelayedLeave(delay_id="sweep")


def test_the_sweep_follows_a_plain_leave_too_and_never_fails_the_leave() -> None:
    m = _leave_with_a_join_on_the_wire()
    assert isinstance(m.next_action(T0 + 20), SendDelayedLeaveNow)
    m.receive_result(NotFound(), T0 + 30)  # the delayed leave was gone: the leave content
    assert isinstance(m.next_action(T0 + 30), SendLeave)
    m.receive_result(Ok(event_id="$leave"), T0 + 40)
    assert isinstance(m.next_action(T0 + 40), ScheduleDelayedLeave)
    m.receive_result(NetworkError("unreachable"), T0 + 50)  # one attempt, no retry, no error
    assert m.next_action(T0 + 50) == Stopped(None)


def test_no_sweep_without_an_abandoned_join() -> None:
    # A plain leave.
    m = machine()
    m.join(T0, transports=[LK])
    m.next_action(T0)
    m.receive_result(Ok(delay_id="d1"), T0)
    m.next_action(T0)
    m.receive_result(Ok(event_id="$j"), T0)
    m.leave(T0 + 10)
    assert isinstance(m.next_action(T0 + 10), SendDelayedLeaveNow)
    m.receive_result(Ok(), T0 + 20)
    assert m.next_action(T0 + 20) == Stopped(None)
    # An abandoned restart (no join on the wire) needs none either.
    sim = joined_sim(config=MembershipConfig(expiry_ms=60_000))
    sim.run_for(50_000)
    while not isinstance(action := sim.machine.next_action(sim.now), RestartDelayedLeave):
        if isinstance(action, Wait):
            sim._advance(action.until_ms)
        else:
            assert not isinstance(action, Stopped)
            sim.machine.receive_result(sim.server.answer(action, sim.now), sim.now)
    sim.machine.leave(sim.now)
    assert sim.machine.abandon(sim.now)
    assert isinstance(sim.machine.next_action(sim.now), SendDelayedLeaveNow)
    sim.machine.receive_result(Ok(), sim.now)
    assert sim.machine.next_action(sim.now) == Stopped(None)
