"""A member joining after the key grace period: how many frames can it not decrypt?

Two members (A, B) in an encrypted room carry media over one transport (mesh or SFU) until
their keys are older than the grace period; then C joins (rotation territory: C must not get a
key that encrypted media from before it joined). The figure is what C saw from A and B in its
first seconds, per sender:

* **mesh**: frames that reached C's decryptor and failed (counted per frame);
* **SFU**: the livekit SDK reports decryption only as per-participant state changes, so the
  figure is the time it reported the sender's frames failing, times the sender's frame rate
  (video fps + 50 Opus frames/s when audio is on), rounded up.

Used by the integration test (``tests/integration/test_late_join_keys.py``) and by
``bench/join.py``. Each member is in-process: Homeserver + CallAgent + CallKeys +
MediaSwitcher, advertising only the transport under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Final

from matrixrtc.agent import AgentConfig, CallAgent
from matrixrtc.call_keys import CallKeys, CallKeysConfig
from matrixrtc.devstack import Synapse, UserCreds
from matrixrtc.livekit.connection import MediaOptions
from matrixrtc.matrix import Homeserver, Login
from matrixrtc.media_transport.mesh import MeshMedia
from matrixrtc.media_transport.sfu import LiveKitMedia
from matrixrtc.mesh.engine import MeshConfig
from matrixrtc.mesh.matrix_link import MeshLinkConfig
from matrixrtc.model import FullMeshTransport, LivekitTransport, Transport
from matrixrtc.session.media_policy import MediaKind
from matrixrtc.session.mesh_signalling import DeviceRef, SignallingConfig
from matrixrtc.switching import MediaSwitcher, SwitchConfig

__all__ = ["LateJoin", "late_join"]

OPUS_FRAMES_PER_S: Final = 50
_MESH = MeshLinkConfig(
    mesh=MeshConfig(
        host_addresses=("127.0.0.1",),
        signalling=SignallingConfig(invite_timeout_ms=4000, retry_interval_ms=1000),
    )
)


@dataclass(frozen=True, slots=True)
class LateJoin:
    kind: MediaKind
    failures: dict[str, int]  # sender -> frames the joiner could not decrypt
    first_frame_s: dict[str, float | None] = field(default_factory=dict)  # join -> first video

    @property
    def total(self) -> int:
        return sum(self.failures.values())


@dataclass
class _Member:
    name: str
    stack: contextlib.AsyncExitStack
    agent: CallAgent
    keys: CallKeys
    switcher: MediaSwitcher

    @property
    def ref(self) -> DeviceRef:
        return DeviceRef(self.agent.hs.user_id, self.agent.hs.device_id)


async def _join(
    synapse: Synapse,
    user: UserCreds,
    room_id: str,
    name: str,
    transports: tuple[Transport, ...],
    keys_config: CallKeysConfig,
    media: MediaOptions,
) -> _Member:
    stack = contextlib.AsyncExitStack()
    try:
        hs = await stack.enter_async_context(
            Homeserver(synapse.base_url, Login(user.user_id, password=user.password))
        )
        agent = await stack.enter_async_context(
            CallAgent(hs, room_id, AgentConfig(transports=transports))
        )
        keys = await stack.enter_async_context(CallKeys(agent, keys_config))
        switcher = await stack.enter_async_context(
            MediaSwitcher(agent, keys, SwitchConfig(media=media, mesh=_MESH))
        )
    except BaseException:
        await stack.aclose()
        raise
    return _Member(name, stack, agent, keys, switcher)


def _video_frames(m: _Member, of: _Member, kind: MediaKind) -> int:
    peer = m.switcher.peers.get(of.ref)
    return 0 if peer is None else peer.frames.get(kind, 0)


def _failures(joiner: _Member, sender: _Member, kind: MediaKind, media: MediaOptions) -> int:
    running = joiner.switcher.running(kind)
    if isinstance(running, MeshMedia):
        engine = running.link.engine if running.link is not None else None
        link = engine.link_for(sender.ref) if engine is not None else None
        return 0 if link is None else sum(s.decrypt_failures for s in link.stats.values())
    if isinstance(running, LiveKitMedia) and running.lk is not None:
        identity = next(
            p.rtc_backend_identity
            for p in joiner.agent.participants
            if DeviceRef(p.user_id, p.device_id) == sender.ref
        )
        now = time.monotonic()
        rate = media.fps + (OPUS_FRAMES_PER_S if media.audio else 0)
        seconds = sum(
            stats.failing_seconds(now)
            for conn in running.lk.connections.values()
            if (stats := conn.stats.get(identity)) is not None
        )
        return math.ceil(seconds * rate)
    raise AssertionError(f"{joiner.name} runs no {kind.value} transport")


async def late_join(
    synapse: Synapse,
    users: tuple[UserCreds, UserCreds, UserCreds],
    kind: MediaKind,
    *,
    sfu_url: str | None = None,
    keys_config: CallKeysConfig | None = None,
    media: MediaOptions | None = None,
    frames: int = 15,
    timeout_s: float = 30.0,
) -> LateJoin:
    """Run the scenario once (see the module docstring); ``frames``: video frames C must
    have decoded from each sender before counting."""
    cfg = keys_config or CallKeysConfig(grace_ms=2_000)
    media = media or MediaOptions(width=160, height=120, fps=15.0)
    if kind is MediaKind.SFU:
        if sfu_url is None:
            raise ValueError("an SFU run needs sfu_url")
        transports: tuple[Transport, ...] = (LivekitTransport(livekit_service_url=sfu_url),)
    else:
        transports = (FullMeshTransport(),)
    a_user, b_user, c_user = users
    room_id = await synapse.create_call_room(a_user, invite=[b_user, c_user], encrypted=True)
    members: list[_Member] = []
    try:
        async with asyncio.timeout(timeout_s):
            for u, name in ((a_user, "a"), (b_user, "b")):
                members.append(await _join(synapse, u, room_id, name, transports, cfg, media))
            await asyncio.gather(*(m.switcher.wait_settled(kind, timeout_s) for m in members))
            # Every key now older than the grace period: C's join is a "late" one.
            await asyncio.sleep(cfg.grace_ms / 1000 + 0.5)
            started = time.monotonic()
            c = await _join(synapse, c_user, room_id, "c", transports, cfg, media)
            members.append(c)
            senders = members[:2]
            firsts: dict[str, float | None] = {}
            while len(firsts) < len(senders) or any(
                _video_frames(c, s, kind) < frames for s in senders
            ):
                for s in senders:
                    peer = c.switcher.peers.get(s.ref)
                    if s.name not in firsts and peer is not None and peer.first_frame_at:
                        firsts[s.name] = peer.first_frame_at - started
                await asyncio.sleep(0.02)
            failures = {s.name: _failures(c, s, kind, media) for s in senders}
            return LateJoin(kind, failures, firsts)
    finally:
        for m in reversed(members):
            with contextlib.suppress(Exception):
                await m.stack.aclose()
