"""Join a room's call, play a media file into it once someone else is there, leave.

    MATRIXRTC_HOMESERVER=https://matrix.example.org MATRIXRTC_USER=@bot:example.org \
    MATRIXRTC_PASSWORD=... MATRIXRTC_ROOM='!room:example.org' python examples/announce.py FILE

The file is checked before joining (an unreadable file never joins the call). Optional:
MATRIXRTC_TRANSPORT (auto, mesh or sfu), MATRIXRTC_SFU_URL (when the room names no SFU).
"""

import asyncio
import os
import sys

from matrixrtc import Call
from matrixrtc.media.file_source import MediaFile


async def main(path: str) -> None:
    media = MediaFile(path)  # raises MediaFileError, with the reason, for a bad file
    async with Call(
        os.environ["MATRIXRTC_ROOM"],
        homeserver=os.environ["MATRIXRTC_HOMESERVER"],
        user=os.environ["MATRIXRTC_USER"],
        password=os.environ["MATRIXRTC_PASSWORD"],
        transport=os.environ.get("MATRIXRTC_TRANSPORT", "auto"),  # type: ignore[arg-type]
        sfu_url=os.environ.get("MATRIXRTC_SFU_URL"),
    ) as call:
        await call.wait_for_participants(2, timeout_s=60)  # someone to hear it
        with call.events() as events:
            while call.transport is None:  # media can flow
                await events.get()
        await asyncio.sleep(1.0)  # the peer connections come up
        for track in media.tracks:
            call.publish(track)
        print(f"playing {media.info.describe()}", flush=True)
        await media.wait_ended()
        await asyncio.sleep(0.5)  # the last frames leave before we do
    media.close()
    print(f"done: {media.stats.frames['video']} video, {media.stats.frames['audio']} audio frames")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
