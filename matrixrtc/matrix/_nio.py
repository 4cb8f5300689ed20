"""matrix-nio glue shared by the adapter's modules: the client subclass with the capturing
Olm machine, nio errors mapped to ours, and device-store lookups."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any

import aiohttp
from nio import AsyncClient
from nio.exceptions import (
    EncryptionError,
    GroupEncryptionError,
    LocalProtocolError,
    OlmTrustError,
)
from peewee import SqliteDatabase

from matrixrtc.matrix.errors import CryptoError, HomeserverTimeout, HomeserverUnreachable
from matrixrtc.matrix.olm_hook import CapturingOlm
from matrixrtc.matrix.types import DeviceRef

__all__ = ["NioClient", "QuickBindDatabase", "device_of", "fast_commits", "nio_errors"]


class NioClient(AsyncClient):  # type: ignore[misc]  # nio is untyped
    """nio's client with an Olm machine that keeps to-device payloads nio would drop, and a
    crypto store that commits without waiting for the disk (:func:`fast_commits`) and binds
    its tables once instead of at every call (:class:`QuickBindDatabase`)."""

    def load_store(self) -> None:
        super().load_store()
        store: Any = getattr(self, "store", None)
        if store is not None:
            fast_commits(store.database)
            if type(store.database) is SqliteDatabase:
                store.database.__class__ = QuickBindDatabase
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


class QuickBindDatabase(SqliteDatabase):  # type: ignore[misc]  # peewee is untyped
    """nio's SQLite store database, with a cheap :meth:`bind_ctx`.

    nio wraps every store method (saving an Olm session after each to-device message, the
    encrypted rooms after each sync, ...) in ``database.bind_ctx(models)``, so that several
    stores can share peewee's model classes. peewee's context walks every model's
    foreign-key graph and rebinds the whole graph on entry and again on exit: ≈ 40 graph walks
    per call for nio's models, 2–5 ms of the event loop per call (profiled: 80 % of the time
    nio spent on a to-device message went there, 6–22 ms a message while a transport
    switch delivered keys and signalling). Here each model list's graph is walked once, and
    models already bound to this database (the one store of a process: the usual case) are
    not touched; models bound elsewhere are bound here and put back on exit, as nio expects.
    nio's instance is switched to this class (:meth:`NioClient.load_store`): nothing else of
    it changes.
    """

    def bind_ctx(
        self, models: Iterable[Any], bind_refs: bool = True, bind_backrefs: bool = True
    ) -> _QuickBind:
        key = (tuple(models), bind_refs, bind_backrefs)
        cache: dict[Any, tuple[Any, ...]] = self.__dict__.setdefault("_bind_closures", {})
        closure = cache.get(key)
        if closure is None:
            seen: dict[Any, None] = {}
            for model in key[0]:
                seen[model] = None
                if bind_refs or bind_backrefs:
                    for _fk, related, _back in model._meta.model_graph(
                        refs=bind_refs, backrefs=bind_backrefs
                    ):
                        seen[related] = None
            closure = cache[key] = tuple(seen)
        return _QuickBind(self, closure)


class _QuickBind:
    __slots__ = ("_closure", "_database", "_previous")

    def __init__(self, database: SqliteDatabase, closure: tuple[Any, ...]) -> None:
        self._database = database
        self._closure = closure
        self._previous: list[tuple[Any, Any]] = []

    def __enter__(self) -> tuple[Any, ...]:
        db = self._database
        self._previous = [
            (m, m._meta.database) for m in self._closure if m._meta.database is not db
        ]
        for model, _old in self._previous:
            model._meta.set_database(db)
        return self._closure

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for model, old in reversed(self._previous):
            model._meta.set_database(old)


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
