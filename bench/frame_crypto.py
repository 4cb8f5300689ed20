"""Frame cryptor throughput: our FrameCryptor against raw AESGCM on the same buffers.

``raw`` is the bare AEAD call the format needs on the same buffers: ``AESGCM.encrypt`` of the
plain frame's payload with its 3-byte VP8 delta header as associated data, and
``AESGCM.decrypt`` of the encrypted frame's ciphertext with its IV and header (slices of the
frame, as the cryptor must take them);
``ours`` is the stateful :class:`~matrixrtc.e2ee.cryptor.FrameCryptor` doing everything a
transport asks of it (header rule, per-SSRC counter and IV, trailer, key ring lookup, failure
bookkeeping). Both run interleaved in rounds in one process; the best round counts (the least
disturbed by other load on the machine).

    python -m bench.frame_crypto [--json] [--rounds N] [--seconds S]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from importlib.metadata import version

from matrixrtc.e2ee.cryptor import FrameCryptor, KeyRing
from matrixrtc.e2ee.frame import make_iv

SIZES = (100, 1200, 10_000)
HEADER = 3  # VP8 delta frame


def _frames_per_s(fn: Callable[[], object], batch: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(batch):
        fn()
    return batch / ((time.perf_counter_ns() - t0) / 1e9)


def bench(size: int, rounds: int, seconds: float) -> list[dict[str, object]]:
    key = os.urandom(16)
    tx_ring, rx_ring = KeyRing(), KeyRing()
    tx_ring.set_key(key, 1)
    rx_ring.set_key(key, 1)
    tx, rx = FrameCryptor(tx_ring), FrameCryptor(rx_ring)
    ks = tx_ring.keyset()
    assert ks is not None
    aead = ks.aead
    frame = bytes([0x31]) + os.urandom(size - 1)  # VP8 delta frame tag
    iv = make_iv(1234, 5678, 0)
    encrypted = tx.encrypt(frame, kind="video", codec="vp8", keyframe=False, ssrc=1234, timestamp=0)
    assert encrypted is not None
    assert rx.decrypt(encrypted, kind="video", codec="vp8", keyframe=False) == frame

    cases: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
        "encrypt": (
            lambda: tx.encrypt(
                frame, kind="video", codec="vp8", keyframe=False, ssrc=1234, timestamp=0
            ),
            lambda: aead.encrypt(iv, frame[HEADER:], frame[:HEADER]),
        ),
        "decrypt": (
            lambda: rx.decrypt(encrypted, kind="video", codec="vp8", keyframe=False),
            lambda: aead.decrypt(encrypted[-14:-2], encrypted[HEADER:-14], encrypted[:HEADER]),
        ),
    }
    results: list[dict[str, object]] = []
    for op, (ours, raw) in cases.items():
        # Calibrate a batch to ~seconds / (2 * rounds) for the slower of the two.
        probe = max(_frames_per_s(ours, 2000), 1.0)
        batch = max(1000, int(probe * seconds / (2 * rounds)))
        best_ours = best_raw = 0.0
        for _ in range(rounds):
            best_raw = max(best_raw, _frames_per_s(raw, batch))
            best_ours = max(best_ours, _frames_per_s(ours, batch))
        results.append(
            {
                "size": size,
                "op": op,
                "ours_fps": round(best_ours),
                "raw_fps": round(best_raw),
                "ratio": round(best_ours / best_raw, 3),
            }
        )
    if rx.stats.decrypt_failures:
        raise RuntimeError("decrypt failures during the benchmark")
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Frame cryptor vs raw AESGCM throughput.")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.5, help="time budget per size and op")
    args = ap.parse_args(argv)
    results = [r for size in SIZES for r in bench(size, args.rounds, args.seconds)]
    if args.json:
        doc = {
            "results": results,
            "python": platform.python_version(),
            "cryptography": version("cryptography"),
            "raw": "AESGCM.encrypt/decrypt on the same frame buffers (payload, aad=3-byte header)",
        }
        print(json.dumps(doc))
        return
    print(f"{'size':>6} {'op':<8} {'ours fps':>12} {'raw fps':>12} {'ratio':>6}")
    for r in results:
        print(
            f"{r['size']:>6} {r['op']:<8} {r['ours_fps']:>12,} {r['raw_fps']:>12,} {r['ratio']:>6}"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
