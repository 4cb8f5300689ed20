"""When an expiring access token is renewed (MSC2918 ``expires_in_ms``), and what counts as a
lifetime in a /login or /refresh answer."""

from __future__ import annotations

import pytest

from matrixrtc.matrix.login import expires_in_ms, refresh_ahead_s


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
