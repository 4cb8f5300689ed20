"""When a member reads the resolved state at its own call membership key (pure rule)."""

from __future__ import annotations

from typing import Any

from matrixrtc.session.own_state import OwnStateWatch, at_own_key, resolved_differs

KEY = "_@a:hs_DEV_m.call"


def ev(event_id: str, ts: int, *, join: bool = True) -> dict[str, Any]:
    content: dict[str, Any] = {"application": "m.call", "device_id": "DEV"} if join else {}
    return {
        "type": "org.matrix.msc3401.call.member",
        "state_key": KEY,
        "event_id": event_id,
        "origin_server_ts": ts,
        "content": content,
    }


def test_a_plain_join_and_heartbeats_need_no_check() -> None:
    w = OwnStateWatch()
    assert not w.observe([ev("$j1", 1_000)], resolved=False)
    assert not w.observe([ev("$j2", 3_600_000)], resolved=False)  # hourly refresh


def test_a_rejoin_right_after_our_delayed_leave_fired_is_checked() -> None:
    """The soak's false kick: the stall fired our leave, we re-joined, the DAG forked."""
    w = OwnStateWatch()
    assert not w.observe([ev("$j1", 1_000)], resolved=False)
    assert not w.observe([ev("$l", 60_000, join=False)], resolved=False)
    assert w.observe([ev("$j2", 61_000)], resolved=False)
    # both in one update, too
    w2 = OwnStateWatch()
    assert w2.observe([ev("$l", 60_000, join=False), ev("$j2", 61_000)], resolved=False)


def test_a_rejoin_long_after_a_leave_is_no_fork() -> None:
    w = OwnStateWatch(window_ms=30_000)
    w.observe([ev("$l", 60_000, join=False)], resolved=False)
    assert not w.observe([ev("$j2", 100_000)], resolved=False)


def test_stream_order_older_than_time_order_is_checked() -> None:
    w = OwnStateWatch()
    w.observe([ev("$j2", 50_000)], resolved=False)
    assert w.observe([ev("$j1", 40_000)], resolved=False)


def test_with_state_after_the_update_is_resolved_already() -> None:
    w = OwnStateWatch()
    assert not w.observe(
        [ev("$l", 60_000, join=False), ev("$j2", 61_000), ev("$l", 60_000, join=False)],
        resolved=True,
    )


def test_the_same_event_seen_twice_counts_once() -> None:
    w = OwnStateWatch()
    w.observe([ev("$j1", 50_000)], resolved=False)
    assert not w.observe([ev("$j1", 50_000)], resolved=False)


def test_resolved_differs() -> None:
    held = ev("$j2", 61_000)
    assert resolved_differs(ev("$l", 60_000, join=False), held)
    assert not resolved_differs(ev("$j2", 61_000), held)
    assert resolved_differs(ev("$l", 60_000, join=False), None)
    assert not resolved_differs({"content": {}}, held)  # not an event (format=content)


def test_at_own_key_keeps_only_call_memberships_at_our_key_in_order() -> None:
    other_key = {**ev("$o", 1), "state_key": "_@b:hs_B_m.call"}
    other_type = {**ev("$t", 2), "type": "m.room.member"}
    mine = [ev("$1", 3), ev("$2", 4, join=False)]
    state = [other_key, mine[0], other_type, mine[1]]
    assert at_own_key(state, KEY) == mine
    assert at_own_key(state, None) == []  # the sticky form has no key
    assert at_own_key([], KEY) == []
