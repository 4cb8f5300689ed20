"""Files for recordings: plain or sealed to a recipient (``matrixrtc.e2ee.sealed_stream``).

:class:`RecordingFile` is the binary, write-only, non-seekable file a muxer writes into. Every
``write()`` goes to the disk at once (one ``os.write`` per call, sealed as one chunk when a
recipient key is given), so after a crash the file holds everything the muxer had handed over,
and a sealed file loses at most its last chunk. Plain and sealed files receive the very same
bytes from the muxer: decrypting a sealed recording gives what the plain one would have held.

Keys: ``python -m matrixrtc recording-key KEYFILE`` writes a private key (base64, mode 0600)
and prints the public key to give to ``record --encrypt-to``.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from pathlib import Path
from typing import Final

from nacl.public import PrivateKey

from matrixrtc.e2ee.sealed_stream import (
    BadRecipientKey,
    SealedStreamError,
    SealedStreamReader,
    SealedStreamWriter,
    TruncatedStream,
)
from matrixrtc.errors import LocalError

__all__ = [
    "SEALED_SUFFIX",
    "DecryptResult",
    "RecordingFile",
    "RecordingWriteError",
    "decrypt_file",
    "generate_key_file",
    "open_sealed",
    "parse_key",
    "read_private_key",
    "seal_bytes",
]

SEALED_SUFFIX: Final = ".sealed"
_READ_SIZE: Final = 1 << 16


class RecordingWriteError(LocalError):
    """Writing a recording file failed (disk full, I/O error); the file so far stays valid."""


def parse_key(text: str) -> bytes:
    """A 32-byte X25519 key from base64 (standard or URL-safe, padded or not) or hex."""
    text = text.strip()
    if len(text) == 64:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    try:
        raw = base64.b64decode(
            text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4), validate=True
        )
    except (binascii.Error, ValueError) as exc:
        raise BadRecipientKey("a key is 32 bytes in base64 or hex") from exc
    if len(raw) != 32:
        raise BadRecipientKey(f"a key is 32 bytes, this one is {len(raw)}")
    return raw


def generate_key_file(path: Path) -> str:
    """Write a new private key to ``path`` (mode 0600, refuses to overwrite); return the public
    key in base64."""
    key = PrivateKey.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(base64.b64encode(bytes(key)).decode() + "\n")
    return base64.b64encode(bytes(key.public_key)).decode()


def read_private_key(path: Path) -> bytes:
    try:
        text = path.read_text()
    except OSError as exc:
        raise LocalError(f"cannot read the key file {path}: {exc.strerror}") from exc
    return parse_key(text)


class RecordingFile(io.RawIOBase):
    """A new file at ``path`` for a muxer to write into; sealed to ``recipient`` if given.

    A failed write raises :class:`RecordingWriteError` once and the file is closed: what was
    written before stays on disk, intact."""

    def __init__(self, path: Path, recipient: bytes | None = None) -> None:
        super().__init__()
        self.path = path
        self.bytes_written = 0  # bytes accepted from the muxer (plaintext)
        self.error: str | None = None
        self._sealer = SealedStreamWriter(recipient) if recipient is not None else None
        try:
            self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise RecordingWriteError(f"cannot create {path}: {exc.strerror}") from exc
        if self._sealer is not None:
            self._put(self._sealer.header())

    @property
    def sealed(self) -> bool:
        return self._sealer is not None

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        if self._fd is None:
            raise RecordingWriteError(self.error or f"{self.path} is closed")
        chunk = bytes(data)
        if not chunk:
            return 0
        self._put(self._sealer.chunk(chunk) if self._sealer is not None else chunk)
        self.bytes_written += len(chunk)
        return len(chunk)

    def close(self) -> None:
        fd = self._fd
        if fd is not None and self._sealer is not None and self.error is None:
            self._put(self._sealer.final())
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        super().close()

    def _put(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as exc:
            self.error = f"writing {self.path} failed: {exc.strerror or exc}"
            os.close(self._fd)
            self._fd = None
            raise RecordingWriteError(self.error) from exc


def seal_bytes(data: bytes, recipient: bytes) -> bytes:
    """``data`` as one whole sealed stream (a small file written at once: ``index.json``)."""
    writer = SealedStreamWriter(recipient)
    return writer.header() + writer.final(data)


def open_sealed(sealed: bytes, private_key: bytes) -> bytes:
    """What :func:`seal_bytes` sealed (``SealedStreamError`` on a wrong key, an altered or
    a cut stream)."""
    reader = SealedStreamReader(private_key)
    data = reader.feed(sealed)
    reader.close()
    return data


class DecryptResult:
    def __init__(self, src: Path, dst: Path, plaintext_bytes: int, chunks: int) -> None:
        self.src, self.dst = src, dst
        self.plaintext_bytes, self.chunks = plaintext_bytes, chunks


def decrypt_file(src: Path, dst: Path, private_key: bytes) -> DecryptResult:
    """Decrypt the sealed file ``src`` into ``dst``.

    On a truncated file everything intact is still written to ``dst`` (a Matroska recording
    cut this way stays playable) and :class:`~matrixrtc.e2ee.sealed_stream.TruncatedStream` is
    raised; any other :class:`SealedStreamError` removes ``dst``."""
    reader = SealedStreamReader(private_key)
    try:
        with src.open("rb") as fin, dst.open("xb") as fout:
            while data := fin.read(_READ_SIZE):
                fout.write(reader.feed(data))
            reader.close()
    except SealedStreamError as exc:
        if reader.chunks == 0 or not isinstance(exc, TruncatedStream):
            dst.unlink(missing_ok=True)
        raise
    return DecryptResult(src, dst, reader.plaintext_bytes, reader.chunks)
