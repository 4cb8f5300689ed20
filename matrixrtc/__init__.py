"""matrixrtc: Python infrastructure for MatrixRTC (Matrix native group calls).

The supported names are the ones in ``__all__`` below: start with :class:`Call`
(docs/api.md). Everything else is importable from its module but may change without notice.

Layout (see CONTRIBUTING.md and README): ``model``/``session``/``e2ee`` are the pure, sans-I/O
protocol core; ``matrix``, ``mesh`` and ``livekit`` are asyncio adapters; ``call`` is the front
door on top of them; ``devstack`` starts the real local stack for tests and demos.

The names are loaded on first use, so importing the pure core (``matrixrtc.model`` ...) does
not import aiortc, nio or livekit.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matrixrtc.agent import Participant, ParticipantsChanged, RingState
    from matrixrtc.call import (
        Call,
        CallEvent,
        CallOptions,
        FrameStream,
        RemoteFrame,
        TransportChoice,
    )
    from matrixrtc.call_keys import KeyEvent, KeyEventKind
    from matrixrtc.errors import ConfigError, LocalError, MatrixRTCError, RemoteError
    from matrixrtc.matrix import Homeserver, Login, Subscription
    from matrixrtc.model import Dialect
    from matrixrtc.session.media_policy import MediaKind
    from matrixrtc.switching import SwitchRecord

__version__ = "0.1.0"

_WHERE = {
    "Call": "matrixrtc.call",
    "CallEvent": "matrixrtc.call",
    "CallOptions": "matrixrtc.call",
    "ConfigError": "matrixrtc.errors",
    "Dialect": "matrixrtc.model",
    "FrameStream": "matrixrtc.call",
    "Homeserver": "matrixrtc.matrix",
    "KeyEvent": "matrixrtc.call_keys",
    "KeyEventKind": "matrixrtc.call_keys",
    "LocalError": "matrixrtc.errors",
    "Login": "matrixrtc.matrix",
    "MatrixRTCError": "matrixrtc.errors",
    "MediaKind": "matrixrtc.session.media_policy",
    "Participant": "matrixrtc.agent",
    "ParticipantsChanged": "matrixrtc.agent",
    "RemoteError": "matrixrtc.errors",
    "RemoteFrame": "matrixrtc.call",
    "RingState": "matrixrtc.agent",
    "Subscription": "matrixrtc.matrix",
    "SwitchRecord": "matrixrtc.switching",
    "TransportChoice": "matrixrtc.call",
}

__all__ = [
    "Call",
    "CallEvent",
    "CallOptions",
    "ConfigError",
    "Dialect",
    "FrameStream",
    "Homeserver",
    "KeyEvent",
    "KeyEventKind",
    "LocalError",
    "Login",
    "MatrixRTCError",
    "MediaKind",
    "Participant",
    "ParticipantsChanged",
    "RemoteError",
    "RemoteFrame",
    "RingState",
    "Subscription",
    "SwitchRecord",
    "TransportChoice",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'matrixrtc' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
