"""When an expiring access token is renewed (MSC2918 ``expires_in_ms``), what counts as a
lifetime in a /login or /refresh answer, and what a session restored from disk knows of it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from matrixrtc.matrix.errors import HomeserverUnreachable
from matrixrtc.matrix.login import expires_in_ms, log_in, refresh_ahead_s
from matrixrtc.matrix.state_dir import SavedSession, StateDir
from matrixrtc.matrix.types import Login


@pytest.mark.parametrize(
    ("life_ms", "after_s"),
    [(2_000, 1.6), (300_000, 240.0), (3_600_000, 3_540.0), (100, 0.08)],
)
def test_renewed_a_fifth_of_its_life_ahead_at_most_a_minute(life_ms: int, after_s: float) -> None:
    assert refresh_ahead_s(life_ms) == pytest.approx(after_s)


@pytest.mark.parametrize(
    ("resp", "life"),
    [
        ({"expires_in_ms": 300_000}, 300_000),
        ({}, None),
        ({"expires_in_ms": 0}, None),
        ({"expires_in_ms": -5}, None),
        ({"expires_in_ms": True}, None),
        ({"expires_in_ms": "300000"}, None),
        ({"expires_in_ms": 1.5}, None),
    ],
)
def test_lifetime_only_from_a_positive_integer(resp: dict[str, object], life: int | None) -> None:
    assert expires_in_ms(resp) == life


# ------------------------------------------------------------ a session restored from disk

T = 1_800_000_000_000  # wall-clock ms


def test_saved_expiry_comes_back_as_what_is_left_of_the_life(tmp_path: Path) -> None:
    d = StateDir(tmp_path / "s")
    d.save(SavedSession("http://h", "@u:h", "DEV", "tok", "ref", 300_000), now_ms=T)
    assert json.loads(d.session_file.read_text())["expires_at_ms"] == T + 300_000
    restored = d.load(now_ms=T + 60_000)
    assert restored is not None
    assert restored.expires_in_ms == 240_000
    assert restored.refresh_token == "ref"
    # Past its time on our clock: not known (the restore renews it to learn it).
    late = d.load(now_ms=T + 300_000)
    assert late is not None
    assert late.expires_in_ms is None
    # No expiry given: none saved, none read.
    d.save(SavedSession("http://h", "@u:h", "DEV", "tok"), now_ms=T)
    assert "expires_at_ms" not in json.loads(d.session_file.read_text())
    loaded = d.load(now_ms=T)
    assert loaded is not None
    assert loaded.expires_in_ms is None


class _FakeHomeserver:
    """Answers whoami and /refresh as Synapse does with refreshable tokens; records calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def __call__(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        self.calls.append(path.rsplit("/", 1)[-1])
        if path.endswith("/whoami"):
            return {"user_id": "@u:h", "device_id": "DEV"}
        if path.endswith("/refresh"):
            assert kw["body"] == {"refresh_token": "ref"}
            return {"access_token": "tok2", "refresh_token": "ref2", "expires_in_ms": 300_000}
        raise AssertionError(path)


def _state_with(tmp_path: Path, session: SavedSession, *, now_ms: int) -> StateDir:
    d = StateDir(tmp_path / "s")
    d.save(session, now_ms=now_ms)
    (d.crypto_dir / "store.db").write_bytes(b"")  # the same device's crypto store
    return d


async def test_a_restored_session_knows_its_expiry_at_once(tmp_path: Path) -> None:
    fake = _FakeHomeserver()
    saved = SavedSession("http://h", "@u:h", "DEV", "tok", "ref", 300_000)
    # Saved moments ago (the wall clock now): what is left of the life, no renewal needed.
    d = _state_with(tmp_path, saved, now_ms=int(time.time() * 1000))
    session = await log_in(fake, "http://h", Login("@u:h", password="pw"), d)
    assert fake.calls == ["whoami"]
    assert session.access_token == "tok"
    assert session.expires_in_ms is not None
    assert 290_000 < session.expires_in_ms <= 300_000


async def test_a_restored_session_of_unknown_expiry_is_renewed_at_once(tmp_path: Path) -> None:
    """A file from before the expiry was saved: the token works, but nothing would renew it
    ahead, so it would first be refused. It is renewed at restore, and the renewal saved."""
    fake = _FakeHomeserver()
    d = _state_with(tmp_path, SavedSession("http://h", "@u:h", "DEV", "tok", "ref"), now_ms=T)
    session = await log_in(fake, "http://h", Login("@u:h", password="pw"), d)
    assert fake.calls == ["whoami", "refresh"]
    assert (session.access_token, session.refresh_token) == ("tok2", "ref2")
    assert session.expires_in_ms == 300_000
    on_disk = d.load()
    assert on_disk is not None
    assert on_disk.access_token == "tok2"
    assert on_disk.expires_in_ms is not None
    # Without a refresh token the token does not expire: restored as it is.
    fake.calls.clear()
    d = _state_with(tmp_path, SavedSession("http://h", "@u:h", "DEV", "tok"), now_ms=T)
    session = await log_in(fake, "http://h", Login("@u:h", password="pw"), d)
    assert fake.calls == ["whoami"]
    assert session.expires_in_ms is None


async def test_a_failed_renewal_at_restore_keeps_the_working_token(tmp_path: Path) -> None:
    async def unreachable_refresh(method: str, path: str, **kw: Any) -> dict[str, Any]:
        if path.endswith("/whoami"):
            return {"user_id": "@u:h", "device_id": "DEV"}
        raise HomeserverUnreachable("POST /refresh: connection reset")

    d = _state_with(tmp_path, SavedSession("http://h", "@u:h", "DEV", "tok", "ref"), now_ms=T)
    session = await log_in(unreachable_refresh, "http://h", Login("@u:h", password="pw"), d)
    assert (session.access_token, session.expires_in_ms) == ("tok", None)
