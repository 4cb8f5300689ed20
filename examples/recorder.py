"""Join a room's call and record everyone else into a directory until Ctrl-C (or N seconds).

    MATRIXRTC_HOMESERVER=... MATRIXRTC_USER=... MATRIXRTC_PASSWORD=... MATRIXRTC_ROOM=... \
    python examples/recorder.py DIR [SECONDS]

One WebM file per participant and presence, and DIR/index.json. With MATRIXRTC_RECORDING_KEY
(an X25519 public key from `python -m matrixrtc recording-key`) every file is sealed to it,
the index too (DIR/index.json.sealed).
"""

import asyncio
import contextlib
import os
import signal
import sys

from matrixrtc import Call


async def main(directory: str, seconds: float | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Call(
        os.environ["MATRIXRTC_ROOM"],
        homeserver=os.environ["MATRIXRTC_HOMESERVER"],
        user=os.environ["MATRIXRTC_USER"],
        password=os.environ["MATRIXRTC_PASSWORD"],
        transport=os.environ.get("MATRIXRTC_TRANSPORT", "auto"),  # type: ignore[arg-type]
        sfu_url=os.environ.get("MATRIXRTC_SFU_URL"),
    ) as call:
        recording = call.record(directory, encrypt_to=os.environ.get("MATRIXRTC_RECORDING_KEY"))
        print(f"recording into {directory}", flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)
        await recording.aclose()
    for p in recording.recorder.index()["participants"]:
        print(p["user_id"], [s["file"] for s in p["segments"]])


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else None))
