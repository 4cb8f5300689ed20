"""When a copied (passthrough) video stream may be handed on: pure, no I/O.

A VP8 delta frame only decodes on top of every frame before it back to a key frame. A copy of
the received frames (``Call.record(passthrough=True)``) that loses one — an RTP packet never
arrived, a frame failed to decrypt, the decoder rejected one — is undecodable from there until
the next key frame, which with a 60-frame GOP can be seconds away (or never, for senders that
only send one when asked). So after each *gap* the copy stops, a key frame is asked for (a PLI)
and the copy resumes at the first key frame.

:class:`KeyFrameGate` is that rule; the transport reports gaps (:meth:`KeyFrameGate.gap`) and
asks :meth:`KeyFrameGate.admit` for each frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["KEY_ASK_INTERVAL_S", "Admit", "KeyFrameGate"]

KEY_ASK_INTERVAL_S: Final = 0.5  # while waiting for a key frame, ask again this often


@dataclass(frozen=True)
class Admit:
    """What to do with one frame: hand it on (``pass_on``), ask the sender for a key frame
    (``ask_key``)."""

    pass_on: bool
    ask_key: bool


class KeyFrameGate:
    """Hands frames on from a key frame after each gap (and at the start); see the module doc.

    ``gaps`` counts the gaps reported while frames were passing; ``dropped`` the frames held
    back while waiting for a key frame."""

    def __init__(self, *, ask_interval_s: float = KEY_ASK_INTERVAL_S) -> None:
        self._ask_interval_s = ask_interval_s
        self.waiting = True  # for a key frame
        self._asked_at: float | None = None
        self.gaps = 0
        self.dropped = 0

    def gap(self) -> None:
        """Frames were lost (sequence gap, decrypt failure, decoder error): hold the copy
        until a key frame, and ask for one with the next frame."""
        if not self.waiting:
            self.gaps += 1
        self.waiting = True
        self._asked_at = None

    def admit(self, *, keyframe: bool, now: float) -> Admit:
        """One received frame at ``now`` (seconds, any monotonic clock)."""
        if keyframe:
            self.waiting = False
            self._asked_at = None
            return Admit(pass_on=True, ask_key=False)
        if not self.waiting:
            return Admit(pass_on=True, ask_key=False)
        self.dropped += 1
        ask = self._asked_at is None or now - self._asked_at >= self._ask_interval_s
        if ask:
            self._asked_at = now
        return Admit(pass_on=False, ask_key=ask)
