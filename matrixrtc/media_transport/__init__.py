"""The media transport protocol: what the mesh/SFU switcher needs from a transport.

A call's media goes over one :class:`MediaTransport` at a time (two during a make-before-break
switch). :mod:`matrixrtc.switching` talks to transports only through this protocol and finds
them in a registry, ``{MediaKind: factory}`` (:data:`DEFAULT_TRANSPORTS`): adding a transport
means writing one class that implements the protocol, a factory that builds it from a
:class:`TransportContext`, and a registry entry; nothing in the switcher changes.

Implementations: :class:`matrixrtc.media_transport.mesh.MeshMedia` (aiortc full mesh over
Matrix to-device signalling) and :class:`matrixrtc.media_transport.sfu.LiveKitMedia` (LiveKit
connections through the focus' authorization service).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from matrixrtc.media_transport.base import (
    FrameCounter,
    MediaEngine,
    MediaTransport,
    TransportContext,
    TransportFactory,
    TransportProbe,
)
from matrixrtc.media_transport.mesh import MeshMedia
from matrixrtc.media_transport.sfu import LiveKitMedia, probe_livekit
from matrixrtc.session.media_policy import MediaKind

__all__ = [
    "DEFAULT_PROBES",
    "DEFAULT_TRANSPORTS",
    "FrameCounter",
    "LiveKitMedia",
    "MediaEngine",
    "MediaTransport",
    "MeshMedia",
    "TransportContext",
    "TransportFactory",
    "TransportProbe",
]

# What the switcher runs for each decision of the policy, unless told otherwise.
DEFAULT_TRANSPORTS: Final[Mapping[MediaKind, TransportFactory]] = {
    MediaKind.MESH: MeshMedia,
    MediaKind.SFU: LiveKitMedia,
}

# How the switcher learns that a failed kind of transport could work again.
DEFAULT_PROBES: Final[Mapping[MediaKind, TransportProbe]] = {MediaKind.SFU: probe_livekit}
