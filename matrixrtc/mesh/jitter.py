"""VP8 frame reassembly for mesh receivers that gives up on a lost packet instead of stalling.

aiortc's video ``JitterBuffer`` (capacity 512 packets in aiortc 1.16) hands frames on strictly in
sequence order and waits for a missing packet until 512 later packets have arrived; then it
drops just enough to fit and hands on **one** frame per arriving packet. In an 8-party mesh on
two cores this was the cliff of issue 19: one packet lost at a moment of overload (a socket
buffer overflowing while the process was off the CPU) and not recovered by NACK froze that pair
for 10–25 s (≈ 512 packets at ~1.5 packets per frame), then the backlog could only drain as
fast as new packets arrived (never, at one packet per frame), while every packet over capacity
raised a PLI, so the sender's shared encoder made key frames for *every* peer (one participant
counted 114 key frames in 40 s), which cost CPU everywhere and pushed other pairs over the edge.

:class:`FrameAssembler` keeps aiortc's interface (``add(packet) -> (pli, frame)``) but:

- a frame is complete at its marker bit, and every frame that becomes complete is handed on at
  once (``deliver``), not one per packet. A frame whose packets run straight into the next
  frame's start without a marker was cut short: an SFU switching layers (LiveKit's forwarder)
  stops the old layer mid-frame and renumbers the new one to follow on, so nothing looks lost.
  That frame is dropped (decrypting it fails its tag); the switch starts at a key frame, so
  nothing else is;
- a gap is waited on for ``give_up_s`` (time for aiortc's NACK and the sender's retransmission);
  then, or when ``capacity`` packets are held, the assembler skips to the next key frame it
  holds, or drops what it holds and waits for one, asking for it with one PLI (repeated every
  ``pli_interval_s`` while none arrives, never once per packet);
- after any skip, delta frames are dropped until a key frame (they would not decode);
- what a sender may put between frames is passed over: a packet without payload (padding on
  the media SSRC, which a sender without RTX uses for bandwidth probes) costs nothing, and a
  malformed frame boundary (a new timestamp on a packet that does not start a frame) drops that
  frame and waits for a key frame instead of blocking until ``capacity``;
- a receiver that only decrypts and counts a stream (``needs_key`` false: nothing decodes it
  or copies it) needs no key frame after a loss: every later frame that arrives whole is handed
  on (frame E2EE decrypts each frame alone) and no PLI is sent. At twelve SFU participants,
  each receiver decoding three of eleven videos, PLIs made every publisher encode ~1.4 key
  frames a second once the box fell behind (which receivers asked was not recorded);
- a packet far behind what was handed on (more than ``capacity``: a sender whose sequence
  numbers restarted, not a late retransmission) starts the assembler over at the next key frame.

Frame starts come from the VP8 payload descriptor (RFC 7741: S bit set, partition index 0);
key frames from the frame tag, which LiveKit's frame-E2EE format keeps in clear.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

from matrixrtc.mesh.transform import vp8_is_keyframe

__all__ = ["AssembledFrame", "FrameAssembler", "vp8_starts_frame"]

GIVE_UP_S: Final = 0.3
PLI_INTERVAL_S: Final = 0.5
CAPACITY: Final = 512
_MALFORMED: Final = -1  # _frame_end: no frame ends here, and none will
_CUT: Final = -2  # _frame_end: the next frame starts, but this one has no marker: cut short


def vp8_starts_frame(payload: bytes) -> bool:
    """The RTP packet's VP8 payload descriptor says it starts a frame (S=1, partition 0)."""
    return bool(payload) and bool(payload[0] & 0x10) and not payload[0] & 0x0F


class AssembledFrame:
    """What aiortc's decoder path reads from a jitter-buffer frame: ``data`` and ``timestamp``."""

    __slots__ = ("data", "keyframe", "timestamp")

    def __init__(self, data: bytes, timestamp: int, keyframe: bool) -> None:
        self.data = data
        self.timestamp = timestamp
        self.keyframe = keyframe


class FrameAssembler:
    """Drop-in for aiortc's video ``JitterBuffer`` on one receiver (see module doc).

    ``add`` takes an aiortc ``RtpPacket`` after depacketization (``sequence_number``,
    ``timestamp``, ``marker``, ``payload`` and the depayloaded ``_data``); every complete frame
    goes to ``deliver(frame, packet)`` (``packet``: the one that completed it), and ``add``
    returns ``(pli, None)``: aiortc sends a PLI when ``pli`` is true and hands nothing on itself.
    """

    def __init__(
        self,
        deliver: Callable[[AssembledFrame, Any], None],
        *,
        give_up_s: float = GIVE_UP_S,
        pli_interval_s: float = PLI_INTERVAL_S,
        capacity: int = CAPACITY,
        clock: Callable[[], float] = time.monotonic,
        on_skip: Callable[[], None] | None = None,
        needs_key: Callable[[], bool] | None = None,
    ) -> None:
        self._deliver = deliver
        self._needs_key = needs_key
        self._give_up_s = give_up_s
        self._pli_interval_s = pli_interval_s
        self.capacity = capacity
        self._clock = clock
        self._on_skip = on_skip
        self._packets: dict[int, Any] = {}  # extended sequence number -> packet
        self._next: int | None = None  # extended sequence number of the next frame's start
        self._gap_since: float | None = None
        self._need_key = True  # the first frame handed on is a key frame
        self._lost = False  # something undecodable was dropped since the last key frame
        self._last_pli: float | None = None
        self.frames = 0
        self.skips = 0  # gaps given up on
        self.dropped_frames = 0  # frames not handed on: cut short, or waiting for a key frame
        self.plis = 0

    def add(self, packet: Any) -> tuple[bool, None]:
        now = self._clock()
        seq = int(packet.sequence_number)
        if self._next is None:
            if not vp8_starts_frame(packet.payload):
                self._lost = True
                return self._ask_key(now), None
            self._next = seq
            ext = seq
        else:
            delta = (seq - self._next) & 0xFFFF
            if delta >= 0x8000:
                if 0x10000 - delta <= self.capacity:
                    return False, None  # older than what was handed on: late or duplicate
                # Far behind: the sender's sequence numbers restarted. Start over.
                self._packets.clear()
                self._next = None
                self._gap_since = None
                self._need_key = self._lost = True
                self.skips += 1
                if self._on_skip is not None:
                    self._on_skip()
                return self.add(packet)
            ext = self._next + delta
        self._packets.setdefault(ext, packet)
        self._drain(now)
        pli = False
        if self._packets and (
            len(self._packets) >= self.capacity
            or (self._gap_since is not None and now - self._gap_since >= self._give_up_s)
        ):
            self._skip()
            self._drain(now)
        if self._need_key and self._lost:
            pli = self._ask_key(now)  # at most every pli_interval_s until a key frame
        return pli, None

    def _keys_needed(self) -> bool:
        return self._needs_key is None or self._needs_key()

    def _ask_key(self, now: float) -> bool:
        if not self._keys_needed():
            return False
        if self._last_pli is not None and now - self._last_pli < self._pli_interval_s:
            return False
        self._last_pli = now
        self.plis += 1
        return True

    def _drain(self, now: float) -> None:
        """Hand on every complete frame from ``_next``; note when a gap starts blocking."""
        assert self._next is not None
        while self._packets:
            first = self._packets.get(self._next)
            if first is not None and not first.payload:
                del self._packets[self._next]  # padding between frames: nothing lost
                self._next += 1
                continue
            if first is not None and not vp8_starts_frame(first.payload):
                # The middle of a frame whose start was skipped or lost: unusable.
                del self._packets[self._next]
                self._next += 1
                self._need_key = self._lost = True
                continue
            end = None if first is None else self._frame_end(self._next, first.timestamp)
            if first is not None and end == _MALFORMED:
                # A new timestamp on a packet that does not start a frame: this frame's end
                # is unknowable. Drop it (the next packet is dropped as a frame's middle).
                self._drop_frame(first.timestamp)
                self._need_key = self._lost = True
                continue
            if first is not None and end == _CUT:
                # Cut short (an SFU's layer switch): drop it. A key frame next needs nothing
                # more; a delta frame next would not decode without this one.
                self._drop_frame(first.timestamp)
                self.dropped_frames += 1
                if not vp8_is_keyframe(self._packets[self._next]._data):
                    self._need_key = self._lost = True
                continue
            if first is None or end is None:
                # Blocked: a missing packet (a gap, if anything later is held) or a frame
                # still arriving.
                if self._gap_since is None and self._holds_past_gap():
                    self._gap_since = now
                return
            parts = [self._packets.pop(s) for s in range(self._next, end + 1)]
            self._next = end + 1
            self._gap_since = None
            key = vp8_is_keyframe(first._data)
            if self._need_key and not key and self._keys_needed():
                self.dropped_frames += 1
                self._lost = True
                continue
            self._need_key = self._lost = False
            self.frames += 1
            frame = AssembledFrame(b"".join(p._data for p in parts), int(first.timestamp), key)
            self._deliver(frame, parts[-1])

    def _drop_frame(self, timestamp: int) -> None:
        """Drop the held packets of the frame at ``_next`` (those with its ``timestamp``)."""
        assert self._next is not None
        s = self._next
        while s in self._packets and self._packets[s].timestamp == timestamp:
            del self._packets[s]
            s += 1
        self._next = s

    def _holds_past_gap(self) -> bool:
        """Whether a packet is held beyond the first missing sequence number from ``_next``."""
        assert self._next is not None
        s = self._next
        while s in self._packets:
            s += 1
        return max(self._packets) > s

    def _frame_end(self, start: int, timestamp: int) -> int | None:
        """The last sequence number of the frame starting at ``start``, if it is complete
        (``_MALFORMED``: the next timestamp began without a frame start; ``_CUT``: the next
        frame began before this one's marker)."""
        s = start
        while True:
            p = self._packets.get(s)
            if p is None:
                return None
            if p.timestamp != timestamp:
                # The next frame began without this one's marker.
                return _CUT if vp8_starts_frame(p.payload) else _MALFORMED
            if p.marker:
                return s
            s += 1

    def _skip(self) -> None:
        """Give up on the gap: go to the first key frame held, else drop all and wait for one."""
        assert self._next is not None
        self.skips += 1
        self._gap_since = None
        self._lost = True
        held = sorted(self._packets)
        target = next(
            (
                s
                for s in held
                if s > self._next
                and vp8_starts_frame(self._packets[s].payload)
                and vp8_is_keyframe(self._packets[s]._data)
            ),
            None,
        )
        if target is None or not self._keys_needed():
            starts = [s for s in held if vp8_starts_frame(self._packets[s].payload)]
            if not self._keys_needed():
                # Only counted: resume at the first frame start past the gap.
                target = next((s for s in starts if s > self._next), held[-1] + 1)
            else:
                # No key frame held: resume at the newest frame start, deltas dropped until a
                # key frame.
                target = starts[-1] if starts else held[-1] + 1
                self._need_key = True
        for s in held:
            if s < target:
                del self._packets[s]
        self._next = target
        if self._on_skip is not None:
            self._on_skip()
