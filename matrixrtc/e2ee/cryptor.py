"""Stateful per-participant frame cryptor: key ring, ratchet-on-failure, failure tolerance.

Mirrors livekit-client's ``ParticipantKeyHandler`` + ``FrameCryptor`` with Element Call's
settings (ring of 256, ratchet window 10, failure tolerance 10, HKDF):

* a key ring of ``ring_size`` slots; the key-index byte on the wire is ``index % ring_size``;
* decrypt with the slot named by the frame's last byte; on an authentication failure try up
  to ``ratchet_window`` ratchet steps of that key and store the ratcheted key only when one of
  them succeeds;
* failures are counted per slot; a slot whose count exceeds ``failure_tolerance`` is invalid
  and its frames are dropped unseen until a new key is set there (``-1`` = never invalid);
  a success resets the count.

Unlike livekit-client (which re-derives one ratchet step from the stored key on every attempt,
so its window only ever reaches one step), the window here walks the chain: step k tries the
key ratcheted k times, as native webrtc-sdk's FrameCryptor does.

Nothing here raises for bad input: :meth:`FrameCryptor.decrypt` returns None and counts why.
"""

from __future__ import annotations

import secrets
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from cryptography.exceptions import InvalidTag

from matrixrtc.e2ee.frame import (
    IV_LENGTH,
    RING_SIZE,
    TAG_LENGTH,
    TRAILER_LENGTH,
    Codec,
    DecryptError,
    TrackKind,
    UnsupportedCodecError,
    clear_header_length,
    make_iv,
    seal,
    sif_payload,
    unseal,
)
from matrixrtc.e2ee.kdf import DEFAULT_SALT, Kdf, KeySet
from matrixrtc.errors import LocalError

__all__ = [
    "ELEMENT_CALL",
    "SHARED_PASSPHRASE",
    "CryptorOptions",
    "CryptorStats",
    "FrameCryptor",
    "KeyRing",
    "KeyRings",
]

log = structlog.get_logger(__name__)
_IV_PACK = struct.Struct(">III").pack
_TRAILERS = tuple(bytes((IV_LENGTH, i)) for i in range(256))
_MIN_BODY = TAG_LENGTH + TRAILER_LENGTH


@dataclass(frozen=True, slots=True, kw_only=True)
class CryptorOptions:
    """Key-provider options, as livekit-client's ``KeyProviderOptions``."""

    ring_size: int = RING_SIZE
    ratchet_window: int = 10
    failure_tolerance: int = 10
    kdf: Kdf = Kdf.HKDF
    salt: bytes = DEFAULT_SALT

    def __post_init__(self) -> None:
        if not 1 <= self.ring_size <= RING_SIZE:
            raise LocalError(f"ring_size must be within 1..256, not {self.ring_size}")
        if self.ratchet_window < 0:
            raise LocalError("ratchet_window must be ≥ 0")
        if self.failure_tolerance < -1:
            raise LocalError("failure_tolerance must be ≥ -1")


# Element Call per-participant keys (MatrixKeyProvider: ratchetWindowSize 10, keyringSize 256).
ELEMENT_CALL = CryptorOptions()
# Element Call shared-passphrase rooms (ExternalE2EEKeyProvider forces window 0, tolerance -1).
SHARED_PASSPHRASE = CryptorOptions(
    ring_size=16, ratchet_window=0, failure_tolerance=-1, kdf=Kdf.PBKDF2
)


class KeyRing:
    """One participant's keys: ``ring_size`` slots, a current slot and per-slot failure counts."""

    __slots__ = ("_failures", "_keys", "_limit", "current_index", "options")

    def __init__(self, options: CryptorOptions = ELEMENT_CALL) -> None:
        self.options = options
        # Always 256 slots so any key-index byte is a valid position; slots ≥ ring_size stay
        # empty (livekit-client reports those frames as missing a key, as we do).
        self._keys: list[KeySet | None] = [None] * RING_SIZE
        self._failures = [0] * RING_SIZE
        # A slot is invalid once its failure count exceeds this (tolerance -1: never).
        tol = options.failure_tolerance
        self._limit = tol if tol >= 0 else sys.maxsize
        self.current_index = 0

    def set_key(self, material: bytes, index: int, *, make_current: bool = True) -> None:
        """Install key material at ``index`` (mod ring size) and clear that slot's failures."""
        slot = index % self.options.ring_size
        self._keys[slot] = KeySet.create(bytes(material), self.options.kdf, self.options.salt)
        self._failures[slot] = 0
        if make_current:
            self.current_index = slot

    def keyset(self, index: int | None = None) -> KeySet | None:
        """The key in ring slot ``index`` (default: the current slot)."""
        slot = self.current_index if index is None else index
        return self._keys[slot] if 0 <= slot < RING_SIZE else None

    def material(self, index: int) -> bytes | None:
        ks = self.keyset(index % self.options.ring_size)
        return ks.material if ks is not None else None

    def ratchet(self, index: int | None = None) -> bytes | None:
        """Ratchet the key at ``index`` (default current) in place; the new material or None."""
        slot = self.current_index if index is None else index % self.options.ring_size
        ks = self._keys[slot]
        if ks is None:
            return None
        self._keys[slot] = ks = ks.ratcheted()
        self._failures[slot] = 0
        return ks.material

    def is_invalid(self, slot: int) -> bool:
        return 0 <= slot < RING_SIZE and self._failures[slot] > self._limit

    @property
    def has_valid_key(self) -> bool:
        return not self.is_invalid(self.current_index)

    def failures(self, slot: int) -> int:
        return self._failures[slot]

    def _failure(self, slot: int) -> None:
        if self.options.failure_tolerance < 0:
            return
        self._failures[slot] += 1
        if self._failures[slot] == self._limit + 1:
            log.warning("e2ee.key_marked_invalid", index=slot)

    def _success(self, slot: int, ks: KeySet | None = None) -> None:
        if ks is not None:
            self._keys[slot] = ks
            self.current_index = slot
        self._failures[slot] = 0


@dataclass(slots=True)
class CryptorStats:
    encrypted: int = 0
    decrypted: int = 0
    passed_through: int = 0  # empty frames, both directions
    sif_frames: int = 0
    ratchets: int = 0  # ratchet steps committed after a successful decrypt
    encrypt_failures: int = 0
    decrypt_failures: int = 0  # every frame decrypt() returned None for
    missing_key: int = 0
    invalid_key_drops: int = 0
    malformed: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


def _random_counter_start() -> int:
    return secrets.randbelow(0xFFFF)


class FrameCryptor:
    """En-/decrypts one participant's frames with its :class:`KeyRing`.

    Use one per remote participant for decryption and one for the local sender. The ring may
    be shared between several cryptors (one per track) of the same participant.
    """

    __slots__ = ("_counter_start", "_counters", "identity", "ring", "sif_trailer", "stats")

    def __init__(
        self,
        ring: KeyRing | None = None,
        *,
        identity: str = "",
        sif_trailer: bytes = b"",
        counter_start: Callable[[], int] = _random_counter_start,
    ) -> None:
        self.ring = ring if ring is not None else KeyRing()
        self.identity = identity
        self.sif_trailer = sif_trailer
        self.stats = CryptorStats()
        self._counters: dict[int, int] = {}
        self._counter_start = counter_start

    # ------------------------------------------------------------------ encrypt
    def encrypt(
        self,
        frame: bytes,
        *,
        kind: TrackKind | str,
        codec: Codec | str | None = None,
        keyframe: bool | None = None,
        ssrc: int,
        timestamp: int,
    ) -> bytes | None:
        """Encrypt with the ring's current key; None (and counted) if that is impossible."""
        if not frame:
            self.stats.passed_through += 1
            return frame
        ring = self.ring
        ks = ring._keys[ring.current_index]
        if ks is None:
            return self._encrypt_failed("no key at the current index")
        if kind == "audio":  # the two common rules inline; the rest in clear_header_length()
            n, nalu = 1, False
        elif codec == "vp8" and keyframe is not None:
            n, nalu = (10 if keyframe else 3), False
        else:
            try:
                n, nalu = clear_header_length(frame, kind, codec, keyframe)
            except UnsupportedCodecError:
                return self._encrypt_failed("unsupported codec")
        if len(frame) < n:
            return self._encrypt_failed("frame shorter than its clear header")
        counters = self._counters
        count = counters.get(ssrc)
        if count is None:
            count = self._counter_start()
        counters[ssrc] = count + 1
        # make_iv(), inlined: this is the per-frame hot path.
        try:
            iv = _IV_PACK(ssrc, timestamp, (timestamp - count % 0xFFFF) & 0xFFFFFFFF)
        except struct.error:  # out-of-range SSRC/timestamp: wrap as JS's DataView does
            iv = make_iv(ssrc, timestamp, count)
        if nalu:
            out = seal(ks, ring.current_index, frame, n, nalu, iv)
        else:  # seal(), inlined for the common codecs
            header = frame[:n]
            body = ks.aead.encrypt(iv, frame[n:], header)
            out = b"".join((header, body, iv, _TRAILERS[ring.current_index]))
        self.stats.encrypted += 1
        return out

    def _encrypt_failed(self, reason: str) -> bytes | None:
        self.stats.encrypt_failures += 1
        self._count(reason)
        log.debug("e2ee.encrypt_failed", identity=self.identity, reason=reason)
        return None

    # ------------------------------------------------------------------ decrypt
    def decrypt(
        self,
        frame: bytes,
        *,
        kind: TrackKind | str,
        codec: Codec | str | None = None,
        keyframe: bool | None = None,
    ) -> bytes | None:
        """Decrypt one received frame; None when it must be dropped (the reason is counted)."""
        if not frame:
            self.stats.passed_through += 1
            return frame
        if self.sif_trailer:
            try:
                sif = sif_payload(frame, self.sif_trailer)
            except DecryptError:
                return self._decrypt_failed("unknown SIF payload", malformed=True)
            if sif is not None:
                self.stats.sif_frames += 1
                return sif
        ring = self.ring
        slot = frame[-1]
        failures = ring._failures
        if failures[slot] > ring._limit:
            self.stats.invalid_key_drops += 1
            return self._decrypt_failed("key marked invalid")
        ks = ring._keys[slot]
        if ks is None:
            self.stats.missing_key += 1
            ring._failure(slot)
            return self._decrypt_failed("missing key")
        out: bytes | None
        try:
            if kind == "audio":  # as in encrypt(): the common rules inline
                n, nalu = 1, False
            elif codec == "vp8" and keyframe is not None:
                n, nalu = (10 if keyframe else 3), False
            else:
                n, nalu = clear_header_length(frame, kind, codec, keyframe)
            try:
                if nalu:
                    out = unseal(ks, frame, n, nalu)
                else:  # unseal(), inlined
                    size = len(frame)
                    if size - n < _MIN_BODY or frame[-2] != IV_LENGTH:
                        raise DecryptError("frame too short or IV length byte not 12")
                    header = frame[:n]
                    out = header + ks.aead.decrypt(frame[-14:-2], frame[n:-14], header)
            except InvalidTag:
                out = self._ratchet_decrypt(ks, slot, frame, n, nalu)
        except (DecryptError, UnsupportedCodecError) as e:
            return self._decrypt_failed(type(e).__name__, malformed=True)
        if out is None:
            # As livekit-client: failures count only while the current key is still valid.
            if ring.has_valid_key:
                ring._failure(slot)
            return self._decrypt_failed("authentication failed")
        if failures[slot]:
            failures[slot] = 0
        self.stats.decrypted += 1
        return out

    def _ratchet_decrypt(
        self, ks: KeySet, slot: int, frame: bytes, n: int, nalu: bool
    ) -> bytes | None:
        for _ in range(self.ring.options.ratchet_window):
            ks = ks.ratcheted()
            out: bytes | None
            try:
                out = unseal(ks, frame, n, nalu)
            except InvalidTag:
                continue
            # Commit only on success, so a forged frame cannot advance our key.
            self.ring._success(slot, ks)
            self.stats.ratchets += 1
            log.info("e2ee.key_ratcheted", identity=self.identity, index=slot)
            return out
        return None

    def _decrypt_failed(self, reason: str, *, malformed: bool = False) -> bytes | None:
        self.stats.decrypt_failures += 1
        if malformed:
            self.stats.malformed += 1
        self._count(reason)
        log.debug("e2ee.decrypt_failed", identity=self.identity, reason=reason)
        return None

    def _count(self, reason: str) -> None:
        self.stats.by_reason[reason] = self.stats.by_reason.get(reason, 0) + 1


class KeyRings:
    """Key rings by LiveKit identity, as the LiveKit key provider keeps them.

    Feed it the key manager's :class:`~matrixrtc.e2ee.keys.UseKey` and
    :class:`~matrixrtc.e2ee.keys.InstallRemoteKey` actions with :meth:`install`; hand
    :meth:`cryptor` to a transport for each participant (own identity: the sender).
    """

    __slots__ = ("_rings", "options")

    def __init__(self, options: CryptorOptions = ELEMENT_CALL) -> None:
        self.options = options
        self._rings: dict[str, KeyRing] = {}

    def ring(self, identity: str) -> KeyRing:
        ring = self._rings.get(identity)
        if ring is None:
            ring = self._rings[identity] = KeyRing(self.options)
        return ring

    def install(self, identity: str, index: int, key: bytes) -> None:
        """Set ``key`` at ``index`` for ``identity`` and make it that ring's current key."""
        self.ring(identity).set_key(key, index)

    def cryptor(self, identity: str, *, sif_trailer: bytes = b"") -> FrameCryptor:
        return FrameCryptor(self.ring(identity), identity=identity, sif_trailer=sif_trailer)

    def forget(self, identity: str) -> None:
        self._rings.pop(identity, None)

    def __contains__(self, identity: object) -> bool:
        return identity in self._rings
