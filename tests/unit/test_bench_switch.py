"""bench/switch.py's figures: the reported gap is the largest over every run, and each
largest gap is placed against its receiver's cutover (old path, across it, new path)."""

from __future__ import annotations

from typing import Any

from bench.switch import _phase, aggregate


def _run(to_sfu: int, to_mesh: int) -> dict[str, Any]:
    return {
        "mesh_to_sfu": to_sfu,
        "sfu_to_mesh": to_mesh,
        "detail": {
            "mesh_to_sfu": {"largest": {"phase": "new path"}},
            "sfu_to_mesh": {"largest": {"phase": "across cutover"}},
        },
        "in_switch_gap_ms": {"mesh_to_sfu": to_sfu, "sfu_to_mesh": to_mesh},
        "steady_gap_ms": {"mesh": 70, "sfu": 80},
        "busy_cores": {},
    }


def test_aggregate_reports_the_largest_gap_of_all_runs_with_the_median() -> None:
    out = aggregate([_run(90, 40), _run(300, 60), _run(80, 50)])
    assert (out["mesh_to_sfu"], out["sfu_to_mesh"]) == (300, 60)
    assert out["median"] == {"mesh_to_sfu": 90, "sfu_to_mesh": 50}
    assert out["switches"] == 3
    assert out["each"]["mesh_to_sfu"] == [90, 300, 80]
    assert out["steady"] == {"mesh_to_sfu": [80] * 3, "sfu_to_mesh": [70] * 3}


def test_phase_places_a_gap_against_the_receivers_cutover_of_that_sender() -> None:
    reports = [{"user": "@sw1:hs", "cut_at": {"@sw0:hs": {"sfu": 10.0}}}]

    def gap(start: float, end: float) -> dict[str, Any]:
        return {"receiver": "sw1", "sender": "sw0", "start": start, "end": end}

    assert _phase(reports, gap(9.0, 9.5), "sfu") == "old path"
    assert _phase(reports, gap(9.9, 10.1), "sfu") == "across cutover"
    assert _phase(reports, gap(10.5, 10.7), "sfu") == "new path"
    assert _phase(reports, gap(9.0, 9.5), "mesh") == "no cutover"
    assert _phase(reports, {"ms": 0}, "sfu") == "none"
