"""Join a room's call and send back what it hears and sees, one second late.

    MATRIXRTC_HOMESERVER=... MATRIXRTC_USER=... MATRIXRTC_PASSWORD=... MATRIXRTC_ROOM=... \
    python examples/echo_bot.py [SECONDS]

It echoes one participant at a time: the first other member it receives media from, until that
member leaves. A test tool for "can people hear me": say something, hear it a second later.
"""

import asyncio
import contextlib
import os
import signal
import sys
from typing import Any

from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from matrixrtc import Call, ParticipantsChanged

DELAY_S = 1.0


class Delayed(MediaStreamTrack):
    """Frames pushed in come out DELAY_S later."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.queue: asyncio.Queue[tuple[float, Any]] = asyncio.Queue()

    def push(self, frame: Any) -> None:
        self.queue.put_nowait((asyncio.get_running_loop().time() + DELAY_S, frame))

    async def recv(self) -> Any:
        if self.readyState != "live":
            raise MediaStreamError
        due, frame = await self.queue.get()
        await asyncio.sleep(max(0.0, due - asyncio.get_running_loop().time()))
        return frame


async def main(seconds: float | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tracks = {"audio": Delayed("audio"), "video": Delayed("video")}
    async with Call(
        os.environ["MATRIXRTC_ROOM"],
        homeserver=os.environ["MATRIXRTC_HOMESERVER"],
        user=os.environ["MATRIXRTC_USER"],
        password=os.environ["MATRIXRTC_PASSWORD"],
        transport=os.environ.get("MATRIXRTC_TRANSPORT", "auto"),  # type: ignore[arg-type]
        sfu_url=os.environ.get("MATRIXRTC_SFU_URL"),
        publish=list(tracks.values()),
    ) as call:
        echoing: list[str] = []  # the member we echo (at most one)

        def changed(change: ParticipantsChanged) -> None:
            if echoing and any(p.member_id == echoing[0] for p in change.left):
                echoing.clear()

        call.on(ParticipantsChanged, changed)
        print("echoing", flush=True)

        async def echo() -> None:
            with call.frames() as frames:
                async for f in frames:
                    if not echoing:
                        echoing.append(f.participant.member_id)
                        print(f"echoing {f.participant.user_id}", flush=True)
                    if f.participant.member_id == echoing[0]:
                        tracks[f.kind].push(f.frame)

        task = asyncio.create_task(echo())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    for t in tracks.values():
        t.stop()


if __name__ == "__main__":
    asyncio.run(main(float(sys.argv[1]) if len(sys.argv) > 1 else None))
