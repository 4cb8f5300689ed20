"""ICE consent freshness on slow paths (matrixrtc.mesh.ice.keep_consent): aioice's own check is
sent once and fails when its answer takes more than 0.5 s, so a link with a 600 ms round trip
lost consent (and its media) after ~30 s. The STUN transactions here are aioice's own; only the
path that carries them is simulated."""

from __future__ import annotations

import asyncio
import functools
from types import SimpleNamespace
from typing import Any

import pytest
from aioice import stun
from aiortc import RTCPeerConnection

from matrixrtc.mesh.ice import CONSENT_RETRANSMISSIONS, keep_consent, keep_consent_on


class SlowPath:
    """Carries STUN requests; each transmission is answered ``rtt`` seconds later (never when
    ``rtt`` is None). Requests run aioice's ``stun.Transaction`` (its timers and retries)."""

    def __init__(self, rtt: float | None) -> None:
        self.rtt = rtt
        self.sent = 0
        self._transactions: dict[bytes, stun.Transaction] = {}

    async def request(
        self,
        request: stun.Message,
        addr: tuple[str, int],
        integrity_key: bytes | None = None,
        retransmissions: int | None = None,
    ) -> tuple[stun.Message, tuple[str, int]]:
        tx = stun.Transaction(request, addr, self, retransmissions=retransmissions)
        self._transactions[request.transaction_id] = tx
        try:
            return await tx.run()
        finally:
            del self._transactions[request.transaction_id]

    def send_stun(self, message: stun.Message, addr: tuple[str, int]) -> None:
        self.sent += 1
        if self.rtt is None:
            return
        answer = stun.Message(
            message_method=message.message_method,
            message_class=stun.Class.RESPONSE,
            transaction_id=message.transaction_id,
        )
        tx = self._transactions[message.transaction_id]
        asyncio.get_running_loop().call_later(self.rtt, tx.response_received, answer, addr)


class FakeConnection:
    """What keep_consent uses of an aioice Connection: one nominated pair over ``path``."""

    def __init__(self, path: SlowPath) -> None:
        self._nominated = {1: SimpleNamespace(protocol=path, remote_addr=("10.77.0.12", 5000))}
        self.remote_password = "password"
        self._query_consent_task: Any = "running"
        self.closed = asyncio.Event()

    def build_request(self, pair: Any, nominate: bool) -> stun.Message:
        return stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)

    async def close(self) -> None:
        assert self._query_consent_task is None  # close() must not cancel the caller
        self.closed.set()


def _request() -> stun.Message:
    return stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)


async def test_aioice_consent_check_fails_on_a_600ms_round_trip() -> None:
    # aioice's query_consent sends each check with retransmissions=0: one 0.5 s timeout.
    with pytest.raises(stun.TransactionTimeout):
        await SlowPath(0.6).request(_request(), ("10.77.0.12", 5000), retransmissions=0)
    # Retransmitted, the same transaction takes the late answer to its first transmission.
    path = SlowPath(0.6)
    await path.request(_request(), ("10.77.0.12", 5000), retransmissions=CONSENT_RETRANSMISSIONS)
    assert path.sent == 2


async def test_consent_is_kept_on_a_600ms_round_trip() -> None:
    path = SlowPath(0.6)
    conn = FakeConnection(path)
    task = asyncio.create_task(
        keep_consent(conn, interval_s=0.01, expiry_s=0.8, jitter=lambda: 0.5)
    )
    await asyncio.sleep(2.0)  # more than twice the expiry
    assert not conn.closed.is_set()
    assert path.sent >= 4
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_consent_expires_when_nothing_answers() -> None:
    conn = FakeConnection(SlowPath(None))
    told: list[bool] = []  # whether the connection was still open when the owner was told
    await asyncio.wait_for(
        keep_consent(
            conn,
            interval_s=0.01,
            expiry_s=0.8,
            retransmissions=0,
            jitter=lambda: 0.5,
            on_expired=lambda: told.append(not conn.closed.is_set()),
        ),
        5.0,
    )
    assert conn.closed.is_set()
    assert told == [True]  # told once, before the close (its "closed" must not look deliberate)


async def test_every_ice_connection_of_a_peer_connection_gets_it() -> None:
    pc = RTCPeerConnection()
    try:
        pc.addTransceiver("audio")
        pc.addTransceiver("video")
        keep_consent_on(pc)
        for t in pc.getTransceivers():
            connection = t.receiver.transport.transport.iceGatherer._connection
            consent = connection.query_consent
            assert isinstance(consent, functools.partial)
            assert consent.func is keep_consent
            assert consent.args == (connection,)
            assert consent.keywords["expiry_s"] == 30.0
    finally:
        await pc.close()
