"""MatrixMesh when our own membership is replaced (the delayed leave fired while we were cut
off and the agent joined again): the new session's engine gets the members at once, while the
old engine's close (final hangups, peer connection closes: seconds toward unreachable peers)
is still under way; the link's exit still waits for that close (chaos bug 2)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from matrixrtc.matrix import Subscription
from matrixrtc.matrix.types import Broadcaster
from matrixrtc.mesh.matrix_link import MatrixMesh
from matrixrtc.model.transports import FullMeshTransport, Transport
from matrixrtc.session.mesh_signalling import DeviceRef

ROOM = "!room:hs"


@dataclass(frozen=True)
class Member:
    user_id: str
    device_id: str
    mesh_session_id: str
    is_self: bool = False
    created_ts: int = 0
    frame_e2ee: bool = True
    legacy_conf_id: str | None = None
    advertised: Sequence[Transport] = (FullMeshTransport(),)

    @property
    def member_id(self) -> str:
        return f"{self.user_id}:{self.device_id}"

    @property
    def rtc_backend_identity(self) -> str:
        return self.member_id


class FakeHomeserver:
    user_id = "@me:hs"
    device_id = "ME"

    def __init__(self) -> None:
        self.to_device: Broadcaster[Any] = Broadcaster()

    def to_device_events(self) -> Subscription[Any]:
        return self.to_device.subscribe()

    def is_encrypted(self, room_id: str) -> bool:
        return True

    def room_state(self, room_id: str) -> Mapping[tuple[str, str], Any]:
        return {}


@dataclass
class FakeAgent:
    hs: FakeHomeserver = field(default_factory=FakeHomeserver)
    room_id: str = ROOM
    participants: list[Member] = field(default_factory=list)
    _changes: Broadcaster[Any] = field(default_factory=Broadcaster)

    def changes(self) -> Subscription[Any]:
        return self._changes.subscribe()

    async def wait_joined(self, timeout_s: float = 10.0) -> None:
        return None

    def set(self, participants: list[Member]) -> None:
        self.participants = participants
        self._changes.publish(object())


class FakeSignalling:
    def accept_conf_id(self, conf_id: str) -> None:
        pass


@dataclass
class FakeLocal:
    session_id: str
    conf_id: str = "conf"


class FakeEngine:
    """What MatrixMesh uses of a MeshEngine; its close lasts until ``release`` is set."""

    def __init__(self, session_id: str, progress: asyncio.Event) -> None:
        self.local = FakeLocal(session_id)
        self.progress = progress
        self.signalling = FakeSignalling()
        self.members: list[dict[DeviceRef, str]] = []
        self.release = asyncio.Event()
        self.closing = False
        self.closed = False

    def set_members(
        self, members: Mapping[DeviceRef, str], conf_ids: Mapping[DeviceRef, str] | None = None
    ) -> None:
        self.members.append(dict(members))
        self.progress.set()

    def receive(self, *args: Any, **kwargs: Any) -> None:
        pass

    async def aclose(self) -> None:
        self.closing = True
        await self.release.wait()
        self.closed = True


async def _polled(cond: Any, timeout_s: float = 2.0) -> None:
    """Until ``cond()`` holds, for state with no event to wait on."""
    async with asyncio.timeout(timeout_s):
        while not cond():  # noqa: ASYNC110 (a counter: no event to wait on)
            await asyncio.sleep(0.001)


async def _until(progress: asyncio.Event, cond: Any, timeout_s: float = 2.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not cond():
            progress.clear()
            await progress.wait()


@dataclass
class Engines:
    """The fake engines MatrixMesh made, oldest first; ``progress`` is set by each one's
    ``set_members``."""

    made: list[FakeEngine]
    progress: asyncio.Event


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> Engines:
    """MatrixMesh builds FakeEngines instead of MeshEngines."""
    engines = Engines([], asyncio.Event())

    def new_engine(self: MatrixMesh, session_id: str) -> FakeEngine:
        engines.made.append(FakeEngine(session_id, engines.progress))
        return engines.made[-1]

    monkeypatch.setattr(MatrixMesh, "_new_engine", new_engine)
    return engines


async def test_new_session_gets_members_while_the_old_engine_still_closes(
    fakes: Engines,
) -> None:
    engines, progress = fakes.made, fakes.progress
    peer = Member("@peer:hs", "PEER", "peer-1")
    agent = FakeAgent(participants=[Member("@me:hs", "ME", "me-1", is_self=True), peer])
    link = MatrixMesh(agent)  # type: ignore[arg-type]
    await link.__aenter__()
    exiting: asyncio.Future[None] | None = None
    try:
        first = engines[0]
        me, them = DeviceRef("@me:hs", "ME"), DeviceRef("@peer:hs", "PEER")
        assert first.members == [{me: "me-1", them: "peer-1"}]
        # Our membership is replaced: a new session id.
        agent.set([Member("@me:hs", "ME", "me-2", is_self=True), peer])
        await _until(progress, lambda: len(engines) == 2 and engines[1].members != [])
        second = engines[1]
        assert link.session_id == "me-2"
        assert second.members == [{me: "me-2", them: "peer-1"}]
        assert first.closing
        assert not first.closed
        # Later changes reach the new engine while the old one is still closing.
        other = Member("@other:hs", "OTHER", "other-1")
        agent.set([Member("@me:hs", "ME", "me-2", is_self=True), peer, other])
        await _until(progress, lambda: len(second.members) == 2)
        assert not first.closed
        exiting = asyncio.ensure_future(link.__aexit__(None, None, None))
        second.release.set()
        # The exit has closed the new engine: nothing but the old engine's close is left.
        await _polled(lambda: second.closed)
        assert not exiting.done()  # the exit waits for the old engine's close
        first.release.set()
        await asyncio.wait_for(exiting, 2.0)
        assert first.closed
        assert second.closed
    finally:
        for e in engines:
            e.release.set()
        if exiting is None:
            await link.__aexit__(None, None, None)


async def test_a_mesh_the_call_is_leaving_links_no_newcomer(fakes: Engines) -> None:
    """While ``admit_new`` says the call's media is not on the mesh (a fourth member moves a
    3-member mesh to the SFU), the mesh keeps its links, drops leavers and links no newcomer;
    once it says yes again (the SFU failed), a refresh links the newcomer."""
    engines, progress = fakes.made, fakes.progress
    on_mesh = True
    me = Member("@me:hs", "ME", "me-1", is_self=True)
    a, b, c = (Member(f"@{n}:hs", n.upper(), f"{n}-1") for n in ("a", "b", "c"))
    agent = FakeAgent(participants=[me, a, b])
    link = MatrixMesh(agent, admit_new=lambda: on_mesh)  # type: ignore[arg-type]
    await link.__aenter__()
    try:
        (engine,) = engines
        refs = {m: DeviceRef(m.user_id, m.device_id) for m in (me, a, b, c)}
        assert set(engine.members[-1]) == {refs[me], refs[a], refs[b]}
        on_mesh = False  # c joins: the call moves to the SFU
        seen = link.member_updates
        agent.set([me, a, b, c])
        # The change has been worked out (no set_members: nothing changed), then judged.
        await _polled(lambda: link.member_updates > seen)
        assert set(engine.members[-1]) == {refs[me], refs[a], refs[b]}
        agent.set([me, a, c])  # b leaves meanwhile: dropped
        await _until(progress, lambda: refs[b] not in engine.members[-1])
        assert set(engine.members[-1]) == {refs[me], refs[a]}
        on_mesh = True  # the SFU is unreachable: everyone on the mesh after all
        link.refresh_members()
        assert set(engine.members[-1]) == {refs[me], refs[a], refs[c]}
    finally:
        for e in engines:
            e.release.set()
        await link.__aexit__(None, None, None)
