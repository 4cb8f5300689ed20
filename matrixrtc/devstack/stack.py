"""Synapse + LiveKit together, as used by ``python -m matrixrtc stack up`` and the demo."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

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


@contextlib.asynccontextmanager
async def local_stack(
    run_dir: Path,
    usernames: Sequence[str] = ("alice", "bob"),
    livekit_service_url: str | None = None,
) -> AsyncIterator[LocalStack]:
    """Start LiveKit, then Synapse, register ``usernames``; stop both on exit."""
    async with (
        LiveKit(run_dir) as livekit,
        Synapse(run_dir, livekit_service_url=livekit_service_url) as synapse,
    ):
        users = tuple([await synapse.register(name) for name in usernames])
        yield LocalStack(run_dir, synapse, livekit, users)
