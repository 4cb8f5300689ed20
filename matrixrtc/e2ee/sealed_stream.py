"""Sealed streams (pure): files encrypted at rest for one recipient's X25519 key.

A recording is written through libsodium's secretstream (XChaCha20-Poly1305) under a fresh
random stream key; that key is sealed (``crypto_box_seal``) to the recipient's X25519 public
key, so only the holder of the matching private key can read the file, and the writer cannot
read it back. The file is a sequence of chunks, each authenticated and each written as soon as
it is sealed: a crash loses at most the chunk being written, and everything before it decrypts.

Layout (integers big-endian)::

    magic      8  b"MRTCSEAL"
    version    1  1
    sealed_len 2  length of sealed_key (80 for the 32-byte key)
    sealed_key    crypto_box_seal(stream_key, recipient_public_key)
    ss_header 24  secretstream header
    chunk*        length 4 | secretstream ciphertext (plaintext + 17 bytes)

Every chunk is authenticated with the bytes before ``ss_header`` as additional data (a header
swapped onto another file's chunks does not decrypt). The last chunk carries secretstream's
``TAG_FINAL``: a file that ends without it was cut (:class:`TruncatedStream`), and bytes after it
are rejected (:class:`TrailingData`). Secretstream itself rejects reordered, dropped or
duplicated chunks.

No I/O: :class:`SealedStreamWriter` returns the bytes to write, :class:`SealedStreamReader` is
fed bytes and returns plaintext. ``matrixrtc.media.sealed_file`` does the file handling.
"""

from __future__ import annotations

import struct
from typing import Final

import nacl.bindings as sodium
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox

from matrixrtc.errors import MatrixRTCError

__all__ = [
    "MAGIC",
    "MAX_CHUNK",
    "BadRecipientKey",
    "CorruptChunk",
    "NotSealed",
    "SealedStreamError",
    "SealedStreamReader",
    "SealedStreamWriter",
    "TrailingData",
    "TruncatedStream",
    "WrongKey",
]

MAGIC: Final = b"MRTCSEAL"
VERSION: Final = 1
MAX_CHUNK: Final = 1 << 24  # plaintext bytes per chunk: bounds what a reader allocates
_KEY_BYTES: Final = sodium.crypto_secretstream_xchacha20poly1305_KEYBYTES
_SS_HEADER: Final = sodium.crypto_secretstream_xchacha20poly1305_HEADERBYTES
_ABYTES: Final = sodium.crypto_secretstream_xchacha20poly1305_ABYTES
_TAG_MESSAGE: Final = sodium.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
_TAG_FINAL: Final = sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL
_SEAL_OVERHEAD: Final = 48  # ephemeral public key 32 + MAC 16
_PREFIX: Final = struct.Struct(">8sBH")
_LEN: Final = struct.Struct(">I")


class SealedStreamError(MatrixRTCError):
    """A sealed file cannot be read (or written); the message says why in plain words."""


class NotSealed(SealedStreamError):
    """The data does not start like a sealed recording (or has an unknown version)."""


class WrongKey(SealedStreamError):
    """The stream key is not sealed to this private key (or its header was altered)."""


class CorruptChunk(SealedStreamError):
    """A chunk does not authenticate: the file was altered or chunks were reordered."""


class TruncatedStream(SealedStreamError):
    """The data ends before the final chunk (the writer crashed or the file was cut)."""


class TrailingData(SealedStreamError):
    """Bytes follow the final chunk."""


class BadRecipientKey(SealedStreamError, ValueError):
    """A recipient public key or private key is not 32 bytes."""


def _public(key: bytes) -> PublicKey:
    if len(key) != 32:
        raise BadRecipientKey(f"an X25519 public key is 32 bytes, not {len(key)}")
    return PublicKey(key)


def _private(key: bytes) -> PrivateKey:
    if len(key) != 32:
        raise BadRecipientKey(f"an X25519 private key is 32 bytes, not {len(key)}")
    return PrivateKey(key)


class SealedStreamWriter:
    """Seals a byte stream to ``recipient`` (a 32-byte X25519 public key).

    ``header()`` first (once), then ``chunk(data)`` for each piece, then ``final()``; each
    returns the bytes to append to the file. ``stream_key`` is for tests only."""

    def __init__(self, recipient: bytes, *, stream_key: bytes | None = None) -> None:
        key = (
            stream_key
            if stream_key is not None
            else sodium.crypto_secretstream_xchacha20poly1305_keygen()
        )
        if len(key) != _KEY_BYTES:
            raise BadRecipientKey(f"a stream key is {_KEY_BYTES} bytes")
        sealed = SealedBox(_public(recipient)).encrypt(key)
        self._ad = _PREFIX.pack(MAGIC, VERSION, len(sealed)) + sealed
        self._state = sodium.crypto_secretstream_xchacha20poly1305_state()
        self._ss_header = sodium.crypto_secretstream_xchacha20poly1305_init_push(self._state, key)
        self._started = False
        self.finished = False
        self.chunks = 0
        self.plaintext_bytes = 0

    def header(self) -> bytes:
        if self._started:
            raise SealedStreamError("header() already returned")
        self._started = True
        return self._ad + self._ss_header

    def chunk(self, data: bytes) -> bytes:
        """One or more sealed chunks holding ``data`` (split at :data:`MAX_CHUNK`)."""
        out = []
        for i in range(0, len(data), MAX_CHUNK):
            out.append(self._seal(data[i : i + MAX_CHUNK], _TAG_MESSAGE))
        return b"".join(out)

    def final(self, data: bytes = b"") -> bytes:
        """The last chunk(s): ``data`` then the end-of-stream tag."""
        head = self.chunk(data[:-MAX_CHUNK] if len(data) > MAX_CHUNK else b"")
        tail = data[-MAX_CHUNK:] if len(data) > MAX_CHUNK else data
        out = head + self._seal(tail, _TAG_FINAL)
        self.finished = True
        return out

    def _seal(self, data: bytes, tag: int) -> bytes:
        if not self._started:
            raise SealedStreamError("header() must come first")
        if self.finished:
            raise SealedStreamError("the stream is finished")
        ct = sodium.crypto_secretstream_xchacha20poly1305_push(self._state, data, self._ad, tag)
        self.chunks += 1
        self.plaintext_bytes += len(data)
        return _LEN.pack(len(ct)) + ct


class SealedStreamReader:
    """Opens a sealed stream with the recipient's 32-byte X25519 private key.

    ``feed(data)`` returns the plaintext of every chunk completed by ``data`` (possibly
    ``b""``); ``close()`` at the end of the input raises :class:`TruncatedStream` unless the
    final chunk was read. After any error the reader stays failed."""

    def __init__(self, private_key: bytes) -> None:
        self._box = SealedBox(_private(private_key))
        self._buf = bytearray()
        self._state: sodium.crypto_secretstream_xchacha20poly1305_state | None = None
        self._ad = b""
        self._error: SealedStreamError | None = None
        self.finished = False
        self.chunks = 0
        self.plaintext_bytes = 0

    def feed(self, data: bytes) -> bytes:
        if self._error is not None:
            raise self._error
        try:
            return self._feed(data)
        except SealedStreamError as exc:
            self._error = exc
            raise

    def close(self) -> None:
        if self._error is not None:
            raise self._error
        if not self.finished:
            where = "header" if self._state is None else f"chunk {self.chunks + 1}"
            self._error = TruncatedStream(
                f"the recording ends inside its {where}, before the final chunk (the recorder "
                f"stopped without finishing or the file was cut); {self.plaintext_bytes} bytes "
                f"in {self.chunks} chunks were intact"
            )
            raise self._error

    def _feed(self, data: bytes) -> bytes:
        self._buf += data
        if self._state is None and not self._read_header():
            return b""
        out = bytearray()
        while self._buf:
            if self.finished:
                raise TrailingData(f"{len(self._buf)} bytes follow the final chunk")
            if len(self._buf) < _LEN.size:
                break
            (length,) = _LEN.unpack_from(self._buf)
            if length < _ABYTES or length > MAX_CHUNK + _ABYTES:
                raise CorruptChunk(f"chunk {self.chunks + 1} has an impossible length {length}")
            if len(self._buf) < _LEN.size + length:
                break
            ct = bytes(self._buf[_LEN.size : _LEN.size + length])
            del self._buf[: _LEN.size + length]
            assert self._state is not None
            try:
                plain, tag = sodium.crypto_secretstream_xchacha20poly1305_pull(
                    self._state, ct, self._ad
                )
            except (CryptoError, RuntimeError, ValueError) as exc:
                raise CorruptChunk(
                    f"chunk {self.chunks + 1} does not authenticate (altered or reordered)"
                ) from exc
            self.chunks += 1
            self.plaintext_bytes += len(plain)
            out += plain
            if tag == _TAG_FINAL:
                self.finished = True
        return bytes(out)

    def _read_header(self) -> bool:
        if len(self._buf) < _PREFIX.size:
            if not MAGIC.startswith(bytes(self._buf[: len(MAGIC)])):
                raise NotSealed("not a sealed recording (no MRTCSEAL header)")
            return False
        magic, version, sealed_len = _PREFIX.unpack_from(self._buf)
        if magic != MAGIC:
            raise NotSealed("not a sealed recording (no MRTCSEAL header)")
        if version != VERSION:
            raise NotSealed(f"sealed recording version {version} is not supported (only 1)")
        if sealed_len != _KEY_BYTES + _SEAL_OVERHEAD:
            raise NotSealed(f"sealed key of {sealed_len} bytes (expected 80)")
        end = _PREFIX.size + sealed_len
        if len(self._buf) < end + _SS_HEADER:
            return False
        sealed = bytes(self._buf[_PREFIX.size : end])
        try:
            key = self._box.decrypt(sealed)
        except CryptoError as exc:
            raise WrongKey(
                "this recording is not sealed to the given private key (wrong key file?)"
            ) from exc
        state = sodium.crypto_secretstream_xchacha20poly1305_state()
        try:
            sodium.crypto_secretstream_xchacha20poly1305_init_pull(
                state, bytes(self._buf[end : end + _SS_HEADER]), key
            )
        except (CryptoError, RuntimeError, ValueError) as exc:
            raise CorruptChunk("the stream header is damaged") from exc
        self._ad = bytes(self._buf[:end])
        self._state = state
        del self._buf[: end + _SS_HEADER]
        return True
