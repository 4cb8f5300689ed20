"""Mesh calls over a real Synapse with participants in separate processes (``call-test``'s
participant): full mesh with frame E2EE, a participant left out of key distribution, SIGKILL
of a participant, a late joiner, TURN relay-only with servers from ``/voip/turnServer``."""

from __future__ import annotations

import asyncio
import secrets
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from matrixrtc.calltest.participant import ParticipantConfig
from matrixrtc.calltest.runner import ParticipantProcess, Provisioned, participants, provision
from matrixrtc.devstack import Coturn, Synapse

pytestmark = pytest.mark.integration

FPS = 15.0
DELAY_MS = 3_000  # delayed leave: same semantics as js-sdk's 8 s, shorter tests


async def _room(base_url: str, n: int, *, encrypted: bool = True) -> Provisioned:
    tag = secrets.token_hex(3)
    return await provision(base_url, [f"mesh{i + 1}-{tag}" for i in range(n)], encrypted=encrypted)


def _configs(prov: Provisioned, **overrides: Any) -> list[ParticipantConfig]:
    base = ParticipantConfig(
        name="",
        homeserver=prov.base_url,
        user="",
        password="",
        room_id=prov.room_id,
        duration_s=0,  # until stopped
        fps=FPS,
        delayed_leave_ms=DELAY_MS,
        extra={"log_level": "info"},
    )
    return [
        replace(base, name=f"p{i + 1}", user=user, password=pw, **overrides)
        for i, (user, pw) in enumerate(prov.users)
    ]


def _peer(p: ParticipantProcess, other: ParticipantProcess) -> dict[str, Any] | None:
    last = p.latest
    if last is None:
        return None
    return next((x for x in last["peers"] if x["id"] == other.peer_id), None)


def _connected_to(p: ParticipantProcess, others: Sequence[ParticipantProcess]) -> bool:
    peers = [_peer(p, o) for o in others]
    return all(x is not None and x["connected_at_ms"] is not None for x in peers)


def _decoding_from(p: ParticipantProcess, others: Sequence[ParticipantProcess]) -> bool:
    peers = [_peer(p, o) for o in others]
    return all(x is not None and x["frames_decoded"] > 0 for x in peers)


async def _all(
    procs: Sequence[ParticipantProcess],
    predicate: Callable[[ParticipantProcess], bool],
    timeout_s: float,
) -> None:
    await asyncio.gather(*(p.wait_until(predicate, timeout_s) for p in procs))


def _frames(procs: Sequence[ParticipantProcess]) -> dict[tuple[str, str], tuple[int, int]]:
    """(receiver, sender) -> (frames decoded, report time ms), from each latest report."""
    out = {}
    for p in procs:
        for o in procs:
            if o is not p:
                peer = _peer(p, o)
                assert peer is not None, (p.name, o.name)
                assert p.latest is not None
                out[(p.name, o.name)] = (int(peer["frames_decoded"]), int(p.latest["t_ms"]))
    return out


async def _next_report(procs: Sequence[ParticipantProcess]) -> None:
    def after(count: int) -> Callable[[ParticipantProcess], bool]:
        return lambda q: len(q.stats) > count

    await asyncio.gather(*(p.wait_until(after(len(p.stats)), 5) for p in procs))


def _assert_rate(
    before: dict[tuple[str, str], tuple[int, int]],
    after: dict[tuple[str, str], tuple[int, int]],
    share: float,
) -> None:
    for key, (n1, t1) in after.items():
        n0, t0 = before[key]
        expected = FPS * (t1 - t0) / 1000
        assert n1 - n0 >= share * expected, f"{key}: {n1 - n0} of {expected:.0f} frames"


def _call_ids(procs: Sequence[ParticipantProcess]) -> dict[tuple[str, str], str]:
    """(participant, peer) -> call id of their current link."""
    out = {}
    for p in procs:
        for o in procs:
            peer = _peer(p, o) if o is not p else None
            if peer is not None:
                out[(p.name, o.name)] = str(peer["call_id"])
    return out


def _decrypt_failures(p: ParticipantProcess) -> int:
    assert p.latest is not None
    return sum(int(x["decrypt_failures"]) for x in p.latest["peers"])


async def test_three_participants_full_mesh_with_e2ee(synapse: Synapse, run_dir: Path) -> None:
    prov = await _room(synapse.base_url, 3)
    async with participants(_configs(prov), run_dir / "mesh-three") as procs:
        await asyncio.gather(*(p.wait_ready() for p in procs))
        await _all(procs, lambda p: _decoding_from(p, [o for o in procs if o is not p]), 20)
        await _next_report(procs)
        before = _frames(procs)
        await asyncio.sleep(10)
        await _next_report(procs)
        after = _frames(procs)
        _assert_rate(before, after, 0.9)
        for p in procs:
            assert p.latest is not None
            assert p.latest["key_index"] == 0, p.name  # media keys are in use
            assert _decrypt_failures(p) == 0, p.name
            assert p.latest["members"] == 3
            assert p.latest["signalling_dropped"] == 0


async def test_participant_without_keys_decodes_nothing(synapse: Synapse, run_dir: Path) -> None:
    prov = await _room(synapse.base_url, 2)
    # A long delayed leave: this test is about keys, and on a loaded machine a 3 s one can
    # fire between two restarts, so that both re-join as new sessions on new links whose
    # counters start again from zero (the figures below would then describe a fresh link).
    keyed, keyless = _configs(prov, delayed_leave_ms=30_000)
    keyless = replace(keyless, withhold_keys=True)
    async with participants([keyed, keyless], run_dir / "mesh-keyless") as procs:
        p1, p2 = procs
        await asyncio.gather(*(p.wait_ready() for p in procs))
        # p1 holds p2's key: media flows both ways and p1 decodes p2.
        await p1.wait_until(lambda p: _decoding_from(p, [p2]), 20)
        await p2.wait_until(lambda p: _connected_to(p, [p1]), 20)
        await asyncio.sleep(3)
        await _next_report([p2])
        peer = _peer(p2, p1)
        assert peer is not None
        assert peer["packets_in"] > 3 * FPS  # the packets arrive ...
        assert peer["decrypt_failures"] > 3 * FPS  # ... as frames nobody can decrypt ...
        assert peer["frames_decoded"] == 0  # ... and none decodes without the key
        assert peer["audio_frames_decoded"] == 0
        assert peer["connected_at_ms"] is not None


async def test_sigkill_closes_links_rotates_keys_media_continues(
    synapse: Synapse, run_dir: Path
) -> None:
    prov = await _room(synapse.base_url, 3)
    async with participants(_configs(prov), run_dir / "mesh-kill") as procs:
        p1, p2, p3 = procs
        await asyncio.gather(*(p.wait_ready() for p in procs))
        await _all(procs, lambda p: _decoding_from(p, [o for o in procs if o is not p]), 20)
        calls = _call_ids([p1, p2])
        killed = p3.peer_id
        p3.kill()
        t_kill = time.time() * 1000
        await p3.proc.wait()
        rest = [p1, p2]

        def closed(p: ParticipantProcess) -> bool:
            return p.latest is not None and all(x["id"] != killed for x in p.latest["peers"])

        await _all(rest, closed, (DELAY_MS + 3000) / 1000 + 1)
        for p in rest:
            first_without = next(s for s in p.stats if all(x["id"] != killed for x in s["peers"]))
            # Reports come once a second: the link was closed before this report was taken.
            print(f"{p.name}: link to the killed peer gone {first_without['t_ms'] - t_kill:.0f} ms")
            assert first_without["t_ms"] - t_kill <= DELAY_MS + 3000, p.name
        # Keys rotate (a new index, so p3's key no longer decrypts anything new) ...
        await _all(rest, lambda p: p.latest is not None and p.latest["key_index"] == 1, 10)
        for p in rest:
            assert p.latest is not None
            assert p.latest["key_rotation_ms"], p.name
            print(f"{p.name}: key rotation {p.latest['key_rotation_ms']} ms after the leave")
        # ... and media between the rest continues under the new keys, undisturbed.
        await _next_report(rest)
        before = _frames(rest)
        await asyncio.sleep(3)
        await _next_report(rest)
        _assert_rate(before, _frames(rest), 0.8)
        assert _call_ids(rest) == calls  # only the leaver's connections went
        for p in rest:
            assert _decrypt_failures(p) == 0, p.name


async def test_frozen_participant_rejoins_as_a_new_session_and_the_mesh_reforms(
    synapse: Synapse, run_dir: Path
) -> None:
    """SIGSTOP (a device cut off) past the delayed leave: the others drop it; on SIGCONT its
    agent joins afresh (new created_ts, so a new MSC2746 session) and the mesh forms again."""
    prov = await _room(synapse.base_url, 3)
    async with participants(_configs(prov), run_dir / "mesh-freeze") as procs:
        p1, p2, p3 = procs
        await asyncio.gather(*(p.wait_ready() for p in procs))
        await _all(procs, lambda p: _decoding_from(p, [o for o in procs if o is not p]), 20)
        assert p3.latest is not None
        old_session = p3.latest["session_id"]
        frozen = p3.peer_id
        p3.proc.send_signal(signal.SIGSTOP)
        try:

            def dropped(p: ParticipantProcess) -> bool:
                return p.latest is not None and all(x["id"] != frozen for x in p.latest["peers"])

            await _all([p1, p2], dropped, (DELAY_MS + 3000) / 1000 + 2)
        finally:
            p3.proc.send_signal(signal.SIGCONT)

        def fresh(p: ParticipantProcess) -> bool:
            return p.latest is not None and p.latest["session_id"] != old_session

        await p3.wait_until(fresh, 15)
        await _all(procs, lambda p: _decoding_from(p, [o for o in procs if o is not p]), 15)
        await _next_report(procs)
        before = _frames(procs)
        await asyncio.sleep(2)
        await _next_report(procs)
        _assert_rate(before, _frames(procs), 0.8)


async def test_late_joiner_connects_and_decodes_quickly(synapse: Synapse, run_dir: Path) -> None:
    prov = await _room(synapse.base_url, 3)
    c1, c2, c3 = _configs(prov)
    log_dir = run_dir / "mesh-late"
    async with participants([c1, c2], log_dir) as early:
        await asyncio.gather(*(p.wait_ready() for p in early))
        await _all(early, lambda p: _decoding_from(p, [o for o in early if o is not p]), 20)
        calls = _call_ids(early)
        async with participants([c3], log_dir) as (late,):
            await late.wait_ready()
            await late.wait_until(lambda p: _decoding_from(p, early), 10)
            assert late.ready is not None
            joined = int(late.ready["joined_at_ms"])
            for o in early:
                peer = _peer(late, o)
                assert peer is not None
                connected, first = int(peer["connected_at_ms"]), int(peer["first_frame_at_ms"])
                print(f"late joiner <- {o.name}: connected {connected - joined} ms after joining, "
                      f"first frame {first - connected} ms after connecting")  # fmt: skip
                assert connected - joined <= 3000, (o.name, connected - joined)
                assert first - connected <= 1000, (o.name, first - connected)
            await _all(early, lambda p: _decoding_from(p, [late]), 10)
            assert _decrypt_failures(late) == 0
            assert _call_ids(early) == calls  # the joiner only added its own connections


async def test_turn_relay_only_two_party_call(coturn: Coturn, run_dir: Path) -> None:
    # A homeserver whose /voip/turnServer hands out the coturn credentials.
    turn = {
        "turn_uris": coturn.uris,
        "turn_username": coturn.username,
        "turn_password": coturn.password,
        "turn_allow_guests": False,
    }
    async with Synapse(run_dir, extra_config=turn, name="synapse-turn") as hs:
        prov = await _room(hs.base_url, 2)
        configs = _configs(prov, turn_from_homeserver=True, relay_only=True)
        async with participants(configs, run_dir / "mesh-turn") as procs:
            await asyncio.gather(*(p.wait_ready() for p in procs))
            await _all(procs, lambda p: _decoding_from(p, [o for o in procs if o is not p]), 20)
            await _next_report(procs)
            before = _frames(procs)
            await asyncio.sleep(3)
            await _next_report(procs)
            _assert_rate(before, _frames(procs), 0.8)
            # Both ends of every media path are relay candidates on coturn.
            for p in procs:
                assert p.latest is not None
                for peer in p.latest["peers"]:
                    assert peer["ice_pair"] == ["relay", "relay"], (p.name, peer["ice_pair"])
