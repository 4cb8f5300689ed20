"""Real aiortc peers in one process forming a full mesh over 127.0.0.1.

An in-process queue stands in for to-device delivery (the Matrix wiring is tested elsewhere;
the rig is tests/integration/mesh_rig.py).
Frame E2EE uses a small AES-GCM transform defined here (same clear-header rule as LiveKit's
format, a key per sender) and, in the last test, the stateful LiveKit-format cryptor from
``matrixrtc.e2ee``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from matrixrtc.e2ee import FrameCryptor, KeyRing
from matrixrtc.media.frames import FrameTap
from matrixrtc.mesh.engine import TAP_POLL_S, MeshEngine
from matrixrtc.mesh.transform import CryptorTransform, FrameDecryptor
from matrixrtc.session.mesh_signalling import DeviceRef
from tests.integration.mesh_rig import (
    CONF,
    CONFIG,
    FPS,
    IN_NETNS,
    Router,
    decoded,
    make_engine,
    received,
    ref,
    session,
    wait_for,
)

pytestmark = [pytest.mark.integration, IN_NETNS]

# -- a test-only frame transform ------------------------------------------------------------


def _clear_bytes(kind: str, codec: str, keyframe: bool | None) -> int:
    if kind == "audio":
        return 1
    return 10 if keyframe else 3


class _AesDecryptor:
    def __init__(self, key: bytes | None) -> None:
        self.aead = AESGCM(key) if key is not None else None

    def decrypt(
        self, frame: bytes, *, kind: str, codec: str, keyframe: bool | None
    ) -> bytes | None:
        if self.aead is None or len(frame) < 12 + 16:
            return None
        n = _clear_bytes(kind, codec, keyframe)
        header, body, iv = frame[:n], frame[n:-12], frame[-12:]
        try:
            return header + self.aead.decrypt(iv, body, header)
        except InvalidTag:  # a frame under another key: undecryptable, not a test failure
            return None


class AesGcmTransform:
    """Per-sender AES-GCM keys; ``keys`` maps a device id to the key that device sends with."""

    def __init__(self, own_key: bytes, keys: Mapping[str, bytes]) -> None:
        self.aead = AESGCM(own_key)
        self.keys = dict(keys)
        self.counter = 0
        self.decryptors: dict[str, _AesDecryptor] = {}

    def encrypt(
        self, frame: bytes, *, kind: str, codec: str, keyframe: bool, ssrc: int, timestamp: int
    ) -> bytes | None:
        self.counter += 1
        n = _clear_bytes(kind, codec, keyframe)
        iv = ssrc.to_bytes(4, "big") + self.counter.to_bytes(8, "big")
        header = frame[:n]
        return header + self.aead.encrypt(iv, frame[n:], header) + iv

    def decryptor(self, participant: DeviceRef) -> FrameDecryptor:
        dec = _AesDecryptor(self.keys.get(participant.device_id))
        self.decryptors[participant.device_id] = dec
        return dec


def key_for(device_id: str) -> bytes:
    return (device_id.encode() * 16)[:16]


def transforms(*names: str) -> dict[str, AesGcmTransform]:
    keys = {n: key_for(n) for n in names}
    return {n: AesGcmTransform(keys[n], keys) for n in names}


# -- tests -----------------------------------------------------------------------------------


async def test_three_peer_mesh_encrypted_encode_once_and_leave(mesh_router: Router) -> None:
    names = ("AAA", "BBB", "CCC")
    refs = [ref(n) for n in names]
    tf = transforms(*names)
    engines = {r: make_engine(mesh_router, r, tf[r.device_id]) for r in refs}
    members = {r: session(r) for r in refs}
    for engine in engines.values():
        engine.start()
        engine.set_members(members)
    await wait_for(
        lambda: all(decoded(e, p, "video") > 0 for r, e in engines.items() for p in refs if p != r),
        15,
        "every peer to decode video from every other",
    )
    # js-sdk reads stream metadata by the SDP's msid stream id (and throws if it is missing).
    for _o, _t, ty, content in mesh_router.sent:
        if ty in ("m.call.invite", "m.call.answer"):
            sdp = content["offer" if ty == "m.call.invite" else "answer"]["sdp"]
            streams = set(re.findall(r"a=msid:(\S+) ", sdp))
            assert set(content["sdp_stream_metadata"]) == streams
            assert (
                content["org.matrix.msc3077.sdp_stream_metadata"] == content["sdp_stream_metadata"]
            )
    # Every candidate we offered is on loopback only.
    for engine in engines.values():
        for link in engine.links.values():
            sdp = link.pc.localDescription.sdp
            hosts = re.findall(r"a=candidate:\S+ \d+ udp \d+ (\S+) ", sdp)
            assert hosts
            assert set(hosts) == {"127.0.0.1"}

    def snapshot() -> dict[tuple[DeviceRef, DeviceRef, str], int]:
        # Video decoded; audio received and decrypted (nobody listens: it is not decoded).
        return {
            (r, p, k): decoded(e, p, k) if k == "video" else received(e, p, k)
            for r, e in engines.items()
            for p in refs
            if p != r
            for k in ("video", "audio")
        }

    def encoder_counts() -> dict[tuple[DeviceRef, str], tuple[int, int]]:
        return {
            (r, k): (e.encoders[k].frames_in, e.encoders[k].frames_encoded)
            for r, e in engines.items()
            for k in ("video", "audio")
        }

    before, enc_before, t0 = snapshot(), encoder_counts(), time.monotonic()
    await asyncio.sleep(5.0)
    after, enc_after, elapsed = snapshot(), encoder_counts(), time.monotonic() - t0

    nominal = {"video": FPS * elapsed, "audio": 50 * elapsed}
    for (r, kind), (frames_in, encoded) in enc_after.items():
        produced = frames_in - enc_before[(r, kind)][0]
        encodes = encoded - enc_before[(r, kind)][1]
        # The sources kept (near) real time, so "expected" below is close to nominal.
        assert produced >= 0.85 * nominal[kind], (r, kind, produced, nominal[kind])
        # Encode once: one encoder invocation per source frame while serving two peers.
        assert abs(encodes - produced) <= 1, (r, kind, produced, encodes)
        assert len(engines[r].encoders[kind].subscribers) == 2
        for p in refs:
            if p != r:
                # ... and every peer gets >= 90 % of the frames that one encoder made.
                got = after[(p, r, kind)] - before[(p, r, kind)]
                assert got >= 0.9 * encodes, (kind, "from", r, "at", p, got, encodes)
    for r, e in engines.items():
        for link in e.links.values():
            for kind, stats in link.stats.items():
                assert stats.decrypt_failures == 0, (r, link.peer, kind)

    # CCC leaves: exactly its connections close, AAA <-> BBB keep flowing.
    a, b, c = refs
    links_ab = (engines[a].link_for(b), engines[b].link_for(a))
    left = {a: session(a), b: session(b)}
    engines[a].set_members(left)
    engines[b].set_members(left)
    await engines[c].aclose()
    await wait_for(
        lambda: engines[a].link_for(c) is None and engines[b].link_for(c) is None, 5, "close"
    )
    assert (engines[a].link_for(b), engines[b].link_for(a)) == links_ab
    assert len(engines[a].links) == 1
    assert len(engines[b].links) == 1
    assert len(engines[a].encoders["video"].subscribers) == 1
    base = decoded(engines[a], b, "video"), decoded(engines[b], a, "video")
    await asyncio.sleep(1.5)
    assert decoded(engines[a], b, "video") - base[0] >= 0.8 * FPS * 1.5
    assert decoded(engines[b], a, "video") - base[1] >= 0.8 * FPS * 1.5


async def test_peer_without_the_key_receives_packets_but_decodes_nothing(
    mesh_router: Router,
) -> None:
    a, d = ref("AAA"), ref("DDD")
    tf_a = AesGcmTransform(key_for("AAA"), {"DDD": key_for("DDD")})
    tf_d = AesGcmTransform(key_for("DDD"), {})  # never got AAA's key
    ea, ed = make_engine(mesh_router, a, tf_a), make_engine(mesh_router, d, tf_d)
    for e in (ea, ed):
        e.start()
        e.set_members({a: session(a), d: session(d)})
    await wait_for(lambda: decoded(ea, d, "video") > 10, 10, "AAA decoding DDD")
    link = ed.link_for(a)
    assert link is not None
    await wait_for(
        lambda: (
            link.stats["video"].decrypt_failures > 20 and link.stats["audio"].decrypt_failures > 50
        ),
        5,
        "DDD receiving AAA's frames",
    )
    assert link.stats["video"].frames_decoded == 0
    assert link.stats["video"].encoded_frames == 0
    assert link.stats["audio"].encoded_frames == 0
    # The key arrives late: decoding starts, helped by a key frame request to AAA's encoder.
    requests = ea.encoders["video"].keyframe_requests_from_peers
    tf_d.decryptors["AAA"].aead = AESGCM(key_for("AAA"))
    await wait_for(lambda: link.stats["video"].frames_decoded > 5, 5, "DDD decoding after key")
    assert ea.encoders["video"].keyframe_requests_from_peers > requests
    await wait_for(lambda: link.stats["audio"].encoded_frames > 0, 5, "DDD decrypting audio")


async def test_remote_audio_is_decoded_only_while_the_frames_tap_listens(
    mesh_router: Router,
) -> None:
    """Nothing but the frames tap reads remote audio: without a listener it is received,
    decrypted and counted, not decoded (CPU: an Opus decode and a track hand-off per frame
    per peer); decoding follows the tap's ``listening``."""
    a, b = ref("AAA"), ref("BBB")
    tf = transforms("AAA", "BBB")
    listening = False
    tapped: list[str] = []
    tap: FrameTap[DeviceRef] = FrameTap(
        lambda peer, frame: tapped.append(type(frame).__name__), lambda: listening
    )
    ea = make_engine(mesh_router, a, tf["AAA"], frames=tap)
    eb = make_engine(mesh_router, b, tf["BBB"])  # no tap at all
    for e in (ea, eb):
        e.start()
        e.set_members({a: session(a), b: session(b)})
    await wait_for(
        lambda: received(ea, b, "audio") > 50 and received(eb, a, "audio") > 50,
        10,
        "audio both ways",
    )
    assert decoded(ea, b, "audio") == decoded(eb, a, "audio") == 0
    assert decoded(ea, b, "video") > 0  # video is decoded as ever
    assert "AudioFrame" not in tapped
    listening = True
    await wait_for(lambda: decoded(ea, b, "audio") > 25, 5, "AAA decoding audio for its tap")
    assert "AudioFrame" in tapped
    assert decoded(eb, a, "audio") == 0
    # The tap stops listening: decoding stops, receiving goes on.
    listening = False
    await asyncio.sleep(TAP_POLL_S * 3)
    stopped = decoded(ea, b, "audio")
    await wait_for(lambda: received(ea, b, "audio") > stopped + 50, 5, "audio still received")
    assert decoded(ea, b, "audio") <= stopped + 1


async def test_malformed_signalling_is_contained(mesh_router: Router) -> None:
    a, b = ref("AAA"), ref("BBB")
    # A member with no engine (we play its part by hand); it sorts below BBB, so BBB waits
    # for its invite instead of calling it.
    x = ref("AAX")
    ea, eb = make_engine(mesh_router, a, None), make_engine(mesh_router, b, None)
    members = {a: session(a), b: session(b), x: session(x)}
    for e in (ea, eb):
        e.start()
        e.set_members(members)
    await wait_for(lambda: decoded(eb, a, "video") > 5, 10, "BBB decoding AAA")

    def env(call_id: str, seq: int | None = 0, **over: Any) -> dict[str, Any]:
        out = {
            "call_id": call_id,
            "party_id": "AAX",
            "version": "1",
            "conf_id": CONF,
            "device_id": "AAX",
            "sender_session_id": session(x),
            "dest_session_id": session(b),
            "seq": seq,
        } | over
        return {k: v for k, v in out.items() if v is not None}

    garbage_sdp = {"offer": {"type": "offer", "sdp": "v=0\r\nthis is not sdp\r\nm=video x\r\n"}}
    n_sent = len(mesh_router.sent)
    eb.receive(x.user_id, "m.call.invite", env("wrongdest", dest_session_id="other") | garbage_sdp)
    eb.receive(x.user_id, "m.call.invite", env("garbage1") | garbage_sdp)
    eb.receive(x.user_id, "m.call.hangup", env("nosuchcall"))
    eb.receive(
        x.user_id, "m.call.candidates", env("gappy", seq=5) | {"candidates": [{"candidate": ""}]}
    )
    eb.receive(
        x.user_id, "m.call.invite", env("huge") | {"offer": {"type": "offer", "sdp": "v" * 100_000}}
    )
    eb.receive(x.user_id, "m.call.invite", {"call_id": 1, "offer": None})
    eb.receive(x.user_id, "m.call.answer", "not even an object")

    # The garbage-SDP invite is hung up cleanly with a reason; nothing else gets an answer.
    await wait_for(
        lambda: any(t == x and ty == "m.call.hangup" for _, t, ty, _c in mesh_router.sent[n_sent:]),
        5,
        "hangup to AAX",
    )
    replies = [(ty, c) for o, t, ty, c in mesh_router.sent[n_sent:] if o == b and t == x]
    assert [(ty, c["call_id"], c["reason"]) for ty, c in replies] == [
        ("m.call.hangup", "garbage1", "set_remote_description")
    ]
    assert set(eb.links) == {eb.signalling.call_for(a).call_id}  # type: ignore[union-attr]
    # ... and BBB keeps receiving AAA.
    base = decoded(eb, a, "video")
    await asyncio.sleep(1.0)
    assert decoded(eb, a, "video") - base >= 0.8 * FPS
    link = eb.link_for(a)
    assert link is not None
    assert link.stats["video"].decrypt_failures == 0


async def test_livekit_format_cryptor_with_key_rotation(mesh_router: Router) -> None:
    """The stateful LiveKit-format cryptor from matrixrtc.e2ee, per-participant key rings."""
    a, b = ref("AAA"), ref("BBB")
    rings = {r: KeyRing() for r in (a, b)}  # each sender's ring, as every receiver knows it
    for r, ring in rings.items():
        ring.set_key(key_for(r.device_id), 0)
    # Each side: one local cryptor, and one receiving cryptor per remote participant with its
    # own copy of that participant's ring.
    remote_rings = {(me, peer): KeyRing() for me in (a, b) for peer in (a, b) if me != peer}
    for (_me, peer), ring in remote_rings.items():
        ring.set_key(key_for(peer.device_id), 0)
    cryptors: dict[tuple[DeviceRef, DeviceRef], FrameCryptor] = {}

    def remote_for(me: DeviceRef) -> Callable[[DeviceRef], FrameCryptor]:
        def get(peer: DeviceRef) -> FrameCryptor:
            c = FrameCryptor(remote_rings[(me, peer)], identity=peer.device_id)
            cryptors[(me, peer)] = c
            return c

        return get

    local = {r: FrameCryptor(rings[r], identity=r.device_id) for r in (a, b)}
    ea = make_engine(mesh_router, a, CryptorTransform(local[a], remote_for(a)))
    eb = make_engine(mesh_router, b, CryptorTransform(local[b], remote_for(b)))
    for e in (ea, eb):
        e.start()
        e.set_members({a: session(a), b: session(b)})
    await wait_for(
        lambda: decoded(ea, b, "video") > 15 and decoded(eb, a, "video") > 15, 10, "decoding"
    )
    assert cryptors[(b, a)].stats.decrypted > 0
    assert local[a].stats.encrypted > 0
    # Rotate AAA's key: receivers learn index 1 first, then AAA switches to it.
    new_key = bytes(range(16))
    remote_rings[(b, a)].set_key(new_key, 1, make_current=False)
    rings[a].set_key(new_key, 1)
    await asyncio.sleep(0.5)
    # From now on only index 1 can decrypt AAA's frames at BBB.
    remote_rings[(b, a)].set_key(b"\xff" * 16, 0, make_current=False)
    base = decoded(eb, a, "video")
    await asyncio.sleep(1.0)
    assert decoded(eb, a, "video") - base >= 0.8 * FPS
    for e, peer in ((ea, b), (eb, a)):
        link = e.link_for(peer)
        assert link is not None
        assert link.stats["video"].decrypt_failures == 0
        assert link.stats["audio"].decrypt_failures == 0
    assert cryptors[(b, a)].stats.decrypt_failures == 0


async def test_ice_failure_replaces_the_call_and_media_resumes(mesh_router: Router) -> None:
    a, b = ref("AAA"), ref("BBB")
    tf = transforms("AAA", "BBB")
    ea, eb = make_engine(mesh_router, a, tf["AAA"]), make_engine(mesh_router, b, tf["BBB"])
    for e in (ea, eb):
        e.start()
        e.set_members({a: session(a), b: session(b)})
    await wait_for(lambda: decoded(eb, a, "video") > 5, 10, "BBB decoding AAA")
    old = eb.link_for(a)
    assert old is not None
    # aioice reports "failed" only after ~30 s of lost consent; feed the outcome directly.
    eb._feed(eb.signalling.media_failed(old.call_id))
    await wait_for(
        lambda: (
            (link := eb.link_for(a)) is not None
            and link.call_id != old.call_id
            and link.stats.get("video") is not None
            and link.stats["video"].frames_decoded > 5
        ),
        10,
        "a new call with media",
    )
    hangups = [c for o, t, ty, c in mesh_router.sent if o == b and ty == "m.call.hangup"]
    assert [(c["call_id"], c["reason"]) for c in hangups] == [(old.call_id, "ice_failed")]
    new = eb.link_for(a)
    assert new is not None
    assert ea.link_for(b) is not None
    assert ea.link_for(b).call_id == new.call_id  # type: ignore[union-attr]
    assert old.call_id not in ea.links
    assert old.call_id not in eb.links
    assert len(ea.encoders["video"].subscribers) == 1
    assert new.stats["video"].decrypt_failures == 0


# Consent checks every 0.3 s, expiry after 1.5 s without an answer (30 s in production).
QUICK_CONSENT = dataclasses.replace(CONFIG, consent_interval_s=0.3, consent_expiry_s=1.5)


async def _connected_pair(router: Router) -> tuple[DeviceRef, DeviceRef, MeshEngine, MeshEngine]:
    a, b = ref("AAA"), ref("BBB")  # AAA calls BBB
    tf = transforms("AAA", "BBB")
    ea = make_engine(router, a, tf["AAA"], config=QUICK_CONSENT)
    eb = make_engine(router, b, tf["BBB"], config=QUICK_CONSENT)
    for e in (ea, eb):
        e.start()
        e.set_members({a: session(a), b: session(b)})
    await wait_for(lambda: decoded(eb, a, "video") > 5, 10, "BBB decoding AAA")
    return a, b, ea, eb


def _hangups(router: Router, sender: DeviceRef) -> list[tuple[str, str]]:
    return [
        (c["call_id"], c["reason"])
        for o, _t, ty, c in router.sent
        if o == sender and ty == "m.call.hangup"
    ]


async def _media_on_a_new_call(eb: MeshEngine, a: DeviceRef, old_call_id: str) -> None:
    await wait_for(
        lambda: (
            (link := eb.link_for(a)) is not None
            and link.call_id != old_call_id
            and link.stats.get("video") is not None
            and link.stats["video"].frames_decoded > 5
        ),
        15,
        "a new call with media",
    )


async def test_expired_ice_consent_replaces_the_call(mesh_router: Router) -> None:
    """Chaos bug 3: when consent expires, aioice closes the ICE connection silently and aiortc
    closes the peer connection ("closed", never "failed"). The engine hangs up and the caller
    calls again. The fault: AAA's answers to BBB's consent checks are lost (the STUN requests
    AAA receives are dropped); media still flows both ways until BBB's consent expires."""
    a, b, ea, eb = await _connected_pair(mesh_router)
    old = eb.link_for(a)
    assert old is not None
    ea_link = ea.link_for(b)
    assert ea_link is not None
    for transceiver in ea_link.pc.getTransceivers()[:1]:  # bundled: one ICE connection
        connection = transceiver.receiver.transport.transport.iceGatherer._connection
        connection.request_received = lambda *args, **kwargs: None  # type: ignore[method-assign]
    await _media_on_a_new_call(eb, a, old.call_id)
    assert old.consent_expired
    assert _hangups(mesh_router, b) == [(old.call_id, "ice_failed")]


async def test_a_peer_connection_the_peer_closed_is_given_up_after_the_consent_expiry(
    mesh_router: Router,
) -> None:
    """AAA closes its peer connection (DTLS close_notify) and its hangup is lost: BBB does not
    hang up at once (a closing peer's hangup normally follows, and calling again would ring a
    device that is going), but after the consent expiry; then AAA calls again."""
    a, b, ea, eb = await _connected_pair(mesh_router)
    old = eb.link_for(a)
    assert old is not None
    closed_at = time.monotonic()
    await ea._close_link(ea.links[old.call_id])  # as AAA ends a call, minus the hangup it sends
    await wait_for(lambda: old.pc.connectionState == "closed", 5, "BBB's end closed")
    await asyncio.sleep(0.5)
    assert _hangups(mesh_router, b) == []
    await wait_for(lambda: bool(_hangups(mesh_router, b)), 5, "BBB giving the link up")
    assert time.monotonic() - closed_at >= QUICK_CONSENT.consent_expiry_s
    assert _hangups(mesh_router, b) == [(old.call_id, "ice_failed")]
    await _media_on_a_new_call(eb, a, old.call_id)
