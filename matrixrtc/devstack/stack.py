"""Synapse + LiveKit + coturn together, as used by ``python -m matrixrtc stack up``.

Synapse's ``/voip/turnServer`` hands out the coturn's credentials (legacy mesh clients such
as Hydrogen refuse to call when it answers ``{}``)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from matrixrtc.devstack.coturn import Coturn
from matrixrtc.devstack.livekit import LiveKit
from matrixrtc.devstack.synapse import Synapse, UserCreds

__all__ = ["LocalStack", "local_stack"]


@dataclass(frozen=True, slots=True)
class LocalStack:
    """A running homeserver and SFU, with users ready to log in."""

    run_dir: Path
    synapse: Synapse
    livekit: LiveKit
    users: tuple[UserCreds, ...]
    coturn: Coturn


@contextlib.asynccontextmanager
async def local_stack(
    run_dir: Path,
    usernames: Sequence[str] = ("alice", "bob"),
    livekit_service_url: str | None = None,
) -> AsyncIterator[LocalStack]:
    """Start coturn, LiveKit, then Synapse (TURN from that coturn), register ``usernames``;
    stop everything on exit."""
    async with Coturn(run_dir) as coturn, LiveKit(run_dir) as livekit:
        synapse = Synapse(
            run_dir,
            livekit_service_url=livekit_service_url,
            extra_config=coturn.synapse_config(),
        )
        async with synapse:
            users = tuple([await synapse.register(name) for name in usernames])
            yield LocalStack(run_dir, synapse, livekit, users, coturn)
