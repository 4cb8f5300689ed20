"""Homeserver adapter (I/O): matrix-nio[e2e] plus the endpoints nio lacks.

Start with :class:`Homeserver` (``async with Homeserver(url, Login(...), state_dir=...)``).
"""

from matrixrtc.matrix.errors import (
    CryptoError,
    DelayNotFound,
    DelayTooLong,
    HomeserverError,
    HomeserverTimeout,
    HomeserverUnreachable,
    LoginError,
    RateLimited,
    Unsupported,
)
from matrixrtc.matrix.homeserver import Homeserver
from matrixrtc.matrix.types import (
    Broadcaster,
    DelayAction,
    DeviceRef,
    Login,
    OpenIdToken,
    RoomUpdate,
    Subscription,
    ToDeviceEvent,
    ToDeviceSendResult,
)

__all__ = [
    "Broadcaster",
    "CryptoError",
    "DelayAction",
    "DelayNotFound",
    "DelayTooLong",
    "DeviceRef",
    "Homeserver",
    "HomeserverError",
    "HomeserverTimeout",
    "HomeserverUnreachable",
    "Login",
    "LoginError",
    "OpenIdToken",
    "RateLimited",
    "RoomUpdate",
    "Subscription",
    "ToDeviceEvent",
    "ToDeviceSendResult",
    "Unsupported",
]
