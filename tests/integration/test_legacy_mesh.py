"""A full-mesh call in the 2022 MSC3401 dialect over a real Synapse, media over aiortc on
127.0.0.1: what Hydrogen and legacy js-sdk ``GroupCall`` see in the room state (one call
event, per-user ``m.calls`` entries that keep other devices), Olm signalling toward devices
with keys, decoded media both ways, leave removes exactly our entry and hangs up the peer."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

import pytest

from matrixrtc.devstack import Synapse
from matrixrtc.matrix import Homeserver, Login
from matrixrtc.media.sources import SyntheticVideoTrack, ToneAudioTrack
from matrixrtc.mesh.engine import MeshConfig, MeshEngine
from matrixrtc.session.mesh_signalling import DeviceRef
from tests.mesh_members import mesh_member

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.environ.get("MATRIXRTC_IN_NETNS") != "1" and os.environ.get("MATRIXRTC_NO_NETNS") != "1",
        reason="media tests run inside the private network namespace (scripts/in-netns)",
    ),
]

CONFIG = MeshConfig(host_addresses=("127.0.0.1",), remote_networks=("127.0.0.0/8",))
CALL = "org.matrix.msc3401.call"
MEMBER = "org.matrix.msc3401.call.member"


async def wait_for(predicate: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


def decoded(engine: MeshEngine | None, peer: DeviceRef, kind: str) -> int:
    """Video frames decoded; audio frames received and decrypted (remote audio is decoded
    only for a frames tap, and these engines have none)."""
    link = None if engine is None else engine.link_for(peer)
    if link is None or kind not in link.stats:
        return 0
    stats = link.stats[kind]
    return stats.frames_decoded if kind == "video" else stats.encoded_frames


def sources() -> list[Any]:
    return [SyntheticVideoTrack(320, 240, 15), ToneAudioTrack()]


async def test_two_devices_call_in_the_2022_dialect_and_leave(
    synapse: Synapse, user_factory: Any
) -> None:
    a, b = await user_factory("leg-a"), await user_factory("leg-b")
    room = await synapse.create_call_room(a, invite=[b])
    # Another device of B's is already listed in that call: our write must keep it.
    other_entry = {
        "device_id": "BPHONE",
        "session_id": "phone-session",
        "expires_ts": int(time.time() * 1000) + 3_600_000,
        "feeds": [{"purpose": "m.usermedia"}],
    }
    async with (
        Homeserver(synapse.base_url, Login(a.user_id, password=a.password)) as ha,
        Homeserver(synapse.base_url, Login(b.user_id, password=b.password)) as hb,
        mesh_member(ha, room, sources=sources(), config=CONFIG) as ca,
    ):
        conf_id = ca.conf_id
        assert conf_id is not None
        await hb.put_state(
            room,
            MEMBER,
            b.user_id,
            {"m.calls": [{"m.call_id": conf_id, "m.devices": [other_entry]}]},
        )
        await hb.wait_synced()
        async with mesh_member(hb, room, sources=sources(), config=CONFIG) as cb:
            assert cb.conf_id == conf_id  # joined the room's call, did not make another
            pa, pb = DeviceRef(a.user_id, ha.device_id), DeviceRef(b.user_id, hb.device_id)
            await wait_for(
                lambda: all(
                    decoded(e, p, k) > 5
                    for e, p in ((ca.engine, pb), (cb.engine, pa))
                    for k in ("video", "audio")
                ),
                30,
                "media decoded both ways",
            )
            state = await hb.get_state_event(room, MEMBER, b.user_id)
            assert state is not None
            devices = state["m.calls"][0]["m.devices"]
            assert [d["device_id"] for d in devices] == ["BPHONE", hb.device_id]
            assert devices[0] == other_entry
            assert devices[1]["session_id"] == cb.session_id
            call = await hb.get_state_event(room, CALL, conf_id)
            assert call == {"m.intent": "m.room", "m.type": "m.video"}
            # Both devices have keys: signalling went Olm-encrypted, in an unencrypted room.
            assert not ca.room_encrypted
            assert ca.dropped_signalling == cb.dropped_signalling == 0
        # B left: its entry is gone (its phone's stays) and A's call to B is hung up.
        await wait_for(
            lambda: ca.engine is not None and ca.engine.link_for(pb) is None, 10, "hangup"
        )
        state = await ha.get_state_event(room, MEMBER, b.user_id)
        assert state is not None
        assert [d["device_id"] for d in state["m.calls"][0]["m.devices"]] == ["BPHONE"]


async def test_frame_e2ee_per_peer_encrypted_between_current_members_plain_to_a_2022_one(
    synapse: Synapse, user_factory: Any
) -> None:
    """An encrypted room: two state-dialect members with frame E2EE (CallKeys) and one
    2022-dialect member without (as Hydrogen and legacy js-sdk). The current members encrypt
    to each other (each decodes the other only through its decryptor) and send the same
    encoded frames unencrypted to the 2022 member; its frames are decoded without
    decryption. Without the per-peer rule the 2022 member would get ciphertext and the
    current members would try to decrypt its plain frames: nothing would decode."""
    c = await user_factory("e2p-c")  # creates the room: starting a 2022 call takes PL 50
    a, b = await user_factory("e2p-a"), await user_factory("e2p-b")
    room = await synapse.create_call_room(c, invite=[a, b], encrypted=True)
    async with (
        Homeserver(synapse.base_url, Login(a.user_id, password=a.password)) as ha,
        Homeserver(synapse.base_url, Login(b.user_id, password=b.password)) as hb,
        Homeserver(synapse.base_url, Login(c.user_id, password=c.password)) as hc,
        mesh_member(hc, room, sources=sources(), config=CONFIG) as mc,
        mesh_member(ha, room, dialect="state", e2ee=True, sources=sources(), config=CONFIG) as ma,
        mesh_member(hb, room, dialect="state", e2ee=True, sources=sources(), config=CONFIG) as mb,
    ):
        pa, pb, pc = (
            DeviceRef(a.user_id, ha.device_id),
            DeviceRef(b.user_id, hb.device_id),
            DeviceRef(c.user_id, hc.device_id),
        )
        pairs = [
            (ma, pb), (mb, pa),  # frame E2EE
            (ma, pc), (mb, pc), (mc, pa), (mc, pb),  # plain DTLS-SRTP
        ]  # fmt: skip
        await wait_for(
            lambda: all(decoded(m.engine, p, k) > 10 for m, p in pairs for k in ("video", "audio")),
            40,
            "media decoded between every pair",
        )
        for m, peer, e2ee in ((ma, pb, True), (mb, pa, True), (ma, pc, False), (mc, pa, False)):
            assert m.engine is not None
            link = m.engine.link_for(peer)
            assert link is not None
            assert link.frame_e2ee is e2ee, (peer, e2ee)
        # The 2022 member has no frame E2EE at all; A's one encoder both encrypted and not.
        assert mc.keys is None
        assert ma.engine is not None
        video = ma.engine.encoders["video"]
        assert video.frames_protected > 10
        assert video.frames_plain > 10
        assert ma.dropped_signalling == mb.dropped_signalling == mc.dropped_signalling == 0
