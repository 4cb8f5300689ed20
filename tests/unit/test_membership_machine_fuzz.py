"""OwnMembershipMachine under arbitrary answers and observations (hypothesis).

Whatever the homeserver answers and whatever the session reports, the machine never raises,
never queues a step twice, keeps time moving forward, and after ``leave`` reaches ``Stopped``
once the server cooperates.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from matrixrtc.model import Dialect, LivekitTransport
from matrixrtc.session.membership_machine import (
    CancelDelayedLeave,
    DelayedEventsUnsupported,
    LocalTimeout,
    MaxDelayExceeded,
    MembershipStatus,
    NetworkError,
    NotFound,
    Ok,
    OwnMembershipMachine,
    OwnMembershipMissing,
    OwnMembershipSeen,
    Rejected,
    Request,
    Result,
    RetryAfter,
    ScheduleDelayedLeave,
    SendJoin,
    Stopped,
    Wait,
)

T0 = 1_753_000_000_000
LK = LivekitTransport(livekit_service_url="https://rtc.example.org/livekit/jwt")

results = st.one_of(
    st.builds(Ok),
    st.builds(NotFound),
    st.builds(RetryAfter, st.none() | st.integers(0, 20_000)),
    st.builds(NetworkError),
    st.builds(LocalTimeout),
    st.builds(MaxDelayExceeded, st.none() | st.integers(-5, 20_000)),
    st.builds(DelayedEventsUnsupported),
    st.builds(Rejected, st.sampled_from(["M_FORBIDDEN", "M_UNKNOWN", ""])),
)
events = st.lists(
    st.one_of(
        st.tuples(st.just("result"), results, st.integers(0, 3000)),
        st.tuples(st.just("seen"), st.integers(0, 2**45), st.just(0)),
        st.tuples(st.just("missing"), st.none(), st.just(0)),
        st.tuples(st.just("update"), st.sampled_from(["audio", "video"]), st.just(0)),
    ),
    max_size=60,
)


def _cooperative(request: Request, n: int) -> Result:
    if isinstance(request, ScheduleDelayedLeave):
        return Ok(delay_id=f"d{n}")
    if isinstance(request, SendJoin):
        return Ok(event_id=f"$e{n}")
    if isinstance(request, CancelDelayedLeave):
        return NotFound()
    return Ok()


def _queue_is_sane(m: OwnMembershipMachine) -> None:
    steps = [step for _, step in m.scheduled]
    assert len(steps) == len(set(steps)), steps


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events, st.integers(0, 60), st.sampled_from([Dialect.STATE, Dialect.STICKY]))
def test_machine_survives_anything_and_leaves(
    script: list[tuple[str, Any, int]], leave_at: int, dialect: Dialect
) -> None:
    m = OwnMembershipMachine(
        user_id="@a:example.org", device_id="D", dialect=dialect, member_id="uuid"
    )
    now = T0
    m.join(now, transports=[LK])
    for i, (kind, value, latency) in enumerate(script):
        if i == leave_at:
            m.leave(now)
        if kind == "seen":
            m.observe(OwnMembershipSeen(created_ts=value, event_id=f"$s{i}"), now)
            continue
        if kind == "missing":
            m.observe(OwnMembershipMissing(), now)
            continue
        if kind == "update":
            if m.joined:
                m.update_membership(now, intent=value)
            continue
        action = m.next_action(now)
        if isinstance(action, Stopped):
            break
        if isinstance(action, Wait):
            assert action.until_ms > now
            now = action.until_ms
            continue
        now += latency
        result = value
        if isinstance(result, Ok):
            result = _cooperative(action, i)
        m.receive_result(result, now)
        _queue_is_sane(m)
    # Now leave against a cooperative server: the machine must stop within a few steps.
    m.leave(now)
    for n in range(200):
        action = m.next_action(now)
        if isinstance(action, Stopped):
            break
        if isinstance(action, Wait):
            assert action.until_ms > now
            now = action.until_ms
            continue
        m.receive_result(_cooperative(action, 1000 + n), now)
        _queue_is_sane(m)
    else:
        raise AssertionError(f"no stop after leave; queue {m.scheduled}")
    assert m.status in (MembershipStatus.DISCONNECTED, MembershipStatus.FAILED)
    assert not m.has_membership_event or m.status is MembershipStatus.FAILED
