"""A hostile room, in the pure core (issue 18): the call goes on, memory stays bounded, and
every rejection is logged once per sender per minute.

10 000 honest memberships next to 10 000 forged state keys, a sticky-event flood (thousands
of sticky keys and thousands of events on one key from one sender), oversized contents, and a
to-device key flood with sender-chosen member ids and keys claiming other devices.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import MutableMapping
from typing import Any

from structlog.testing import capture_logs

from matrixrtc.e2ee import keys as keys_mod
from matrixrtc.e2ee.inbound import DropReason, RejectedKey, screen_key_message
from matrixrtc.e2ee.keys import KeyManager, Member
from matrixrtc.e2ee.messages import ElementCallKeys
from matrixrtc.model.rejections import RejectionLog
from matrixrtc.session import RTCSession
from matrixrtc.session.rtc_session import (
    MAX_STICKY_HISTORY,
    MAX_STICKY_KEYS_PER_SENDER,
)
from tests.unit.test_session_rtc import NOW, ROOM, state_ev, sticky_ev

MALLORY = "@mallory:evil.example"
ALICE = "@alice:example.org"


def _rejections(
    logs: list[MutableMapping[str, Any]], sender: str
) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == "membership_rejected" and e["sender"] == sender]


def test_ten_thousand_members_and_forged_state_keys() -> None:
    now = [0.0]
    rejections = RejectionLog(clock=lambda: now[0])
    s = RTCSession(ROOM, rejections=rejections)
    users = [f"@u{i}:example.org" for i in range(10_000)]
    s.set_joined_members([*users, MALLORY])
    started = time.perf_counter()
    with capture_logs() as logs:
        s.receive_room_update(state=[state_ev(u, "DEV") for u in users], now_ms=NOW)
        # Mallory writes call.member state at keys that belong to other users.
        forged = [state_ev(f"@victim{i}:example.org", "DEV", sender=MALLORY) for i in range(10_000)]
        s.receive_room_update(state=forged, now_ms=NOW)
        changes = s.update(NOW)
    elapsed = time.perf_counter() - started
    assert changes is not None
    assert len(s.memberships) == 10_000  # every honest member, no forged one
    assert {m.sender for m in s.memberships} == set(users)
    assert len(_rejections(logs, MALLORY)) == 1  # 10 000 rejections, one line this minute
    [changed] = [e for e in logs if e["event"] == "memberships_changed"]
    assert changed["n_joined"] == 10_000
    assert len(changed["joined"]) <= 20  # one bounded line, not 10 000 identities
    assert elapsed < 10
    # A minute later Mallory's next rejection is logged again, with the count suppressed.
    now[0] = 61.0
    with capture_logs() as logs:
        s.receive_state_event(state_ev("@victim0:example.org", "DEV2", sender=MALLORY))
    [line] = _rejections(logs, MALLORY)
    assert line["suppressed_before"] == 9_999
    # Memory: a forged key costs what its raw state event costs (room state, bounded by the
    # homeserver), no parsed membership; measured on 2 000 more.
    more = [state_ev(f"@late{i}:example.org", "DEV", sender=MALLORY) for i in range(2_000)]
    tracemalloc.start()
    s.receive_room_update(state=more, now_ms=NOW)
    s.update(NOW)
    grown, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"\n10 000 + 10 000 forged: {elapsed:.2f} s; {grown / 2000:.0f} B per forged key")
    assert grown / 2000 < 2048
    assert len(s.memberships) == 10_000


def test_sticky_flood_is_bounded_and_logged_once() -> None:
    now = [0.0]
    s = RTCSession(ROOM, rejections=RejectionLog(clock=lambda: now[0]))
    s.set_joined_members([ALICE, MALLORY])
    s.receive_sticky_event(sticky_ev(ALICE, "ADEV", "alice-m"), NOW)
    with capture_logs() as logs:
        for i in range(5_000):  # a new sticky key (member id) each time
            s.receive_sticky_event(sticky_ev(MALLORY, f"D{i}", f"m{i}"), NOW)
        for i in range(5_000):  # and thousands of events on one key
            s.receive_sticky_event(sticky_ev(MALLORY, "D0", "m0", ts=NOW + i), NOW)
    s.update(NOW)
    held = {k: v for k, v in s._sticky.items() if k[0] == MALLORY}
    assert len(held) == MAX_STICKY_KEYS_PER_SENDER
    assert all(len(v) <= MAX_STICKY_HISTORY for v in held.values())
    assert len(s.memberships) == 1 + MAX_STICKY_KEYS_PER_SENDER  # the call goes on for Alice
    assert any(m.sender == ALICE for m in s.memberships)
    lines = _rejections(logs, MALLORY)
    assert len(lines) == 1
    assert "sticky keys" in lines[0]["reason"]
    # Expired keys make room again.
    s.update(NOW + 3_600_001)
    assert not s._sticky
    s.receive_sticky_event(
        sticky_ev(MALLORY, "D9999", "m9999", ts=NOW + 3_600_002), NOW + 3_600_002
    )
    assert (MALLORY, "m9999") in s._sticky


def test_oversized_contents_are_no_membership() -> None:
    s = RTCSession(ROOM, rejections=RejectionLog())
    s.set_joined_members([ALICE, MALLORY])
    big = state_ev(MALLORY, "DEV")
    big["content"]["padding"] = "x" * 70_000
    big_sticky = sticky_ev(MALLORY, "DEV2", "m2")
    big_sticky["content"]["padding"] = "x" * 70_000
    with capture_logs() as logs:
        s.receive_state_event(big)
        s.receive_sticky_event(big_sticky, NOW)
        s.receive_state_event(state_ev(ALICE, "ADEV"))
    s.update(NOW)
    assert [m.sender for m in s.memberships] == [ALICE]
    assert any("larger than a Matrix event" in e["reason"] for e in _rejections(logs, MALLORY))


def test_to_device_key_flood_keeps_the_records_bounded() -> None:
    km = KeyManager(Member.state_form(ALICE, "ADEV", NOW))
    km.update_members(
        [
            Member.state_form(ALICE, "ADEV", NOW),
            Member.state_form(MALLORY, "MDEV", NOW),
        ],
        NOW,
    )
    with capture_logs() as logs:
        for i in range(20_000):  # sender-chosen member ids: a new ring name each time
            km.receive_key(MALLORY, "MDEV", f"member-{i}", i % 256, b"k" * 16, NOW + i)
        for i in range(5_000):  # devices without a membership: buffered, bounded
            km.receive_key(MALLORY, f"GHOST{i}", None, 0, b"k" * 16, NOW + i)
    assert len(km.rings) <= keys_mod.MAX_RINGS
    assert len(km._latest) <= keys_mod.MAX_LATEST
    assert km.early_keys <= keys_mod.MAX_EARLY_KEYS
    buffered = [e for e in logs if e["event"] == "e2ee.key_buffered_until_membership"]
    assert len(buffered) <= 1  # once a minute for this sender (the module-wide throttle)


def test_keys_claiming_other_devices_are_dropped() -> None:
    content = ElementCallKeys(
        room_id=ROOM, index=0, key=b"k" * 16, claimed_device_id="ADEV", member_id="m"
    ).to_json()
    verdict = screen_key_message(
        event_type="io.element.call.encryption_keys",
        content=content,
        sender=MALLORY,
        sender_device="MDEV",
        encrypted=True,
        room_id=ROOM,
        room_encrypted=True,
        own_device=(ALICE, "ADEV"),
    )
    assert isinstance(verdict, RejectedKey)
    assert verdict.reason is DropReason.CLAIMED_DEVICE_MISMATCH
