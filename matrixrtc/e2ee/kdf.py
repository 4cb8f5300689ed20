"""Key derivation for LiveKit's frame format: sender key material → AES-128-GCM frame key.

livekit-client imports raw key bytes (per-participant keys, what Element Call uses) as HKDF
material and a shared passphrase as PBKDF2 material; both then derive the 16-byte AES-GCM key
with the same salt. Ratcheting derives 32 new bytes from the material with the same parameters
and re-imports them *with the same algorithm* (so a PBKDF2 key stays PBKDF2 after a ratchet).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from functools import lru_cache

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

__all__ = [
    "DEFAULT_SALT",
    "HKDF_INFO",
    "PBKDF2_ITERATIONS",
    "Kdf",
    "KeySet",
    "derive_frame_key",
    "keyset",
    "ratchet_material",
]

DEFAULT_SALT = b"LKFrameEncryptionKey"
# WebCrypto HKDF params in livekit-client: info = new ArrayBuffer(128), i.e. 128 zero bytes.
HKDF_INFO = bytes(128)
PBKDF2_ITERATIONS = 100_000
_AES_KEY_BYTES = 16  # keySize 128 bits
_RATCHET_BYTES = 32  # deriveBits(…, 256)


class Kdf(enum.Enum):
    """How key material is turned into the AES key (WebCrypto import algorithm)."""

    HKDF = "HKDF"  # raw sender keys (per-participant mode)
    PBKDF2 = "PBKDF2"  # shared passphrase mode (ExternalE2EEKeyProvider)


def _derive(material: bytes, kdf: Kdf, salt: bytes, length: int) -> bytes:
    if kdf is Kdf.HKDF:
        return HKDF(hashes.SHA256(), length, salt, HKDF_INFO).derive(material)
    return PBKDF2HMAC(hashes.SHA256(), length, salt, PBKDF2_ITERATIONS).derive(material)


def derive_frame_key(material: bytes, kdf: Kdf = Kdf.HKDF, salt: bytes = DEFAULT_SALT) -> bytes:
    """The 16-byte AES-128-GCM key livekit-client derives from ``material``."""
    return _derive(material, kdf, salt, _AES_KEY_BYTES)


def ratchet_material(material: bytes, kdf: Kdf = Kdf.HKDF, salt: bytes = DEFAULT_SALT) -> bytes:
    """One ratchet step: 32 bytes derived from ``material`` with the same parameters."""
    return _derive(material, kdf, salt, _RATCHET_BYTES)


@dataclass(frozen=True, slots=True)
class KeySet:
    """Key material together with its derived, ready-to-use AEAD object."""

    material: bytes = field(repr=False)
    kdf: Kdf
    salt: bytes
    aead: AESGCM = field(repr=False, compare=False)

    @classmethod
    def create(cls, material: bytes, kdf: Kdf = Kdf.HKDF, salt: bytes = DEFAULT_SALT) -> KeySet:
        return cls(material, kdf, salt, AESGCM(derive_frame_key(material, kdf, salt)))

    def ratcheted(self) -> KeySet:
        return KeySet.create(
            ratchet_material(self.material, self.kdf, self.salt), self.kdf, self.salt
        )


@lru_cache(maxsize=64)
def keyset(material: bytes, kdf: Kdf = Kdf.HKDF, salt: bytes = DEFAULT_SALT) -> KeySet:
    """Cached :class:`KeySet` for the stateless functions (PBKDF2 costs ~50 ms per derivation)."""
    return KeySet.create(material, kdf, salt)
