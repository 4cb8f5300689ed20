"""The controller's /sync room cache (pure): state and sticky memberships as /sync delivers
them, fed to the judge through the same reduction as the admin source's room state."""

from __future__ import annotations

import json
from typing import Any

from sfu.controller.ghosts import GhostJudge, Participant, Reason, room_view
from sfu.controller.registry import Grant
from sfu.controller.sync_source import ENDED_KEEP_MS, SyncRooms, live_sticky_join, sync_filter
from tests.unit.test_sfu_ghosts import ALICE, ROOM, T0, grant, member_ev, sticky_ev

NOW_MS = int(T0 * 1000)


def sync(
    *,
    state: tuple[dict[str, Any], ...] | list[dict[str, Any]] = (),
    timeline: tuple[dict[str, Any], ...] | list[dict[str, Any]] = (),
    sticky: tuple[dict[str, Any], ...] | list[dict[str, Any]] = (),
    left: bool = False,
) -> dict[str, Any]:
    if left:
        return {"next_batch": "s", "rooms": {"leave": {ROOM: {}}}}
    section = {
        "state": {"events": list(state)},
        "timeline": {"events": list(timeline)},
        "msc4354_sticky": {"events": list(sticky)},
    }
    return {"next_batch": "s", "rooms": {"join": {ROOM: section}}}


def judge(rooms: SyncRooms, now_ms: int, g: Grant | None = None) -> Reason:
    snap = rooms.snapshot(ROOM, now_ms)
    assert snap is not None
    v = room_view(snap.state, now_ms, sticky=snap.sticky)
    g = g or grant()
    [f] = GhostJudge(grace=0, join_grace=0).observe(
        [Participant(g.identity, "PA_1", T0)],
        {g.identity: g},
        {ROOM: v},
        registry_since=0,
        ended_hints={},
        now=now_ms / 1000,
    )
    return f.reason


def test_a_sticky_member_from_the_first_sync_then_its_leave_in_the_timeline() -> None:
    rooms = SyncRooms()
    join = sticky_ev(ALICE, "DEV", NOW_MS)
    changed = rooms.apply(sync(state=[member_ev(ALICE, "join")], sticky=[join]), NOW_MS)
    assert changed == {ROOM}
    assert judge(rooms, NOW_MS + 1000) is Reason.OK
    # nothing new: nothing changed
    assert rooms.apply({"next_batch": "t", "rooms": {"join": {ROOM: {}}}}, NOW_MS + 1500) == set()
    leave = sticky_ev(ALICE, "DEV", NOW_MS + 2000, left=True)
    assert rooms.apply(sync(timeline=[leave]), NOW_MS + 2000) == {ROOM}
    assert judge(rooms, NOW_MS + 2500) is Reason.CALL_ENDED


def test_state_changes_in_the_timeline_apply() -> None:
    rooms = SyncRooms()
    rooms.apply(
        sync(state=[member_ev(ALICE, "join")], sticky=[sticky_ev(ALICE, "DEV", NOW_MS)]), NOW_MS
    )
    assert rooms.apply(sync(timeline=[member_ev(ALICE, "ban", "@mod:hs")]), NOW_MS + 1) == {ROOM}
    assert judge(rooms, NOW_MS + 2) is Reason.BANNED


def test_an_ended_sticky_join_is_kept_a_while_so_the_end_is_seen() -> None:
    rooms = SyncRooms()
    ev = sticky_ev(ALICE, "DEV", NOW_MS, duration_ms=5000)
    rooms.apply(sync(state=[member_ev(ALICE, "join")], timeline=[ev]), NOW_MS)
    assert judge(rooms, NOW_MS + 6000) is Reason.CALL_ENDED
    snap = rooms.snapshot(ROOM, NOW_MS + 5000 + ENDED_KEEP_MS)
    assert snap is not None
    assert snap.sticky == []


def test_rooms_not_joined_or_left_are_unknown() -> None:
    rooms = SyncRooms()
    assert rooms.snapshot(ROOM, NOW_MS) is None
    rooms.apply(sync(state=[member_ev(ALICE, "join")]), NOW_MS)
    assert rooms.snapshot(ROOM, NOW_MS) is not None
    assert rooms.apply(sync(left=True), NOW_MS) == {ROOM}
    assert rooms.snapshot(ROOM, NOW_MS) is None


def test_the_filter_asks_for_what_the_judge_reads() -> None:
    f = json.loads(sync_filter())
    timeline = set(f["room"]["timeline"]["types"])
    assert {"org.matrix.msc4143.rtc.member", "m.room.encrypted", "m.room.member"} <= timeline
    assert "org.matrix.msc3401.call.member" in f["room"]["state"]["types"]


def test_the_last_look_before_a_no_membership_removal() -> None:
    """/messages, newest first: a sticky join of the device that its key has not since left
    and under an hour old keeps the participant, whatever the sync stream showed."""
    join = sticky_ev(ALICE, "DEV", NOW_MS)
    leave = sticky_ev(ALICE, "DEV", NOW_MS + 1000, left=True)
    assert live_sticky_join([join], ALICE, "DEV", NOW_MS + 5000)
    assert not live_sticky_join([leave, join], ALICE, "DEV", NOW_MS + 5000)
    assert not live_sticky_join([join], ALICE, "OTHER", NOW_MS + 5000)
    assert not live_sticky_join([join], ALICE, "DEV", NOW_MS + 3_600_000)
    assert not live_sticky_join([], ALICE, "DEV", NOW_MS)
    # another key of the same device (a second member id) still counts
    other_key = sticky_ev(ALICE, "DEV", NOW_MS + 2000, member_id="mem-2")
    assert live_sticky_join([leave, other_key, join], ALICE, "DEV", NOW_MS + 5000)


def test_state_after_wins_over_a_newer_timeline_event_that_lost_state_resolution() -> None:
    """After a stall forked the room's DAG, state resolution may keep a member's leave while
    its re-join is newest in stream order: MSC4222's state_after (asked for on every sync)
    tells the resolved state, and it must win over the timeline order."""
    from tests.unit.test_sfu_ghosts import call_ev

    rooms = SyncRooms()
    join = call_ev(ALICE, "DEV", NOW_MS)
    rooms.apply(sync(state=[member_ev(ALICE, "join"), join]), NOW_MS)
    leave = call_ev(ALICE, "DEV", NOW_MS + 1000, left=True)
    rejoin = call_ev(ALICE, "DEV", NOW_MS + 2000)
    after = {
        "timeline": {"events": [leave, rejoin]},
        "org.matrix.msc4222.state_after": {"events": [leave]},
    }
    rooms.apply({"next_batch": "t", "rooms": {"join": {ROOM: after}}}, NOW_MS + 2000)
    assert judge(rooms, NOW_MS + 2500) is Reason.CALL_ENDED
    # without state_after (older servers) the timeline order decides, as before
    legacy = SyncRooms()
    legacy.apply(sync(state=[member_ev(ALICE, "join"), join]), NOW_MS)
    legacy.apply(sync(timeline=[leave, rejoin]), NOW_MS + 2000)
    assert judge(legacy, NOW_MS + 2500) is Reason.OK
    # and a later state_after with the re-join (the client published again) brings it back
    rooms.apply(
        {"next_batch": "u", "rooms": {"join": {ROOM: {"state_after": {"events": [rejoin]}}}}},
        NOW_MS + 3000,
    )
    assert judge(rooms, NOW_MS + 3500) is Reason.OK
