"""The passthrough copy's key-frame rule (``matrixrtc.media.key_gate``), pure."""

from __future__ import annotations

from matrixrtc.media.key_gate import KeyFrameGate


def _run(gate: KeyFrameGate, frames: str, t0: float = 0.0, step: float = 0.1) -> str:
    """Feed ``frames`` (K key, d delta, | a gap); return per frame: P passed, A dropped and
    a key frame asked for, x dropped without asking."""
    out = []
    t = t0
    for c in frames:
        if c == "|":
            gate.gap()
            continue
        admit = gate.admit(keyframe=c == "K", now=t)
        out.append("P" if admit.pass_on else "A" if admit.ask_key else "x")
        assert not (admit.pass_on and admit.ask_key)
        t += step
    return "".join(out)


def test_the_copy_starts_at_a_key_frame_and_asks_for_one() -> None:
    gate = KeyFrameGate(ask_interval_s=0.5)
    # Deltas before the first key frame are held; asked at once, then every 0.5 s.
    assert _run(gate, "ddddddddKdd") == "AxxxxAxxPPP"
    assert gate.dropped == 8
    assert gate.gaps == 0


def test_a_gap_holds_the_copy_until_the_next_key_frame() -> None:
    gate = KeyFrameGate()
    assert _run(gate, "Kdd|ddKd") == "PPPAxPP"
    assert gate.gaps == 1
    assert gate.dropped == 2


def test_a_key_frame_right_after_a_gap_passes_and_asks_nothing() -> None:
    gate = KeyFrameGate()
    assert _run(gate, "Kd|Kd") == "PPPP"
    assert gate.gaps == 1
    assert gate.dropped == 0


def test_gaps_while_waiting_count_once_and_ask_again_at_once() -> None:
    gate = KeyFrameGate(ask_interval_s=10.0)
    assert _run(gate, "Kd|d|d|dK") == "PPAAAP"  # each new gap asks at once
    assert gate.gaps == 1  # one interruption of the copy
