"""call-test --html: per-pair series from the once-a-second reports, the call's markers, and a
self-contained page (inline SVG only)."""

from __future__ import annotations

import re
from typing import Any

from matrixrtc.calltest.html import call_markers, pair_series, render_html


def _s(t: int, frames: int, fails: int, key: int, **extra: Any) -> dict[str, Any]:
    return {
        "t_ms": t,
        "joined_at_ms": 1_000,
        "key_index": key,
        "peers": [{"id": "@b:hs|DB", "frames_decoded": frames, "decrypt_failures": fails,
                   "kbps_in": 380.0}],
        **extra,
    }  # fmt: skip


SAMPLES = [
    _s(2_000, 0, 0, 0),
    _s(3_000, 15, 0, 0),
    _s(4_000, 30, 2, 1),  # a rotation, and two frames that did not decrypt
    _s(5_000, 37, 2, 1, switches=[{"at_ms": 4_500, "from": "mesh", "to": "sfu"}]),
]
FINAL = {**_s(5_500, 44, 2, 1), "switches": [{"at_ms": 4_500, "from": "mesh", "to": "sfu"}]}


def test_pair_series_rates_and_interval_failures() -> None:
    (series,) = pair_series(SAMPLES).values()
    assert [round(f, 1) for _, f, _, _ in series] == [15.0, 15.0, 7.0]
    assert [d for *_, d in series] == [0, 2, 0]
    assert series[0][2] == 380.0


def test_markers_joins_leaves_rotations_switches_once_each() -> None:
    marks = call_markers([("a", SAMPLES, FINAL)])
    assert marks == [
        (1_000, "join", "a joined"),
        (4_000, "key", "a key 0\u21921"),
        (4_500, "switch", "a mesh\u2192sfu"),
        (5_500, "leave", "a left"),
    ]


def test_page_is_self_contained_with_a_plot_per_series() -> None:
    report = {"transport": "auto", "resolution": "320x240", "fps": 15, "e2ee": True,
              "window": {"min_fps_ratio": 0.47, "seconds": 3.0}}  # fmt: skip
    page = render_html(report, [("a", SAMPLES, FINAL), ("b", [], None)], {"@b:hs|DB": "b"})
    assert page.startswith("<!doctype html>")
    assert "<script" not in page
    assert not re.search(r"(src|href)=", page)  # nothing fetched
    assert page.count("<svg") == 3  # a receives from b: fps, kbit/s, decrypt failures
    assert "from b" in page  # device ids shown as participant names
    assert "a mesh\u2192sfu" in page
    assert "a key 0\u21921" in page
    assert "a left" in page
    assert "min fps ratio 0.47" in page
