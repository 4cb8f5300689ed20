"""The LiveKit transport against the real stack: Synapse (OpenID), our authorization service
(``python -m sfu serve``), real LiveKit servers, and the livekit rtc SDK's own E2EE.

Keys come from the real sender-key manager (``matrixrtc.e2ee.KeyManager``) of each
participant; the to-device hop between managers is done in-process here (``KeyBus``), since
this module tests the LiveKit side, not Matrix delivery. Frames are counted after the SDK has
decrypted and decoded them, so a counted frame is a decrypted frame.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from livekit import api, rtc

from matrixrtc.devstack import AuthService, LiveKit, Synapse, UserCreds
from matrixrtc.devstack._process import free_tcp_port
from matrixrtc.e2ee.keys import InstallRemoteKey, KeyAction, KeyManager, Member, SendKey, UseKey
from matrixrtc.livekit import (
    Endpoint,
    LiveKitConnection,
    LiveKitTransport,
    MediaOptions,
    OwnDevice,
    RoomConnection,
    SfuCredentials,
    TokenResponseError,
    TokenServiceError,
    TokenServiceUnreachable,
    request_credentials,
)
from matrixrtc.matrix.homeserver import OpenIdToken
from matrixrtc.model.livekit_ids import legacy_identity, livekit_identity, livekit_room_alias
from matrixrtc.model.membership import (
    CallMembership,
    Dialect,
    RtcMemberData,
    SessionMembershipData,
)
from matrixrtc.model.transports import LivekitTransport

MEDIA = MediaOptions(width=320, height=240, fps=15.0)
FIRST_FRAME_TIMEOUT = 20.0
MEASURE_S = 4.0
# Half the frames: proves decrypted media flows without depending on how fast a loaded 2-core
# box drains the SDK's frame queue (it drops frames under load: "queue overflow"). Keyless and
# wrong-KDF participants must decode exactly zero, which is where breakage shows.
MIN_FRACTION = 0.5


# ---------------------------------------------------------------------------------- services
# Other test modules import these two names.
Service = AuthService


def service(run_dir: Path, name: str, lk: LiveKit, hs: Synapse, full_access: str) -> Service:
    return AuthService(run_dir, lk, hs, name=name, full_access=full_access)


@dataclass
class Stack:
    hs: Synapse
    lk_a: LiveKit
    lk_b: LiveKit
    sfu_a: Service  # full access, in front of lk_a
    sfu_b: Service  # full access, in front of lk_b
    restricted_a: Service  # nobody has full access, in front of lk_a


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(synapse: Synapse, livekit: LiveKit, run_dir: Path) -> AsyncIterator[Stack]:
    async with LiveKit(run_dir, name="livekit-b") as lk_b:
        full = synapse.server_name
        sfu_a = service(run_dir, "lk-sfu-a", livekit, synapse, full)
        sfu_b = service(run_dir, "lk-sfu-b", lk_b, synapse, full)
        restricted = service(run_dir, "lk-sfu-restricted", livekit, synapse, "elsewhere.example")
        services = (sfu_a, sfu_b, restricted)
        try:
            await asyncio.gather(*(s.start() for s in services))
            yield Stack(synapse, livekit, lk_b, sfu_a, sfu_b, restricted)
        finally:
            await asyncio.gather(*(s.stop() for s in services))


def openid_source(hs: Synapse, user: UserCreds) -> Callable[[], Awaitable[OpenIdToken]]:
    async def fetch() -> OpenIdToken:
        path = f"/_matrix/client/v3/user/{quote(user.user_id, safe='')}/openid/request_token"
        r = await hs.request("POST", path, user=user, json_body={})
        return OpenIdToken(
            r["access_token"], r["token_type"], r["matrix_server_name"], r["expires_in"]
        )

    return fetch


# ---------------------------------------------------------------------------------- members
def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Participant:
    """One call member: its membership, key manager and LiveKit transport."""

    user: UserCreds
    membership: CallMembership
    keys: KeyManager
    transport: LiveKitTransport
    own: OwnDevice

    @property
    def device(self) -> tuple[str, str]:
        return (self.user.user_id, self.user.device_id)

    @property
    def identity(self) -> str:
        return self.membership.rtc_backend_identity

    def member(self) -> Member:
        return key_member(self.membership)


def key_member(m: CallMembership) -> Member:
    if m.dialect is Dialect.STICKY:
        return Member.sticky_form(m.user_id, m.device_id, m.created_ts, m.member_id)
    return Member.state_form(m.user_id, m.device_id, m.created_ts)


def make_participant(
    hs: Synapse,
    user: UserCreds,
    room_id: str,
    service_url: str,
    *,
    sticky: bool,
    created_ts: int,
    multi_sfu: bool = True,
    publish: bool = True,
) -> Participant:
    transports = [LivekitTransport(livekit_service_url=service_url)]
    data: RtcMemberData | SessionMembershipData
    if sticky:
        member_id = str(uuid.uuid4())
        data = RtcMemberData.for_join(
            user_id=user.user_id,
            device_id=user.device_id,
            member_id=member_id,
            transports=transports,
        )
        membership = CallMembership(
            dialect=Dialect.STICKY,
            event_id=f"$sticky-{member_id}",
            sender=user.user_id,
            origin_server_ts=created_ts,
            data=data,
        )
    else:
        data = SessionMembershipData.for_join(
            user_id=user.user_id,
            device_id=user.device_id,
            transports=transports,
            multi_sfu=multi_sfu,
            created_ts=created_ts,
        )
        membership = CallMembership(
            dialect=Dialect.STATE,
            event_id=f"$state-{user.device_id}",
            sender=user.user_id,
            origin_server_ts=created_ts,
            data=data,
            state_key=f"_{user.user_id}_{user.device_id}_m.call",
        )
    own = OwnDevice(user.user_id, user.device_id, membership.member_id, sticky=sticky)
    media = MEDIA if publish else MediaOptions(video=False, audio=False)
    transport = LiveKitTransport(
        room_id=room_id, own=own, openid=openid_source(hs, user), media=media
    )
    return Participant(user, membership, KeyManager(key_member(membership)), transport, own)


@dataclass
class KeyBus:
    """Carries key-manager actions between participants (stands in for Olm to-device)."""

    members: dict[tuple[str, str], Participant] = field(default_factory=dict)
    sent: list[tuple[tuple[str, str], SendKey]] = field(default_factory=list)  # (from, what)
    # (who, when, index) per UseKey
    used: list[tuple[tuple[str, str], float, int]] = field(default_factory=list)
    installed: list[tuple[str, int, bytes]] = field(default_factory=list)  # remote keys

    def handle(self, sender: Participant, actions: list[KeyAction]) -> None:
        sends: list[SendKey] = []
        for a in actions:
            if isinstance(a, UseKey):
                self.used.append((sender.device, time.monotonic(), a.index))
                sender.transport.use_own_key(a.index, a.key)
            elif isinstance(a, InstallRemoteKey):
                self.installed.append((a.identity, a.index, a.key))
                sender.transport.set_remote_key(a.identity, a.index, a.key)
            else:
                sends.append(a)
        for send in sends:
            self.sent.append((sender.device, send))
            for device in send.to:
                receiver = self.members.get(device)
                if receiver is None:
                    continue
                got = receiver.keys.receive_key(
                    sender.user.user_id,
                    sender.user.device_id,
                    sender.membership.member_id
                    if sender.membership.dialect is Dialect.STICKY
                    else None,
                    send.index,
                    send.key,
                    now_ms(),
                )
                self.handle(receiver, got)
            self.handle(sender, sender.keys.send_result(send.rollout, True, now_ms()))

    def update(self, everyone: list[Participant], present: list[Participant]) -> None:
        for p in everyone:
            self.members[p.device] = p
        members = [p.member() for p in present]
        for p in present:
            self.handle(p, p.keys.update_members(members, now_ms()))

    async def run_timers(self, participants: list[Participant]) -> None:
        """Fire each manager's use-key deadline (the agent's job in production)."""
        while True:
            for p in participants:
                deadline = p.keys.next_deadline()
                if deadline is not None and now_ms() >= deadline:
                    self.handle(p, p.keys.tick(now_ms()))
            await asyncio.sleep(0.02)


async def wait_until(cond: Callable[[], bool], limit_s: float, what: str) -> None:
    deadline = time.monotonic() + limit_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def conn(p: Participant) -> LiveKitConnection:
    (c,) = p.transport.connections.values()
    assert isinstance(c, LiveKitConnection)  # the default engine: the SDK
    return c


def publisher(p: Participant) -> LiveKitConnection:
    c = next(c for c in p.transport.connections.values() if c.publish)
    assert isinstance(c, LiveKitConnection)
    return c


def assert_receives(rx: RoomConnection, tx: RoomConnection, start: float, end: float) -> None:
    """``rx`` decoded at least 80 % of the frames ``tx`` sent in [start, end), and saw no
    decrypt failure from ``tx`` in that window."""
    sent = tx.sent.video_frames_between(start, end)
    stats = rx.stats[tx.identity]
    got = stats.video_frames_between(start, end)
    print(f"{tx.identity[:12]} → {rx.identity[:12]}: {got}/{sent} frames")
    assert sent >= MEASURE_S * MEDIA.fps * 0.8, f"sender too slow: {sent} frames"
    assert got >= MIN_FRACTION * sent, f"{rx.identity} got {got} of {sent} frames"
    assert stats.failures_after(start) == [], stats.e2ee_events


async def call_room(stack: Stack, users: list[UserCreds]) -> str:
    return await stack.hs.create_call_room(users[0], invite=users[1:])


async def close_all(*ps: Participant) -> None:
    await asyncio.gather(*(p.transport.aclose() for p in ps))


# ---------------------------------------------------------------------------------- tests
async def test_two_members_exchange_encrypted_media_and_keyless_participants_cannot(
    stack: Stack, user_factory: Callable[..., Awaitable[UserCreds]]
) -> None:
    """Alice (sticky form → /get_token, hashed identity) and Bob (state form → /sfu/get,
    ``@user:hs:DEVICE``) share one LiveKit room through our service and decrypt each other.
    Carol holds a valid LiveKit token but no keys; Dave has every key but the SDK's default
    key provider (PBKDF2, ring 16): neither decodes a single frame."""
    alice, bob, carol, dave = [await user_factory(n) for n in ("alice", "bob", "carol", "dave")]
    room_id = await call_room(stack, [alice, bob])
    t0 = now_ms()
    a = make_participant(stack.hs, alice, room_id, stack.sfu_a.url, sticky=True, created_ts=t0)
    b = make_participant(stack.hs, bob, room_id, stack.sfu_a.url, sticky=False, created_ts=t0 + 1)
    bus = KeyBus()
    memberships = [a.membership, b.membership]
    http = aiohttp.ClientSession()
    extra: list[LiveKitConnection] = []
    try:
        await asyncio.gather(*(p.transport.update(memberships, p.membership) for p in (a, b)))
        bus.update([a, b], [a, b])
        ca, cb = conn(a), conn(b)
        assert (ca.credentials.endpoint, cb.credentials.endpoint) == (
            Endpoint.GET_TOKEN,
            Endpoint.SFU_GET,
        )
        assert ca.identity == livekit_identity(alice.user_id, alice.device_id, a.own.member_id)
        assert cb.identity == legacy_identity(bob.user_id, bob.device_id)
        assert ca.credentials.room == cb.credentials.room == livekit_room_alias(room_id)
        assert ca.publish
        assert cb.publish

        # The two outsiders, with valid tokens for the same LiveKit room.
        for user, e2ee_defaults in ((carol, False), (dave, True)):
            creds = await request_credentials(
                http,
                stack.sfu_a.url,
                room_id=room_id,
                user_id=user.user_id,
                device_id=user.device_id,
                member_id=f"{user.user_id}:{user.device_id}",
                openid=await openid_source(stack.hs, user)(),
            )
            # Dave: every key, but the SDK's default key provider (PBKDF2, ring 16).
            options = rtc.E2EEOptions() if e2ee_defaults else None
            c = LiveKitConnection(creds, publish=False, e2ee_options=options)
            extra.append(c)
            if e2ee_defaults:
                for identity, index, key in bus.installed:
                    c.set_remote_key(identity, index, key)
            await c.connect()

        await wait_until(
            lambda: (
                a.identity in cb.stats
                and cb.stats[a.identity].first_video_at is not None
                and b.identity in ca.stats
                and ca.stats[b.identity].first_video_at is not None
            ),
            FIRST_FRAME_TIMEOUT,
            "first decrypted frames",
        )
        start = max(
            ca.stats[b.identity].first_video_at or 0, cb.stats[a.identity].first_video_at or 0
        )
        start += 1.0
        await asyncio.sleep(max(0.0, start + MEASURE_S - time.monotonic()))
        end = start + MEASURE_S
        assert_receives(cb, ca, start, end)
        assert_receives(ca, cb, start, end)
        assert ca.stats[b.identity].e2ee_state == cb.stats[a.identity].e2ee_state == "OK"
        assert ca.stats[b.identity].audio_frames > 0
        assert cb.stats[a.identity].audio_frames > 0

        for outsider in extra:
            for sender in (a, b):
                stats = outsider.stats.get(sender.identity)
                # It subscribed to the video and decoded nothing.
                assert stats is not None, f"{outsider.identity} never saw {sender.identity}"
                assert stats.video_tracks == 1
                assert stats.video_frames == 0, (outsider.identity, stats.video_frames)
        # Without keys the SDK says so; with keys derived the SDK's default way (PBKDF2) it
        # reports nothing at all, frames just never decode.
        carol_view = extra[0].stats
        assert all(carol_view[p.identity].e2ee_state == "MISSING_KEY" for p in (a, b))

        # Element Call's key indices run to 255 (ring 256); with the SDK's default ring of 16
        # index 200 would not be usable.
        high = os.urandom(16)
        b.transport.set_remote_key(a.identity, 200, high)
        a.transport.use_own_key(200, high)
        switched = time.monotonic()
        assert ca.own_key_indices == [200, 200]
        # Measured after a settle time: on a loaded machine the switch can cost a key frame
        # (LiveKit throttles PLIs per track), seen as a gap of up to ~1.5 s in CI.
        window = switched + 2.0
        await asyncio.sleep(max(0.0, window + MEASURE_S - time.monotonic()))
        assert_receives(cb, ca, window, window + MEASURE_S)
        assert cb.stats[a.identity].failures_after(switched) == []
    finally:
        await asyncio.gather(*(c.aclose() for c in extra))
        await close_all(a, b)
        await http.close()


async def test_rotation_on_leave_keeps_media_flowing_and_locks_the_leaver_out(
    stack: Stack, user_factory: Callable[..., Awaitable[UserCreds]]
) -> None:
    """Carol leaves the Matrix call but keeps her LiveKit connection. Alice's manager rotates
    (index 1), Bob gets the new key, Alice switches after the use-key delay and her sender
    cryptors follow the index: Bob sees no decrypt failure, Carol decodes nothing after it."""
    alice, bob, carol = [await user_factory(n) for n in ("alice", "bob", "carol")]
    room_id = await call_room(stack, [alice, bob, carol])
    t0 = now_ms()
    a = make_participant(stack.hs, alice, room_id, stack.sfu_a.url, sticky=False, created_ts=t0)
    b = make_participant(
        stack.hs, bob, room_id, stack.sfu_a.url, sticky=True, created_ts=t0 + 1, publish=False
    )
    c = make_participant(
        stack.hs, carol, room_id, stack.sfu_a.url, sticky=False, created_ts=t0 + 2, publish=False
    )
    everyone = [a, b, c]
    bus = KeyBus()
    timers = asyncio.get_running_loop().create_task(bus.run_timers(everyone))
    try:
        memberships = [p.membership for p in everyone]
        await asyncio.gather(*(p.transport.update(memberships, p.membership) for p in everyone))
        bus.update(everyone, everyone)
        ca, cb, cc = conn(a), conn(b), conn(c)
        await wait_until(
            lambda: all(
                a.identity in x.stats and x.stats[a.identity].video_frames >= 15 for x in (cb, cc)
            ),
            FIRST_FRAME_TIMEOUT,
            "Bob and Carol decode Alice with key 0",
        )
        assert ca.own_key_indices == [0, 0]  # video + audio sender cryptors

        # Carol leaves the call (Matrix side); Alice and Bob recompute.
        left_at = time.monotonic()
        bus.update(everyone, [a, b])
        sends = [s for who, s in bus.sent if who == a.device and s.index == 1]
        assert sends
        assert all(s.to == ((bob.user_id, bob.device_id),) for s in sends)
        await wait_until(lambda: a.keys.current_index == 1, 5, "Alice to use key 1")
        (used_at,) = [t for who, t, i in bus.used if who == a.device and i == 1]
        assert used_at - left_at >= 0.9  # the use-key delay (1000 ms)
        assert ca.own_key_indices == [1, 1]

        window = used_at + 1.0  # frames already in flight may still use key 0
        await asyncio.sleep(max(0.0, window + MEASURE_S - time.monotonic()))
        assert_receives(cb, ca, window, window + MEASURE_S)
        # Bob: no failure anywhere from before the rotation to now.
        assert cb.stats[a.identity].failures_after(left_at) == []
        carol_view = cc.stats[a.identity]
        assert carol_view.video_frames_between(window, time.monotonic()) == 0
        assert carol_view.failures_after(used_at), carol_view.e2ee_events
    finally:
        timers.cancel()
        await asyncio.gather(timers, return_exceptions=True)
        await close_all(*everyone)


async def test_multi_sfu_members_on_different_sfus_receive_each_other(
    stack: Stack, user_factory: Callable[..., Awaitable[UserCreds]]
) -> None:
    """State-form ``multi_sfu`` (Element Call's default): Alice publishes on SFU A, Bob on
    SFU B; each also subscribes on the other's SFU (``/get_token`` first for remote SFUs)."""
    alice, bob = await user_factory("alice"), await user_factory("bob")
    room_id = await call_room(stack, [alice, bob])
    t0 = now_ms()
    a = make_participant(stack.hs, alice, room_id, stack.sfu_a.url, sticky=False, created_ts=t0)
    b = make_participant(stack.hs, bob, room_id, stack.sfu_b.url, sticky=False, created_ts=t0 + 1)
    bus = KeyBus()
    try:
        memberships = [a.membership, b.membership]
        plans = await asyncio.gather(
            *(p.transport.update(memberships, p.membership) for p in (a, b))
        )
        bus.update([a, b], [a, b])
        ta, tb = (LivekitTransport(livekit_service_url=s.url) for s in (stack.sfu_a, stack.sfu_b))
        assert dict(plans[0].connections) == {ta: True, tb: False}
        assert dict(plans[1].connections) == {tb: True, ta: False}
        assert a.transport.failures == {}
        assert b.transport.failures == {}
        a_pub, a_sub = a.transport.connections[ta], a.transport.connections[tb]
        b_pub, b_sub = b.transport.connections[tb], b.transport.connections[ta]
        assert a_pub.credentials.url == stack.lk_a.url
        assert b_pub.credentials.url == stack.lk_b.url
        assert (a_pub.credentials.endpoint, a_sub.credentials.endpoint) == (
            Endpoint.SFU_GET,
            Endpoint.GET_TOKEN,
        )
        # Alice's media reaches Bob over SFU A, Bob's reaches Alice over SFU B.
        await wait_until(
            lambda: (
                a.identity in b_sub.stats
                and b_sub.stats[a.identity].first_video_at is not None
                and b.identity in a_sub.stats
                and a_sub.stats[b.identity].first_video_at is not None
            ),
            FIRST_FRAME_TIMEOUT,
            "first frames across SFUs",
        )
        start = 1.0 + max(
            b_sub.stats[a.identity].first_video_at or 0, a_sub.stats[b.identity].first_video_at or 0
        )
        await asyncio.sleep(max(0.0, start + MEASURE_S - time.monotonic()))
        assert_receives(b_sub, a_pub, start, start + MEASURE_S)
        assert_receives(a_sub, b_pub, start, start + MEASURE_S)
        # Nobody publishes on the subscribe-only connections.
        assert a_sub.sent.video_frames == b_sub.sent.video_frames == 0
        assert a.transport.remote_stats()[b.identity] is a_sub.stats[b.identity]
    finally:
        await close_all(a, b)


async def test_livekit_restart_connections_are_replaced_and_media_resumes(
    stack: Stack, user_factory: Callable[..., Awaitable[UserCreds]]
) -> None:
    """LiveKit B restarts mid-call (its rooms are gone; auto_create is off). Each transport
    replaces its dropped connection with fresh credentials (the service creates the room
    again), keys are installed again, and decrypted media resumes."""
    alice, bob = await user_factory("alice"), await user_factory("bob")
    room_id = await call_room(stack, [alice, bob])
    t0 = now_ms()
    a = make_participant(stack.hs, alice, room_id, stack.sfu_b.url, sticky=True, created_ts=t0)
    b = make_participant(stack.hs, bob, room_id, stack.sfu_b.url, sticky=False, created_ts=t0 + 1)
    bus = KeyBus()
    try:
        memberships = [a.membership, b.membership]
        await asyncio.gather(*(p.transport.update(memberships, p.membership) for p in (a, b)))
        bus.update([a, b], [a, b])
        old_a, old_b = conn(a), conn(b)
        await wait_until(
            lambda: all(
                x.identity in c.stats and c.stats[x.identity].video_frames >= 15
                for x, c in ((a, old_b), (b, old_a))
            ),
            FIRST_FRAME_TIMEOUT,
            "media before the restart",
        )
        await stack.lk_b.restart()
        restarted = time.monotonic()
        await wait_until(
            lambda: all(len(p.transport.repairs) == 1 for p in (a, b)),
            30,
            "both connections replaced",
        )
        new_a, new_b = conn(a), conn(b)
        assert new_a is not old_a
        assert new_b is not old_b
        assert (new_a.identity, new_b.identity) == (old_a.identity, old_b.identity)
        # Counters carry over: the same stats objects, now fed by the new connections.
        a_at_b, b_at_a = new_b.stats[a.identity], new_a.stats[b.identity]
        assert a_at_b is old_b.stats[a.identity]
        await wait_until(
            lambda: (
                bool(a_at_b.video_times)
                and a_at_b.video_times[-1] > restarted
                and bool(b_at_a.video_times)
                and b_at_a.video_times[-1] > restarted
            ),
            FIRST_FRAME_TIMEOUT,
            "media after the restart",
        )
        start = 1.0 + max(
            next(t for t in stats.video_times if t > restarted) for stats in (a_at_b, b_at_a)
        )
        await asyncio.sleep(max(0.0, start + 3.0 - time.monotonic()))
        for rx, tx in ((new_b, new_a), (new_a, new_b)):
            sent = tx.sent.video_frames_between(start, start + 3.0)
            stats = rx.stats[tx.identity]
            assert stats.video_frames_between(start, start + 3.0) >= MIN_FRACTION * sent
            assert stats.failures_after(start) == []
        gaps = [
            max(y - x for x, y in zip(s.video_times, list(s.video_times)[1:], strict=False))
            for s in (a_at_b, b_at_a)
        ]
        print(
            f"restart: largest media gap {max(gaps):.2f} s; repairs",
            [round(r.restored_at - r.lost_at, 2) for p in (a, b) for r in p.transport.repairs],
        )
    finally:
        await close_all(a, b)


@dataclass
class GatedService:
    """A stand-in for a slow authorization service: forwards to a real one, but holds every
    token request until :attr:`gate` opens (so a connection's open can be kept in flight)."""

    target: str
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    held: asyncio.Event = field(default_factory=asyncio.Event)  # a request is waiting
    url: str = ""

    async def forward(self, request: web.Request) -> web.StreamResponse:
        self.held.set()
        await self.gate.wait()
        async with (
            aiohttp.ClientSession() as s,
            s.post(self.target + request.path, data=await request.read()) as r,
        ):
            return web.json_response(await r.json(), status=r.status)


@pytest_asyncio.fixture(loop_scope="session")
async def gated_sfu_b(stack: Stack) -> AsyncIterator[GatedService]:
    gated = GatedService(stack.sfu_b.url)
    app = web.Application()
    app.router.add_post("/get_token", gated.forward)
    app.router.add_post("/sfu/get", gated.forward)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_tcp_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    gated.url = f"http://127.0.0.1:{port}"
    try:
        yield gated
    finally:
        gated.gate.set()
        await runner.cleanup()


async def test_keys_set_while_a_connection_opens_reach_it(
    stack: Stack,
    user_factory: Callable[..., Awaitable[UserCreds]],
    gated_sfu_b: GatedService,
) -> None:
    """Alice (multi_sfu) publishes on SFU A and must also subscribe to Carol's SFU B, whose
    token service is held. Her SFU A connection is up and published, but her transport is
    still opening SFU B when every key arrives: Bob's key, and her own at index 3. Once the
    open finishes, that SFU A connection holds them all: Bob and Alice decode each other from
    the first frame, with no MISSING_KEY ever, and her sender cryptors use index 3."""
    alice, bob, carol = [await user_factory(n) for n in ("alice", "bob", "carol")]
    room_id = await call_room(stack, [alice, bob, carol])
    t0 = now_ms()
    a = make_participant(stack.hs, alice, room_id, stack.sfu_a.url, sticky=False, created_ts=t0)
    b = make_participant(stack.hs, bob, room_id, stack.sfu_a.url, sticky=False, created_ts=t0 + 1)
    # Carol only has a membership (on the held service); she never connects.
    c = make_participant(stack.hs, carol, room_id, gated_sfu_b.url, sticky=False, created_ts=t0 + 2)
    bus = KeyBus()
    alias = livekit_room_alias(room_id)
    lkapi = api.LiveKitAPI(stack.lk_a.http_url, stack.lk_a.api_key, stack.lk_a.api_secret)
    opening = asyncio.get_running_loop().create_task(
        a.transport.update([a.membership, b.membership, c.membership], a.membership)
    )
    try:

        async def alice_published_on_a() -> bool:
            listed = await lkapi.room.list_participants(api.ListParticipantsRequest(room=alias))
            return any(p.identity == a.identity and len(p.tracks) == 2 for p in listed.participants)

        deadline = time.monotonic() + FIRST_FRAME_TIMEOUT
        while not (gated_sfu_b.held.is_set() and await alice_published_on_a()):
            assert time.monotonic() < deadline, "Alice's SFU A connection never published"
            assert not opening.done()
            await asyncio.sleep(0.1)
        assert not opening.done()  # SFU B is still being opened
        # Every key, while Alice's transport is mid-open.
        bus.update([a, b], [a, b])
        high = os.urandom(16)
        a.transport.use_own_key(3, high)
        b.transport.set_remote_key(a.identity, 3, high)
        gated_sfu_b.gate.set()
        plan = await asyncio.wait_for(opening, 15)
        ta = LivekitTransport(livekit_service_url=stack.sfu_a.url)
        assert dict(plan.connections) == {
            ta: True,
            LivekitTransport(livekit_service_url=gated_sfu_b.url): False,
        }
        assert a.transport.failures == {}
        ca = a.transport.connections[ta]
        assert isinstance(ca, LiveKitConnection)
        assert ca.own_key_indices == [3, 3]  # video + audio sender cryptors

        await b.transport.update([a.membership, b.membership], b.membership)
        cb = conn(b)
        await wait_until(
            lambda: all(
                tx.identity in rx.stats and rx.stats[tx.identity].video_frames >= 15
                for rx, tx in ((ca, b), (cb, a))
            ),
            FIRST_FRAME_TIMEOUT,
            "Alice and Bob decode each other",
        )
        # The connection that was mid-open had Bob's key before Bob even joined: not one
        # failure, ever.
        bob_at_alice = ca.stats[b.identity]
        assert bob_at_alice.failures_after(0.0) == [], bob_at_alice.e2ee_events
        assert bob_at_alice.e2ee_state == "OK"
        # Bob joins while Alice publishes: the SDK may try a frame before connect() returns
        # and its key provider exists; none may fail once frames decode.
        alice_at_bob = cb.stats[a.identity]
        assert alice_at_bob.failures_after(alice_at_bob.first_video_at or 0.0) == []
        assert alice_at_bob.e2ee_state == "OK", alice_at_bob.e2ee_events
    finally:
        gated_sfu_b.gate.set()
        opening.cancel()
        await asyncio.gather(opening, return_exceptions=True)
        await lkapi.aclose()
        await close_all(a, b, c)


# ---------------------------------------------------------------------------------- tokens
@pytest_asyncio.fixture(loop_scope="session")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def test_token_fallbacks_and_errors(
    stack: Stack,
    user_factory: Callable[..., Awaitable[UserCreds]],
    http: aiohttp.ClientSession,
) -> None:
    """§3.4 against our real service, plus one stand-in for a pre-v0.4.0 lk-jwt-service
    (only ``/sfu/get``; it forwards to ours, so the credentials are real)."""
    user = await user_factory("tok")
    room_id = await call_room(stack, [user])
    openid = await openid_source(stack.hs, user)()

    async def req(
        service_url: str,
        endpoint: Endpoint = Endpoint.AUTO,
        token: OpenIdToken = openid,
        delay_id: str | None = None,
        delay_timeout_ms: int | None = None,
    ) -> SfuCredentials:
        return await request_credentials(
            http,
            service_url,
            room_id=room_id,
            user_id=user.user_id,
            device_id=user.device_id,
            member_id="m1",
            openid=token,
            endpoint=endpoint,
            delay_id=delay_id,
            delay_timeout_ms=delay_timeout_ms,
        )

    # Forced endpoints give the two identity forms.
    got = await req(stack.sfu_a.url, Endpoint.GET_TOKEN)
    assert got.identity == livekit_identity(user.user_id, user.device_id, "m1")
    assert got.room == livekit_room_alias(room_id)
    assert got.url == stack.lk_a.url
    got = await req(stack.sfu_a.url, Endpoint.SFU_GET)
    assert got.identity == legacy_identity(user.user_id, user.device_id)
    assert got.endpoint is Endpoint.SFU_GET
    # AUTO against a current service: /get_token.
    got = await req(stack.sfu_a.url, Endpoint.AUTO)
    assert got.endpoint is Endpoint.GET_TOKEN

    # Delegated leave refused (restricted user: 400 M_BAD_JSON) → asked again without it.
    for endpoint in (Endpoint.GET_TOKEN, Endpoint.SFU_GET):
        got = await req(
            stack.restricted_a.url, endpoint, delay_id="syd_delay", delay_timeout_ms=8000
        )
        assert got.endpoint is endpoint

    # A bad OpenID token: typed error with status and errcode.
    bad = OpenIdToken("not-a-token", "Bearer", openid.matrix_server_name, 3600)
    with pytest.raises(TokenServiceError) as err:
        await req(stack.sfu_a.url, token=bad)
    assert (err.value.status, err.value.errcode) == (401, "M_UNAUTHORIZED")

    # Old service without /get_token, and one that hands out a non-WebSocket URL.
    async def sfu_get(request: web.Request) -> web.StreamResponse:
        async with http.post(stack.sfu_a.url + "/sfu/get", data=await request.read()) as r:
            body = await r.json()
        if request.path.startswith("/evil/"):
            body["url"] = "file:///etc/passwd"
        return web.json_response(body, status=r.status)

    app = web.Application()
    app.router.add_post("/sfu/get", sfu_get)
    app.router.add_post("/evil/sfu/get", sfu_get)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_tcp_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        old = f"http://127.0.0.1:{port}"
        got = await req(old, Endpoint.AUTO)
        assert got.endpoint is Endpoint.SFU_GET
        assert got.identity == legacy_identity(user.user_id, user.device_id)
        with pytest.raises(TokenServiceError) as err:
            await req(old, Endpoint.GET_TOKEN)
        assert err.value.status == 404
        # The legacy credentials from the fallback really open the room.
        async with LiveKitConnection(got, publish=False) as c:
            assert c.room.local_participant.identity == got.identity
        with pytest.raises(TokenResponseError):
            await req(old + "/evil/", Endpoint.SFU_GET)
    finally:
        await runner.cleanup()
    with pytest.raises(TokenServiceUnreachable):
        await req(old)
