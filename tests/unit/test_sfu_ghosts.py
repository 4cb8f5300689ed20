"""The controller's judge (pure): each rule, grace timing, and what must never be removed."""

from __future__ import annotations

import re
from typing import Any

from matrixrtc.model.membership import RtcMemberData, sticky_leave_content
from matrixrtc.model.transports import LivekitTransport
from sfu.controller.ghosts import GhostJudge, Participant, Reason, RoomView, Verdict, room_view
from sfu.controller.registry import Grant

ROOM = "!r:hs"
ALICE = "@alice:hs"
T0 = 1_000_000.0  # wall seconds: the participant joined LiveKit


def grant(identity: str = "id-a", user: str = ALICE, device: str = "DEV") -> Grant:
    return Grant(
        room="lk",
        identity=identity,
        matrix_room=ROOM,
        slot_id="m.call#ROOM",
        user_id=user,
        device_id=device,
        member_id=identity,
        server_name="hs",
        endpoint="sfu_get",
        issued_at=T0 - 1,
    )


def member_ev(user: str, membership: str, sender: str | None = None) -> dict[str, Any]:
    return {
        "type": "m.room.member",
        "state_key": user,
        "sender": sender or user,
        "event_id": f"$m{user}{membership}",
        "origin_server_ts": 1,
        "content": {"membership": membership},
    }


def call_ev(
    user: str, device: str, ts_ms: int, *, left: bool = False, expires: int = 3_600_000
) -> dict[str, Any]:
    content: dict[str, Any] = (
        {}
        if left
        else {
            "application": "m.call",
            "call_id": "",
            "scope": "m.room",
            "device_id": device,
            "expires": expires,
            "created_ts": ts_ms,
            "focus_active": {"type": "livekit", "focus_selection": "oldest_membership"},
            "foci_preferred": [
                {"type": "livekit", "livekit_service_url": "https://x", "livekit_alias": ROOM}
            ],
        }
    )
    return {
        "type": "org.matrix.msc3401.call.member",
        "state_key": f"_{user}_{device}_m.call",
        "sender": user,
        "event_id": f"$c{ts_ms}{left}",
        "origin_server_ts": ts_ms,
        "content": content,
    }


def sticky_ev(
    user: str,
    device: str,
    ts_ms: int,
    *,
    member_id: str = "mem-1",
    left: bool = False,
    duration_ms: int = 3_600_000,
) -> dict[str, Any]:
    """An ``org.matrix.msc4143.rtc.member`` sticky event as a joined account's /sync shows it."""
    content = (
        sticky_leave_content(member_id)
        if left
        else RtcMemberData.for_join(
            user_id=user,
            device_id=device,
            member_id=member_id,
            transports=[LivekitTransport(livekit_service_url="https://x")],
        ).to_json()
    )
    return {
        "type": "org.matrix.msc4143.rtc.member",
        "sender": user,
        "event_id": f"$s{ts_ms}{left}",
        "origin_server_ts": ts_ms,
        "msc4354_sticky": {"duration_ms": duration_ms},
        "content": content,
    }


def view(
    *events: dict[str, Any],
    now: float = T0 + 10,
    sticky: list[tuple[dict[str, Any], int]] | None = None,
    sticky_visible: bool = True,
) -> RoomView:
    """A room as a source that shows sticky events (unless ``sticky_visible`` is False)."""
    held: list[tuple[object, int]] | None = list(sticky or []) if sticky_visible else None
    return room_view(events, int(now * 1000), sticky=held)


P = Participant("id-a", "PA_1", T0)


def judge_once(
    j: GhostJudge,
    v: RoomView | None,
    now: float,
    *,
    p: Participant = P,
    grants: dict[str, Grant] | None = None,
    since: float = 0.0,
    hints: dict[str, float] | None = None,
) -> tuple[Reason, Verdict]:
    g = {"id-a": grant()} if grants is None else grants
    [f] = j.observe([p], g, {ROOM: v}, registry_since=since, ended_hints=hints or {}, now=now)
    return f.reason, f.verdict


def test_active_membership_is_kept() -> None:
    v = view(member_ev(ALICE, "join"), call_ev(ALICE, "DEV", int(T0 * 1000)))
    assert judge_once(GhostJudge(), v, T0 + 100) == (Reason.OK, Verdict.KEEP)


def test_ban_is_removed_after_grace_not_before() -> None:
    j = GhostJudge(grace=2)
    v = view(member_ev(ALICE, "ban", "@mod:hs"), call_ev(ALICE, "DEV", int(T0 * 1000)))
    assert judge_once(j, v, T0 + 10) == (Reason.BANNED, Verdict.WATCH)
    assert judge_once(j, v, T0 + 11.9) == (Reason.BANNED, Verdict.WATCH)
    assert judge_once(j, v, T0 + 12) == (Reason.BANNED, Verdict.REMOVE)


def test_leave_by_user_and_kick_by_moderator() -> None:
    j = GhostJudge(grace=0)
    assert judge_once(j, view(member_ev(ALICE, "leave")), T0 + 5)[0] is Reason.LEFT_ROOM
    kicked = view(member_ev(ALICE, "leave", "@mod:hs"))
    assert judge_once(j, kicked, T0 + 5) == (Reason.KICKED, Verdict.REMOVE)


def test_call_leave_after_join_is_definite_but_an_old_one_waits_for_join_grace() -> None:
    j = GhostJudge(grace=2, join_grace=30)
    after = view(member_ev(ALICE, "join"), call_ev(ALICE, "DEV", int((T0 + 5) * 1000), left=True))
    assert judge_once(j, after, T0 + 6)[0] is Reason.CALL_ENDED
    assert judge_once(j, after, T0 + 8)[1] is Verdict.REMOVE
    # a leave from an earlier call (before this LiveKit join): the client may still publish
    j2 = GhostJudge(grace=2, join_grace=30)
    before = view(member_ev(ALICE, "join"), call_ev(ALICE, "DEV", int((T0 - 60) * 1000), left=True))
    assert judge_once(j2, before, T0 + 6) == (Reason.NO_MEMBERSHIP, Verdict.WATCH)
    assert judge_once(j2, before, T0 + 29) == (Reason.NO_MEMBERSHIP, Verdict.WATCH)
    assert judge_once(j2, before, T0 + 30) == (Reason.NO_MEMBERSHIP, Verdict.REMOVE)


def test_expired_membership_ends_the_call() -> None:
    j = GhostJudge(grace=0)
    v = view(
        member_ev(ALICE, "join"),
        call_ev(ALICE, "DEV", int(T0 * 1000), expires=5_000),
        now=T0 + 6,
    )
    assert judge_once(j, v, T0 + 6) == (Reason.CALL_ENDED, Verdict.REMOVE)


def test_seen_active_then_gone_is_call_ended() -> None:
    j = GhostJudge(grace=1, join_grace=30)
    active = view(member_ev(ALICE, "join"), call_ev(ALICE, "DEV", int(T0 * 1000)))
    assert judge_once(j, active, T0 + 5)[0] is Reason.OK
    gone = view(member_ev(ALICE, "join"))  # state event vanished (e.g. redacted)
    assert judge_once(j, gone, T0 + 6) == (Reason.CALL_ENDED, Verdict.WATCH)
    assert judge_once(j, gone, T0 + 7) == (Reason.CALL_ENDED, Verdict.REMOVE)


def test_a_rejoin_within_grace_cancels_the_removal() -> None:
    j = GhostJudge(grace=2)
    left = view(member_ev(ALICE, "join"), call_ev(ALICE, "DEV", int((T0 + 5) * 1000), left=True))
    assert judge_once(j, left, T0 + 6)[1] is Verdict.WATCH
    back = view(member_ev(ALICE, "join"), call_ev(ALICE, "DEV", int((T0 + 7) * 1000)))
    assert judge_once(j, back, T0 + 7)[1] is Verdict.KEEP
    # leaving again starts a fresh grace period
    again = view(member_ev(ALICE, "join"), call_ev(ALICE, "DEV", int((T0 + 9) * 1000), left=True))
    assert judge_once(j, again, T0 + 10)[1] is Verdict.WATCH
    assert judge_once(j, again, T0 + 12)[1] is Verdict.REMOVE


def test_invisible_room_is_never_acted_on_without_a_hint() -> None:
    j = GhostJudge(grace=0, join_grace=0)
    assert judge_once(j, None, T0 + 1000) == (Reason.UNKNOWN, Verdict.KEEP)
    # a delayed-leave job reported the membership gone after this join
    got = judge_once(j, None, T0 + 1000, hints={"id-a": T0 + 10})
    assert got == (Reason.CALL_ENDED, Verdict.REMOVE)
    # a hint from before this LiveKit session says nothing about it
    assert judge_once(GhostJudge(grace=0), None, T0 + 1000, hints={"id-a": T0 - 1})[0] is (
        Reason.UNKNOWN
    )


def test_foreign_tokens() -> None:
    j = GhostJudge(grace=2, allow_identities=re.compile(r"bot-.*"))
    assert judge_once(j, None, T0 + 1, grants={}) == (Reason.FOREIGN_TOKEN, Verdict.WATCH)
    assert judge_once(j, None, T0 + 2, grants={}) == (Reason.FOREIGN_TOKEN, Verdict.REMOVE)
    # joined before the registry existed: maybe a token from before an upgrade
    assert judge_once(j, None, T0 + 9, grants={}, since=T0 + 1)[0] is Reason.UNKNOWN
    # egress/ingress/agent kinds and allow-listed identities
    egress = Participant("EG_x", "PA_2", T0, standard=False)
    assert judge_once(j, None, T0 + 9, p=egress, grants={})[0] is Reason.ALLOWED
    bot = Participant("bot-recorder", "PA_3", T0)
    assert judge_once(j, None, T0 + 9, p=bot, grants={})[0] is Reason.ALLOWED


def test_memberships_not_required_for_sticky_only_clients() -> None:
    j = GhostJudge(grace=0, join_grace=0, require_membership=False)
    assert judge_once(j, view(member_ev(ALICE, "join")), T0 + 100)[0] is Reason.UNKNOWN


def test_another_device_or_a_forged_key_does_not_count() -> None:
    j = GhostJudge(grace=0, join_grace=0)
    other = view(member_ev(ALICE, "join"), call_ev(ALICE, "OTHER", int(T0 * 1000)))
    assert judge_once(j, other, T0 + 1)[0] is Reason.NO_MEMBERSHIP
    forged = call_ev(ALICE, "DEV", int(T0 * 1000))
    forged["sender"] = "@mallory:hs"  # anyone may write another user's `_@…` key
    assert judge_once(j, view(member_ev(ALICE, "join"), forged), T0 + 1)[0] is (
        Reason.NO_MEMBERSHIP
    )


def test_memory_is_dropped_for_departed_sessions() -> None:
    j = GhostJudge(grace=5)
    v = view(member_ev(ALICE, "ban", "@mod:hs"))
    judge_once(j, v, T0 + 1)
    j.forget_except([])
    # a new session of the same identity starts its own grace period
    p2 = Participant("id-a", "PA_new", T0 + 2)
    assert judge_once(j, v, T0 + 6, p=p2)[1] is Verdict.WATCH


def test_active_members_count_only_joined_users() -> None:
    v = view(
        member_ev(ALICE, "leave", "@mod:hs"),
        call_ev(ALICE, "DEV", int(T0 * 1000)),
        member_ev("@bob:hs", "join"),
        call_ev("@bob:hs", "B", int(T0 * 1000)),
        call_ev("@bob:hs", "OLD", int((T0 - 7200) * 1000), expires=1000),
    )
    assert v.active_members() == 1


def test_after_a_homeserver_outage_an_ending_call_waits_for_the_client_to_rejoin() -> None:
    j = GhostJudge(grace=2)
    left = view(member_ev(ALICE, "join"), call_ev(ALICE, "DEV", int((T0 + 5) * 1000), left=True))
    patient = T0 + 36  # homeserver last failed at T0 + 6; outage grace 30 s

    def once(now: float) -> tuple[Reason, Verdict]:
        [f] = j.observe(
            [P],
            {"id-a": grant()},
            {ROOM: left},
            registry_since=0.0,
            ended_hints={},
            now=now,
            patient_until=patient,
        )
        return f.reason, f.verdict

    assert once(T0 + 7) == (Reason.CALL_ENDED, Verdict.WATCH)
    assert once(T0 + 20) == (Reason.CALL_ENDED, Verdict.WATCH)
    assert once(T0 + 36) == (Reason.CALL_ENDED, Verdict.REMOVE)
    # a ban right after the outage is explicit: no extra patience
    j2 = GhostJudge(grace=2)
    banned = view(member_ev(ALICE, "ban", "@mod:hs"))
    [f] = j2.observe(
        [P],
        {"id-a": grant()},
        {ROOM: banned},
        registry_since=0.0,
        ended_hints={},
        now=T0 + 7,
        patient_until=patient,
    )
    [f] = j2.observe(
        [P],
        {"id-a": grant()},
        {ROOM: banned},
        registry_since=0.0,
        ended_hints={},
        now=T0 + 9,
        patient_until=patient,
    )
    assert f.verdict is Verdict.REMOVE


async def test_memory_registry_forgets_rooms_unused_for_a_day() -> None:
    from dataclasses import replace

    from sfu.controller.registry import GRANT_TTL, MemoryRegistry

    now = [T0]
    reg = MemoryRegistry(clock=lambda: now[0])
    await reg.record(grant("kept"))
    await reg.record(replace(grant("old"), room="old-room"))
    now[0] += GRANT_TTL / 2
    await reg.touch("lk")
    now[0] += GRANT_TTL / 2 + 1
    for i in range(1024):  # the sweep runs every 1024 records
        await reg.record(replace(grant(f"n{i}"), room="busy"))
    assert "kept" in await reg.room_grants("lk")
    assert await reg.room_grants("old-room") == {}


# -------------------------------------------------------------- sticky memberships (MSC4354)


def test_a_sticky_member_is_kept() -> None:
    j = GhostJudge(grace=0, join_grace=0)
    ts = int(T0 * 1000)
    v = view(member_ev(ALICE, "join"), sticky=[(sticky_ev(ALICE, "DEV", ts), ts)], now=T0 + 100)
    assert judge_once(j, v, T0 + 100) == (Reason.OK, Verdict.KEEP)
    assert v.active_members() == 1


def test_a_sticky_leave_after_the_join_ends_the_call() -> None:
    j = GhostJudge(grace=2, join_grace=30)
    ts = int(T0 * 1000)
    joined = (sticky_ev(ALICE, "DEV", ts), ts)
    left = (sticky_ev(ALICE, "DEV", ts + 5000, left=True), ts + 5000)
    # the leave names only the sticky key: the device comes from the key's join
    v = view(member_ev(ALICE, "join"), sticky=[left, joined], now=T0 + 6)
    assert v.active_members() == 0
    assert judge_once(j, v, T0 + 6) == (Reason.CALL_ENDED, Verdict.WATCH)
    assert judge_once(j, v, T0 + 8) == (Reason.CALL_ENDED, Verdict.REMOVE)


def test_a_sticky_join_ends_when_its_stickiness_runs_out() -> None:
    j = GhostJudge(grace=0, join_grace=30)
    ts = int(T0 * 1000)
    ev = sticky_ev(ALICE, "DEV", ts, duration_ms=5_000)
    assert (
        judge_once(j, view(member_ev(ALICE, "join"), sticky=[(ev, ts)], now=T0 + 4), T0 + 4)[0]
        is Reason.OK
    )
    expired = view(member_ev(ALICE, "join"), sticky=[(ev, ts)], now=T0 + 6)
    assert judge_once(j, expired, T0 + 6) == (Reason.CALL_ENDED, Verdict.REMOVE)
    # the server's remaining time (unsigned ttl) counts from receipt
    late = {**ev, "unsigned": {"msc4354_sticky_duration_ttl_ms": 10_000}}
    v = view(member_ev(ALICE, "join"), sticky=[(late, ts + 3000)], now=T0 + 12)
    assert judge_once(GhostJudge(grace=0), v, T0 + 12)[0] is Reason.OK


def test_a_newer_sticky_join_replaces_a_leave_of_the_same_key() -> None:
    ts = int(T0 * 1000)
    events = [
        (sticky_ev(ALICE, "DEV", ts), ts),
        (sticky_ev(ALICE, "DEV", ts + 1000, left=True), ts + 1000),
        (sticky_ev(ALICE, "DEV", ts + 2000), ts + 2000),
    ]
    v = view(member_ev(ALICE, "join"), sticky=events, now=T0 + 3)
    assert judge_once(GhostJudge(grace=0), v, T0 + 3)[0] is Reason.OK


def test_a_sticky_membership_of_another_device_or_sender_does_not_count() -> None:
    j = GhostJudge(grace=0, join_grace=0)
    ts = int(T0 * 1000)
    other = view(member_ev(ALICE, "join"), sticky=[(sticky_ev(ALICE, "OTHER", ts), ts)])
    assert judge_once(j, other, T0 + 1)[0] is Reason.NO_MEMBERSHIP
    forged = sticky_ev(ALICE, "DEV", ts)
    forged["sender"] = "@mallory:hs"  # member.user_id must be the sender
    assert judge_once(j, view(member_ev(ALICE, "join"), sticky=[(forged, ts)]), T0 + 1)[0] is (
        Reason.NO_MEMBERSHIP
    )


def test_where_sticky_memberships_cannot_be_read_nobody_is_removed_for_having_none() -> None:
    """The admin room-state API shows no sticky events; an encrypted sticky event cannot be
    read. A member publishing only a sticky membership must not look memberless there."""
    j = GhostJudge(grace=0, join_grace=0)
    blind = view(member_ev(ALICE, "join"), sticky_visible=False)
    assert judge_once(j, blind, T0 + 100) == (Reason.UNKNOWN, Verdict.KEEP)
    ts = int(T0 * 1000)
    encrypted = {
        "type": "m.room.encrypted",
        "sender": ALICE,
        "event_id": "$enc",
        "origin_server_ts": ts,
        "msc4354_sticky": {"duration_ms": 60_000},
        "content": {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "..."},
    }
    opaque = view(member_ev(ALICE, "join"), sticky=[(encrypted, ts)])
    assert judge_once(j, opaque, T0 + 10) == (Reason.UNKNOWN, Verdict.KEEP)
    # once that event is no longer sticky, nothing unreadable is left: no membership
    stale = view(member_ev(ALICE, "join"), sticky=[(encrypted, ts)], now=T0 + 61)
    assert judge_once(j, stale, T0 + 61)[0] is Reason.NO_MEMBERSHIP
    # other evidence still counts where sticky events are invisible
    left = view(
        member_ev(ALICE, "join"),
        call_ev(ALICE, "DEV", int((T0 + 5) * 1000), left=True),
        sticky_visible=False,
    )
    assert judge_once(GhostJudge(grace=0), left, T0 + 6)[0] is Reason.CALL_ENDED
    banned = view(member_ev(ALICE, "ban", "@mod:hs"), sticky_visible=False)
    assert judge_once(GhostJudge(grace=0), banned, T0 + 6)[0] is Reason.BANNED


def _ended_burst(j: GhostJudge, n: int, now: float, spread: float = 0.5) -> list[Verdict]:
    """``n`` participants, each in its own session, whose memberships all ended around
    T0 + 5 (``spread`` s apart): the verdict of each at ``now``."""
    out = []
    for i in range(n):
        user, sid = f"@u{i}:hs", f"PA_{i}"
        v = view(
            member_ev(user, "join"),
            call_ev(user, "DEV", int((T0 + 5 + i * spread) * 1000), left=True),
            now=now,
        )
        g = {f"id-{i}": grant(f"id-{i}", user)}
        [f] = j.observe(
            [Participant(f"id-{i}", sid, T0)],
            g,
            {ROOM: v},
            registry_since=0.0,
            ended_hints={},
            now=now,
        )
        assert f.reason is Reason.CALL_ENDED
        out.append(f.verdict)
    return out


def test_a_burst_of_delayed_leaves_firing_together_gets_the_burst_grace() -> None:
    """A homeserver stall fires every pending delayed leave at once: three or more call
    memberships ending within the window wait ``burst_grace``, not ``grace``."""
    j = GhostJudge(grace=2, burst_count=3, burst_window=10, burst_grace=30)
    assert _ended_burst(j, 3, T0 + 6) == [Verdict.WATCH] * 3
    assert _ended_burst(j, 3, T0 + 9) == [Verdict.WATCH] * 3  # plain grace would remove
    assert _ended_burst(j, 3, T0 + 35.9) == [Verdict.WATCH] * 3
    assert _ended_burst(j, 3, T0 + 36) == [Verdict.REMOVE] * 3


def test_two_endings_or_endings_far_apart_are_no_burst() -> None:
    j = GhostJudge(grace=2, burst_count=3, burst_window=10, burst_grace=30)
    assert _ended_burst(j, 2, T0 + 6) == [Verdict.WATCH] * 2
    assert _ended_burst(j, 2, T0 + 8) == [Verdict.REMOVE] * 2
    spread = GhostJudge(grace=2, burst_count=3, burst_window=10, burst_grace=30)
    _ended_burst(spread, 3, T0 + 30, spread=11)  # 11 s apart by their leaves' timestamps
    assert _ended_burst(spread, 3, T0 + 32, spread=11) == [Verdict.REMOVE] * 3
    off = GhostJudge(grace=2, burst_count=0)
    _ended_burst(off, 5, T0 + 6)
    assert _ended_burst(off, 5, T0 + 8) == [Verdict.REMOVE] * 5


def test_members_recovering_fast_do_not_shorten_the_burst_patience_of_the_rest() -> None:
    j = GhostJudge(grace=2, burst_count=3, burst_window=10, burst_grace=30)
    _ended_burst(j, 3, T0 + 6)
    for i in (0, 1):  # two publish again at once: their sessions are fine and kept
        user = f"@u{i}:hs"
        back = view(member_ev(user, "join"), call_ev(user, "DEV", int((T0 + 7) * 1000)))
        [f] = j.observe(
            [Participant(f"id-{i}", f"PA_{i}", T0)],
            {f"id-{i}": grant(f"id-{i}", user)},
            {ROOM: back},
            registry_since=0.0,
            ended_hints={},
            now=T0 + 7,
        )
        assert f.verdict is Verdict.KEEP
    user = "@u2:hs"
    still = view(member_ev(user, "join"), call_ev(user, "DEV", int((T0 + 6) * 1000), left=True))

    def third(now: float) -> Verdict:
        [f] = j.observe(
            [Participant("id-2", "PA_2", T0)],
            {"id-2": grant("id-2", user)},
            {ROOM: still},
            registry_since=0.0,
            ended_hints={},
            now=now,
        )
        return f.verdict

    assert third(T0 + 20) is Verdict.WATCH
    assert third(T0 + 36) is Verdict.REMOVE
