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

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from aioice import TransportPolicy
from aiortc import (
    RTCBundlePolicy,
    RTCConfiguration,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
)

from matrixrtc.errors import LocalError

__all__ = [
    "IceServerConfig",
    "candidate_allowed",
    "filter_sdp_candidates",
    "gather_on",
    "ice_servers_from_turn_response",
    "parse_networks",
    "rtc_configuration",
]

log = structlog.get_logger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_ICE_SCHEMES = ("stun:", "turn:", "turns:")


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


def ice_servers_from_turn_response(response: object) -> tuple[IceServerConfig, ...]:
    """Servers from a ``GET /_matrix/client/v3/voip/turnServer`` body; () if unusable.

    aiortc uses only the first STUN and the first TURN URI of its configuration.
    """
    if not isinstance(response, Mapping):
        return ()
    uris = response.get("uris")
    username = response.get("username")
    password = response.get("password")
    if not isinstance(uris, list) or not all(isinstance(u, str) for u in uris):
        log.info("mesh.turn_response_ignored", reason="uris is not a list of strings")
        return ()
    usable = tuple(u for u in uris if u.startswith(_ICE_SCHEMES) and len(u) <= 512)
    if not usable:
        return ()
    if not isinstance(username, str) or not isinstance(password, str):
        username = password = None
    return (IceServerConfig(urls=usable, username=username, credential=password),)


def parse_networks(networks: Sequence[str]) -> tuple[Network, ...]:
    try:
        return tuple(ipaddress.ip_network(n, strict=False) for n in networks)
    except ValueError as exc:
        raise LocalError(f"invalid network in remote_networks: {exc}") from exc


def candidate_allowed(candidate: str, networks: Sequence[Network]) -> bool:
    """Whether an ICE candidate (``candidate:...`` attribute value) points into ``networks``.

    mDNS (``.local``) and unparsable candidates are refused: we cannot tell where they lead.
    """
    fields = candidate.split()
    if len(fields) < 8:
        return False
    try:
        address = ipaddress.ip_address(fields[4])
    except ValueError:
        return False
    return any(address in network for network in networks)


def filter_sdp_candidates(sdp: str, networks: Sequence[Network]) -> str:
    """``sdp`` without the ``a=candidate`` lines that point outside ``networks``."""
    kept: list[str] = []
    dropped = 0
    for line in sdp.splitlines(keepends=True):
        if line.startswith("a=candidate:") and not candidate_allowed(line[2:].strip(), networks):
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        log.info("mesh.remote_candidates_filtered", dropped=dropped)
    return "".join(kept)
