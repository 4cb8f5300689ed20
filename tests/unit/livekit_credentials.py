"""LiveKit credentials for unit tests' connections, which never connect: nothing listens on
port 1 and the token is no JWT."""

from __future__ import annotations

from matrixrtc.livekit import SfuCredentials
from matrixrtc.livekit.token import Endpoint

CREDS = SfuCredentials(
    url="ws://127.0.0.1:1",
    jwt="unused",
    identity="@alice:hs:DEV",
    room="room-alias",
    endpoint=Endpoint.SFU_GET,
)
