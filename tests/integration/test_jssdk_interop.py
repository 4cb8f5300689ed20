"""The project and matrix-js-sdk (pinned npm release, run in Node) in one call, real Synapse.

A js-sdk ``MatrixRTCSession`` member (``tests/jssdk/member.mjs``: Rust crypto in WASM, joins
as Element Call does: multi-SFU focus, the room id as ``livekit_alias`` in the state form,
``unstableSendStickyEvents`` in the sticky one) and a project member (``CallAgent`` +
``CallKeys``) join one room. For each dialect, join order and room kind:

- each sees the other's membership, with the identity and the transport it publishes on;
- media keys arrive both ways (the bytes js-sdk hands its media layer are ours, and ours hold
  the bytes js-sdk announced for itself);
- a third member joins and leaves: both rotate, and each receives the other's new key;
- SIGKILL of either side is seen by the other as a leave once the delayed leave fires.

``make test`` runs the whole matrix (about 80 s); ``MATRIXRTC_INTEROP_FAST=1`` runs a
representative subset (one case per dialect, each order, each room kind once) when iterating.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from matrixrtc.agent import AgentConfig, CallAgent, Participant
from matrixrtc.call_keys import CallKeys, CallKeysConfig
from matrixrtc.devstack import Synapse, UserCreds
from matrixrtc.matrix import Homeserver, Login
from matrixrtc.model import Dialect, EventType, LivekitTransport, RtcDecline
from matrixrtc.model.notification import DECLINE_STICKY_MS
from matrixrtc.session import RTCSession
from matrixrtc.session.ring import RingState, judge_notification
from tests.integration.jssdk_member import JsMember, js_sdk_available

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not js_sdk_available(), reason="node or node_modules/matrix-js-sdk missing"),
]

FOCUS = "http://127.0.0.1:9/livekit/jwt"  # advertised only, never contacted
DELAY_MS = 3_000  # delayed leave on both sides: a SIGKILL shows as a leave after this
# The delayed leave fires DELAY_MS after the last restart, and restarts come every DELAY_MS / 2.
MIN_DELAYED_LEAVE_S = (DELAY_MS - DELAY_MS // 2) / 1000 * 0.9
FULL = os.environ.get("MATRIXRTC_INTEROP_FAST") != "1"
KEY_WAIT_S = 20.0  # one key step (send, Olm, sync, js-sdk's 1 s use delay) on a loaded box
THIRD_MEMBER_S = 60.0  # the third member's whole visit, hard bound

# (dialect, who joins first, encrypted room). The fast subset covers each dialect, each join
# order and each room kind at least once.
ALL_CASES = [
    (d, order, enc)
    for d in ("state", "sticky")
    for order in ("js_first", "py_first")
    for enc in (False, True)
]
FAST_CASES = {("state", "py_first", False), ("sticky", "js_first", True)}


def _cases() -> list[Any]:
    return [
        pytest.param(*c, id="-".join((c[0], c[1], "e2ee" if c[2] else "plain")))
        for c in ALL_CASES
        if FULL or c in FAST_CASES
    ]


@dataclass
class PyMember:
    agent: CallAgent
    keys: CallKeys

    @property
    def identity(self) -> str:
        return self.agent.rtc_backend_identity

    def sees(self, user_id: str) -> Participant | None:
        return next((p for p in self.agent.participants if p.user_id == user_id), None)

    def own_key_b64(self) -> tuple[int, str] | None:
        own = self.keys.own_key
        return None if own is None else (own[0], base64.b64encode(own[1]).decode())


@contextlib.asynccontextmanager
async def py_member(hs: Homeserver, room: str, dialect: str) -> AsyncIterator[PyMember]:
    """Our member joins the call on an already logged-in device ``hs``."""
    async with (
        CallAgent(
            hs,
            room,
            AgentConfig(
                dialect=Dialect(dialect),
                transports=(LivekitTransport(livekit_service_url=FOCUS),),
                intent="video",
                delayed_leave_ms=DELAY_MS,
                restart_interval_ms=DELAY_MS // 2,
            ),
        ) as agent,
        CallKeys(agent, CallKeysConfig(allow_plaintext_keys=True)) as keys,
    ):
        await agent.wait_joined(15)
        yield PyMember(agent, keys)


async def _learn_device(hs: Homeserver, user_id: str, device_id: str) -> None:
    """Until ``hs`` has ``user_id``'s ``device_id`` in its device store (test-only peek)."""
    nio = hs._require_nio()

    async def known() -> bool:
        nio.olm.users_for_key_query.add(user_id)
        await nio.keys_query()
        return any(d.id == device_id for d in nio.device_store.active_user_devices(user_id))

    deadline = time.monotonic() + 15
    while not await known():
        if time.monotonic() > deadline:
            raise AssertionError(f"{hs.user_id} never learnt {user_id}'s device {device_id}")
        await asyncio.sleep(0.1)


async def until(pred: Any, timeout_s: float = 15.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or pred}")
        await asyncio.sleep(0.05)


def js_config(creds: UserCreds, synapse: Synapse, room: str, dialect: str) -> dict[str, Any]:
    return {
        "baseUrl": synapse.base_url,
        "user": creds.user_id,
        "password": creds.password,
        "roomId": room,
        "dialect": dialect,
        "livekitServiceUrl": FOCUS,
        "delayedLeaveMs": DELAY_MS,
    }


def expected_js_transport(dialect: str, room: str) -> LivekitTransport:
    """Element Call's focus as js-sdk writes it: with the room id as alias in the state form."""
    return LivekitTransport(
        livekit_service_url=FOCUS, livekit_alias=room if dialect == "state" else None
    )


def expected_py_transport_json(dialect: str, room: str) -> dict[str, Any]:
    t: dict[str, Any] = {"type": "livekit", "livekit_service_url": FOCUS}
    if dialect == "state":
        t["livekit_alias"] = room
    return t


async def _both_see_each_other(js: JsMember, py: PyMember, dialect: str, room: str) -> str:
    """Membership and transport both ways; returns js's LiveKit identity."""
    members = await js.wait_members(
        lambda ms: any(m["user_id"] == py.agent.hs.user_id for m in ms), 20
    )
    theirs_of_ours = next(m for m in members if m["user_id"] == py.agent.hs.user_id)
    assert theirs_of_ours["device_id"] == py.agent.hs.device_id
    assert theirs_of_ours["kind"] == ("rtc" if dialect == "sticky" else "session")
    assert theirs_of_ours["identity"] == py.identity
    assert theirs_of_ours["transport"] == expected_py_transport_json(dialect, room)

    ours_of_theirs: Participant = await until(lambda: py.sees(js.user_id), 20, "js member")
    assert ours_of_theirs.device_id == js.device_id
    assert ours_of_theirs.dialect is Dialect(dialect)
    assert ours_of_theirs.transport == expected_js_transport(dialect, room)
    assert ours_of_theirs.member_id == js.member_id
    own = await js.wait_for(lambda e: e["event"] == "key" and e["user_id"] == js.user_id)
    assert ours_of_theirs.rtc_backend_identity == own["identity"]
    identity: str = own["identity"]
    return identity


async def _keys_both_ways(
    js: JsMember, py: PyMember, js_identity: str, *, min_ours: int = 0, min_theirs: int = 0
) -> None:
    """Each side holds the other's key in use, bytes equal: ours at index >= ``min_ours``,
    js-sdk's at index >= ``min_theirs``."""

    def ours_at_js() -> bool:
        own = py.own_key_b64()
        return own is not None and own[0] >= min_ours and js.keys(py.identity).get(own[0]) == own[1]

    await until(ours_at_js, KEY_WAIT_S, f"js-sdk to hold our key (index >= {min_ours})")

    def theirs_at_ours() -> bool:
        js_own = js.keys(js_identity)
        if not js_own or max(js_own) < min_theirs:
            return False
        index = max(js_own)
        got = py.keys.remote_key(js_identity, index)
        return got is not None and base64.b64encode(got).decode() == js_own[index]

    await until(theirs_at_ours, KEY_WAIT_S, f"us to hold js-sdk's key (index >= {min_theirs})")


@pytest.mark.parametrize(("dialect", "order", "encrypted"), _cases())
async def test_js_sdk_and_project_in_one_call(
    synapse: Synapse,
    user_factory: Any,
    run_dir: Path,
    dialect: str,
    order: str,
    encrypted: bool,
) -> None:
    alice, bob, carol = await user_factory("js"), await user_factory("py"), await user_factory("c")
    room = await synapse.create_call_room(alice, invite=[bob, carol], encrypted=encrypted)
    js = JsMember(
        {**js_config(alice, synapse, room, dialect), "join": False},
        run_dir / f"js-{dialect}-{order}-{encrypted}.log",
    )
    async with contextlib.AsyncExitStack() as stack:
        # Every device exists before anyone joins: a sticky membership is a Megolm-encrypted
        # room event in an encrypted room, readable only by devices that existed when it was
        # sent, until its sender re-sends it: js-sdk hourly; we at once for a newer device
        # (test_sticky_new_device.py), so only a js-sdk sender needs this order.
        bob_hs = await stack.enter_async_context(
            Homeserver(synapse.base_url, Login(bob.user_id, password=bob.password))
        )
        carol_hs = await stack.enter_async_context(
            Homeserver(synapse.base_url, Login(carol.user_id, password=carol.password))
        )
        stack.push_async_callback(js.close)
        await js.start()
        # ... and each device knows the others' (a device list change reaches a client only
        # with its next sync: encrypting before that leaves the new device out).
        for hs in (bob_hs, carol_hs):
            await _learn_device(hs, js.user_id, js.device_id)
        await js.send({"cmd": "track", "user_ids": [bob.user_id, carol.user_id]})
        await js.wait_for(lambda e: e["event"] == "tracked")
        if order == "js_first":
            await js.send({"cmd": "join"})
            await js.wait_members(lambda ms: len(ms) == 1)
            py = await stack.enter_async_context(py_member(bob_hs, room, dialect))
        else:
            py = await stack.enter_async_context(py_member(bob_hs, room, dialect))
            await js.send({"cmd": "join"})
        js_identity = await _both_see_each_other(js, py, dialect, room)
        await _keys_both_ways(js, py, js_identity)

        await _third_member_comes_and_goes(js, py, js_identity, carol_hs, room, dialect)

        if dialect == "sticky" or FULL:
            # SIGKILL of the js-sdk member: its delayed leave fires and we see it go.
            killed = time.monotonic()
            await js.kill()
            await until(lambda: py.sees(js.user_id) is None, DELAY_MS / 1000 + 10, "js leave")
            # The delayed leave fires DELAY after the last restart (one every DELAY / 2): an
            # explicit leave would show within a few hundred ms.
            assert time.monotonic() - killed >= MIN_DELAYED_LEAVE_S


async def _third_member_comes_and_goes(
    js: JsMember, py: PyMember, js_identity: str, carol_hs: Homeserver, room: str, dialect: str
) -> None:
    """A third (project) member joins and leaves; after the leave both sides use a new key and
    hold each other's.

    js-sdk 43 hands a joiner its current key only while that key is younger than 10 s
    (``keyRotationGracePeriodMs``); an older one is replaced by a new key for everyone. On a
    loaded box the first key is often older than that by now, so the third member must hold
    js-sdk's key *in use*, whichever it is (demanding the first one failed there every time
    the grace had passed). The whole phase is bounded: a hang fails with a message."""
    carol = carol_hs.user_id
    async with asyncio.timeout(THIRD_MEMBER_S):
        async with py_member(carol_hs, room, dialect) as third:
            await js.wait_members(lambda ms: any(m["user_id"] == carol for m in ms))
            await until(lambda: py.sees(carol), KEY_WAIT_S, "third member")

            def third_holds_js_key_in_use() -> bool:
                js_own = js.keys(js_identity)
                got = third.keys.remote_key(js_identity, max(js_own))
                return got is not None and base64.b64encode(got).decode() == js_own[max(js_own)]

            await until(third_holds_js_key_in_use, KEY_WAIT_S, "third member: js-sdk's key")
            js_before = max(js.keys(js_identity))
            own = py.own_key_b64()
            assert own is not None
            py_before = own[0]
        await js.wait_members(lambda ms: all(m["user_id"] != carol for m in ms))
        await until(lambda: py.sees(carol) is None, KEY_WAIT_S, "third member gone")
        # Both rotate after the leave (our indices may skip one: the prepared next key).
        await _keys_both_ways(js, py, js_identity, min_ours=py_before + 1, min_theirs=js_before + 1)


def _join_cli(synapse: Synapse, creds: UserCreds, room: str, dialect: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "matrixrtc",
        "join",
        "--homeserver",
        synapse.base_url,
        "--user",
        creds.user_id,
        "--room",
        room,
        "--dialect",
        dialect,
        "--livekit-service-url",
        FOCUS,
        "--delayed-leave-ms",
        str(DELAY_MS),
        "--restart-interval-ms",
        str(DELAY_MS // 2),
        "--output",
        "json",
    ]


@pytest.mark.parametrize(
    "dialect", [pytest.param(d) for d in ("state", "sticky") if FULL or d == "state"]
)
async def test_sigkill_of_the_project_member_is_a_leave_for_js_sdk(
    synapse: Synapse, user_factory: Any, run_dir: Path, dialect: str
) -> None:
    alice, bob = await user_factory("js"), await user_factory("py")
    room = await synapse.create_call_room(alice, invite=[bob])
    js = JsMember(js_config(alice, synapse, room, dialect), run_dir / f"js-kill-{dialect}.log")
    await js.start()
    proc = await asyncio.create_subprocess_exec(
        *_join_cli(synapse, bob, room, dialect),
        env={**os.environ, "MATRIXRTC_PASSWORD": bob.password},
        stdout=asyncio.subprocess.PIPE,
        stderr=(run_dir / f"py-kill-{dialect}.log").open("ab"),
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):  # our process shows both members
            while line := await proc.stdout.readline():
                ev = json.loads(line)
                if ev.get("event") == "participants" and len(ev["participants"]) == 2:
                    break
        await js.wait_members(lambda ms: any(m["user_id"] == bob.user_id for m in ms), 20)
        killed = time.monotonic()
        os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        await js.wait_members(
            lambda ms: all(m["user_id"] != bob.user_id for m in ms), DELAY_MS / 1000 + 10
        )
        waited = time.monotonic() - killed
        assert waited >= MIN_DELAYED_LEAVE_S, f"leave seen after {waited:.2f} s: not delayed"
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        await js.close()


RING = AgentConfig(
    dialect=Dialect.STICKY,
    transports=(LivekitTransport(livekit_service_url=FOCUS),),
    ring=True,
    ring_lifetime_ms=60_000,
)


async def _ring_until_js_declines(hs: Homeserver, room: str, js: JsMember) -> dict[str, Any]:
    """Our agent rings (sticky dialect: it opens the slot first); js-sdk must accept the
    notification (js-sdk 43's parseCallNotificationContent) and decline it, which ends our
    ring. Returns what js-sdk saw."""
    async with CallAgent(hs, room, RING) as caller:
        await until(lambda: caller.notification_event_id, 15, "our ring")
        note_id = caller.notification_event_id
        seen = await js.wait_for(
            lambda e: e["event"] == "notification" and e["event_id"] == note_id, 15
        )
        assert seen["valid"], seen["error"]
        await js.send({"cmd": "decline", "event_id": note_id})
        assert await caller.wait_ring_ended(15) is RingState.DECLINED
    return seen


async def test_rings_and_declines_both_ways(
    synapse: Synapse, user_factory: Any, run_dir: Path
) -> None:
    """Ours rings, js-sdk's receiving rules accept it and its decline ends our ring; js-sdk
    rings, our receiving rules accept it and js-sdk files our decline where it looks."""
    alice, bob = await user_factory("js"), await user_factory("py")
    async with Homeserver(synapse.base_url, Login(bob.user_id, password=bob.password)) as hs:
        # 1. We start the call and ring (sticky dialect: the agent opens the slot first).
        room = await synapse.create_call_room(alice, invite=[bob])
        js = JsMember(
            {**js_config(alice, synapse, room, "sticky"), "join": False},
            run_dir / "js-ring-1.log",
        )
        try:
            await js.start()
            seen = await _ring_until_js_declines(hs, room, js)
            assert seen["content"]["slot_id"] == "m.call#ROOM"
        finally:
            await js.close()

        # 2. js-sdk starts a call and rings (Element Call's caller opens the slot first).
        room2 = await synapse.create_call_room(alice, invite=[bob])
        with hs.room_updates() as updates:
            js2 = JsMember(
                {
                    **js_config(alice, synapse, room2, "sticky"),
                    "notificationType": "ring",
                    "openSlot": True,
                },
                run_dir / "js-ring-2.log",
            )
            try:
                await js2.start()
                sent = await js2.wait_for(lambda e: e["event"] == "sent_notification", 20)
                note_ev: dict[str, Any] = {}
                async with asyncio.timeout(15):
                    while not note_ev:
                        u = await updates.get()
                        for ev in u.timeline if u.room_id == room2 else ():
                            if ev.get("event_id") == sent["event_id"]:
                                note_ev = dict(ev)
                s = RTCSession(room2)
                s.receive_room_update(state=hs.room_state(room2).values(), now_ms=0)
                verdict = judge_notification(
                    note_ev,
                    receiver=hs.user_id,
                    now_ms=int(time.time() * 1000),
                    slot_status=s.slot_status,
                    sender_may_notify_room=True,  # alice created the room (PL 100)
                    current_sticky_event_id=note_ev["event_id"],
                )
                assert verdict.notification is not None, verdict.reason
                assert verdict.notification.notification_type == "ring"
                decline = RtcDecline.for_notification(note_ev["event_id"]).to_json()
                await hs.send_sticky(room2, EventType.RTC_DECLINE, decline, DECLINE_STICKY_MS)

                async def js_filed_it() -> bool:
                    since = len(js2.lines)
                    await js2.send(
                        {
                            "cmd": "has_declined",
                            "user_id": bob.user_id,
                            "event_id": sent["event_id"],
                        }
                    )
                    answer = await js2.wait_for(lambda e: e["event"] == "has_declined", since=since)
                    return bool(answer["value"])

                deadline = time.monotonic() + 15
                while not await js_filed_it():
                    assert time.monotonic() < deadline, "js-sdk never saw our decline"
                    await asyncio.sleep(0.2)
            finally:
                await js2.close()


async def test_join_refuses_a_closed_slot_and_says_why(
    synapse: Synapse, user_factory: Any, run_dir: Path
) -> None:
    """A closed slot (js-sdk 43 ignores sticky memberships in it): no membership is sent into
    it, and ``matrixrtc join`` exits 1 naming the slot and its status."""
    alice, bob = await user_factory("owner"), await user_factory("py")
    room = await synapse.create_call_room(alice, invite=[bob])
    await synapse.request(
        "PUT",
        f"/_matrix/client/v3/rooms/{room}/state/org.matrix.msc4143.rtc.slot/m.call%23ROOM",
        user=alice,
        json_body={"status": "closed", "application": {"type": "m.call"}, "x.keep": 1},
    )
    proc = await asyncio.create_subprocess_exec(
        *_join_cli(synapse, bob, room, "sticky"),
        env={**os.environ, "MATRIXRTC_PASSWORD": bob.password},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        _, err = await proc.communicate()
    assert proc.returncode == 1
    assert b"m.call#ROOM" in err
    assert b"is closed" in err
    reply = await synapse.request("GET", f"/_matrix/client/v3/rooms/{room}/state", user=alice)
    state = reply["body"]  # a JSON array comes back wrapped
    assert not [e for e in state if e["type"] == "org.matrix.msc3401.call.member" and e["content"]]
    slot = [e for e in state if e["type"] == "org.matrix.msc4143.rtc.slot"]
    assert slot[0]["content"]["status"] == "closed"  # left as it was


async def test_a_slot_closed_mid_call_makes_us_leave(
    synapse: Synapse, user_factory: Any, run_dir: Path
) -> None:
    """js-sdk's caller closes the slot mid-call (``ensureRtcSlotClosed``): js-sdk 43 then
    hides every sticky membership of that slot, so the call is over. ``matrixrtc join``
    leaves (its sticky leave goes out), says why, and exits 0."""
    alice, bob = await user_factory("owner"), await user_factory("py")
    room = await synapse.create_call_room(alice, invite=[bob])
    js = JsMember(
        {**js_config(alice, synapse, room, "sticky"), "openSlot": True},
        run_dir / "js-slot-closed.log",
    )
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(js.close)
        await js.start()
        proc = await asyncio.create_subprocess_exec(
            *_join_cli(synapse, bob, room, "sticky"),
            env={**os.environ, "MATRIXRTC_PASSWORD": bob.password},
            stdout=asyncio.subprocess.PIPE,
            stderr=(run_dir / "py-slot-closed.log").open("ab"),
        )

        async def _kill() -> None:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

        stack.push_async_callback(_kill)
        await js.wait_members(lambda ms: any(m["user_id"] == bob.user_id for m in ms), 30)
        await js.send({"cmd": "close_slot"})
        await js.wait_for(lambda e: e["event"] == "slot_closed")
        closed = time.monotonic()
        async with asyncio.timeout(20):
            out, _ = await proc.communicate()
        print(f"left and exited {time.monotonic() - closed:.2f} s after the slot closed")
        assert proc.returncode == 0
        lines = [json.loads(line) for line in out.splitlines() if line.startswith(b"{")]
        (left,) = [e for e in lines if e.get("event") == "left"]
        assert "m.call#ROOM" in left["reason"]
        assert "closed" in left["reason"]
        # The sticky leave went out (js-sdk 43's leave content: the slot and our sticky key).
        reply = await synapse.request(
            "GET",
            f"/_matrix/client/v3/rooms/{room}/messages",
            user=alice,
            params={"dir": "b", "limit": "50"},
        )
        ours = [
            e["content"]
            for e in reply["chunk"]
            if e["type"] == "org.matrix.msc4143.rtc.member" and e["sender"] == bob.user_id
        ]
        assert ours
        assert set(ours[0]) == {"slot_id", "msc4354_sticky_key"}


async def test_js_sdk_encrypted_decline_ends_our_ring(
    synapse: Synapse, user_factory: Any, run_dir: Path
) -> None:
    """In an encrypted room js-sdk's decline is a Megolm-encrypted sticky event: our caller
    must hold the room key (js-sdk shares it with our device) and read the decline."""
    alice, bob = await user_factory("js"), await user_factory("py")
    room = await synapse.create_call_room(alice, invite=[bob], encrypted=True)
    async with Homeserver(synapse.base_url, Login(bob.user_id, password=bob.password)) as hs:
        js = JsMember(
            {**js_config(alice, synapse, room, "sticky"), "join": False},
            run_dir / "js-ring-e2ee.log",
        )
        try:
            await js.start()
            await _learn_device(hs, js.user_id, js.device_id)
            await _ring_until_js_declines(hs, room, js)
        finally:
            await js.close()
