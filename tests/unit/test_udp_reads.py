"""A UDP socket with datagrams queued is read in one go, not one datagram per loop iteration
(an SFU subscriber socket carries every publisher's packets; see ``batch_udp_reads``)."""

from __future__ import annotations

import asyncio
import socket

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
