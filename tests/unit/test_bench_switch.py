"""bench/switch.py's figures: the reported gap is the largest over every run, and each
largest gap is placed against its receiver's cutover (old path, across it, new path)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any, cast

from bench._host import CpuSample
from bench.switch import _MARK, _cores_by_process, _phase, _Proc, aggregate


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
        "udp": {"received": 1000, "dropped": to_mesh, "at_port": None},
        "busy_cores_by_process": {},
    }


def test_aggregate_reports_the_largest_gap_of_all_runs_with_the_median() -> None:
    out = aggregate([_run(90, 40), _run(300, 60), _run(80, 50)])
    assert (out["mesh_to_sfu"], out["sfu_to_mesh"]) == (300, 60)
    assert out["median"] == {"mesh_to_sfu": 90, "sfu_to_mesh": 50}
    assert [u["dropped"] for u in out["udp"]] == [40, 60, 50]  # each run's, in order
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


def test_cores_by_process_over_a_window_with_a_process_that_started_in_it() -> None:
    cores = os.cpu_count() or 1
    # 2 s of wall time: 2 * cores CPU seconds in total, 1.5 of them busy.
    since = (CpuSample(10.0, 100.0, 0.0), {"sw0": 5.0, "synapse": 1.0})
    until = (
        CpuSample(11.5, 100.0 + 2.0 * cores, 0.0),
        {"sw0": 5.5, "synapse": 1.2, "sw3": 0.4, "new": 9.0},
    )
    out = _cores_by_process(since, until)
    # sw3 started in the window (counts from 0); "new" is no member and was not running at
    # the start: left out, its CPU falls in "other".
    assert out["sw0"] == 0.25
    assert out["synapse"] == 0.1
    assert out["sw3"] == 0.2
    assert "new" not in out
    assert out["other"] == round(1.5 / 2.0 * 1 - (0.25 + 0.1 + 0.2), 2)


class _ExitedProcess:
    """A member process that has exited while its last line is still unread."""

    def __init__(self) -> None:
        self.returncode = 0
        self.stdout = asyncio.StreamReader()


async def test_a_report_printed_just_before_the_member_exited_is_read() -> None:
    fake = _ExitedProcess()
    member = _Proc("sw0", cast(asyncio.subprocess.Process, fake))
    line = _MARK + json.dumps({"event": "report", "user": "@sw0:hs"}) + "\n"

    def arrive() -> None:
        fake.stdout.feed_data(line.encode())
        fake.stdout.feed_eof()

    asyncio.get_running_loop().call_later(0.05, arrive)
    await member._until(lambda: member.report is not None)
    assert member.report is not None
    assert member.report["user"] == "@sw0:hs"


async def test_a_report_line_longer_than_asyncios_default_limit_is_read(tmp_path: Path) -> None:
    report = '{"event": "report", "user": "@sw0:hs", "gaps": ["x" * 1000] * 300}'  # ~300 KB
    code = f"import json; print({_MARK!r} + json.dumps({report}))"
    member = await _Proc.spawn("sw0", [sys.executable, "-c", code], tmp_path / "sw0.log")
    await member._until(lambda: member.report is not None)
    assert member.report is not None
    assert len(member.report["gaps"]) == 300
    await member.proc.wait()
    await member.kill()
