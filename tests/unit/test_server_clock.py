"""State-form expiry judged on the homeserver's clock: the skew estimate from ``unsigned.age``
(matrixrtc.session.server_clock) and the session's use of it (a device 30 s ahead no longer
sees every other member expire 30 s before their refresh)."""

from __future__ import annotations

from typing import Any

import pytest

from matrixrtc.session.server_clock import SAMPLES, TOLERANCE_MS, ServerClock
from tests.unit.test_session_rtc import ALICE, NOW, session, state_ev, who


def served(ots: int, age: int) -> dict[str, Any]:
    return {"type": "m.room.message", "origin_server_ts": ots, "unsigned": {"age": age}}


def test_offset_is_the_median_of_receipt_minus_server_time() -> None:
    clock = ServerClock()
    assert clock.offset_ms == 0
    # Served 200 ms after it was sent; received 30 s "later" on a clock 30 s ahead (+ 40 ms).
    for transit in (40, 35, 5_000, 38, 41):  # one response held up 5 s under load
        clock.observe(served(NOW, 200), NOW + 200 + 30_000 + transit)
    assert clock.offset_ms == 30_040


def test_agreeing_clocks_and_transit_time_count_as_no_skew() -> None:
    clock = ServerClock()
    for transit in (30, 900, 1_500, 60):
        clock.observe(served(NOW, 10), NOW + 10 + transit)
    assert clock.offset_ms == 0  # below the tolerance: js-sdk's rule, unchanged
    behind = ServerClock()
    behind.observe(served(NOW, 0), NOW - TOLERANCE_MS - 500)
    assert behind.offset_ms == -TOLERANCE_MS - 500


@pytest.mark.parametrize(
    "event",
    [
        {"origin_server_ts": NOW},
        {"origin_server_ts": NOW, "unsigned": {"age": -1}},
        {"origin_server_ts": NOW, "unsigned": {"age": True}},
        {"origin_server_ts": "1", "unsigned": {"age": 5}},
        {"origin_server_ts": NOW, "unsigned": "age"},
    ],
)
def test_events_without_a_usable_age_are_no_sample(event: dict[str, Any]) -> None:
    clock = ServerClock()
    clock.observe(event, NOW + 60_000)
    assert clock.offset_ms == 0


def test_only_recent_samples_count() -> None:
    clock = ServerClock()
    for _ in range(SAMPLES):
        clock.observe(served(NOW, 0), NOW + 30_000)
    for _ in range(SAMPLES):
        clock.observe(served(NOW, 0), NOW)  # the device's clock was set right
    assert clock.offset_ms == 0


def test_a_device_ahead_judges_expiry_on_the_homeservers_clock() -> None:
    s = session()
    s.receive_state_event(state_ev(ALICE, "A1", ts=NOW, expires=40_000))
    ahead = NOW + 30_000  # this device's clock when the homeserver's reads NOW
    # Uncorrected (js-sdk): expired 10 s after the join, 25 s before the owner's refresh.
    s.update(ahead + 10_000)
    assert who(s) == []
    s.clock_offset_ms = 30_000
    s.update(ahead + 10_000)
    assert who(s) == [(ALICE, "A1")]
    assert s.next_wakeup_ms() == ahead + 40_000
    assert s.update(ahead + 39_999) is None
    changes = s.update(ahead + 40_000)
    assert changes is not None
    assert [m.sender for m in changes.left] == [ALICE]
