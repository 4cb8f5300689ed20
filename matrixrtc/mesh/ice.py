"""ICE configuration for mesh peer connections: explicit servers and host address restriction.

* ``iceServers`` always comes from our configuration (``/voip/turnServer`` or settings) and is
  never ``None``: aiortc substitutes Google's public STUN server for ``None``.
* Host candidates: aioice gathers on every interface address except 127.0.0.1 and offers no
  option to choose them. :func:`gather_on` gathers each of the peer connection's ICE
  connections *before* aiortc does, on exactly the configured addresses, through aioice's own
  ``Connection.get_component_candidates`` (which also adds STUN/TURN candidates for the
  configured servers), and marks the gathering done so aiortc's later ``gather()`` keeps our
  candidates. This is per peer connection, so nothing global changes. Tests pass
  ``("127.0.0.1",)``: inside the test network namespace only loopback exists, and aioice would
  otherwise find no address at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aioice import TransportPolicy
from aiortc import (
    RTCBundlePolicy,
    RTCConfiguration,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
)

from matrixrtc.errors import LocalError

__all__ = ["IceServerConfig", "gather_on", "rtc_configuration"]


@dataclass(frozen=True, slots=True, kw_only=True)
class IceServerConfig:
    """One STUN/TURN server (the shape of a ``/voip/turnServer`` answer)."""

    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = None


def rtc_configuration(
    servers: Sequence[IceServerConfig], *, relay_only: bool = False
) -> RTCConfiguration:
    ice = [
        RTCIceServer(urls=list(s.urls), username=s.username, credential=s.credential)
        for s in servers
    ]
    return RTCConfiguration(
        iceServers=ice,  # never None: None would mean a public STUN server
        bundlePolicy=RTCBundlePolicy.MAX_BUNDLE,
        iceTransportPolicy=RTCIceTransportPolicy.RELAY if relay_only else RTCIceTransportPolicy.ALL,
    )


def _ice_connections(pc: RTCPeerConnection) -> list[Any]:
    seen: dict[int, Any] = {}
    transports = [t.receiver.transport for t in pc.getTransceivers()]
    if pc.sctp is not None:
        transports.append(pc.sctp.transport)
    for dtls in transports:
        connection = dtls.transport.iceGatherer._connection
        seen[id(connection)] = connection
    return list(seen.values())


async def gather_on(pc: RTCPeerConnection, addresses: Sequence[str]) -> None:
    """Gather host candidates of ``pc`` on ``addresses`` only (before setLocalDescription)."""
    for connection in _ice_connections(pc):
        if connection._local_candidates_start:
            continue  # already gathered (renegotiation)
        if not hasattr(connection, "get_component_candidates"):
            raise LocalError("unexpected aioice version: cannot restrict host candidates")
        host = [] if connection._transport_policy == TransportPolicy.RELAY else list(addresses)
        connection._local_candidates_start = True
        for component in sorted(connection._components):
            connection._local_candidates += await connection.get_component_candidates(
                component=component, addresses=host
            )
        connection._local_candidates_end = True
