"""The Matrix link's signalling rules over a real Synapse: in an encrypted room a plaintext
``m.call.*`` to-device event is dropped even when its envelope is otherwise perfect; in an
unencrypted room the same event is accepted (the control that shows the event is valid)."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from matrixrtc.calltest.participant import ParticipantConfig
from matrixrtc.calltest.runner import ParticipantProcess, participants, provision
from matrixrtc.devstack import Synapse

pytestmark = pytest.mark.integration


async def _login(base: str, user: str, password: str) -> str:
    async with aiohttp.ClientSession() as http:
        body = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user},
            "password": password,
        }
        async with http.post(base + "/_matrix/client/v3/login", json=body) as resp:
            assert resp.status == 200
            return str((await resp.json())["access_token"])


async def _send_plaintext(
    base: str, token: str, to_user: str, to_device: str, event_type: str, content: Any
) -> None:
    path = f"/_matrix/client/v3/sendToDevice/{quote(event_type)}/{secrets.token_hex(8)}"
    body = {"messages": {to_user: {to_device: content}}}
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {token}"}
        async with http.put(base + path, json=body, headers=headers) as resp:
            assert resp.status == 200


def _link(p: ParticipantProcess, other: ParticipantProcess) -> dict[str, Any] | None:
    if p.latest is None:
        return None
    return next((x for x in p.latest["peers"] if x["id"] == other.peer_id), None)


async def _forged_hangup(synapse: Synapse, run_dir: Path, *, encrypted: bool) -> tuple[
    ParticipantProcess, str, dict[str, Any] | None
]:  # fmt: skip
    """A two-party call; p2's *user* (another device, no Olm) sends p1 a plaintext hangup
    naming p2's call device, call id and sessions. Returns p1, the call id, p1's link to p2
    in the report after p1 showed it handled the hangup (None when closed): dropped it (its
    ``signalling_dropped`` count grew) or ended the call (the link is gone or is a new call)."""
    tag = secrets.token_hex(3)
    prov = await provision(synapse.base_url, [f"sig1-{tag}", f"sig2-{tag}"], encrypted=encrypted)
    configs = [
        ParticipantConfig(
            name=f"p{i + 1}",
            homeserver=prov.base_url,
            user=user,
            password=pw,
            room_id=prov.room_id,
            duration_s=0,
            audio=False,
            e2ee=encrypted,
        )
        for i, (user, pw) in enumerate(prov.users)
    ]
    async with participants(configs, run_dir / f"signalling-{tag}") as (p1, p2):
        await asyncio.gather(p1.wait_ready(), p2.wait_ready())

        def decoding(p: ParticipantProcess) -> bool:
            link = _link(p, p2)
            return link is not None and link["frames_decoded"] > 0

        await p1.wait_until(decoding, 20)
        await p2.wait_until(lambda p: p.latest is not None and p.latest["peers"] != [], 10)
        assert p1.latest is not None
        assert p2.latest is not None
        assert p1.device is not None
        assert p2.device is not None
        link = _link(p1, p2)
        assert link is not None
        call_id = str(link["call_id"])
        hangup = {
            "call_id": call_id,
            "party_id": p2.device[1],
            "version": "1",
            "conf_id": p1.latest["conf_id"],
            "device_id": p2.device[1],
            "sender_session_id": p2.latest["session_id"],
            "dest_session_id": p1.latest["session_id"],
            "reason": "user_hangup",
        }
        token = await _login(prov.base_url, p2.device[0], prov.users[1][1])
        dropped = p1.latest["signalling_dropped"]
        await _send_plaintext(
            prov.base_url, token, p1.device[0], p1.device[1], "m.call.hangup", hangup
        )

        def handled(p: ParticipantProcess) -> bool:
            assert p.latest is not None
            link = _link(p, p2)
            ended = link is None or link["call_id"] != call_id
            return ended or p.latest["signalling_dropped"] > dropped

        await p1.wait_until(handled, 10)
        count = len(p1.stats)  # one more report: a dropped hangup must not end it later
        await p1.wait_until(lambda p: len(p.stats) > count, 5)
        return p1, call_id, _link(p1, p2)


async def test_plaintext_signalling_is_dropped_in_an_encrypted_room(
    synapse: Synapse, run_dir: Path
) -> None:
    p1, call_id, link = await _forged_hangup(synapse, run_dir, encrypted=True)
    assert link is not None
    assert link["call_id"] == call_id  # the call survived
    assert p1.latest is not None
    assert p1.latest["signalling_dropped"] >= 1


async def test_plaintext_signalling_is_accepted_in_an_unencrypted_room(
    synapse: Synapse, run_dir: Path
) -> None:
    p1, call_id, link = await _forged_hangup(synapse, run_dir, encrypted=False)
    # The same event ends the call where plaintext signalling is the norm (js-sdk >= v37).
    assert link is None or link["call_id"] != call_id
    assert p1.latest is not None
    assert p1.latest["signalling_dropped"] == 0
