"""The frame E2EE hook of the mesh engine.

A :class:`FrameTransform` encrypts each *encoded* local frame once, between the shared encoder
and aiortc's packetizer, and hands out one :class:`FrameDecryptor` per remote participant,
applied between aiortc's depacketizer/jitter buffer and its decoder. The mesh engine binds a
decryptor to each receiver; there is no process-global key table.

``matrixrtc.e2ee.FrameCryptor`` (LiveKit's frame format) satisfies both protocols structurally.
``ssrc`` passed to :meth:`FrameTransform.encrypt` is one random value per local track, not an
RTP SSRC: with encode-once the same ciphertext goes to every peer, each of which sees a
different RTP SSRC. It only feeds the IV, which travels in the frame trailer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from matrixrtc.e2ee import FrameCryptor
from matrixrtc.session.mesh_signalling import DeviceRef

__all__ = ["CryptorTransform", "FrameDecryptor", "FrameTransform", "vp8_is_keyframe"]


class FrameDecryptor(Protocol):
    def decrypt(
        self, frame: bytes, *, kind: str, codec: str, keyframe: bool | None
    ) -> bytes | None:
        """The clear frame, or None to drop it (it is counted as a decrypt failure)."""
        ...


class FrameTransform(Protocol):
    def encrypt(
        self, frame: bytes, *, kind: str, codec: str, keyframe: bool, ssrc: int, timestamp: int
    ) -> bytes | None:
        """The protected frame, or None to drop it (e.g. no key yet)."""
        ...

    def decryptor(self, participant: DeviceRef) -> FrameDecryptor:
        """The decryption context for frames sent by ``participant``."""
        ...


def vp8_is_keyframe(frame: bytes) -> bool:
    """VP8 frame tag (RFC 6386 §9.1): bit 0 of the first byte is 0 for a key frame.

    The frame tag stays in clear in LiveKit's format, so this works on protected frames too.
    """
    return bool(frame) and not frame[0] & 0x01


class CryptorTransform:
    """A :class:`FrameTransform` over :mod:`matrixrtc.e2ee`'s LiveKit-format ``FrameCryptor``.

    ``local`` encrypts with our sender key ring; ``remote(participant)`` returns the cryptor
    holding that participant's key ring (the key manager's owner decides how rings are kept).
    """

    def __init__(self, local: FrameCryptor, remote: Callable[[DeviceRef], FrameCryptor]) -> None:
        self.local = local
        self._remote = remote

    def encrypt(
        self, frame: bytes, *, kind: str, codec: str, keyframe: bool, ssrc: int, timestamp: int
    ) -> bytes | None:
        return self.local.encrypt(
            frame, kind=kind, codec=codec, keyframe=keyframe, ssrc=ssrc, timestamp=timestamp
        )

    def decryptor(self, participant: DeviceRef) -> FrameDecryptor:
        return self._remote(participant)
