"""Diagnostics: where the frames that end the gaps of ``bench/switch.py`` spent their time.

Sets the per-member traces (``MATRIXRTC_FRAME_TRACE=1 BENCH_SWITCH_DUMP=D.jsonl``) beside the
packet times of ``bench/rtp_sniff.py`` (same run, same namespace) and prints, for each gap over
``--ms`` in each switch window, the frame that ended it (and the one before it), per hop in ms:
encoder fan-out → the RTP sender took it → its last packet left the sender's process (kernel)
→ [the SFU forwarded its last packet (kernel)] → the receiver's loop had it whole (arrival).

    python bench/split_transit.py D.jsonl PACKETS.json [--ms 100]
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import statistics
from pathlib import Path
from typing import Any

M32 = 0xFFFFFFFF


def _offset(
    pkts: list[tuple[float, int]], events: list[tuple[float, int]], lo: float, hi: float
) -> tuple[int, int, float]:
    """The most common (RTP ts - event value) among packets [ev + lo, ev + hi] after an event,
    how many events agree on it, and the median |packet time - event time| of those: every
    member sends the same clip, so only the delay tells senders apart."""
    times = [p[0] for p in pkts]
    votes: collections.Counter[int] = collections.Counter()
    for t, v in events:
        i = bisect.bisect_left(times, t + lo)
        j = bisect.bisect_right(times, t + hi)
        for _, ts in pkts[i:j]:
            votes[(ts - v) & M32] += 1
    if not votes:
        return 0, 0, 1.0
    # Every frame in the window votes for one offset per frame near it (they are 6000
    # apart): of the offsets with about the most votes, the one with the shortest delay.
    top = votes.most_common(1)[0][1]
    best = (0, 0, 1.0)
    for off, n in votes.items():
        if n < 0.8 * top:
            continue
        delays = []
        for t, v in events:
            i = bisect.bisect_left(times, t + lo)
            j = bisect.bisect_right(times, t + hi)
            delays += [abs(pt - t) for pt, ts in pkts[i:j] if (ts - v) & M32 == off]
        d = statistics.median(delays) if delays else 1.0
        if d < best[2]:
            best = (off, n, d)
    return best


def _pick(cands: list[tuple[int, int, float, str]]) -> tuple[int, int, float, str]:
    """Of (offset, votes, delay, who): the shortest delay among those with most votes."""
    top = max((c[1] for c in cands), default=0)
    good = [c for c in cands if c[1] >= 0.6 * top and top > 0]
    return min(good, key=lambda c: c[2]) if good else (0, 0, 1.0, "")


def analyse(run: dict[str, Any], packets: list[list[Any]], ms: int) -> None:
    reports = run["reports"]
    name = {r["user"]: r["user"].split(":")[0].lstrip("@") for r in reports}
    t_lo = run["t_join"] - 2
    t_hi = run["t_back"] + 3
    pk = [p for p in packets if t_lo <= p[0] <= t_hi]
    ports: collections.Counter[int] = collections.Counter()
    for p in pk:
        ports[p[1]] += 1
        ports[p[2]] += 1
    pair_ports: collections.Counter[int] = collections.Counter()
    for sp, dp in {(p[1], p[2]) for p in pk}:
        pair_ports[sp] += 1
        pair_ports[dp] += 1
    sfu_port = pair_ports.most_common(1)[0][0]
    # Video flows: (sport, dport, ssrc) with frame-end (marker) packets of the video PT.
    by_pt = collections.Counter(p[7] for p in pk if p[8] > 300)
    video_pt = {pt for pt, _ in by_pt.most_common(2)}
    flows: dict[tuple[int, int, int], list[list[Any]]] = collections.defaultdict(list)
    for p in pk:
        if p[7] in video_pt:
            flows[(p[1], p[2], p[3])].append(p)
    flows = {k: v for k, v in flows.items() if len(v) > 50}
    # Who sends each flow: its RTP ts minus the sender's pts (the RTP sender's pickups).
    pickups = {
        (r["user"], lab): [(t, pts) for lab2, t, pts in r["pickup_trace"] if lab2 == lab]
        for r in reports
        for lab in ("mesh", "sfu")
    }
    info: dict[tuple[int, int, int], dict[str, Any]] = {}
    for key, rows in flows.items():
        marks = sorted((p[0], p[5]) for p in rows if p[6])
        if not marks:
            continue
        upstream = key[1] == sfu_port
        downstream = key[0] == sfu_port
        lab = "sfu" if upstream or downstream else "mesh"
        cands = []
        for (user, lab2), ev in pickups.items():
            if lab2 != lab or not ev:
                continue
            cands.append((*_offset(marks, ev, 0.0, 0.4 if downstream else 0.15), user))
        c = _pick(cands)
        best = (c[0], c[1], c[3])
        info[key] = {"sender": best[2], "pts_off": best[0], "votes": best[1],
                     "n": len(marks), "kind": "up" if upstream else "down" if downstream
                     else "mesh", "rows": sorted(rows)}  # fmt: skip
        if upstream:
            continue
        # Who receives it: its RTP ts minus the receiver's mapped ts (rx trace).
        cands = []
        for r in reports:
            ev = [(t, ts) for lab2, t, ts, _b in r["rx_trace"]
                  if lab2.startswith(f"{lab} {best[2]}")]  # fmt: skip
            if ev:
                cands.append((*_offset(marks, ev, -0.4, 0.0), r["user"]))
        c = _pick(cands)
        bestr = (c[0], c[1], c[3])
        info[key].update(receiver=bestr[2], rx_off=bestr[0], rx_votes=bestr[1])
    print(f"  sfu port {sfu_port}; video flows:")
    for key, i in sorted(info.items(), key=lambda kv: (kv[1]["kind"], kv[1]["sender"])):
        print(
            f"   {i['kind']:4} {key} {name.get(i['sender'], '?')}->"
            f"{name.get(i.get('receiver', ''), 'sfu')} frames {i['n']} votes {i['votes']}"
            f"/{i.get('rx_votes', '-')}"
        )

    def first_last(key: tuple[int, int, int], ts: int) -> tuple[float, float] | None:
        rows = [p for p in info[key]["rows"] if p[5] == ts]
        return (rows[0][0], rows[-1][0]) if rows else None

    def hops(row: list[Any], rcv: str, snd: str, via: str, start: float) -> str:
        down = [k for k, i in info.items() if i.get("receiver") == rcv and i["sender"] == snd
                and i["kind"] == ("down" if via == "sfu" else "mesh")]  # fmt: skip
        if not down:
            return "no flow"
        d = info[down[0]]
        ts_down = (row[2] + d["rx_off"]) & M32
        pts = (ts_down - d["pts_off"]) & M32

        def rel(t: float | None) -> str:
            return "-" if t is None else f"{(t - start) * 1000:.0f}"

        fan = next((t[3] for t in next(r for r in reports if r["user"] == snd)["frame_trace"]
                    if t[0] == via and t[4] == pts), None)  # fmt: skip
        pick = next((t for t, p in pickups[(snd, via)] if p == pts), None)
        fl_down = first_last(down[0], ts_down)
        up_s = ""
        if via == "sfu":
            ups = [k for k, i in info.items() if i["kind"] == "up" and i["sender"] == snd]
            fl_up = first_last(ups[0], (pts + info[ups[0]]["pts_off"]) & M32) if ups else None
            up_s = f" up {rel(fl_up[0]) if fl_up else '-'}..{rel(fl_up[1]) if fl_up else '-'}"
        return (
            f"fan {rel(fan)} pick {rel(pick)}{up_s} down "
            f"{rel(fl_down[0]) if fl_down else '-'}..{rel(fl_down[1]) if fl_down else '-'}"
            f" rx {rel(row[1])}"
        )

    for window, since, until in (("mesh_to_sfu", run["t_join"], run["t_leave"]),
                                 ("sfu_to_mesh", run["t_leave"], run["t_back"])):  # fmt: skip
        print(f"  {window}:")
        for r in reports:
            for peer, start, end, via, _open in r["gaps"]:
                if not (start >= since and end < until and (end - start) * 1000 > ms):
                    continue
                rx = [row for row in r["rx_trace"]
                      if row[0].startswith(f"{via} {peer}")]  # fmt: skip
                ends = [row for row in rx if abs(row[1] - end) < 0.002]
                line = (f"   +{(start - since) * 1000:5.0f} {(end - start) * 1000:4.0f} ms "
                        f"{name[peer]}->{name[r['user']]} via {via}:")  # fmt: skip
                if not ends:
                    print(line, "no rx row at the gap's end")
                    continue
                k = rx.index(ends[0])
                for tag, row in (("before", rx[k - 1] if k else None), ("after", rx[k])):
                    if row is None:
                        continue
                    line += f" [{tag} " + hops(row, r["user"], peer, via, start) + "]"
                print(line)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dump")
    parser.add_argument("packets")
    parser.add_argument("--ms", type=int, default=100)
    args = parser.parse_args()
    packets = sorted(json.loads(Path(args.packets).read_text()))
    for n, line in enumerate(Path(args.dump).read_text().splitlines()):
        print(f"run {n}")
        analyse(json.loads(line), packets, args.ms)


if __name__ == "__main__":
    main()
