"""Diagnostics: record every video RTP packet's header on this network namespace's interfaces
with its kernel timestamp (SO_TIMESTAMPNS), as CLOCK_MONOTONIC seconds, so the time a frame
spends in the sender's process, in the SFU and in the receiver's process can be told apart.

Run beside a bench inside the same ``./scripts/in-netns`` (needs CAP_NET_RAW)::

    python bench/rtp_sniff.py OUT.json &  ...bench...;  kill -INT $!

Writes OUT.json on SIGINT/SIGTERM: rows [t, sport, dport, ssrc, seq, rtp_ts, marker, pt, bytes]
(the SRTP header is in the clear; RTCP and non-RTP datagrams are skipped).
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import sys
import time

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SO_TIMESTAMPNS = 35


def main() -> None:
    out_path = sys.argv[1]
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    offset = time.time() - time.monotonic()  # kernel stamps are CLOCK_REALTIME
    rows: list[list[int | float]] = []
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    sock.settimeout(0.2)
    while not stop:
        try:
            data, anc, _flags, addr = sock.recvmsg(2048, 64)
        except TimeoutError:
            continue
        except InterruptedError:
            continue
        if addr[2] == PACKET_OUTGOING or len(data) < 40 or data[0] >> 4 != 4 or data[9] != 17:
            continue
        ihl = (data[0] & 0xF) * 4
        sport, dport = struct.unpack_from("!HH", data, ihl)
        rtp = data[ihl + 8 :]
        if len(rtp) < 12 or rtp[0] >> 6 != 2:
            continue
        pt = rtp[1] & 0x7F
        if 64 <= pt <= 95:  # RTCP (rtcp-mux: 200-207 with the marker bit)
            continue
        t = 0.0
        for level, kind, value in anc:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                sec, nsec = struct.unpack("qq", value[:16])
                t = sec + nsec / 1e9 - offset
        seq, ts, ssrc = struct.unpack_from("!HII", rtp, 2)
        rows.append([round(t, 6), sport, dport, ssrc, seq, ts, rtp[1] >> 7, pt, len(rtp)])
    with open(out_path, "w") as f:
        json.dump(rows, f)


if __name__ == "__main__":
    main()
