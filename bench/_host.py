"""What the machine's CPU did while a benchmark ran, from ``/proc``: how many cores were busy,
how many the hypervisor took for other guests (steal), and each benchmark process's own share.
On a shared host, figures from a run where the host took a large share are the host's, not
ours; benchmarks report these beside their figures so a reader can tell."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CpuSample",
    "UdpSample",
    "busy_cores",
    "cpu_sample",
    "lower_cpu_weight",
    "parse_cpu_line",
    "parse_snmp_udp",
    "parse_udp_socket_drops",
    "process_cpu",
    "process_cpu_s",
    "steal_cores",
    "udp_drops",
    "udp_sample",
]

_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class CpuSample:
    """CPU seconds since boot, summed over every core."""

    busy: float  # everything but idle and iowait (includes ``stolen``)
    total: float
    stolen: float  # the hypervisor ran someone else while this guest had work


def parse_cpu_line(line: str, tick: float = _TICK) -> CpuSample:
    """The aggregate ``cpu`` line of ``/proc/stat`` (``cpu user nice system idle iowait irq
    softirq steal guest guest_nice``, in ticks). Older kernels give fewer fields; guest time is
    already inside user and nice, so it is not added again."""
    name, *rest = line.split() or [""]
    if name != "cpu" or len(rest) < 4:
        raise ValueError(f"not the aggregate cpu line of /proc/stat: {line!r}")
    ticks = [float(x) for x in rest[:8]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0.0)
    total = sum(ticks)
    stolen = ticks[7] if len(ticks) > 7 else 0.0
    return CpuSample(busy=(total - idle) / tick, total=total / tick, stolen=stolen / tick)


def cpu_sample() -> CpuSample:
    return parse_cpu_line(Path("/proc/stat").read_text().split("\n", 1)[0])


def _cores(used: float, since: CpuSample, until: CpuSample, cores: int | None) -> float:
    span = until.total - since.total
    return round(used / span * (cores or os.cpu_count() or 1), 2) if span > 0 else 0.0


def busy_cores(since: CpuSample, until: CpuSample, cores: int | None = None) -> float:
    """How many cores were busy on average between two samples (everything that ran)."""
    return _cores(until.busy - since.busy, since, until, cores)


def steal_cores(since: CpuSample, until: CpuSample, cores: int | None = None) -> float:
    """Of :func:`busy_cores`, how many the hypervisor took for others: our processes waited
    for a core they would otherwise have had."""
    return _cores(until.stolen - since.stolen, since, until, cores)


def process_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds (every thread) process ``pid`` has used so far; None if it
    is not running."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


def process_cpu(pids: Mapping[str, int | None]) -> dict[str, float]:
    """:func:`process_cpu_s` of each named process; one not running (yet, or any more) is
    left out."""
    out = {name: process_cpu_s(pid) for name, pid in pids.items()}
    return {name: s for name, s in out.items() if s is not None}


def lower_cpu_weight(pid: int, nice: int) -> dict[str, int | None]:
    """Give process ``pid`` (every thread it has now; later ones inherit it) the CPU weight of
    ``nice``, and its scheduler autogroup too where the kernel groups by session (a process
    started in its own session, as devstack services are, is weighed as a group against the
    others, so a thread's nice alone would not lower it). What it got, read back:
    ``{"threads": nice of the main thread, "autogroup": nice of its group (None: no
    autogroups)}``. Raising a nice needs no privilege."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.setpriority(os.PRIO_PROCESS, int(task.name), nice)
    autogroup: int | None = None
    group = Path(f"/proc/{pid}/autogroup")
    try:
        group.write_text(str(nice))
        autogroup = int(group.read_text().split("nice")[1])
    except (OSError, IndexError, ValueError):  # no autogroups here (or not ours to change)
        autogroup = None
    return {"threads": os.getpriority(os.PRIO_PROCESS, pid), "autogroup": autogroup}


@dataclass(frozen=True, slots=True)
class UdpSample:
    """This network namespace's UDP counters (``/proc/net/snmp``) and the drops of one socket
    (``/proc/net/udp``), all since they began."""

    received: int  # datagrams delivered to a socket
    rcvbuf_dropped: int  # datagrams dropped because the receiving socket's buffer was full
    port_dropped: int | None  # of those, the socket on ``port``'s (None: no such socket)


def parse_snmp_udp(text: str) -> tuple[int, int]:
    """(InDatagrams, RcvbufErrors) from ``/proc/net/snmp``: its two ``Udp:`` lines are the
    field names, then the values."""
    rows = [line.split()[1:] for line in text.splitlines() if line.startswith("Udp:")]
    if len(rows) < 2:
        raise ValueError("no Udp: lines in /proc/net/snmp")
    values = dict(zip(rows[0], rows[1], strict=False))
    return int(values["InDatagrams"]), int(values["RcvbufErrors"])


def parse_udp_socket_drops(text: str, port: int) -> int | None:
    """The ``drops`` column (the last) of the socket bound to local ``port`` in
    ``/proc/net/udp``; None if none is."""
    want = f":{port:04X}"
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 1 and fields[1].endswith(want):
            return int(fields[-1])
    return None


def udp_sample(port: int | None = None) -> UdpSample:
    received, dropped = parse_snmp_udp(Path("/proc/net/snmp").read_text())
    on_port = None
    if port is not None:
        on_port = parse_udp_socket_drops(Path("/proc/net/udp").read_text(), port)
    return UdpSample(received=received, rcvbuf_dropped=dropped, port_dropped=on_port)


def udp_drops(since: UdpSample, until: UdpSample) -> dict[str, int | None]:
    """What UDP lost between two samples: ``dropped`` datagrams of ``received + dropped``, and
    how many of them the socket on the samples' port (``at_port``) dropped."""
    at_port = None
    if since.port_dropped is not None and until.port_dropped is not None:
        at_port = until.port_dropped - since.port_dropped
    return {
        "received": until.received - since.received,
        "dropped": until.rcvbuf_dropped - since.rcvbuf_dropped,
        "at_port": at_port,
    }
