"""Mesh engines in one process over real aiortc peer connections on 127.0.0.1, with an
in-process queue standing in for to-device delivery (the Matrix wiring is tested elsewhere).

Shared by the mesh engine tests: :class:`Router` (its ``mesh_router`` fixture is in this
folder's conftest.py), :func:`make_engine`, device names and the polling helpers.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiortc.mediastreams import MediaStreamTrack

from matrixrtc.media.frames import FrameTap
from matrixrtc.media.sources import SyntheticVideoTrack, ToneAudioTrack
from matrixrtc.mesh.engine import MeshConfig, MeshEngine
from matrixrtc.mesh.transform import FrameTransform
from matrixrtc.session.mesh_signalling import DeviceRef, LocalDevice, mesh_conf_id

# Real peer connections: only inside the private network namespace (scripts/in-netns).
IN_NETNS = pytest.mark.skipif(
    os.environ.get("MATRIXRTC_IN_NETNS") != "1" and os.environ.get("MATRIXRTC_NO_NETNS") != "1",
    reason="media tests run inside the private network namespace (scripts/in-netns)",
)
CONF = mesh_conf_id("!mesh:localhost")
FPS = 15
CONFIG = MeshConfig(host_addresses=("127.0.0.1",), remote_networks=("127.0.0.0/8",))


@dataclass
class Router:
    """Every to-device message the engines send, kept in ``sent`` and delivered to the target
    engine (if any) on the next loop iteration."""

    engines: dict[DeviceRef, MeshEngine] = field(default_factory=dict)
    sent: list[tuple[DeviceRef, DeviceRef, str, dict[str, Any]]] = field(default_factory=list)

    def sender_for(self, origin: DeviceRef) -> _Sender:
        return _Sender(self, origin)

    def deliver(self, origin: DeviceRef, target: DeviceRef, event_type: str, content: Any) -> None:
        self.sent.append((origin, target, event_type, dict(content)))
        engine = self.engines.get(target)
        if engine is not None:
            asyncio.get_running_loop().call_soon(
                engine.receive, origin.user_id, event_type, dict(content)
            )

    async def aclose(self) -> None:
        await asyncio.gather(*(e.aclose() for e in self.engines.values()))


@dataclass
class _Sender:
    router: Router
    origin: DeviceRef

    async def send_to_device(
        self, user_id: str, device_id: str, event_type: str, content: Mapping[str, Any]
    ) -> None:
        self.router.deliver(self.origin, DeviceRef(user_id, device_id), event_type, content)


def ref(n: str) -> DeviceRef:
    return DeviceRef(f"@{n.lower()}:localhost", n)


def session(r: DeviceRef) -> str:
    return f"sess-{r.device_id}"


def make_engine(
    router: Router,
    r: DeviceRef,
    transform: FrameTransform | None = None,
    *,
    sources: Sequence[MediaStreamTrack] | None = None,
    config: MeshConfig = CONFIG,
    frames: FrameTap[DeviceRef] | None = None,
) -> MeshEngine:
    """An engine for ``r`` on ``router``; ``sources`` default to synthetic video and audio."""
    if sources is None:
        sources = [SyntheticVideoTrack(320, 240, FPS), ToneAudioTrack()]
    engine = MeshEngine(
        LocalDevice(user_id=r.user_id, device_id=r.device_id, session_id=session(r), conf_id=CONF),
        router.sender_for(r),
        sources=list(sources),
        config=config,
        transform=transform,
        frames=frames,
    )
    router.engines[r] = engine
    return engine


async def wait_for(predicate: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def decoded(engine: MeshEngine, peer: DeviceRef, kind: str) -> int:
    link = engine.link_for(peer)
    if link is None or kind not in link.stats:
        return 0
    return link.stats[kind].frames_decoded


def received(engine: MeshEngine, peer: DeviceRef, kind: str) -> int:
    """Frames of ``kind`` from ``peer`` received and decrypted (decoded or not)."""
    link = engine.link_for(peer)
    if link is None or kind not in link.stats:
        return 0
    return link.stats[kind].encoded_frames
