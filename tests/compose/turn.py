"""The ``turn`` profile's coturn, used as a client uses it: credentials from the homeserver,
an allocation, a relayed round trip, and the relay policy.

- ``GET /_matrix/client/v3/voip/turnServer`` (through Caddy) answers the ``TURN_URIS`` with
  time-limited credentials derived from ``TURN_SECRET``, the secret coturn shares
  (``--use-auth-secret``): the two ends of the wiring agree;
- a TURN allocation (RFC 5766, UDP) with those credentials succeeds and one with a wrong
  password is refused;
- a datagram relayed to a peer on a public address (a TEST-NET-2 address added to the test's
  namespace) comes back through the relay;
- a relay towards the stack's own private address is refused (compose.yaml's
  ``--denied-peer-ip`` ranges: TURN must not open a way into the compose network).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from aioice import stun
from aioice.turn import create_turn_endpoint

PUBLIC_PEER = "198.51.100.7"  # TEST-NET-2: "public" to coturn, local to the namespace


@dataclass(frozen=True)
class TurnCredentials:
    uris: list[str]
    username: str
    password: str


class _Relay(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue()
        self.errors: list[Exception] = []

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.put_nowait((data, addr))

    def error_received(self, exc: Exception) -> None:
        self.errors.append(exc)


class _Echo(asyncio.DatagramProtocol):
    transport: asyncio.DatagramTransport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(b"echo:" + data, addr)


def udp_server(uris: list[str]) -> tuple[str, int]:
    for uri in uris:
        # turn:host:port?transport=udp
        rest = uri.split(":", 1)[1]
        hostport = rest.split("?", 1)[0]
        if uri.startswith("turn:") and "transport=tcp" not in uri:
            host, _, port = hostport.rpartition(":")
            return host, int(port or 3478)
    raise ValueError(f"no UDP turn: URI in {uris}")


async def check_turn(
    creds: TurnCredentials, private_peer: str, check: Callable[[bool, str], None]
) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    server = udp_server(creds.uris)
    figures: dict[str, float] = {}
    # Wrong password: the allocation is refused (401 again after the nonce round).
    code = None
    try:
        transport, _ = await asyncio.wait_for(
            create_turn_endpoint(_Relay, server, creds.username, "wrong", lifetime=60), 10
        )
    except stun.TransactionFailed as exc:
        code = exc.response.attributes.get("ERROR-CODE", (None, ""))[0]
    else:
        transport.close()
    check(code == 401, f"a TURN allocation with a wrong password is refused ({code})")

    t0 = loop.time()
    transport, relay = await asyncio.wait_for(
        create_turn_endpoint(_Relay, server, creds.username, creds.password, lifetime=60), 10
    )
    figures["turn_allocate_ms"] = round((loop.time() - t0) * 1000)
    relayed = transport.get_extra_info("sockname")
    check(
        relayed is not None, f"TURN allocation with the homeserver's credentials: relay {relayed}"
    )
    echo_transport, _ = await loop.create_datagram_endpoint(
        _Echo, local_addr=(PUBLIC_PEER, 0), family=socket.AF_INET
    )
    try:
        peer = echo_transport.get_extra_info("sockname")
        t0 = loop.time()
        data, addr = b"", None
        for _ in range(3):  # UDP: the first send also creates the permission/channel
            transport.sendto(b"ping", peer)
            with contextlib.suppress(TimeoutError):
                data, addr = await asyncio.wait_for(relay.received.get(), 2)
                break
        figures["turn_relay_rtt_ms"] = round((loop.time() - t0) * 1000)
        check(
            data == b"echo:ping" and addr is not None and addr[0] == PUBLIC_PEER,
            f"a datagram relayed to {PUBLIC_PEER} and its answer relayed back ({data!r})",
        )
        relay.errors.clear()
        transport.sendto(b"ping", (private_peer, peer[1]))
        for _ in range(50):
            if relay.errors:
                break
            await asyncio.sleep(0.1)
        check(
            bool(relay.errors) and relay.received.empty(),
            f"a relay to the stack's private address {private_peer} is refused "
            f"({relay.errors[0] if relay.errors else 'no error'})",
        )
    finally:
        echo_transport.close()
        transport.close()
        await asyncio.sleep(0.2)  # lets the allocation's deletion go out
    return figures
