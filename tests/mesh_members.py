"""A mesh member in a given membership dialect for the heterogeneous-mesh tests: a
:class:`~matrixrtc.agent.CallAgent` plus :class:`~matrixrtc.mesh.matrix_link.MatrixMesh`,
the same pair ``matrixrtc.Call`` and ``python -m matrixrtc legacy-call`` run."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

from aiortc.mediastreams import MediaStreamTrack

from matrixrtc.agent import AgentConfig, CallAgent, dialect_choice
from matrixrtc.call_keys import CallKeys
from matrixrtc.matrix import Homeserver
from matrixrtc.media.frames import FrameTap
from matrixrtc.mesh.engine import MeshConfig
from matrixrtc.mesh.matrix_link import FrameKeys, MatrixMesh, MeshLinkConfig
from matrixrtc.model import FullMeshTransport


@contextlib.asynccontextmanager
async def mesh_member(
    hs: Homeserver,
    room_id: str,
    *,
    dialect: str = "msc3401_2022",
    sources: Sequence[MediaStreamTrack] = (),
    config: MeshConfig | None = None,
    keys: FrameKeys | None = None,
    intent: str | None = None,
    e2ee: bool = False,
) -> AsyncIterator[MatrixMesh]:
    """``e2ee``: distribute frame keys (:class:`~matrixrtc.call_keys.CallKeys`) and encrypt
    frames to every peer that takes part in frame E2EE. The member listens to every decoded
    frame, as a client that plays them does: remote audio is decoded only for a listener,
    and the interop tests check that a browser's audio decodes here."""
    chosen, auto = dialect_choice(dialect)
    agent_cfg = AgentConfig(
        dialect=chosen, auto_dialect=auto, transports=(FullMeshTransport(),), intent=intent
    )
    link_cfg = MeshLinkConfig(mesh=config or MeshConfig())
    async with contextlib.AsyncExitStack() as stack:
        agent = await stack.enter_async_context(CallAgent(hs, room_id, agent_cfg))
        if e2ee:
            keys = await stack.enter_async_context(CallKeys(agent))
        mesh = await stack.enter_async_context(
            MatrixMesh(
                agent,
                keys=keys,
                sources=sources,
                config=link_cfg,
                frames=FrameTap(lambda _peer, _frame: None),
            )
        )
        yield mesh
