"""The call's encoder pool (matrixrtc.mesh.encoder_pool): two transports of a switch share one
encoder per kind, on real PyAV codecs in-process."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import av
from aiortc.mediastreams import MediaStreamError

from matrixrtc.e2ee import KeyRings
from matrixrtc.media.sources import SyntheticVideoTrack, ToneAudioTrack
from matrixrtc.mesh.encoder_pool import EncoderPool
from matrixrtc.mesh.fanout import FanOutTrack
from matrixrtc.mesh.transform import CryptorTransform

KEY = bytes(range(32))


async def _drain(track: FanOutTrack, into: list[av.Packet[Any]]) -> None:
    with contextlib.suppress(MediaStreamError):
        while True:
            into.append(await track.recv())


def _transform() -> tuple[CryptorTransform, KeyRings]:
    rings = KeyRings()
    rings.install("@me:x|DEV", 0, KEY)
    local = rings.cryptor("@me:x|DEV")
    return CryptorTransform(local, lambda _peer: local), rings


async def test_the_second_transport_gets_the_first_ones_encoder_and_the_same_bytes() -> None:
    transform, rings = _transform()
    pool = EncoderPool(transform)
    mesh_source, sfu_source = SyntheticVideoTrack(160, 120, 30), SyntheticVideoTrack(160, 120, 30)
    mesh_enc = pool.acquire(mesh_source, user="mesh")
    sfu_enc = pool.acquire(sfu_source, user="sfu")
    assert sfu_enc is mesh_enc  # one encoder: each frame encoded and encrypted once
    assert mesh_enc.trace_label == "mesh+sfu"
    assert pool.owns(mesh_source)
    assert not pool.owns(sfu_source)
    assert [e.kind for e in pool] == ["video"]
    audio = pool.acquire(ToneAudioTrack(), user="mesh")
    assert audio is not mesh_enc
    assert audio.kind == "audio"

    mesh_track, sfu_track = mesh_enc.subscribe(), sfu_enc.subscribe()
    got_mesh: list[av.Packet[Any]] = []
    got_sfu: list[av.Packet[Any]] = []
    readers = [
        asyncio.create_task(_drain(mesh_track, got_mesh)),
        asyncio.create_task(_drain(sfu_track, got_sfu)),
    ]
    mesh_enc.start()
    sfu_enc.start()  # a second start is the same encoder: nothing more
    await asyncio.sleep(0.4)

    # The mesh's transport closes (the switch is over): its peers' tracks first, then its
    # hold on the encoder. The SFU's peer goes on receiving from the same encoder.
    mesh_track.stop()
    await pool.release(mesh_enc, user="mesh")
    assert mesh_source.readyState == "live"  # still read by the encoder the SFU uses
    assert mesh_enc.trace_label == "sfu"
    before = len(got_sfu)
    await asyncio.sleep(0.3)
    assert len(got_sfu) > before + 3
    assert mesh_enc.frames_in - 1 <= mesh_enc.frames_encoded <= mesh_enc.frames_in

    await pool.release(sfu_enc, user="sfu")  # the last user: closed, its source stopped
    await asyncio.gather(*readers)
    assert mesh_source.readyState == "ended"
    assert [e.kind for e in pool] == ["audio"]
    await pool.aclose()
    assert audio.source.readyState == "ended"
    assert list(pool) == []

    # What both peers got is the same ciphertext, which decrypts under the call's key.
    assert got_mesh[0] is got_sfu[0]
    clear = rings.cryptor("@me:x|DEV").decrypt(
        bytes(got_sfu[-1]), kind="video", codec="vp8", keyframe=None
    )
    assert clear is not None
    assert clear != bytes(got_sfu[-1])


async def test_release_by_a_stranger_or_twice_changes_nothing() -> None:
    pool = EncoderPool(None)
    source = SyntheticVideoTrack(160, 120, 30)
    enc = pool.acquire(source, user="mesh")
    await pool.release(enc, user="sfu")  # never acquired by the SFU
    assert list(pool) == [enc]
    await pool.release(enc, user="mesh")
    await pool.release(enc, user="mesh")
    assert list(pool) == []
    assert source.readyState == "ended"


async def test_an_engine_restart_in_the_same_transport_counts_twice() -> None:
    """The mesh retires an engine while its successor runs (a new session): both hold the
    encoder, and the first one's release must not close it under the second."""
    pool = EncoderPool(None)
    source = SyntheticVideoTrack(160, 120, 30)
    a = pool.acquire(source, user="mesh")
    b = pool.acquire(SyntheticVideoTrack(160, 120, 30), user="mesh")
    assert a is b
    assert a.trace_label == "mesh"
    await pool.release(a, user="mesh")
    assert list(pool) == [a]
    assert source.readyState == "live"
    await pool.release(b, user="mesh")
    assert list(pool) == []
