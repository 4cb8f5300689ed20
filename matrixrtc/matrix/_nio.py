"""matrix-nio glue shared by the adapter's modules: the client subclass with the capturing
Olm machine, nio errors mapped to ours, and device-store lookups."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import aiohttp
from nio import AsyncClient
from nio.exceptions import (
    EncryptionError,
    GroupEncryptionError,
    LocalProtocolError,
    OlmTrustError,
)

from matrixrtc.matrix.errors import CryptoError, HomeserverTimeout, HomeserverUnreachable
from matrixrtc.matrix.olm_hook import CapturingOlm
from matrixrtc.matrix.types import DeviceRef

__all__ = ["NioClient", "device_of", "fast_commits", "nio_errors"]


class NioClient(AsyncClient):  # type: ignore[misc]  # nio is untyped
    """nio's client with an Olm machine that keeps to-device payloads nio would drop, and a
    crypto store that commits without waiting for the disk (:func:`fast_commits`)."""

    def load_store(self) -> None:
        super().load_store()
        store: Any = getattr(self, "store", None)
        if store is not None:
            fast_commits(store.database)
        olm: Any = getattr(self, "olm", None)
        if olm is not None and not isinstance(olm, CapturingOlm):
            # nio builds a plain Olm; rebuild from the same (now saved) account and store.
            self.olm = CapturingOlm(self.user_id, self.device_id, self.store)


def fast_commits(database: Any) -> None:
    """Put nio's SQLite crypto store (a peewee database) in WAL mode with ``synchronous =
    NORMAL``, for its connection now and any it opens later.

    nio saves the Olm session after every to-device message it encrypts or decrypts, each in
    its own transaction, on the event loop. SQLite's defaults (rollback journal, ``synchronous
    = FULL``) make every such commit wait for two fsyncs: on a busy disk 10–25 ms each time
    (measured on the 2-core box), and a key share to three devices during a transport switch
    stalled every frame of the call for that long. In WAL mode with ``NORMAL`` a commit only
    appends to the log (≈ 0.03 ms); fsyncs happen at checkpoints. The database stays
    consistent after any crash; a power loss or kernel crash (not a crash of this process) can
    roll back the last commits, so an Olm session may step back and its peer fail to decrypt
    the next messages we send on it (the trade every WAL + ``NORMAL`` store makes).
    """
    database.pragma("journal_mode", "wal", permanent=True)
    database.pragma("synchronous", "normal", permanent=True)


@contextlib.contextmanager
def nio_errors(what: str) -> Iterator[None]:
    """nio raises transport errors (after its own retries) and crypto errors as-is: give
    callers our types instead."""
    try:
        yield
    except TimeoutError as e:
        raise HomeserverTimeout(f"{what}: no answer in time") from e
    except (aiohttp.ClientError, OSError) as e:
        raise HomeserverUnreachable(f"{what}: {type(e).__name__}: {e}") from e
    except (LocalProtocolError, EncryptionError, GroupEncryptionError, OlmTrustError) as e:
        raise CryptoError(f"{what}: {type(e).__name__}: {e}") from e


def device_of(nio: NioClient, ref: DeviceRef) -> Any:
    """nio's device record for ``ref``, or None when its keys are unknown."""
    try:
        return nio.device_store[ref.user_id][ref.device_id]
    except KeyError:
        return None
