"""The controller's own decisions around the judge (no LiveKit, no homeserver): the last look
before a ``no_membership`` removal, and when the next cycle runs."""

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

    def __init__(self, holds: bool) -> None:
        self.holds = holds
        self.asked: list[tuple[str, str, str]] = []

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
