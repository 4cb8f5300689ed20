"""ICE configuration for aiortc peer connections (mesh, and our own LiveKit client): explicit
servers and host address restriction.

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
* Consent freshness (RFC 7675): aioice 0.13 sends each consent check once, with no
  retransmission, and counts it failed when no answer came within its first STUN timeout
  (0.5 s); six failures in a row close the connection. On a path whose round trip is above
  0.5 s every check fails, so media stops after ~30 s on a link that works (aiortc/aioice#58,
  open). :func:`keep_consent_on` gives each ICE connection of a peer connection the RFC's rule
  instead: a check every 4-6 s, retransmitted while it waits (0.5 + 1 + 2 s), and consent
  lost only when no answer at all came for 30 s. Per connection, nothing global changes.
* UDP reads: :func:`batch_udp_reads` is the one global change, and it relies on an asyncio
  private: it replaces ``_SelectorDatagramTransport._read_ready`` for the whole process with
  CPython 3.11's method (the same in 3.12.1 and 3.13.0) run up to 64 times per readiness event.
  A Python upgrade must compare it with that version's method again
  (``tests/unit/test_udp_reads.py``; the pinned private uses are listed in
  :mod:`matrixrtc.mesh.fanout`).
* Receive buffers: :func:`gather_on` also gives each socket it made a receive buffer of
  :data:`UDP_RECEIVE_BUFFER` (aioice's held ~0.2 s of an SFU subscription; see there). Per
  socket, nothing global changes.
* Closing: :func:`close_peer_connection` shields aiortc's ``close()``. aiortc starts a close of
  its own once every DTLS transport has closed, and a second ``close()`` awaits the first
  one's private future directly: cancelling the second caller (a switch's teardown, a
  timeout) cancels that future, the first close then fails setting it (``InvalidStateError``,
  logged as "Task exception was never retrieved" on most transport switches).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import random
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import structlog
from aioice import TransportPolicy, stun
from aiortc import (
    RTCBundlePolicy,
    RTCConfiguration,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
)

from matrixrtc.errors import LocalError

__all__ = [
    "UDP_RECEIVE_BUFFER",
    "IceServerConfig",
    "candidate_allowed",
    "close_peer_connection",
    "enlarge_receive_buffer",
    "filter_sdp_candidates",
    "gather_on",
    "ice_servers_from_turn_response",
    "keep_consent",
    "keep_consent_on",
    "parse_networks",
    "rtc_configuration",
]

log = structlog.get_logger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_ICE_SCHEMES = ("stun:", "turn:", "turns:")


async def close_peer_connection(pc: Any) -> None:
    """``await pc.close()`` that a cancellation of the caller cannot turn into a failure of a
    close already under way (module docstring, "Closing"). Cancelled, it returns at once;
    the close goes on."""
    await asyncio.shield(pc.close())


@dataclass(frozen=True, slots=True, kw_only=True)
class IceServerConfig:
    """One STUN/TURN server (the shape of a ``/voip/turnServer`` answer)."""

    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = None


# Datagrams read per readiness event of a UDP socket (see batch_udp_reads).
UDP_READ_BATCH = 64


def batch_udp_reads(batch: int = UDP_READ_BATCH) -> None:
    """Make every asyncio UDP transport created from now on read up to ``batch`` queued
    datagrams per readiness event instead of one. asyncio reads one datagram per socket per
    loop iteration: an SFU subscriber connection carries every publisher's audio and video
    (~360 packets/s for three) on one socket, so on a busy loop (a mesh being built beside
    it) packets waited 20-110 ms in the socket with no loop iteration over 20 ms: the
    largest SFU->mesh switch gaps (bench/split_transit.py). Idempotent. Replaces an asyncio
    private with a copy of CPython 3.11's logic: re-check on a Python upgrade (module doc)."""
    from asyncio import selector_events

    cls: Any = getattr(selector_events, "_SelectorDatagramTransport")  # noqa: B009 (private)
    if getattr(cls, "_matrixrtc_batch", None) == batch:
        return

    def read_ready(self: Any) -> None:
        for _ in range(batch):
            if self._conn_lost:
                return
            try:
                data, addr = self._sock.recvfrom(self.max_size)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._protocol.error_received(exc)
                return
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                # As CPython's method: anything else fails this transport (its protocol is
                # told why) instead of escaping to the loop with the socket left open.
                self._fatal_error(exc, "Fatal read error on datagram transport")
                return
            self._protocol.datagram_received(data, addr)

    cls._read_ready = read_ready
    cls._matrixrtc_batch = batch


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
        for protocol in connection._protocols:
            # uvloop's transports are no asyncio.BaseTransport; a TURN relay has no socket
            transport = getattr(protocol, "transport", None)
            if transport is not None:
                enlarge_receive_buffer(transport)


# Bytes of received datagrams each ICE socket may hold until the loop reads them. aioice asks
# for 256 KiB (the kernel doubles it for its bookkeeping: ~200 full-size packets on loopback),
# about 0.2 s of an SFU subscription carrying 11 publishers (~1 000 packets/s). A loop that
# late lost datagrams, then asked for them again (NACK) or for a key frame (PLI): more load
# at the worst moment. bench/scale.py's SFU n=12 cell dropped 17-40 % of its datagrams there
# and collapsed; with this buffer it held in most runs (the switch benchmark dropped none
# either way). The kernel caps the request at net.core.rmem_max (a process without
# CAP_NET_ADMIN cannot exceed it).
UDP_RECEIVE_BUFFER: Final = 2 << 20


def enlarge_receive_buffer(transport: Any, size: int = UDP_RECEIVE_BUFFER) -> int | None:
    """Ask for a ``size``-byte receive buffer on ``transport``'s socket (an asyncio or uvloop
    datagram transport: anything with ``get_extra_info``); the size the kernel
    gave (it doubles the request for its bookkeeping and caps it at net.core.rmem_max), or
    None if the transport has no socket or refused."""
    get_extra_info = getattr(transport, "get_extra_info", None)
    sock = get_extra_info("socket") if get_extra_info is not None else None
    if sock is None:
        return None
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < size:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        got = int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
    except OSError as exc:
        log.info("ice.receive_buffer_refused", error=repr(exc))
        return None
    if got < size and not _capped_logged:
        _capped_logged.append(got)  # once per process: every socket gets the same cap
        log.warning(
            "ice.receive_buffer_capped",
            asked=size,
            got=got,
            hint="raise the net.core.rmem_max sysctl: a busy SFU subscription can overflow it",
        )
    return got


_capped_logged: list[int] = []


# RFC 7675 §5.1: consent expires when no check was answered for 30 s; checks every 4-6 s.
CONSENT_INTERVAL_S = 5.0
CONSENT_EXPIRY_S = 30.0
# Each check waits 0.5 + 1 + 2 s (aioice's RTO doubling) for its answer: a late answer to an
# earlier transmission still counts, so a round trip of up to 3.5 s keeps consent.
CONSENT_RETRANSMISSIONS = 2


async def keep_consent(
    connection: Any,
    *,
    interval_s: float = CONSENT_INTERVAL_S,
    expiry_s: float = CONSENT_EXPIRY_S,
    retransmissions: int = CONSENT_RETRANSMISSIONS,
    clock: Callable[[], float] = time.monotonic,
    jitter: Callable[[], float] = random.random,
    on_expired: Callable[[], None] | None = None,
) -> None:
    """Consent freshness for one aioice ``Connection`` (in place of its ``query_consent``):
    close it once no check has been answered for ``expiry_s``, after calling ``on_expired``.

    The close is silent (no DTLS close_notify reaches the peer) and aiortc then closes the
    whole peer connection: "closed", the same state a peer's deliberate close gives.
    ``on_expired`` is how the owner tells the two apart."""
    answered_at = clock()
    while True:
        await asyncio.sleep(interval_s * (0.8 + 0.4 * jitter()))
        for pair in list(connection._nominated.values()):
            request = connection.build_request(pair, nominate=False)
            try:
                await pair.protocol.request(
                    request,
                    pair.remote_addr,
                    integrity_key=connection.remote_password.encode("utf8"),
                    retransmissions=retransmissions,
                )
                answered_at = clock()
            except stun.TransactionError:
                pass
        if clock() - answered_at >= expiry_s:
            log.info("mesh.ice_consent_expired", unanswered_s=round(clock() - answered_at, 1))
            if on_expired is not None:
                on_expired()
            connection._query_consent_task = None  # what close() would cancel: this task
            await connection.close()
            return


def keep_consent_on(
    pc: RTCPeerConnection,
    *,
    interval_s: float = CONSENT_INTERVAL_S,
    expiry_s: float = CONSENT_EXPIRY_S,
    on_expired: Callable[[], None] | None = None,
) -> None:
    """Give every ICE connection of ``pc`` :func:`keep_consent` (before it connects: aioice
    starts ``query_consent`` at the end of ``connect``)."""
    for connection in _ice_connections(pc):
        for name in ("query_consent", "_nominated", "build_request"):
            if not hasattr(connection, name):
                raise LocalError(f"unexpected aioice version: no Connection.{name}")
        connection.query_consent = functools.partial(
            keep_consent,
            connection,
            interval_s=interval_s,
            expiry_s=expiry_s,
            on_expired=on_expired,
        )


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
