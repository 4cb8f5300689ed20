"""A short run of bench/hostile.py: the token service under hostile load (issue 18).

200 connections for 6 s from 500 loopback addresses mixing forged, expired and mis-addressed
OpenID tokens, SSRF server names, oversized, malformed, slow-body and slow-header requests,
next to 20 well-behaved clients. ``make`` runs the 60 s, 1 000-connection version through
``bench/hostile.py``; the invariants are the same.
"""

from __future__ import annotations

from pathlib import Path

from bench.hostile import scenario
from matrixrtc.devstack import Synapse


async def test_hostile_load_gives_no_token_and_no_5xx(synapse: Synapse, run_dir: Path) -> None:
    report = await scenario(synapse, run_dir, seconds=6.0, connections=200)
    print(
        f"\nhostile: {report['hostile_answers']} answers {report['hostile_by_kind']}; "
        f"valid {report['valid_ok']} ok p99 {report['valid_p99_ms']} ms; "
        f"RSS {report['rss_mb']}; client errors {report['hostile_client_errors']}"
    )
    assert report["invariants"] == dict.fromkeys(report["invariants"], True), report
    kinds = report["hostile_by_kind"]
    assert all(sum(counts.values()) > 0 for counts in kinds.values()), kinds
    assert set(kinds["slow_header"]) <= {"408", "closed"}, kinds["slow_header"]
    assert set(kinds["slow_body"]) <= {"408", "429", "closed"}, kinds["slow_body"]
    assert set(kinds["oversized"]) <= {"413", "429", "closed"}, kinds["oversized"]
    assert set(kinds["malformed"]) <= {"400", "429"}, kinds["malformed"]
    for kind in ("forged", "expired", "wrong_server", "ssrf"):
        assert set(kinds[kind]) <= {"401", "429"}, (kind, kinds[kind])
