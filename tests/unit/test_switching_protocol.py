"""The switcher drives transports only through the MediaTransport protocol: two fake
transports registered in SwitchConfig.transports take the place of mesh and LiveKit, with a
fake agent whose memberships the test sets. No network, no media."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import pytest
import structlog
import structlog.testing

from matrixrtc.agent import CallAgent, Participant, ParticipantsChanged
from matrixrtc.errors import RemoteError
from matrixrtc.matrix import Broadcaster, Subscription, ToDeviceEvent, ToDeviceSendResult
from matrixrtc.media_transport import FrameCounter, MediaEngine, MediaTransport, TransportContext
from matrixrtc.model import (
    CallMembership,
    FullMeshTransport,
    LivekitTransport,
    SessionMembershipData,
    parse_membership_event,
)
from matrixrtc.model.devices import DeviceRef
from matrixrtc.session.media_policy import MediaKind
from matrixrtc.switching import SWITCH_ACK_TYPE, MediaSwitcher, SwitchConfig

ME = "@me:example.org"
SFU = LivekitTransport(livekit_service_url="https://sfu.example.org")
_ids = itertools.count()


def membership(user: str) -> CallMembership:
    content = SessionMembershipData.for_join(
        user_id=user, device_id="D", transports=[SFU, FullMeshTransport()]
    ).to_json()
    m = parse_membership_event(
        {
            "type": "org.matrix.msc3401.call.member",
            "state_key": f"_{user}_D_m.call",
            "sender": user,
            "event_id": f"$e{next(_ids)}",
            "origin_server_ts": 1000 + next(_ids),
            "content": content,
        }
    )
    assert isinstance(m, CallMembership)
    return m


class FakeHs:
    """The switcher's acknowledgements go out and come in as to-device events."""

    user_id = ME
    device_id = "D"

    def __init__(self) -> None:
        self.sent: list[tuple[str, DeviceRef, Mapping[str, Any]]] = []
        self.requests: list[list[DeviceRef]] = []  # the recipients of each send
        self._to_device: Broadcaster[ToDeviceEvent] = Broadcaster()

    def to_device_events(self) -> Subscription[ToDeviceEvent]:
        return self._to_device.subscribe()

    async def send_to_device(
        self,
        event_type: str,
        messages: Mapping[DeviceRef, Mapping[str, Any]],
        *,
        encrypted: bool = True,
    ) -> ToDeviceSendResult:
        assert encrypted
        self.requests.append(list(messages))
        self.sent += [(event_type, to, content) for to, content in messages.items()]
        return ToDeviceSendResult(tuple(messages), ())

    def receive_ack(
        self,
        user: str,
        kind: MediaKind | str,
        room_id: str = "!room:example.org",
        device: str = "D",
    ) -> None:
        content = {"room_id": room_id, "kind": kind.value if isinstance(kind, MediaKind) else kind}
        self._to_device.publish(
            ToDeviceEvent(SWITCH_ACK_TYPE, content, user, device, "curve", True)
        )


class FakeAgent:
    """What the switcher reads of a CallAgent."""

    room_id = "!room:example.org"

    def __init__(self) -> None:
        self.hs = FakeHs()
        self.memberships: tuple[CallMembership, ...] = ()
        self.participants: tuple[Participant, ...] = ()
        self.in_call = True  # False: we left (the agent sent our leave)
        self._changes: Broadcaster[ParticipantsChanged] = Broadcaster()

    def changes(self) -> Subscription[ParticipantsChanged]:
        return self._changes.subscribe()

    async def wait_joined(self, timeout_s: float = 10.0) -> None:
        return None

    def members(self, *users: str) -> None:
        self.memberships = tuple(membership(u) for u in users)
        oldest = self.memberships[0]
        self.participants = tuple(Participant.of(m, oldest, (ME, "D")) for m in self.memberships)
        self._changes.publish(ParticipantsChanged(self.participants))


class FakeTransport:
    """A transport that carries media once the test says so, and counts frames."""

    def __init__(self, kind: MediaKind, ctx: TransportContext, log: list[str]) -> None:
        self.kind = kind
        self.engine: MediaEngine = "mesh" if kind is MediaKind.MESH else "aiortc"
        self.ctx = ctx
        self.log = log
        self.carrying = False
        self.frames = 0
        self.refreshes = 0
        self.polls = 0  # video_counters() calls: the switcher's polls of this transport
        self.fail_start = False
        self.lost = False
        self.hidden: set[DeviceRef] = set()  # members whose video it decodes no more
        self.frame_times: list[float] | None = None  # each frame's time, when the test gives them
        self.folded: list[float] = []  # frames that came, counted only at the next refresh()

    async def start(self) -> None:
        self.log.append(f"start {self.kind.value}")
        if self.fail_start:
            raise RemoteError("cannot start")

    async def update(self) -> None:
        self.log.append(f"update {self.kind.value}")

    def carries(self, peer: Participant, since: float, *, video: bool) -> bool:
        return self.carrying

    def video_counters(self, peer: Participant) -> Sequence[FrameCounter]:
        self.polls += 1
        if self.frame_times is not None:
            times = self.frame_times
            last = times[-1] if times else None
            return (FrameCounter(self, len(times), last, times=lambda n: times[-n:] if n else []),)
        return (FrameCounter(self, self.frames, 1.0 if self.frames else None),)

    def show(self, peer: DeviceRef, on: bool) -> None:
        self.log.append(f"{'show' if on else 'hide'} {peer.user_id} {self.kind.value}")
        if on:
            self.hidden.discard(peer)
        else:
            self.hidden.add(peer)

    def hush(self) -> None:
        self.log.append(f"hush {self.kind.value}")

    def refresh(self) -> None:
        self.refreshes += 1
        if self.folded and self.frame_times is not None:  # fold what came since
            self.frame_times += self.folded
            self.folded = []

    def failing(self) -> bool:
        return self.lost

    async def aclose(self) -> None:
        self.log.append(f"close {self.kind.value}")


class Registry:
    def __init__(self) -> None:
        self.log: list[str] = []
        self.made: dict[MediaKind, FakeTransport] = {}
        self.fail: set[MediaKind] = set()
        self.carrying: set[MediaKind] = {MediaKind.MESH}  # carries as soon as it starts

    def factory(self, kind: MediaKind) -> Any:
        def make(ctx: TransportContext) -> MediaTransport:
            t = FakeTransport(kind, ctx, self.log)
            t.fail_start = kind in self.fail
            t.carrying = kind in self.carrying
            self.made[kind] = t
            return t

        return make

    def config(self) -> SwitchConfig:
        return SwitchConfig(
            mesh_max=2,
            poll_s=0.001,
            idle_poll_s=0.001,
            stagger_s=0.0,
            settle_timeout_s=5.0,
            ack_timeout_s=0.05,
            retry_s=0.01,
            transports={k: self.factory(k) for k in (MediaKind.MESH, MediaKind.SFU)},
        )


@dataclass
class OnTheMesh:
    agent: FakeAgent
    reg: Registry
    switcher: MediaSwitcher


@contextlib.asynccontextmanager
async def on_the_mesh(
    reg: Registry | None = None, *, clock: Callable[[], float] = time.monotonic, **config: Any
) -> AsyncIterator[OnTheMesh]:
    """Us and @a:example.org, the switcher running and settled on the mesh; ``config``
    overrides fields of the registry's SwitchConfig."""
    agent = FakeAgent()
    agent.members(ME, "@a:example.org")
    reg = reg if reg is not None else Registry()
    cfg = replace(reg.config(), **config)
    async with MediaSwitcher(cast(CallAgent, agent), None, cfg, clock=clock) as switcher:
        await switcher.wait_settled(MediaKind.MESH, 5)
        yield OnTheMesh(agent, reg, switcher)


async def until(pred: Any) -> None:
    """Until ``pred()`` holds (state another task changes), or fail after 5 s."""
    async with asyncio.timeout(5):
        for _ in itertools.count():
            if pred():
                return
            await asyncio.sleep(0.001)


async def test_the_switcher_starts_switches_and_closes_transports_through_the_protocol() -> None:
    agent = FakeAgent()
    agent.members(ME, "@a:example.org")
    reg = Registry()
    switcher = MediaSwitcher(cast(CallAgent, agent), None, reg.config())
    assert switcher.engine is None
    async with switcher:
        with switcher.switches() as records:
            first = await switcher.wait_settled(MediaKind.MESH, 5)
            assert (first.old, first.new) == (None, MediaKind.MESH)
            assert switcher.engine == "mesh"
            assert await records.get() == first
            mesh = reg.made[MediaKind.MESH]
            assert mesh.ctx.agent is cast(CallAgent, agent)
            mesh.frames = 3
            peer = DeviceRef("@a:example.org", "D")
            await until(lambda: peer in switcher.peers)
            await until(lambda: switcher.peers[peer].frames.get(MediaKind.MESH) == 3)

            # A third member: above mesh_max, so SFU; make-before-break keeps the mesh until
            # the SFU carries every peer.
            agent.members(ME, "@a:example.org", "@b:example.org")
            await until(lambda: switcher.running(MediaKind.SFU) is not None)
            assert switcher.kind is MediaKind.MESH
            assert switcher.engine == "mesh"  # the SFU does not carry the media yet
            assert switcher.running(MediaKind.MESH) is mesh
            reg.made[MediaKind.SFU].carrying = True
            second = await switcher.wait_settled(MediaKind.SFU, 5)
            assert (second.old, second.new) == (MediaKind.MESH, MediaKind.SFU)
            assert switcher.engine == "aiortc"  # the SFU transport's own answer
            assert second.reason == "3 members > mesh_max 2"
            assert second.carried_at is not None
            assert await records.get() == second
            await until(lambda: "close mesh" in reg.log)
            assert switcher.running(MediaKind.MESH) is None
    assert reg.log[-1] == "close sfu"  # leaving the block closes the running transport
    assert switcher.engine is None


async def test_a_transport_that_fails_to_start_is_closed_and_the_old_one_keeps_running() -> None:
    reg = Registry()
    reg.fail.add(MediaKind.SFU)
    async with on_the_mesh(reg) as m:
        agent, switcher = m.agent, m.switcher
        agent.members(ME, "@a:example.org", "@b:example.org")
        await until(lambda: reg.log.count("start sfu") >= 2)  # retried after a pause
        assert "close sfu" in reg.log
        assert switcher.kind is MediaKind.MESH
        assert "close mesh" not in reg.log


async def test_a_decision_without_a_registered_transport_is_refused_not_crashed() -> None:
    agent = FakeAgent()
    agent.members(ME, "@a:example.org", "@b:example.org")  # SFU decision
    reg = Registry()
    cfg = reg.config()
    only_mesh = SwitchConfig(
        mesh_max=cfg.mesh_max,
        poll_s=cfg.poll_s,
        retry_s=cfg.retry_s,
        transports={MediaKind.MESH: reg.factory(MediaKind.MESH)},
    )
    async with MediaSwitcher(cast(CallAgent, agent), None, only_mesh) as switcher:
        with pytest.raises(TimeoutError):
            await switcher.wait_settled(MediaKind.SFU, 0.2)
        assert switcher.kind is None
        assert reg.log == []


async def test_a_failing_teardown_of_the_old_transport_is_raised_when_the_switcher_closes() -> None:
    agent = FakeAgent()
    agent.members(ME, "@a:example.org")
    reg = Registry()
    switcher = MediaSwitcher(cast(CallAgent, agent), None, reg.config())
    await switcher.__aenter__()
    await switcher.wait_settled(MediaKind.MESH, 5)
    mesh = reg.made[MediaKind.MESH]

    async def broken_close() -> None:
        raise RemoteError("mesh would not close")

    mesh.aclose = broken_close  # type: ignore[method-assign]
    agent.members(ME, "@a:example.org", "@b:example.org")
    await until(lambda: MediaKind.SFU in reg.made)
    reg.made[MediaKind.SFU].carrying = True
    await switcher.wait_settled(MediaKind.SFU, 5)
    await until(lambda: len(switcher._teardowns) == 0)  # failed in the background
    assert [n for n, _ in switcher._teardowns.failures] == ["mesh"]
    with pytest.raises(RemoteError, match="mesh would not close"):
        await switcher.__aexit__(None, None, None)
    assert reg.log[-1] == "close sfu"  # the running transport is still closed


async def test_a_lost_sfu_moves_the_call_to_the_mesh_and_back_once_a_probe_gets_through() -> None:
    agent = FakeAgent()
    agent.members(ME, "@a:example.org", "@b:example.org")  # 3 > mesh_max 2: SFU
    reg = Registry()
    reg.carrying = {MediaKind.MESH, MediaKind.SFU}
    sfu_back = False
    probes: list[bool] = []

    async def probe(ctx: TransportContext) -> bool:
        probes.append(sfu_back)
        return sfu_back

    cfg = reg.config()
    config = SwitchConfig(
        mesh_max=cfg.mesh_max,
        poll_s=cfg.poll_s,
        retry_s=cfg.retry_s,
        transports=cfg.transports,
        fail_after_s=0.05,
        probe_s=0.02,
        ack_timeout_s=0.05,
        probes={MediaKind.SFU: probe},
    )
    async with MediaSwitcher(cast(CallAgent, agent), None, config) as switcher:
        await switcher.wait_settled(MediaKind.SFU, 5)
        first_sfu = reg.made[MediaKind.SFU]
        first_sfu.lost = True
        fallback = await switcher.wait_settled(MediaKind.MESH, 5)
        assert (fallback.old, fallback.new) == (MediaKind.SFU, MediaKind.MESH)
        assert fallback.reason == "the SFU is unreachable and all 3 members can mesh"
        assert switcher.unreachable == {MediaKind.SFU}
        await until(lambda: "close sfu" in reg.log)
        await until(lambda: len(probes) >= 2)  # probed, not yet back: stays on the mesh
        assert switcher.kind is MediaKind.MESH
        sfu_back = True
        back = await switcher.wait_settled(MediaKind.SFU, 5)
        assert (back.old, back.new) == (MediaKind.MESH, MediaKind.SFU)
        assert back.reason == "3 members > mesh_max 2"
        assert reg.made[MediaKind.SFU] is not first_sfu  # a new connection
        assert switcher.unreachable == set()


async def test_the_old_transport_stays_until_every_member_says_it_receives_us_on_the_new() -> None:
    """Make-before-break with the remote side switching too: our old transport carries our
    media to the others until each of them acknowledges receiving us over the new one; each
    member is taken from the new transport once it delivered that member's media."""
    a, b = DeviceRef("@a:example.org", "D"), DeviceRef("@b:example.org", "D")
    async with on_the_mesh(ack_timeout_s=30.0, settle_timeout_s=30.0) as m:
        agent, reg, switcher = m.agent, m.reg, m.switcher
        # A start has nobody waiting for it: no acknowledgement goes out.
        await until(lambda: switcher.peers.get(a) is not None)
        await asyncio.sleep(0.05)
        assert agent.hs.sent == []
        agent.hs.receive_ack("@b:example.org", MediaKind.SFU)  # stale: before the switch

        agent.members(ME, "@a:example.org", "@b:example.org")  # 3 > mesh_max 2: SFU
        await until(lambda: switcher.running(MediaKind.SFU) is not None)
        assert switcher.via(a) is MediaKind.MESH
        reg.made[MediaKind.SFU].carrying = True
        await until(lambda: switcher.via(a) is MediaKind.SFU)  # cut over: SFU delivered a
        assert switcher.via(b) is MediaKind.SFU
        # Both are told we receive them over the SFU (once each).
        await until(
            lambda: {(to, c["kind"]) for _, to, c in agent.hs.sent} >= {(a, "sfu"), (b, "sfu")}
        )

        agent.hs.receive_ack("@a:example.org", MediaKind.SFU)
        agent.hs.receive_ack("@b:example.org", MediaKind.MESH)  # the wrong kind: no use
        agent.hs.receive_ack("@b:example.org", MediaKind.SFU, room_id="!other:example.org")
        await asyncio.sleep(0.1)
        assert switcher.kind is MediaKind.MESH  # b has not said it receives us on the SFU
        assert "close mesh" not in reg.log

        agent.hs.receive_ack("@b:example.org", MediaKind.SFU)
        done = await switcher.wait_settled(MediaKind.SFU, 5)
        assert done.carried_at is not None
        assert done.handover == "2 peers cut over, 2 acknowledged"
        await until(lambda: "close mesh" in reg.log)
        assert sorted((to.user_id, c["kind"]) for _, to, c in agent.hs.sent) == [
            ("@a:example.org", "sfu"),
            ("@b:example.org", "sfu"),
        ]
        assert {t for t, _, _ in agent.hs.sent} == {SWITCH_ACK_TYPE}
        assert agent.hs.sent[0][2] == {"room_id": agent.room_id, "kind": "sfu"}
        # Both were cut over in the same poll: one request tells both.
        assert [sorted(r.user_id for r in to) for to in agent.hs.requests] == [
            ["@a:example.org", "@b:example.org"]
        ]


async def test_a_switch_overtaken_back_to_the_old_kind_keeps_the_old_transport() -> None:
    reg = Registry()
    reg.carrying = {MediaKind.MESH}  # the SFU never delivers
    async with on_the_mesh(reg) as m:
        agent, switcher = m.agent, m.switcher
        mesh = reg.made[MediaKind.MESH]
        agent.members(ME, "@a:example.org", "@b:example.org")
        await until(lambda: switcher.running(MediaKind.SFU) is not None)
        agent.members(ME, "@a:example.org")  # b left again: back to the mesh
        await until(lambda: "close sfu" in reg.log)
        assert switcher.running(MediaKind.MESH) is mesh
        assert "close mesh" not in reg.log
        assert [(r.old, r.new) for r in switcher.history] == [(None, MediaKind.MESH)]


async def test_acks_count_only_from_members_devices_and_the_rest_are_logged_rarely() -> None:
    """An Olm-verified device that is not in the call (another user, or another device of a
    member) cannot make us tear the old path down; each such sender is logged once a minute."""
    now = [0.0]
    a, b = DeviceRef("@a:example.org", "D"), DeviceRef("@b:example.org", "D")
    with structlog.testing.capture_logs() as logs:
        async with on_the_mesh(
            clock=lambda: now[0], ack_timeout_s=300.0, settle_timeout_s=300.0
        ) as m:
            agent, reg, switcher = m.agent, m.reg, m.switcher
            agent.members(ME, "@a:example.org", "@b:example.org")  # SFU
            await until(lambda: switcher.running(MediaKind.SFU) is not None)
            now[0] = 1.0
            reg.made[MediaKind.SFU].carrying = True
            await until(
                lambda: switcher.via(a) is MediaKind.SFU and switcher.via(b) is MediaKind.SFU
            )
            for _ in range(3):
                agent.hs.receive_ack("@mallory:example.org", MediaKind.SFU)
                agent.hs.receive_ack("@a:example.org", MediaKind.SFU, device="OTHER")
                agent.hs.receive_ack("@b:example.org", MediaKind.SFU, device="OTHER")
            agent.hs.receive_ack("@b:example.org", "carrier-pigeon")
            agent.hs.receive_ack("@a:example.org", MediaKind.SFU)  # a member's own device
            await until(lambda: (a, MediaKind.SFU) in switcher._acks)
            await asyncio.sleep(0.05)
            assert switcher.kind is MediaKind.MESH  # b's own device has not acknowledged
            assert "close mesh" not in reg.log
            assert set(switcher._acks) == {(a, MediaKind.SFU)}
            ignored = [e for e in logs if e["event"] == "switch.ack_ignored"]
            assert sorted((e["sender"], e["device"], e["reason"]) for e in ignored) == [
                ("@a:example.org", "OTHER", "not a member of the call"),
                ("@b:example.org", "OTHER", "not a member of the call"),
                ("@mallory:example.org", "D", "not a member of the call"),
            ]  # once per sender: b's unknown kind and the repeats are suppressed
            now[0] = 62.0  # a minute on: one line again, saying how many were suppressed
            agent.hs.receive_ack("@mallory:example.org", MediaKind.SFU)
            await until(lambda: len([e for e in logs if e["event"] == "switch.ack_ignored"]) == 4)
            again = [e for e in logs if e["event"] == "switch.ack_ignored"][-1]
            assert (again["sender"], again["suppressed_before"]) == ("@mallory:example.org", 2)
            agent.hs.receive_ack("@b:example.org", MediaKind.SFU)
            done = await switcher.wait_settled(MediaKind.SFU, 5)
            assert done.handover == "2 peers cut over, 2 acknowledged"


async def test_the_old_transport_stops_decoding_each_member_once_it_is_cut_over() -> None:
    """A member taken from the new transport is not shown from the old one any more: the old
    one stops decoding it at its cutover (not before: it is shown from there until then), and
    nobody is hidden on the new one."""
    a, b = DeviceRef("@a:example.org", "D"), DeviceRef("@b:example.org", "D")
    async with on_the_mesh(ack_timeout_s=30.0, settle_timeout_s=30.0) as m:
        agent, reg, switcher = m.agent, m.reg, m.switcher
        mesh = reg.made[MediaKind.MESH]
        agent.members(ME, "@a:example.org", "@b:example.org")  # 3 > mesh_max 2: SFU
        await until(lambda: switcher.running(MediaKind.SFU) is not None)
        await asyncio.sleep(0.05)
        assert mesh.hidden == set()  # the SFU delivers nobody yet: the mesh shows them
        reg.made[MediaKind.SFU].carrying = True
        await until(lambda: switcher.via(a) is MediaKind.SFU)
        assert mesh.hidden == {a, b}
        assert switcher.kind is MediaKind.MESH  # still up (no acknowledgement yet)
        assert reg.made[MediaKind.SFU].hidden == set()


async def test_a_switch_abandoned_after_a_cutover_shows_the_member_again_on_the_old() -> None:
    a = DeviceRef("@a:example.org", "D")
    async with on_the_mesh(ack_timeout_s=30.0, settle_timeout_s=30.0) as m:
        agent, reg, switcher = m.agent, m.reg, m.switcher
        mesh = reg.made[MediaKind.MESH]
        agent.members(ME, "@a:example.org", "@b:example.org")
        await until(lambda: switcher.running(MediaKind.SFU) is not None)
        reg.made[MediaKind.SFU].carrying = True
        await until(lambda: a in mesh.hidden)
        agent.members(ME, "@a:example.org")  # b left before the handover ended: back
        await until(lambda: "close sfu" in reg.log)
        assert switcher.running(MediaKind.MESH) is mesh
        assert mesh.hidden == set()
        assert reg.log.index("show @a:example.org mesh") > reg.log.index("hide @a:example.org mesh")


async def test_every_frame_a_poll_sees_is_a_gap_of_its_own() -> None:
    """Frames that came between two polls are gaps one by one (the counter keeps their times):
    three frames 50-70 ms apart seen by one poll are no 190 ms gap."""
    async with on_the_mesh(poll_s=0.05) as m:
        switcher = m.switcher
        mesh = m.reg.made[MediaKind.MESH]
        peer = DeviceRef("@a:example.org", "D")
        mesh.frame_times = [1.0]
        await until(lambda: switcher.peers.get(peer) is not None
                    and switcher.peers[peer].last_frame_at == 1.0)  # fmt: skip
        mesh.frame_times = [1.0, 1.05, 1.12, 1.19]  # three at once, before the next poll
        await until(lambda: switcher.peers[peer].last_frame_at == 1.19)
        gaps = [round(g.end - g.start, 3) for g in switcher.gaps if g.peer == peer]
        assert gaps == [0.05, 0.07, 0.07]
        assert switcher.peers[peer].max_gap_s == pytest.approx(0.07)


async def test_a_gap_still_open_is_judged_after_the_transports_fold_their_counts() -> None:
    """A transport that folds its counts periodically (the aiortc SFU engine, every 50 ms)
    has frames the switcher's view lacks: ``max_gap_s()`` takes them in first, so a frame
    that came 66 ms after the last one is no open gap of 100 ms."""
    now = [10.0]
    async with on_the_mesh(clock=lambda: now[0]) as m:
        switcher = m.switcher
        mesh = m.reg.made[MediaKind.MESH]
        peer = DeviceRef("@a:example.org", "D")
        mesh.frame_times = [10.0]
        await until(lambda: switcher.peers.get(peer) is not None
                    and switcher.peers[peer].last_frame_at == 10.0)  # fmt: skip
        mesh.folded = [10.066]  # came, not yet folded into the counter
        now[0] = 10.1
        await asyncio.sleep(0.05)  # polls run: they do not fold
        assert switcher.peers[peer].last_frame_at == 10.0
        assert switcher.max_gap_s() == pytest.approx(0.066)  # not the stale 0.1 open gap
        assert mesh.refreshes >= 1
        assert switcher.peers[peer].last_frame_at == 10.066


async def _mesh_frames_then_sfu_starts(
    m: OnTheMesh, a: DeviceRef
) -> tuple[FakeTransport, FakeTransport]:
    """On the mesh, ``a``'s frames at 10.0 and 10.066 s are seen; then a third member joins
    (3 > mesh_max 2) and the SFU transport starts. Returns (mesh, sfu)."""
    mesh = m.reg.made[MediaKind.MESH]
    mesh.frame_times = [10.0, 10.066]
    await until(lambda: a in m.switcher.peers and m.switcher.peers[a].last_frame_at == 10.066)
    m.agent.members(ME, "@a:example.org", "@b:example.org")
    await until(lambda: m.switcher.running(MediaKind.SFU) is not None)
    return mesh, m.reg.made[MediaKind.SFU]


@pytest.mark.parametrize("late_poll", [False, True], ids=["same poll", "later poll"])
async def test_an_old_path_frame_reported_after_the_cutover_still_closes_its_gap(
    late_poll: bool,
) -> None:
    """Counters report frames a little after they were decoded (the LiveKit engines fold
    theirs every 50 ms). A frame of the old path decoded before the cutover was shown, even
    when the poll that sees it comes after the cutover and after a new-path frame: it splits
    the gap (it used to be dropped: a 144 ms gap here where none is over 67). At the cutover
    the new path's latest frame is shown; one it decoded before the cutover is not."""
    now = [10.0]
    a = DeviceRef("@a:example.org", "D")
    async with on_the_mesh(clock=lambda: now[0], ack_timeout_s=30.0, settle_timeout_s=30.0) as m:
        switcher = m.switcher
        mesh, sfu = await _mesh_frames_then_sfu_starts(m, a)
        sfu.frame_times = [10.19]  # decoded before the cutover: not shown
        now[0] = 10.2
        sfu.carrying = True
        await until(lambda: switcher.via(a) is MediaKind.SFU)
        assert switcher.peers[a].cut_at[MediaKind.SFU] == 10.2
        if late_poll:
            sfu.frame_times = [10.19, 10.21]
            await until(lambda: switcher.peers[a].last_frame_at == 10.21)
            mesh.frame_times = [10.0, 10.066, 10.133]  # the old path's, decoded at 10.133
        else:
            mesh.frame_times = [10.0, 10.066, 10.133]
            sfu.frame_times = [10.19, 10.21]
        await until(lambda: any(g.start == 10.133 for g in switcher.gaps))
        sfu.frame_times = [10.19, 10.21, 10.27]
        await until(lambda: switcher.peers[a].last_frame_at == 10.27)
        gaps = sorted((round(g.start, 3), round(g.end, 3)) for g in switcher.gaps if g.peer == a)
        assert gaps == [
            (10.0, 10.066),
            (10.066, 10.133),
            (10.133, 10.2),  # the cutover: the SFU's frame of 10.19 shown from then
            (10.2, 10.21),
            (10.21, 10.27),
        ]
        assert switcher.peers[a].max_gap_s == pytest.approx(0.067)


async def test_frames_the_old_path_counts_at_its_teardown_are_taken_in_before_it_goes() -> None:
    """An old-path frame shown before the cutover but folded into its transport's counter
    only later (the aiortc SFU engine folds every 50 ms) is taken in when the switch ends,
    before the old transport is detached and its counters are read no more."""
    now = [10.0]
    a = DeviceRef("@a:example.org", "D")
    async with on_the_mesh(clock=lambda: now[0], ack_timeout_s=0.0, acks=False) as m:
        switcher = m.switcher
        mesh, sfu = await _mesh_frames_then_sfu_starts(m, a)
        mesh.folded = [10.133]  # came before the cutover; counted at the next refresh()
        sfu.frame_times = [10.19]
        now[0] = 10.2
        sfu.carrying = True  # every member cut over at once: the switch ends
        await switcher.wait_settled(MediaKind.SFU, 5)
        await until(lambda: "close mesh" in m.reg.log)
        gaps = sorted((round(g.start, 3), round(g.end, 3)) for g in switcher.gaps if g.peer == a)
        assert gaps == [(10.0, 10.066), (10.066, 10.133), (10.133, 10.2)]


@contextlib.asynccontextmanager
async def on_the_sfu(linger_s: float) -> AsyncIterator[OnTheMesh]:
    """Us and three others (mesh_max 3: the SFU), the switcher settled on the SFU; on exit
    the switcher's own exit, timed by the caller."""
    reg = Registry()
    reg.carrying = {MediaKind.MESH, MediaKind.SFU}
    agent = FakeAgent()
    agent.members(ME, "@a:example.org", "@b:example.org", "@c:example.org")
    cfg = replace(reg.config(), mesh_max=3, leave_linger_s=linger_s)
    async with MediaSwitcher(cast(CallAgent, agent), None, cfg) as switcher:
        await switcher.wait_settled(MediaKind.SFU, 5)
        yield OnTheMesh(agent, reg, switcher)


def sfu_ends(reg: Registry) -> list[str]:
    return [e for e in reg.log if e.endswith(" sfu") and e.split()[0] in ("hush", "close")]


@pytest.mark.parametrize(
    ("stay", "lingers"),
    [(("@a:example.org", "@b:example.org"), True), (("@a:example.org",), False)],
    ids=["others move to the mesh", "one member left"],
)
async def test_leaving_an_sfu_call_the_others_leave_for_the_mesh_lingers_hushed(
    stay: tuple[str, ...], lingers: bool
) -> None:
    """Our leave takes a 4-member SFU call to 3 (mesh_max 3: mesh): we stop sending on the
    SFU and close it only leave_linger_s later, after the others moved. With nobody left to
    switch we close at once."""
    async with on_the_sfu(0.2) as m:
        m.agent.in_call = False
        m.agent.members(ME, *stay)  # our leave went out; the others' memberships remain
        started = time.monotonic()
    closed_after = time.monotonic() - started
    if lingers:
        assert sfu_ends(m.reg) == ["hush sfu", "close sfu"]
        assert closed_after >= 0.2
    else:
        assert sfu_ends(m.reg) == ["close sfu"]
        assert closed_after < 0.2


async def test_a_switcher_closed_while_still_in_the_call_does_not_linger() -> None:
    async with on_the_sfu(5.0) as m:
        m.agent.members(ME, "@a:example.org", "@b:example.org")  # others would mesh
        started = time.monotonic()
    assert time.monotonic() - started < 1.0
    assert sfu_ends(m.reg) == ["close sfu"]


async def test_between_switches_the_counters_are_polled_at_the_idle_rate() -> None:
    """Settled on one transport the switcher polls every ``idle_poll_s`` (its counters keep
    their frames' times, so no gap is missed); while a switch is under way, every
    ``poll_s``."""
    async with on_the_mesh(poll_s=0.002, idle_poll_s=0.1) as m:
        mesh = m.reg.made[MediaKind.MESH]
        await asyncio.sleep(0.05)  # the start's last fast polls are over
        before = mesh.polls
        await asyncio.sleep(0.35)
        assert mesh.polls - before <= 5  # about 3 at 0.1 s; 175 at poll_s
        m.agent.members(ME, "@a:example.org", "@b:example.org")  # 3 > mesh_max 2: to the SFU
        await until(lambda: m.switcher.running(MediaKind.SFU) is not None)
        before = mesh.polls
        await asyncio.sleep(0.1)  # the SFU carries nothing yet: the handover waits
        assert m.switcher.kind is MediaKind.MESH
        assert mesh.polls - before >= 10  # polled at poll_s while switching


async def test_a_switch_starts_after_the_members_ranked_before_us_and_not_if_undecided() -> None:
    """Every member decides on the same membership change: each starts its new path its
    rank × ``stagger_s`` later (ours to the SFU: third of three, 2 × 0.1 s; to the mesh the
    highest device goes first, as the lower ones place the calls), and a decision that moves
    back meanwhile starts nothing."""
    a, b = "@a:example.org", "@b:example.org"
    async with on_the_mesh(stagger_s=0.1, stagger_max_s=1.0) as m:
        assert sorted([ME, a, b])[-1] == ME
        m.agent.members(ME, a, b)  # 3 > mesh_max 2: the SFU, in 0.2 s ...
        await asyncio.sleep(0.05)
        m.agent.members(ME, a)  # ... but back before our turn: nothing starts
        await asyncio.sleep(0.3)
        assert "start sfu" not in m.reg.log
        t0 = time.monotonic()
        m.agent.members(ME, a, b)
        await until(lambda: "start sfu" in m.reg.log)
        assert time.monotonic() - t0 >= 0.19
        m.reg.made[MediaKind.SFU].carrying = True
        await m.switcher.wait_settled(MediaKind.SFU, 5)
        t0 = time.monotonic()
        m.agent.members(ME, a)  # to the mesh: we are the highest device, first
        await until(lambda: m.reg.log.count("start mesh") == 2)
        assert time.monotonic() - t0 < 0.09
