"""``call-test --html FILE``: one self-contained HTML page (inline SVG, no script, no external
resource) with, per receiving pair, frame-rate, bitrate and decrypt-failure timelines, and the
call's joins, leaves, key rotations and transport switches marked on every plot.

Pure: it reads the participants' once-a-second reports (``stats`` lines) and the final
report; the caller writes the page.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["Marker", "call_markers", "pair_series", "render_html"]

Marker = tuple[int, str, str]  # (wall ms, kind, label)

_W, _H, _PAD = 560, 90, 28
_COLORS = {"join": "#2a7", "leave": "#c33", "key": "#b80", "switch": "#36c"}


def pair_series(
    samples: Sequence[Mapping[str, Any]],
) -> dict[str, list[tuple[int, float, float | None, int]]]:
    """Per sending peer id: (wall ms, fps, kbit/s or None, decrypt failures in the interval)
    between consecutive reports of one receiver."""
    out: dict[str, list[tuple[int, float, float | None, int]]] = {}
    prev: dict[str, tuple[int, int, int]] = {}
    for s in samples:
        t = int(s["t_ms"])
        for peer in s.get("peers", []):
            pid = str(peer["id"])
            frames = int(peer.get("frames_decoded") or 0)
            fails = int(peer.get("decrypt_failures") or 0)
            if pid in prev and t > prev[pid][0]:
                t0, f0, d0 = prev[pid]
                fps = max(0, frames - f0) / ((t - t0) / 1000)
                kbps = peer.get("kbps_in")
                out.setdefault(pid, []).append(
                    (t, fps, None if kbps is None else float(kbps), max(0, fails - d0))
                )
            prev[pid] = (t, frames, fails)
    return out


def call_markers(
    runs: Sequence[tuple[str, Sequence[Mapping[str, Any]], Mapping[str, Any] | None]],
) -> list[Marker]:
    """Joins, leaves, key rotations (a participant's sending key index changing) and transport
    switches, from ``(name, stats samples, final report)`` per participant."""
    marks: list[Marker] = []
    for name, samples, final in runs:
        first = samples[0] if samples else final
        if first is not None and first.get("joined_at_ms") is not None:
            marks.append((int(first["joined_at_ms"]), "join", f"{name} joined"))
        if final is not None:
            marks.append((int(final["t_ms"]), "leave", f"{name} left"))
        index = None
        seen_switches: set[tuple[Any, ...]] = set()
        for s in [*samples, *([final] if final else [])]:
            k = s.get("key_index")
            if k is not None and index is not None and k != index:
                marks.append((int(s["t_ms"]), "key", f"{name} key {index}\u2192{k}"))
            index = k if k is not None else index
            for sw in s.get("switches", []):
                key = (sw.get("at_ms"), sw.get("from"), sw.get("to"))
                if sw.get("at_ms") and key not in seen_switches:
                    seen_switches.add(key)
                    label = f"{name} {sw.get('from') or 'start'}\u2192{sw.get('to')}"
                    marks.append((int(sw["at_ms"]), "switch", label))
    # one marker per (time, kind, label): the final report repeats the last sample's switches
    return sorted(set(marks))


def _plot(
    points: Sequence[tuple[int, float]],
    t0: int,
    t1: int,
    marks: Sequence[Marker],
    title: str,
    y_max: float,
    unit: str,
    ref: float | None = None,
) -> str:
    span = max(1, t1 - t0)
    top = max(y_max, max((v for _, v in points), default=0.0), 1e-9)

    def x(t: int) -> float:
        return _PAD + (t - t0) / span * (_W - 2 * _PAD)

    def y(v: float) -> float:
        return _H - 14 - v / top * (_H - 28)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
        f'role="img" aria-label="{html.escape(title)}">',
        f'<rect x="0" y="0" width="{_W}" height="{_H}" fill="#fff" stroke="#ddd"/>',
        f'<text x="4" y="11" font-size="10">{html.escape(title)} (max {top:.0f} {unit})</text>',
    ]
    for t, kind, label in marks:
        if t0 <= t <= t1:
            parts.append(
                f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="14" y2="{_H - 14}" '
                f'stroke="{_COLORS[kind]}" stroke-dasharray="3,2"><title>'
                f"{html.escape(label)}</title></line>"
            )
    if ref is not None:
        parts.append(
            f'<line x1="{_PAD}" x2="{_W - _PAD}" y1="{y(ref):.1f}" y2="{y(ref):.1f}" '
            'stroke="#bbb" stroke-width="0.5"/>'
        )
    if points:
        path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in points)
        parts.append(f'<polyline fill="none" stroke="#222" stroke-width="1.2" points="{path}"/>')
    parts.append(
        f'<text x="{_PAD}" y="{_H - 2}" font-size="9">0 s</text>'
        f'<text x="{_W - _PAD - 30}" y="{_H - 2}" font-size="9">{span / 1000:.0f} s</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


def render_html(
    report: Mapping[str, Any],
    runs: Sequence[tuple[str, Sequence[Mapping[str, Any]], Mapping[str, Any] | None]],
    names: Mapping[str, str],
) -> str:
    """The page: the report's title and steady-state line, a legend, then per receiver and
    sending peer three timelines (fps against the sent rate, kbit/s, decrypt failures)."""
    marks = call_markers(runs)
    times = [int(s["t_ms"]) for _, samples, _ in runs for s in samples]
    times += [m[0] for m in marks]
    t0, t1 = (min(times), max(times)) if times else (0, 1)
    fps = float(report.get("fps", 15))
    title = (
        f"{report.get('transport', 'mesh')} call: {len(runs)} participants, "
        f"{report.get('resolution')} @ {fps:g} fps, E2EE {'on' if report.get('e2ee') else 'off'}"
    )
    body = [f"<h1>{html.escape(title)}</h1>"]
    w = report.get("window") or {}
    if "min_fps_ratio" in w:
        body.append(
            f"<p>steady state ({w.get('seconds')} s): min fps ratio {w['min_fps_ratio']}, "
            f"CPU {w.get('cpu_percent_per_participant')} % per participant, "
            f"{w.get('memory_mb_per_participant')} MiB per participant, "
            f"{w.get('decrypt_failures')} decrypt failures</p>"
        )
    legend = " ".join(f'<span style="color:{c}">&#9474; {k}</span>' for k, c in _COLORS.items())
    body.append(f"<p>markers (hover for who): {legend}</p>")
    body.append("<h2>events</h2><ul>")
    for t, kind, label in marks:
        body.append(f"<li>{(t - t0) / 1000:7.1f} s &mdash; {html.escape(label)} ({kind})</li>")
    body.append("</ul>")
    for name, samples, _ in runs:
        series = pair_series(samples)
        if not series:
            continue
        body.append(f"<h2>{html.escape(name)} receives</h2>")
        for pid, pts in sorted(series.items(), key=lambda kv: names.get(kv[0], kv[0])):
            who = names.get(pid, pid)
            kbps = [(t, k) for t, _, k, _ in pts if k is not None]
            body.append(f"<h3>from {html.escape(who)}</h3><div>")
            body.append(
                _plot([(t, f) for t, f, _, _ in pts], t0, t1, marks, "fps", fps * 1.2, "fps",
                      ref=fps)
            )  # fmt: skip
            if kbps:
                body.append(_plot(kbps, t0, t1, marks, "kbit/s", 100.0, "kbit/s"))
            body.append(
                _plot([(t, float(d)) for t, _, _, d in pts], t0, t1, marks,
                      "decrypt failures per interval", 1.0, "")
            )  # fmt: skip
            body.append("</div>")
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>"
        f"{html.escape(title)}</title><style>body{{font-family:sans-serif;margin:1em}}"
        "svg{margin:2px}h3{font-size:0.9em;margin:0.4em 0}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )
