"""Live mesh ↔ SFU switching over the real stack: Synapse (memberships, Olm keys, to-device
signalling), our authorization service, a real LiveKit server, aiortc.

In-process participants (each its own device: Homeserver + CallAgent + CallKeys +
MediaSwitcher), 320×240 @ 15 fps video, no audio (to keep four participants on two cores).
With ``mesh_max`` 3, three members start on mesh; a fourth joining moves the call to the SFU;
its leaving moves it back. Make-before-break, asserted as an order (not a time: CI runs this
under load): every member tears down its old transport only after each other member took its
media from the new one and said so. The largest video gap any member saw from any other is
printed (bench/scale.py gives the figure) and must stay under 2 s. Each member encodes its
video with one encoder through both switches (the transports share it: local_media), on
either SFU engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from matrixrtc.agent import AgentConfig, CallAgent
from matrixrtc.call_keys import CallKeys
from matrixrtc.devstack import LiveKit, Synapse, UserCreds
from matrixrtc.livekit import MediaOptions
from matrixrtc.livekit.connection import SfuEngine
from matrixrtc.matrix import Homeserver, Login
from matrixrtc.mesh.engine import MeshConfig
from matrixrtc.mesh.fanout import SharedEncoder
from matrixrtc.mesh.matrix_link import MeshLinkConfig
from matrixrtc.model import FullMeshTransport, LivekitTransport
from matrixrtc.session.media_policy import MediaKind
from matrixrtc.session.mesh_signalling import DeviceRef, SignallingConfig
from matrixrtc.switching import MediaSwitcher, SwitchConfig
from tests.integration.test_livekit_transport import Service, service

pytestmark = pytest.mark.integration

MEDIA = MediaOptions(width=320, height=240, fps=15.0, audio=False)
MAX_GAP_S = 2.0
SETTLE_S = 30.0


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def sfu(synapse: Synapse, livekit: LiveKit, run_dir: Path) -> AsyncIterator[Service]:
    svc = service(run_dir, "lk-sfu-switching", livekit, synapse, synapse.server_name)
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()


@dataclass
class Member:
    name: str
    stack: contextlib.AsyncExitStack
    agent: CallAgent
    keys: CallKeys
    switcher: MediaSwitcher

    @property
    def ref(self) -> DeviceRef:
        return DeviceRef(self.agent.hs.user_id, self.agent.hs.device_id)


async def join(
    synapse: Synapse,
    user: UserCreds,
    room_id: str,
    sfu_url: str,
    name: str,
    mesh_max: int = 3,
    media: MediaOptions = MEDIA,
) -> Member:
    stack = contextlib.AsyncExitStack()
    try:
        hs = await stack.enter_async_context(
            Homeserver(synapse.base_url, Login(user.user_id, password=user.password))
        )
        transports = (LivekitTransport(livekit_service_url=sfu_url), FullMeshTransport())
        agent = await stack.enter_async_context(
            CallAgent(hs, room_id, AgentConfig(transports=transports))
        )
        keys = await stack.enter_async_context(CallKeys(agent))
        config = SwitchConfig(
            mesh_max=mesh_max,
            media=media,
            # Under load an acknowledgement may take a while; waiting for it is what is tested.
            ack_timeout_s=15.0,
            settle_timeout_s=25.0,
            mesh=MeshLinkConfig(
                mesh=MeshConfig(
                    host_addresses=("127.0.0.1",),
                    # A callee that starts its mesh a moment after the caller's invite is
                    # called again soon, rather than after the 60 s invite lifetime.
                    signalling=SignallingConfig(invite_timeout_ms=4000, retry_interval_ms=1000),
                )
            ),
        )
        switcher = await stack.enter_async_context(MediaSwitcher(agent, keys, config))
    except BaseException:
        await stack.aclose()
        raise
    return Member(name, stack, agent, keys, switcher)


async def settled(members: list[Member], kind: MediaKind) -> None:
    await asyncio.gather(*(m.switcher.wait_settled(kind, SETTLE_S) for m in members))


def frames(m: Member, of: Member, kind: MediaKind) -> int:
    peer = m.switcher.peers.get(of.ref)
    return 0 if peer is None else peer.frames.get(kind, 0)


async def flowing(members: list[Member], kind: MediaKind, extra: int = 30) -> None:
    """Until every member got ``extra`` more frames over ``kind`` from every other."""
    base = {(m.name, o.name): frames(m, o, kind) for m in members for o in members if m is not o}

    def done() -> bool:
        return all(frames(m, o, kind) >= base[(m.name, o.name)] + extra for m, o in _pairs(members))

    deadline = time.monotonic() + 15
    while not done():
        assert time.monotonic() < deadline, {
            f"{m.name}<-{o.name}": frames(m, o, kind) - base[(m.name, o.name)]
            for m, o in _pairs(members)
            if frames(m, o, kind) < base[(m.name, o.name)] + extra
        }
        await asyncio.sleep(0.1)


def _pairs(members: list[Member]) -> list[tuple[Member, Member]]:
    return [(m, o) for m in members for o in members if m is not o]


def assert_make_before_break(switched: list[Member], everyone: list[Member]) -> None:
    """Each of ``switched`` (all on the old transport together) detached its old transport only
    after every other one of them had cut it over to the new one (decoded its media there) and
    acknowledged it; a member only on the new transport (a joiner) is received there too."""
    for m in switched:
        last = m.switcher.history[-1]
        others = [o for o in everyone if o is not m]
        on_old = [o for o in switched if o is not m]
        assert last.handover == f"{len(others)} peers cut over, {len(on_old)} acknowledged", (
            m.name,
            last,
        )
        for o in on_old:
            cut = o.switcher.peers[m.ref].cut_at.get(last.new)
            assert cut is not None, (o.name, "never took", m.name, "from", last.new)
            assert cut <= last.finished_at, (m.name, "tore down before", o.name, "cut over")


@pytest.mark.parametrize("engine", ["sdk", "aiortc"])
async def test_fourth_member_moves_the_call_to_sfu_and_back_without_a_two_second_gap(
    synapse: Synapse,
    sfu: Service,
    user_factory: Callable[..., Awaitable[UserCreds]],
    monkeypatch: pytest.MonkeyPatch,
    engine: SfuEngine,
) -> None:
    media = replace(MEDIA, engine=engine)
    video_encoders: list[SharedEncoder] = []
    made = SharedEncoder.__init__

    def counted(self: SharedEncoder, *args: Any, **kwargs: Any) -> None:
        made(self, *args, **kwargs)
        if self.kind == "video":
            video_encoders.append(self)

    monkeypatch.setattr(SharedEncoder, "__init__", counted)
    users = [await user_factory(f"sw{n}{engine}") for n in "abcd"]
    room_id = await synapse.create_call_room(users[0], invite=users[1:], encrypted=True)
    t0 = time.monotonic()
    first = list(
        await asyncio.gather(
            *(
                join(synapse, u, room_id, sfu.url, n, media=media)
                for u, n in zip(users, "abc", strict=False)
            )
        )
    )
    everyone = list(first)
    try:
        await settled(first, MediaKind.MESH)
        await flowing(first, MediaKind.MESH)
        t_mesh = time.monotonic()

        d = await join(synapse, users[3], room_id, sfu.url, "d", media=media)
        everyone.append(d)
        t_join = time.monotonic()
        await settled(everyone, MediaKind.SFU)
        t_sfu = time.monotonic()
        await flowing(everyone, MediaKind.SFU)
        for m in first:
            assert m.switcher.running(MediaKind.MESH) is None  # the old transport is gone
        assert_make_before_break(first, everyone)
        to_sfu_gap = max(m.switcher.max_gap_s(since=t_join) for m in everyone)

        everyone.remove(d)
        index_before = [m.keys.current_index for m in first]
        t_leave = time.monotonic()
        await d.stack.aclose()
        await settled(first, MediaKind.MESH)
        t_back = time.monotonic()
        # The leave rotates every key (after the use-key delay); media goes on under the new ones.
        deadline = time.monotonic() + 10
        while any(m.keys.current_index == i for m, i in zip(first, index_before, strict=True)):
            assert time.monotonic() < deadline, "a remaining member did not rotate after the leave"
            await asyncio.sleep(0.1)
        await flowing(first, MediaKind.MESH)
        for m in first:
            assert m.switcher.running(MediaKind.SFU) is None
        assert_make_before_break(first, first)
        back_gap = max(m.switcher.max_gap_s(since=t_leave) for m in first)

        largest = max(m.switcher.max_gap_s() for m in [*first, d])
        print(
            f"\nmesh up {t_mesh - t0:.1f} s after the joins; "
            f"mesh->sfu {t_sfu - t_join:.2f} s (largest gap {to_sfu_gap * 1000:.0f} ms); "
            f"sfu->mesh {t_back - t_leave:.2f} s (largest gap {back_gap * 1000:.0f} ms); "
            f"largest gap seen by anyone {largest * 1000:.0f} ms"
        )
        for m in [*first, d]:
            print(m.name, m.switcher.report())

        for m in first:
            kinds = [(r.old, r.new) for r in m.switcher.history]
            assert kinds == [
                (None, MediaKind.MESH),
                (MediaKind.MESH, MediaKind.SFU),
                (MediaKind.SFU, MediaKind.MESH),
            ], m.switcher.history
            assert all(r.carried_at is not None for r in m.switcher.history[1:]), m.switcher.history
            assert m.switcher.history[1].reason == "4 members > mesh_max 3"
        assert [(r.old, r.new) for r in d.switcher.history] == [(None, MediaKind.SFU)]
        assert largest < MAX_GAP_S, f"largest media gap {largest:.2f} s"
        # One video encoder per member for the whole call: the mesh, the SFU and the mesh
        # again share it (the SDK engine encodes in its own core, so the joiner, only ever on
        # the SFU, makes none there). Without sharing: 10 (3 + 3 + 1 + 3) and 6 (3 + 3).
        expected = 4 if engine == "aiortc" else 3
        assert len(video_encoders) == expected, [e.trace_label for e in video_encoders]
    finally:
        await asyncio.gather(*(m.stack.aclose() for m in everyone), return_exceptions=True)
