"""ICE helpers: /voip/turnServer parsing and remote candidate filtering (pure functions)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
import uvloop
from aioice.turn import UDP_SOCKET_BUFFER_SIZE  # what aioice asks for every socket
from aiortc import RTCPeerConnection
from hypothesis import given, settings
from hypothesis import strategies as st

from matrixrtc.media.ice import (
    UDP_RECEIVE_BUFFER,
    _ice_connections,
    close_peer_connection,
    enlarge_receive_buffer,
    gather_on,
)
from matrixrtc.mesh.ice import (
    IceServerConfig,
    candidate_allowed,
    filter_sdp_candidates,
    ice_servers_from_turn_response,
    parse_networks,
)

LOOPBACK = parse_networks(["127.0.0.0/8"])
RMEM_MAX = int(Path("/proc/sys/net/core/rmem_max").read_text())  # the most a socket may ask
HOST = "candidate:1 1 udp 2130706431 {} 50000 typ host"


def test_turn_response_becomes_one_server() -> None:
    body = {
        "uris": ["turn:127.0.0.1:3478?transport=udp", "http://evil", "stun:127.0.0.1:3478"],
        "username": "1443779631:@user:example.com",
        "password": "JlKfBy1QwLrO20385QyAtEyIv0=",
        "ttl": 86400,
    }
    assert ice_servers_from_turn_response(body) == (
        IceServerConfig(
            urls=("turn:127.0.0.1:3478?transport=udp", "stun:127.0.0.1:3478"),
            username="1443779631:@user:example.com",
            credential="JlKfBy1QwLrO20385QyAtEyIv0=",
        ),
    )


def test_unusable_turn_responses_give_nothing() -> None:
    assert ice_servers_from_turn_response({}) == ()
    assert ice_servers_from_turn_response({"uris": "turn:x"}) == ()
    assert ice_servers_from_turn_response({"uris": ["http://x"]}) == ()
    assert ice_servers_from_turn_response(None) == ()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
    max_leaves=15,
)


@settings(max_examples=200, deadline=None)
@given(json_values, st.dictionaries(st.sampled_from(["uris", "username", "password"]), json_values))
def test_turn_parser_never_raises(anything: object, mutated: dict[str, object]) -> None:
    ice_servers_from_turn_response(anything)
    ice_servers_from_turn_response(mutated)


def test_candidate_filter() -> None:
    assert candidate_allowed(HOST.format("127.0.0.1"), LOOPBACK)
    assert not candidate_allowed(HOST.format("192.0.2.7"), LOOPBACK)
    assert not candidate_allowed(HOST.format("0a1b2c3d-aaaa.local"), LOOPBACK)
    assert not candidate_allowed("garbage", LOOPBACK)
    sdp = (
        "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 96\r\n"
        f"a={HOST.format('127.0.0.1')}\r\n"
        f"a={HOST.format('10.1.2.3')}\r\n"
        "a=end-of-candidates\r\n"
    )
    out = filter_sdp_candidates(sdp, LOOPBACK)
    assert "127.0.0.1" in out
    assert "10.1.2.3" not in out
    assert out.count("\r\n") == sdp.count("\r\n") - 1


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_candidate_filter_never_raises(text: str) -> None:
    candidate_allowed(text, LOOPBACK)
    filter_sdp_candidates(text, LOOPBACK)


@pytest.mark.parametrize("ours", [True, False])
async def test_a_cancelled_second_close_leaves_the_first_one_whole(ours: bool) -> None:
    """aiortc closes a peer connection on its own once DTLS has closed; our close meanwhile,
    cancelled (a switch's teardown), must not make that close fail. Plain ``pc.close()``
    does (the second case: the test shows the failure close_peer_connection prevents)."""
    pc = RTCPeerConnection()
    pc.addTransceiver("video")
    await pc.setLocalDescription(await pc.createOffer())
    first = asyncio.ensure_future(pc.close())  # as aiortc's own __closeTask
    await asyncio.sleep(0)
    assert not first.done()
    second = asyncio.ensure_future(close_peer_connection(pc) if ours else pc.close())
    await asyncio.sleep(0)
    second.cancel()
    (outcome,) = await asyncio.gather(first, return_exceptions=True)
    if ours:
        assert outcome is None
        assert pc.connectionState == "closed"
    else:
        assert isinstance(outcome, asyncio.InvalidStateError)


class _Count(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received = 0

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.received += 1


async def _burst_delivered(enlarge: bool, count: int = 600) -> int:
    """Datagrams of ``count`` sent (1 200 bytes each, ~0.7 MB) while the receiving loop is
    busy that the receiver still reads once it runs."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(_Count, local_addr=("127.0.0.1", 0))
    try:
        # What aioice gives each socket, whatever this host's default: the "before".
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_SOCKET_BUFFER_SIZE)
        if enlarge:
            assert enlarge_receive_buffer(transport) is not None
        addr = transport.get_extra_info("sockname")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
            for _ in range(count):  # the loop cannot read meanwhile: a ~100 ms late loop
                out.sendto(b"\x80" * 1200, addr)
        for _ in range(50):
            await asyncio.sleep(0.01)
        return protocol.received
    finally:
        transport.close()


async def test_an_enlarged_socket_holds_a_burst_the_default_one_drops() -> None:
    if RMEM_MAX < 1 << 20:
        pytest.skip(f"net.core.rmem_max is {RMEM_MAX}: no larger buffer can be had here")
    assert await _burst_delivered(enlarge=True) == 600
    assert await _burst_delivered(enlarge=False) < 600  # aioice's buffer overflows


def test_gather_on_enlarges_every_socket_it_made_under_uvloop_too() -> None:
    """Our media processes run on uvloop, whose transports are no asyncio.BaseTransport."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_gather_enlarges())


async def test_gather_on_enlarges_every_socket_it_made() -> None:
    await _gather_enlarges()


async def _gather_enlarges() -> None:
    pc = RTCPeerConnection()
    try:
        pc.addTransceiver("video")
        pc.addTransceiver("audio")
        await gather_on(pc, ("127.0.0.1",))
        sizes = [
            p.transport.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            for c in _ice_connections(pc)
            for p in c._protocols
        ]
        assert sizes
        assert all(s >= 2 * min(UDP_RECEIVE_BUFFER, RMEM_MAX) for s in sizes), sizes
    finally:
        await pc.close()
