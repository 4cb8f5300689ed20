"""An encrypted call in a hostile room, against a real Synapse (issue 18).

Two honest agents (CallAgent + CallKeys) hold a call while a third room member, Mallory,
writes 100 call.member state events at state keys of other users (forged) and sends 200
Olm-encrypted key messages that claim the honest agents' own devices. The call goes on (both
still list each other and hold each other's current key, and a key rotation after a new member
still reaches everyone), and each kind of rejection from Mallory is logged at most once this
minute however many there were. The bounds themselves (10 000 members, sticky floods, key
floods) are in tests/unit/test_hostile_room.py.
"""

from __future__ import annotations

import asyncio
import os

from structlog.testing import capture_logs

from matrixrtc.call_keys import CallKeysConfig
from matrixrtc.devstack import Synapse
from matrixrtc.e2ee.messages import ELEMENT_CALL_KEYS_TYPE, ElementCallKeys
from matrixrtc.matrix import DeviceRef, Homeserver, Login
from matrixrtc.model import LivekitTransport, SessionMembershipData
from tests.integration.test_e2ee_call_keys import _all_hold, _peers, _until, _user

CALL_MEMBER = "org.matrix.msc3401.call.member"
FOCUS = LivekitTransport(livekit_service_url="http://127.0.0.1:9/livekit/jwt")
FORGED = 100
KEY_FLOOD = 200


async def test_the_call_goes_on_in_a_hostile_room(synapse: Synapse) -> None:
    hs = synapse
    ann, ben, cat, mal = [await _user(hs, n) for n in ("ann", "ben", "cat", "mal")]
    room = await hs.create_call_room(ann, invite=[ben, cat, mal], encrypted=True)
    cfg = CallKeysConfig()
    with capture_logs() as logs:
        async with (
            _peers(hs, [ann, ben, cat]) as (a, b, c),
            Homeserver(hs.base_url, Login(mal.user_id, password=mal.password)) as m,
        ):
            await a.join(room, cfg)
            await b.join(room, cfg)
            await _until(lambda: _all_hold([a, b]), 5.0, "keys exchanged")
            await m.join_room(room)

            async def forge(i: int) -> None:
                victim = f"@victim{i}:{hs.server_name}"
                content = SessionMembershipData.for_join(
                    user_id=victim, device_id="VDEV", transports=[FOCUS]
                ).to_json()
                await m.put_state(room, CALL_MEMBER, f"_{victim}_VDEV_m.call", content)

            for start in range(0, FORGED, 25):
                await asyncio.gather(*(forge(i) for i in range(start, start + 25)))

            targets = [DeviceRef(p.hs.user_id, p.hs.device_id) for p in (a, b)]
            for i in range(KEY_FLOOD):
                to = targets[i % 2]
                lie = ElementCallKeys(
                    room_id=room,
                    index=i % 256,
                    key=os.urandom(16),
                    claimed_device_id=to.device_id,  # "I am your own device"
                    member_id=f"{to.user_id}:{to.device_id}",
                ).to_json()
                await m.send_to_device(ELEMENT_CALL_KEYS_TYPE, {to: lie})
            await _until(
                lambda: all(
                    p.k.stats.dropped.get("claimed_device_mismatch", 0) >= KEY_FLOOD // 2
                    for p in (a, b)
                ),
                30.0,
                "every forged key message dropped",
            )
            # The call goes on: a third member joins, keys rotate and reach everyone.
            await c.join(room, cfg)
            await _until(lambda: _all_hold([a, b, c]), 10.0, "keys after a join")
            for p in (a, b, c):
                seen = {q.user_id for q in p.a.participants}
                assert {ann.user_id, ben.user_id, cat.user_id} <= seen
                assert not any(u.startswith("@victim") for u in seen)
    forged_lines = [
        e for e in logs if e["event"] == "membership_rejected" and e["sender"] == mal.user_id
    ]
    drop_lines = [
        e
        for e in logs
        if e["event"] == "call_keys.key_message_dropped" and e["sender"] == mal.user_id
    ]
    print(
        f"\n{FORGED} forged state keys -> {len(forged_lines)} log lines; "
        f"{KEY_FLOOD} forged key messages -> {len(drop_lines)} log lines"
    )
    assert len(forged_lines) == 1  # the three agents share the process-wide RejectionLog
    assert len(drop_lines) == 2  # one per receiving agent
