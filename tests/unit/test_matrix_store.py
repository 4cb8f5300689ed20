"""nio's crypto store commits without waiting for the disk (matrixrtc.matrix._nio)."""

from __future__ import annotations

from pathlib import Path

from matrixrtc.matrix._nio import NioClient
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
