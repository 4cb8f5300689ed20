"""The homeserver adapter against a real Synapse: device persistence, Olm to-device with a
verified sender device, MSC4140 delayed events and their errors, discovery, OpenID."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from matrixrtc.devstack import Synapse
from matrixrtc.errors import LocalError
from matrixrtc.matrix import (
    DelayAction,
    DelayNotFound,
    DelayTooLong,
    DeviceRef,
    Homeserver,
    Login,
    LoginError,
    ToDeviceEvent,
)

pytestmark = pytest.mark.integration

CALL_MEMBER = "org.matrix.msc3401.call.member"
FOCUS_URL = "http://127.0.0.1:9/livekit/jwt"  # advertised only, never contacted


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def rtc_synapse(run_dir: Path) -> AsyncIterator[Synapse]:
    """A Synapse of our own: it advertises a focus, and a test restarts it."""
    async with Synapse(run_dir, livekit_service_url=FOCUS_URL, name="synapse-adapter") as hs:
        yield hs


async def _next(sub: Any, pred: Any, within: float = 5.0) -> Any:
    async def _loop() -> Any:
        while True:
            item = await sub.get()
            if pred(item):
                return item

    return await asyncio.wait_for(_loop(), within)


async def test_restarted_agent_is_the_same_device_and_keeps_olm_sessions(
    synapse: Any, run_dir: Path, user_factory: Any
) -> None:
    alice = await user_factory("alice")
    bob = await user_factory("bob")
    a_dir, b_dir = run_dir / "adapter-a", run_dir / "adapter-b"
    async with Homeserver(
        synapse.base_url, Login(alice.user_id, password=alice.password), state_dir=a_dir
    ) as a:
        first_device = a.device_id
        async with Homeserver(
            synapse.base_url, Login(bob.user_id, password=bob.password), state_dir=b_dir
        ) as b:
            with b.to_device_events() as sub:
                res = await a.send_to_device(
                    "m.test.one", {DeviceRef(b.user_id, b.device_id): {"n": 1}}
                )
                assert res.sent == (DeviceRef(b.user_id, b.device_id),)
                assert res.failed == ()
                ev: ToDeviceEvent = await _next(sub, lambda e: e.type == "m.test.one")
                assert ev.encrypted
                assert ev.sender == a.user_id
                assert ev.sender_device == first_device
                assert ev.content == {"n": 1}
    # No password now: the state directory alone restores the device and its crypto store.
    async with Homeserver(synapse.base_url, Login(alice.user_id), state_dir=a_dir) as a2:
        assert a2.device_id == first_device
        devices = await a2.request("GET", "/_matrix/client/v3/devices")
        # The registration's own device plus ours: a restart added none.
        assert first_device in [d["device_id"] for d in devices["devices"]]
        assert len(devices["devices"]) == 2
        olm: Any = a2._require_nio().olm
        sessions_before = sum(len(v) for v in olm.session_store._entries.values())
        assert sessions_before >= 1, "the Olm session with bob was not kept"
        async with Homeserver(synapse.base_url, Login(bob.user_id), state_dir=b_dir) as b2:
            with b2.to_device_events() as sub:
                await a2.send_to_device(
                    "m.test.two", {DeviceRef(b2.user_id, b2.device_id): {"n": 2}}
                )
                ev = await _next(sub, lambda e: e.type == "m.test.two")
                assert ev.sender_device == first_device
                assert ev.content == {"n": 2}
        # Reusing the saved session means no new Olm session had to be claimed.
        assert sum(len(v) for v in olm.session_store._entries.values()) == sessions_before
    # One process at a time per state directory: a second user of it is refused.
    async with Homeserver(synapse.base_url, Login(alice.user_id), state_dir=a_dir):
        with pytest.raises(LocalError, match="in use"):
            async with Homeserver(synapse.base_url, Login(alice.user_id), state_dir=a_dir):
                pass
    # A password login into the same state directory also keeps the device.
    async with Homeserver(
        synapse.base_url, Login(alice.user_id, password=alice.password), state_dir=a_dir
    ) as a3:
        assert a3.device_id == first_device


async def test_login_needs_credentials(synapse: Any, run_dir: Path) -> None:
    with pytest.raises(LoginError):
        async with Homeserver(
            synapse.base_url, Login("@nobody:localhost"), state_dir=run_dir / "none"
        ):
            pass


async def test_access_token_login(synapse: Any, user_factory: Any) -> None:
    carol = await user_factory("carol")
    async with Homeserver(
        synapse.base_url, Login(carol.user_id, access_token=carol.access_token)
    ) as c:
        assert (c.user_id, c.device_id) == (carol.user_id, carol.device_id)


async def test_plaintext_to_device_has_no_verified_sender(synapse: Any, user_factory: Any) -> None:
    alice = await user_factory("alice")
    bob = await user_factory("bob")
    async with (
        Homeserver(synapse.base_url, Login(alice.user_id, password=alice.password)) as a,
        Homeserver(synapse.base_url, Login(bob.user_id, password=bob.password)) as b,
    ):
        with b.to_device_events() as sub:
            await a.send_to_device(
                "m.test.plain", {DeviceRef(b.user_id, b.device_id): {"x": 1}}, encrypted=False
            )
            ev = await _next(sub, lambda e: e.type == "m.test.plain")
            assert not ev.encrypted
            assert ev.sender_device is None
        unknown = DeviceRef(b.user_id, "NOSUCHDEVICE")
        res = await a.send_to_device("m.test.x", {unknown: {}})
        assert res.failed == (unknown,)
        assert res.sent == ()


async def test_delayed_state_events(synapse: Any, user_factory: Any) -> None:
    alice = await user_factory("alice")
    room = await synapse.create_call_room(alice)
    async with Homeserver(synapse.base_url, Login(alice.user_id, password=alice.password)) as a:
        key = f"_{a.user_id}_{a.device_id}_m.call"
        await a.put_state(room, CALL_MEMBER, key, {"application": "m.call", "x": 1})
        delay_id = await a.schedule_delayed_state(room, CALL_MEMBER, key, {}, 1500)
        await asyncio.sleep(1.0)
        await a.update_delayed(delay_id, DelayAction.RESTART)  # pushes the firing to ~2.5 s
        await asyncio.sleep(1.0)
        assert await a.get_state_event(room, CALL_MEMBER, key) == {"application": "m.call", "x": 1}
        await asyncio.sleep(1.2)
        assert await a.get_state_event(room, CALL_MEMBER, key) == {}
        with pytest.raises(DelayNotFound):
            await a.update_delayed(delay_id, DelayAction.RESTART)

        delay_id = await a.schedule_delayed_state(
            room, CALL_MEMBER, key, {"n": 2, "application": "m.call"}, 60_000
        )
        await a.update_delayed(delay_id, DelayAction.SEND)
        assert await a.get_state_event(room, CALL_MEMBER, key) == {"n": 2, "application": "m.call"}
        delay_id = await a.schedule_delayed_state(room, CALL_MEMBER, key, {}, 60_000)
        await a.update_delayed(delay_id, DelayAction.CANCEL)
        with pytest.raises(DelayNotFound):
            await a.update_delayed(delay_id, DelayAction.CANCEL)

        with pytest.raises(DelayTooLong) as too_long:
            await a.schedule_delayed_state(room, CALL_MEMBER, key, {}, 10**12)
        assert too_long.value.max_delay_ms == 86_400_000


async def test_discovery_and_openid(rtc_synapse: Synapse) -> None:
    alice = await rtc_synapse.register("alice")
    async with Homeserver(rtc_synapse.base_url, Login(alice.user_id, password=alice.password)) as a:
        assert await a.supports("org.matrix.msc4140")
        assert await a.supports("org.matrix.msc4354")
        assert await a.rtc_transports() == [{"type": "livekit", "livekit_service_url": FOCUS_URL}]
        assert await a.well_known_rtc_foci() == [
            {"type": "livekit", "livekit_service_url": FOCUS_URL}
        ]
        tok = await a.request_openid_token()
        assert tok.matrix_server_name == rtc_synapse.server_name
        assert tok.expires_in > 0
        assert tok.access_token not in repr(tok)
        who = await a.request(
            "GET",
            "/_matrix/federation/v1/openid/userinfo",
            query={"access_token": tok.access_token},
            auth=False,
        )
        assert who == {"sub": a.user_id}


async def test_sync_loop_survives_a_homeserver_restart(rtc_synapse: Synapse) -> None:
    alice = await rtc_synapse.register("alice2")
    bob = await rtc_synapse.register("bob2")
    room = await rtc_synapse.create_call_room(alice, invite=[bob])
    async with (
        Homeserver(rtc_synapse.base_url, Login(alice.user_id, password=alice.password)) as a,
        Homeserver(rtc_synapse.base_url, Login(bob.user_id, password=bob.password)) as b,
    ):
        with a.room_updates() as updates:
            await rtc_synapse.restart()
            # bob's request may race the restart; the homeserver is up once restart() returns.
            event_id = await b.send_event(
                room, "m.room.message", {"msgtype": "m.text", "body": "hi"}
            )
            got = await _next(
                updates,
                lambda u: any(e.get("event_id") == event_id for e in u.timeline),
                within=10.0,
            )
            assert got.room_id == room
        assert a.connected
        assert a.sync_failures >= 1
