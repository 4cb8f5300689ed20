"""nio's crypto store commits without waiting for the disk (matrixrtc.matrix._nio)."""

from __future__ import annotations

from pathlib import Path

from matrixrtc.matrix._nio import NioClient, QuickBindDatabase
from matrixrtc.matrix.olm_hook import CapturingOlm


async def test_crypto_store_is_wal_without_full_sync(tmp_path: Path) -> None:
    nio = NioClient("http://127.0.0.1:9", "@a:localhost", "DEV", store_path=str(tmp_path))
    try:
        nio.restore_login("@a:localhost", "DEV", "token")
        assert isinstance(nio.olm, CapturingOlm)
        db = nio.store.database
        assert db.pragma("journal_mode") == "wal"
        assert db.pragma("synchronous") == 1  # NORMAL (FULL, the default, is 2)
        # Also for a connection opened later (peewee reapplies its pragmas on connect).
        db.close()
        db.connect()
        assert db.pragma("synchronous") == 1
        # The Olm account was saved through it and loads back.
        assert nio.store.load_account() is not None
    finally:
        await nio.close()


async def test_store_binds_its_tables_once_and_keeps_stores_apart(tmp_path: Path) -> None:
    """nio's store methods run inside ``database.bind_ctx(models)``: ours walks the models'
    graph once per model list (peewee's walks it on every call), and two stores in one
    process still read and write their own databases."""
    from peewee import Metadata

    clients = []
    for name in ("A", "B"):
        nio = NioClient(
            "http://127.0.0.1:9", f"@{name.lower()}:localhost", name, store_path=str(tmp_path)
        )
        nio.restore_login(f"@{name.lower()}:localhost", name, "token")
        clients.append(nio)
    a, b = clients
    try:
        assert isinstance(a.store.database, QuickBindDatabase)
        walks = 0
        real = Metadata.model_graph

        def counting(self: Metadata, *args: object, **kwargs: object) -> object:
            nonlocal walks
            walks += 1
            return real(self, *args, **kwargs)

        Metadata.model_graph = counting
        try:
            keys = {}
            for _ in range(20):  # interleaved: each call must find its own database
                for nio in clients:
                    keys[nio.device_id] = nio.store.load_account().identity_keys["curve25519"]
        finally:
            Metadata.model_graph = real
        assert walks == 0  # both model lists' graphs were walked when the stores loaded
        assert keys["A"] == a.olm.account.identity_keys["curve25519"]
        assert keys["B"] == b.olm.account.identity_keys["curve25519"]
        assert keys["A"] != keys["B"]
    finally:
        for nio in clients:
            await nio.close()


def test_bind_ctx_puts_models_bound_elsewhere_back(tmp_path: Path) -> None:
    from peewee import Model, SqliteDatabase, TextField

    other = SqliteDatabase(str(tmp_path / "other.db"))
    ours = QuickBindDatabase(str(tmp_path / "ours.db"))

    class Parent(Model):  # type: ignore[misc]
        name = TextField()

        class Meta:
            database = other

    with ours.bind_ctx([Parent]):
        assert Parent._meta.database is ours
        with ours.bind_ctx([Parent]):  # nested, as nio's store methods call each other
            assert Parent._meta.database is ours
        assert Parent._meta.database is ours
        ours.create_tables([Parent])
        Parent.create(name="x")
    assert Parent._meta.database is other
    with ours.bind_ctx([Parent]):
        assert [p.name for p in Parent.select()] == ["x"]
    assert not other.table_exists("parent")
