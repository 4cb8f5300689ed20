"""The media transport protocol and what a transport is built from (see the package doc)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeAlias

from aiortc.mediastreams import MediaStreamTrack

from matrixrtc.agent import CallAgent, Participant
from matrixrtc.call_keys import CallKeys
from matrixrtc.livekit.connection import MediaOptions
from matrixrtc.media.frames import FrameTap
from matrixrtc.media_transport.local_media import LocalEncoders
from matrixrtc.mesh.matrix_link import MeshLinkConfig
from matrixrtc.session.media_policy import MediaKind
from matrixrtc.session.mesh_signalling import DeviceRef

__all__ = [
    "FrameCounter",
    "MediaEngine",
    "MediaTransport",
    "TransportContext",
    "TransportFactory",
    "TransportProbe",
]


MediaEngine: TypeAlias = Literal["mesh", "sdk", "aiortc"]
"""What runs a transport's media: the mesh, or the SFU client (the livekit Python SDK, or ours
over aiortc; ``MediaOptions.engine``)."""


@dataclass(frozen=True, slots=True)
class FrameCounter:
    """One running count of decoded video frames from one peer. ``source`` identifies the
    counter (a new object after a reconnect starts a new count)."""

    source: object
    frames: int
    last_frame_at: float | None
    # When the newest ``n`` frames came (oldest first; fewer if not kept): the switcher
    # measures every inter-frame gap, not one per poll. None: only ``last_frame_at`` is known.
    times: Callable[[int], Sequence[float]] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TransportContext:
    """Everything a transport factory may use to build a transport for one call member."""

    agent: CallAgent
    keys: CallKeys | None
    media: MediaOptions = field(default_factory=MediaOptions)
    mesh: MeshLinkConfig = field(default_factory=MeshLinkConfig)
    # Local tracks for a transport that encodes its own (it stops them on close; with
    # ``encoders`` the shared encoders read them instead); None: synthetic.
    sources: Callable[[], Sequence[MediaStreamTrack]] | None = None
    # Our media encoded once for every transport of the call that can share it (the
    # switcher's; see local_media). None: each transport encodes its own ``sources``.
    encoders: LocalEncoders | None = None
    # Every decoded remote frame with its sender and the transport kind that carried it.
    frames: FrameTap[tuple[Participant, MediaKind]] | None = None
    clock: Callable[[], float] = time.monotonic
    # Whether the call's media belongs on the mesh now (the switcher's policy); a mesh links
    # no newcomer while it says no. None: always.
    wants_mesh: Callable[[], bool] | None = None


class MediaTransport(Protocol):
    """One running media transport of a call (see the module docstring)."""

    @property
    def kind(self) -> MediaKind: ...

    @property
    def engine(self) -> MediaEngine:
        """What runs this transport's media."""
        ...

    async def start(self) -> None:
        """Bring the transport up; raises a ``MatrixRTCError`` if it cannot (the caller then
        closes it)."""

    async def update(self) -> None:
        """The call's memberships changed: follow them (open or close connections)."""

    def carries(self, peer: Participant, since: float, *, video: bool) -> bool:
        """Whether ``peer``'s media reaches us over this transport, judged by what the peer
        actually publishes on it: a frame that arrived at or after ``since`` of its video (if
        it publishes video and ``video``, i.e. the call carries video, or video is all it
        publishes), else of its audio (decrypting). So a switch settles as soon as an
        audio-only peer is heard. A peer that publishes nothing counts once connected where
        the transport can tell (the mesh: its description and muted kinds); on the SFU, where
        it looks like a peer about to publish, once it has been in the room a moment
        (``NOTHING_ANNOUNCED_GRACE_S``) announcing nothing unmuted."""

    def video_counters(self, peer: Participant) -> Sequence[FrameCounter]:
        """The decoded-video counters of ``peer`` on this transport (none: not connected)."""

    def show(self, peer: DeviceRef, on: bool) -> None:
        """Whether ``peer``'s video over this transport is decoded for showing. The switcher
        turns it off once ``peer`` is cut over to a new transport (its frames here are shown
        no more) and back on if the switch is abandoned. Off, the transport keeps receiving
        and decrypting where it can (so :meth:`carries` still holds); a transport that cannot
        stop its decoder ignores it."""

    def hush(self) -> None:
        """Send none of our media any more, staying connected: we left the call and linger
        while the others move off this transport (see ``SwitchConfig.leave_linger_s``)."""

    def refresh(self) -> None:
        """Bring :meth:`video_counters` up to date now, where the transport folds its counts
        in periodically (the switcher reads them before judging a gap still open)."""

    def failing(self) -> bool:
        """Whether the transport has lost its server now (it may be repairing itself); the
        switcher falls back to another transport when this holds for a while."""

    async def aclose(self) -> None:
        """Tear down; never raises for an already broken transport."""


TransportFactory = Callable[[TransportContext], MediaTransport]

TransportProbe = Callable[[TransportContext], Awaitable[bool]]
"""Whether a transport of one kind could start now (e.g. its server answers again), without
starting it; the switcher probes a kind that failed before counting on it again."""
