"""Media E2EE (pure): LiveKit frame format cryptor, key rings, sender-key manager.

No I/O here: transports feed frames to :class:`FrameCryptor`; the agent feeds membership and
key events to the key manager and carries out the actions it returns.
"""

from matrixrtc.e2ee.cryptor import (
    ELEMENT_CALL,
    SHARED_PASSPHRASE,
    CryptorOptions,
    CryptorStats,
    FrameCryptor,
    KeyRing,
    KeyRings,
)
from matrixrtc.e2ee.frame import (
    Codec,
    DecryptError,
    TrackKind,
    UnsupportedCodecError,
    decrypt_frame,
    encrypt_frame,
)
from matrixrtc.e2ee.kdf import Kdf
from matrixrtc.e2ee.keys import (
    InstallRemoteKey,
    KeyManager,
    Member,
    SendKey,
    UseKey,
)
from matrixrtc.e2ee.messages import ElementCallKeys, ReceivedKey, parse_key_message

__all__ = [
    "ELEMENT_CALL",
    "SHARED_PASSPHRASE",
    "Codec",
    "CryptorOptions",
    "CryptorStats",
    "DecryptError",
    "ElementCallKeys",
    "FrameCryptor",
    "InstallRemoteKey",
    "Kdf",
    "KeyManager",
    "KeyRing",
    "KeyRings",
    "Member",
    "ReceivedKey",
    "SendKey",
    "TrackKind",
    "UnsupportedCodecError",
    "UseKey",
    "decrypt_frame",
    "encrypt_frame",
    "parse_key_message",
]
