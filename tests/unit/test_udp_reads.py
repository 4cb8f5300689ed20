"""A UDP socket with datagrams queued is read in one go, not one datagram per loop iteration
(an SFU subscriber socket carries every publisher's packets; see ``batch_udp_reads``), and a
failing read is handled as CPython 3.11's own ``_read_ready`` handles it."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from matrixrtc.media.ice import batch_udp_reads


class _Recorder(asyncio.DatagramProtocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.received: list[bytes] = []
        self.seen_next_iteration: int | None = None
        self.all_in = loop.create_future()

    def datagram_received(self, data: bytes, addr: object) -> None:
        if not self.received:
            # Runs at the loop's next iteration: how many datagrams were read before it.
            self.loop.call_soon(self._mark)
        self.received.append(data)
        if len(self.received) == 10 and not self.all_in.done():
            self.all_in.set_result(None)

    def _mark(self) -> None:
        self.seen_next_iteration = len(self.received)


async def test_queued_datagrams_are_read_in_one_iteration() -> None:
    batch_udp_reads()
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: _Recorder(loop), local_addr=("127.0.0.1", 0)
    )
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        addr = transport.get_extra_info("sockname")
        for i in range(10):  # all queued in the receiver's socket before the loop runs again
            sender.sendto(bytes([i]) * 100, addr)
        await asyncio.wait_for(proto.all_in, 5)
        assert proto.received == [bytes([i]) * 100 for i in range(10)]
        assert proto.seen_next_iteration == 10
    finally:
        sender.close()
        transport.close()


class _Boom(BaseException):
    """Neither an Exception nor SystemExit/KeyboardInterrupt."""


class _FailingSocket:
    """Stands in for the transport's socket: every read raises ``exc``."""

    def __init__(self, sock: socket.socket, exc: BaseException) -> None:
        self.sock = sock
        self.exc = exc

    def recvfrom(self, bufsize: int) -> tuple[bytes, object]:
        raise self.exc

    def close(self) -> None:
        self.sock.close()


class _Lost(asyncio.DatagramProtocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.lost: asyncio.Future[BaseException | None] = loop.create_future()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.set_result(exc)


async def _failing_transport(exc: BaseException) -> tuple[Any, _Lost]:
    batch_udp_reads()
    loop = asyncio.get_running_loop()
    transport: Any
    transport, proto = await loop.create_datagram_endpoint(
        lambda: _Lost(loop), local_addr=("127.0.0.1", 0)
    )
    transport._sock = _FailingSocket(transport._sock, exc)
    return transport, proto


@pytest.mark.parametrize("exc", [SystemExit(), KeyboardInterrupt()])
async def test_a_read_raising_exit_or_interrupt_propagates(exc: BaseException) -> None:
    transport, _ = await _failing_transport(exc)
    try:
        with pytest.raises(type(exc)):
            transport._read_ready()
        assert not transport.is_closing()
    finally:
        transport.close()


async def test_a_read_raising_another_base_exception_closes_the_transport() -> None:
    """As CPython's own method does: the transport fails and the protocol is told why."""
    boom = _Boom()
    transport, proto = await _failing_transport(boom)
    try:
        transport._read_ready()  # does not raise
        assert transport.is_closing()
        assert await asyncio.wait_for(proto.lost, 5) is boom
    finally:
        transport.close()
