"""Simulcast on the SFU, sans I/O: which layers a publisher sends, and the offer that says so.

A simulcast publisher sends each video frame at several sizes, each layer on its own SSRC
within one m-section, told apart by the RID header extension (RFC 8851/8852) that every
packet of a layer carries; the SFU forwards to each subscriber the layer it asked for. This is
how livekit-client (and so Element Call) publishes: layers ``q`` (quarter), ``h`` (half) and
``f`` (full), from the smallest, announced in ``AddTrackRequest.layers`` with their quality,
size and bitrate, and in the offer as ``a=rid:<rid> send`` lines, one ``a=simulcast:send``
line and the RID extension's ``a=extmap``.

aiortc cannot offer simulcast, so :func:`simulcast_offer` rewrites the video m-section of its
offer before it goes to the server: RID lines and extension added, ``a=ssrc`` / ``a=ssrc-group``
lines removed (pion then learns each layer's SSRC from the RID on its first packets), and RTX
payload types removed (a retransmission goes out on the layer's own SSRC: aiortc would send
every layer's RTX on one SSRC, which pion could not attribute).

:func:`layers_for` is the plan: two layers for our small sources, ``q`` at half the width and
height (a quarter of the pixels) and ``h`` at the full size, as livekit-client names a
two-layer publication.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "RID_EXTENSION_URI",
    "Quality",
    "SimulcastLayer",
    "layers_for",
    "simulcast_offer",
]

RID_EXTENSION_URI: Final = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id"

Quality = Literal["low", "medium", "high"]


@dataclass(frozen=True, slots=True)
class SimulcastLayer:
    rid: str
    quality: Quality
    width: int
    height: int
    bitrate: int  # bit/s the layer's encoder targets


# The low layer's share of the full layer's bitrate: a quarter of the pixels, and VP8 needs a
# little more per pixel at small sizes.
LOW_BITRATE_SHARE: Final = 0.3
MIN_LAYER_SIDE: Final = 16  # below this (either side) a layer is not worth sending


def layers_for(width: int, height: int, bitrate: int) -> tuple[SimulcastLayer, ...]:
    """The layers of a ``width`` × ``height`` source at ``bitrate``, smallest first: ``q`` at
    half each side and ``h`` at the full size; one layer (``h``) if half would be too small."""
    full = SimulcastLayer("h", "medium", width, height, bitrate)
    w, h = _even(width // 2), _even(height // 2)
    if w < MIN_LAYER_SIDE or h < MIN_LAYER_SIDE:
        return (full,)
    low = SimulcastLayer("q", "low", w, h, max(1, int(bitrate * LOW_BITRATE_SHARE)))
    return (low, full)


def _even(n: int) -> int:
    return n - n % 2  # VP8's 4:2:0 wants even sides


_SSRC_LINE: Final = re.compile(r"^a=ssrc(-group)?:")
_RTPMAP: Final = re.compile(r"^a=rtpmap:(\d+) ([^/]+)/")
_FMTP_OR_FB: Final = re.compile(r"^a=(fmtp|rtcp-fb):(\d+)[ ]")
_EXTMAP: Final = re.compile(r"^a=extmap:(\d+)")


def simulcast_offer(sdp: str, mid: str, rids: tuple[str, ...]) -> tuple[str, int]:
    """``sdp`` (an offer) with the m-section ``mid`` rewritten to send the ``rids`` layers
    (module docstring), and the RID extension's id in it. Raises ValueError if no m-section
    has that mid or ``rids`` is empty."""
    if not rids:
        raise ValueError("simulcast needs at least one rid")
    newline = "\r\n" if "\r\n" in sdp else "\n"
    lines = sdp.split(newline)
    trailing = lines[-1] == ""
    if trailing:
        lines.pop()
    ext_id = _free_extension_id(lines)
    starts = [i for i, line in enumerate(lines) if line.startswith("m=")] + [len(lines)]
    for start, end in itertools.pairwise(starts):
        section = lines[start:end]
        if f"a=mid:{mid}" in section:
            rewritten = _rewrite(section, rids, ext_id)
            out = lines[:start] + rewritten + lines[end:]
            return newline.join(out) + (newline if trailing else ""), ext_id
    raise ValueError(f"the offer has no m-section with mid {mid!r}")


def _free_extension_id(lines: list[str]) -> int:
    """An extension id no m-section of the offer uses. Ids are per section in SDP, but the
    sections share one BUNDLE transport and pion reads a packet's extensions with one map for
    all of them: with the audio section first, aiortc's ``ssrc-audio-level`` has id 2, and a
    RID on id 2 in the video section was never read, so LiveKit never saw the layers."""
    used = {int(m.group(1)) for line in lines if (m := _EXTMAP.match(line))}
    free = [i for i in range(1, 15) if i not in used]  # one-byte header ids (RFC 8285)
    if not free:
        raise ValueError("the offer uses every one-byte header extension id")
    return free[0]


def _rewrite(section: list[str], rids: tuple[str, ...], ext_id: int) -> list[str]:
    rtx = {m.group(1) for line in section if (m := _RTPMAP.match(line)) and m.group(2) == "rtx"}
    out: list[str] = []
    last_extmap = -1
    for line in section:
        if _SSRC_LINE.match(line):
            continue
        m = _RTPMAP.match(line) or _FMTP_OR_FB.match(line)
        if m is not None and m.group(2 if m.re is _FMTP_OR_FB else 1) in rtx:
            continue
        if line.startswith("m="):
            words = line.split(" ")
            line = " ".join(words[:3] + [pt for pt in words[3:] if pt not in rtx])
        out.append(line)
        if _EXTMAP.match(line):
            last_extmap = len(out) - 1
    at = last_extmap + 1 if last_extmap >= 0 else 1
    out.insert(at, f"a=extmap:{ext_id} {RID_EXTENSION_URI}")
    out += [f"a=rid:{rid} send" for rid in rids]
    out.append("a=simulcast:send " + ";".join(rids))
    return out
