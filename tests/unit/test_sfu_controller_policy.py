"""The controller's own decisions around the judge (no LiveKit, no homeserver): the last looks
before a removal (``no_membership``: a sticky join; any Matrix reason: the room's resolved
current state), and when the next cycle runs."""

from __future__ import annotations

from typing import Any

from sfu.controller.config import ControllerConfig
from sfu.controller.controller import Controller, _RoomResult
from sfu.controller.ghosts import Finding, Participant, Reason, Verdict
from sfu.controller.leader import LocalLeadership
from sfu.controller.matrix_source import RoomSnapshot, SourceCheck
from sfu.controller.registry import MemoryRegistry
from tests.unit.test_sfu_ghosts import grant

NOW = 1_000_000.0


class FakeSource:
    kind = "fake"
    last_failure = 0.0

    def __init__(self, holds: bool, state: list[dict[str, Any]] | None = None) -> None:
        self.holds = holds
        self.asked: list[tuple[str, str, str]] = []
        self.state = state
        self.state_reads = 0

    async def start(self) -> None: ...
    async def close(self) -> None: ...

    async def probe(self) -> SourceCheck:
        return SourceCheck(True, "fake")

    async def room(self, room_id: str) -> RoomSnapshot | None:
        return None

    async def wait_changed(self, within: float) -> bool:
        return False

    async def may_hold_membership(self, room_id: str, user_id: str, device_id: str) -> bool:
        self.asked.append((room_id, user_id, device_id))
        return self.holds

    async def current_state(self, room_id: str) -> list[dict[str, Any]] | None:
        self.state_reads += 1
        return self.state


def controller(source: Any, **cfg: Any) -> Controller:
    config = ControllerConfig(livekit_url="ws://x", key="k", secret="s", **cfg)
    return Controller(
        config,
        MemoryRegistry(),
        registry_complete=True,
        source=source,
        leadership=LocalLeadership(),
        clock=lambda: NOW,
    )


def finding(reason: Reason, verdict: Verdict = Verdict.REMOVE, due: float | None = None) -> Finding:
    return Finding(Participant("id-a", "PA_1", NOW - 60), reason, verdict, grant(), NOW - 5, due)


async def test_no_membership_is_removed_only_once_the_source_confirms_it() -> None:
    confirmed = FakeSource(holds=False)
    assert await controller(confirmed)._confirmed_memberless(finding(Reason.NO_MEMBERSHIP))
    assert confirmed.asked == [("!r:hs", "@alice:hs", "DEV")]
    doubtful = FakeSource(holds=True)
    c = controller(doubtful)
    assert not await c._confirmed_memberless(finding(Reason.NO_MEMBERSHIP))
    # the doubt holds a while: no request per cycle for the same session
    assert not await c._confirmed_memberless(finding(Reason.NO_MEMBERSHIP))
    assert len(doubtful.asked) == 1
    # without any source there is nothing to confirm with
    assert not await controller(None)._confirmed_memberless(finding(Reason.NO_MEMBERSHIP))


def test_the_next_cycle_comes_when_a_removal_falls_due() -> None:
    c = controller(None, interval=1.0)
    watched = _RoomResult("lk", [finding(Reason.BANNED, Verdict.WATCH, due=NOW + 0.3)])
    assert 0.3 <= c._next_wait([watched]) <= 0.35
    later = _RoomResult("lk", [finding(Reason.BANNED, Verdict.WATCH, due=NOW + 5)])
    assert c._next_wait([later]) == 1.0
    assert c._next_wait([]) == 1.0


async def test_a_removal_on_matrix_evidence_needs_the_current_state_to_agree() -> None:
    """The stream said the call ended; the room's resolved current state, read just before
    the removal, decides (a re-join that won state resolution keeps the member)."""
    from tests.unit.test_sfu_ghosts import ALICE, call_ev, member_ev

    joined = member_ev(ALICE, "join")
    active = FakeSource(holds=False, state=[joined, call_ev(ALICE, "DEV", int(NOW * 1000) - 1000)])
    c = controller(active)
    f = finding(Reason.CALL_ENDED)
    assert not await c._still_bad("lk", f, NOW)
    # the disagreement is remembered a few seconds: no state read per cycle meanwhile
    assert not await c._still_bad("lk", f, NOW)
    assert active.state_reads == 1
    ended = [joined, call_ev(ALICE, "DEV", int(NOW * 1000) - 1000, left=True)]
    assert await controller(FakeSource(holds=False, state=ended))._still_bad("lk", f, NOW)
    banned = [member_ev(ALICE, "ban", "@mod:hs")]
    assert await controller(FakeSource(holds=False, state=banned))._still_bad(
        "lk", finding(Reason.BANNED), NOW
    )
    # unreadable now (homeserver down): not removed now, asked again next cycle
    assert not await controller(FakeSource(holds=False, state=None))._still_bad("lk", f, NOW)
    # no homeserver access at all: a delegated leave's word is all there is
    assert await controller(None)._still_bad("lk", f, NOW)
