"""The doctor's pieces that need no deployment: the STUN probe and the report."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import pytest

from sfu.doctor import FAIL, PASS, SKIP, Row, render, stun_binding


class _StunResponder(asyncio.DatagramProtocol):
    """Answers a Binding request with a Binding success carrying the same transaction id."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) >= 20 and data[:2] == b"\x00\x01":
            self.transport.sendto(struct.pack("!HHI", 0x0101, 0, 0x2112A442) + data[8:20], addr)


async def test_stun_binding_answered_and_unanswered() -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(_StunResponder, local_addr=("127.0.0.1", 0))
    try:
        port = transport.get_extra_info("sockname")[1]
        assert await stun_binding("127.0.0.1", port, 2.0) < 1.0
    finally:
        transport.close()
    silent, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0)
    )
    try:
        with pytest.raises(TimeoutError):
            await stun_binding("127.0.0.1", silent.get_extra_info("sockname")[1], 0.3)
    finally:
        silent.close()


def test_render_shows_fixes_for_failures_only() -> None:
    text = render(
        [
            Row("versions", PASS, "23 spec versions", "never shown"),
            Row("delayed_events", FAIL, "MSC4140 is off", "set max_event_delay_duration"),
            Row("turn", SKIP, "no --turn"),
        ]
    )
    assert "FAIL  delayed_events  MSC4140 is off" in text
    assert "fix: set max_event_delay_duration" in text
    assert "never shown" not in text
    assert text.endswith("1 check(s) failed")
