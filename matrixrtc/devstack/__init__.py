"""The real local stack: Synapse, LiveKit, our authorization service, Redis, coturn, Chromium
as async context managers.

Each service takes a run directory (``new_run_dir()``), picks free loopback ports, writes its
config and log there, waits until it is ready and stops its whole process group on exit.
A failed start raises ``matrixrtc.errors.ServiceStartError`` with the tail of the log.
``leftover_processes()`` lists any process group started here that is still alive.
"""

from __future__ import annotations

from matrixrtc.devstack._paths import LIVEKIT_VERSION, find_livekit_binary, new_run_dir
from matrixrtc.devstack._process import leftover_processes, log_tail
from matrixrtc.devstack.auth_service import AuthService
from matrixrtc.devstack.chromium import Chromium
from matrixrtc.devstack.coturn import Coturn
from matrixrtc.devstack.livekit import LiveKit
from matrixrtc.devstack.redis import Redis
from matrixrtc.devstack.synapse import HomeserverRequestError, Synapse, UserCreds

__all__ = [
    "LIVEKIT_VERSION",
    "AuthService",
    "Chromium",
    "Coturn",
    "HomeserverRequestError",
    "LiveKit",
    "Redis",
    "Synapse",
    "UserCreds",
    "find_livekit_binary",
    "leftover_processes",
    "log_tail",
    "new_run_dir",
]
