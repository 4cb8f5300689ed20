"""bench/_host.py: the machine's CPU figures that benchmarks print beside their own."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench._host import (
    CpuSample,
    UdpSample,
    busy_cores,
    cpu_sample,
    lower_cpu_weight,
    parse_cpu_line,
    parse_snmp_udp,
    parse_udp_socket_drops,
    process_cpu,
    steal_cores,
    udp_drops,
)

# user nice system idle iowait irq softirq steal guest guest_nice, in ticks of 1/100 s
LINE = "cpu  1000 20 300 5000 80 0 40 160 500 0"


def test_each_field_lands_where_the_kernel_puts_it() -> None:
    s = parse_cpu_line(LINE, tick=100)
    assert s.total == pytest.approx(66.0)  # guest is inside user already: not added again
    assert s.busy == pytest.approx(66.0 - 50.0 - 0.8)  # idle and iowait are not busy
    assert s.stolen == pytest.approx(1.6)


def test_an_old_kernel_line_without_steal_reads_as_none_stolen() -> None:
    s = parse_cpu_line("cpu 100 0 100 800", tick=100)
    assert (s.busy, s.total, s.stolen) == (2.0, 10.0, 0.0)


@pytest.mark.parametrize("line", ["", "cpu0 1 2 3 4 5", "cpu 1 2", "intr 1 2 3 4 5"])
def test_anything_but_the_aggregate_line_is_refused(line: str) -> None:
    with pytest.raises(ValueError, match="aggregate cpu line"):
        parse_cpu_line(line)


def test_cores_are_shares_of_the_span_times_the_cores() -> None:
    since = CpuSample(busy=10.0, total=100.0, stolen=1.0)
    # 20 CPU-seconds passed on 2 cores (10 s of wall time): 15 busy, 4 of them stolen
    until = CpuSample(busy=25.0, total=120.0, stolen=5.0)
    assert busy_cores(since, until, cores=2) == 1.5
    assert steal_cores(since, until, cores=2) == 0.4
    assert busy_cores(since, since, cores=2) == 0.0  # no time passed: nothing, not a crash


def test_this_machine_reads() -> None:
    s = cpu_sample()
    assert 0 <= s.stolen <= s.busy <= s.total
    assert s.total > 0


def test_process_cpu_reads_a_running_process_and_skips_others() -> None:
    used = process_cpu({"me": os.getpid(), "gone": 2**22 + 7, "never": None})
    assert set(used) == {"me"}
    assert used["me"] > 0


SNMP = """Ip: Forwarding DefaultTTL
Ip: 1 64
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors
Udp: 1991010 5075 543686 2540444 543600 0 0
UdpLite: InDatagrams NoPorts
UdpLite: 0 0
"""

# /proc/net/udp, its columns shortened: local address (port in hex) ... drops last
UDP = """   sl  local_address rem_address   st ... inode ref pointer drops
  12: 0100007F:4E52 00000000:0000 07 ... 1 2 0000000000000000 17
  13: 0100007F:0035 00000000:0000 07 ... 3 2 0000000000000000 0
"""


def test_udp_counters_come_from_their_own_columns() -> None:
    assert parse_snmp_udp(SNMP) == (1991010, 543600)  # RcvbufErrors, not InErrors
    assert parse_udp_socket_drops(UDP, 0x4E52) == 17
    assert parse_udp_socket_drops(UDP, 53) == 0
    assert parse_udp_socket_drops(UDP, 0x35 + 1) is None
    with pytest.raises(ValueError, match="Udp"):
        parse_snmp_udp("Ip: 1\nIp: 2\n")


def test_udp_drops_between_two_samples() -> None:
    since = UdpSample(received=100, rcvbuf_dropped=5, port_dropped=2)
    until = UdpSample(received=1100, rcvbuf_dropped=45, port_dropped=2)
    assert udp_drops(since, until) == {"received": 1000, "dropped": 40, "at_port": 0}
    assert udp_drops(since, UdpSample(1100, 45, None))["at_port"] is None


def test_lower_cpu_weight_reaches_every_thread_and_the_session_group() -> None:
    """What bench/switch.py does to Synapse: a child in its own session (as devstack starts
    services), with a second thread, ends at the nice asked for, thread by thread, and so does
    its scheduler autogroup where the kernel has them."""
    code = (
        "import threading, time; "
        "threading.Thread(target=time.sleep, args=(30,)).start(); time.sleep(30)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        tasks = Path(f"/proc/{child.pid}/task")
        for _ in range(200):  # until its second thread runs
            if len(list(tasks.iterdir())) >= 2:
                break
            time.sleep(0.01)
        got = lower_cpu_weight(child.pid, 15)
        assert got["threads"] == 15
        for task in tasks.iterdir():  # every thread, not just the main one
            assert os.getpriority(os.PRIO_PROCESS, int(task.name)) == 15
        group = Path(f"/proc/{child.pid}/autogroup")
        enabled = Path("/proc/sys/kernel/sched_autogroup_enabled")
        if group.exists() and enabled.exists() and enabled.read_text().strip() == "1":
            assert got["autogroup"] == 15
            assert "nice 15" in group.read_text()
    finally:
        child.kill()
        child.wait()


def test_switch_bench_refuses_a_nice_it_could_not_apply(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A nice outside -20..19, or a negative one without root, is refused before any stack
    starts, with a line that says why (not a PermissionError traceback once Synapse is up)."""
    from bench import switch

    with pytest.raises(SystemExit) as exit_:
        switch.main(["--homeserver-nice", "25"])
    assert exit_.value.code == 2
    assert "from -20 to 19" in capsys.readouterr().err
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SystemExit) as exit_:
        switch.main(["--homeserver-nice", "-5"])
    assert exit_.value.code == 2
    assert "needs root" in capsys.readouterr().err
