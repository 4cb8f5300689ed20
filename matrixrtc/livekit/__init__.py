"""LiveKit transport (I/O): livekit rtc SDK with Element-Call-compatible per-participant E2EE.

Modules (each documents its API in its docstring):

* ``token``       credentials from an authorization service (``/get_token``, ``/sfu/get``).
* ``connection``  ``LiveKitConnection``: one SFU, E2EE key provider, synthetic media, counters.
* ``receive``     ``ReceivedTracks``: layers asked for, remote frames rendered or counted.
* ``preencoded``  the synthetic video as a looped VP8 clip encoded once.
* ``signal``      LiveKit's ``/rtc`` signalling protocol, sans I/O (protobuf messages as events).
* ``rtc_client``  ``RtcClient``: our own LiveKit client over aiortc (signalling, subscriber and
                  publisher peer connections); ``MediaOptions.engine="aiortc"`` makes it the
                  engine of ``LiveKitTransport`` (``matrixrtc.media_transport.aiortc_engine``,
                  through ``connection_factory`` and the ``RoomConnection`` protocol).
* ``transport``   ``LiveKitTransport``: one connection per SFU the call needs (oldest member
                  or multi-SFU), keys from the sender-key manager installed everywhere,
                  dropped connections replaced with fresh credentials.
"""

from matrixrtc.livekit.connection import (
    ConnectionState,
    KeyTable,
    LiveKitConnectError,
    LiveKitConnection,
    MediaOptions,
    ParticipantStats,
    RoomConnection,
    SentStats,
    element_call_e2ee_options,
)
from matrixrtc.livekit.token import (
    Endpoint,
    JwtClaims,
    SfuCredentials,
    TokenResponseError,
    TokenServiceError,
    TokenServiceUnreachable,
    jwt_claims,
    parse_credentials,
    request_credentials,
)
from matrixrtc.livekit.transport import (
    ConnectionFactory,
    LiveKitTransport,
    OwnDevice,
    Plan,
    Repair,
    plan_connections,
)

__all__ = [
    "ConnectionFactory",
    "ConnectionState",
    "Endpoint",
    "JwtClaims",
    "KeyTable",
    "LiveKitConnectError",
    "LiveKitConnection",
    "LiveKitTransport",
    "MediaOptions",
    "OwnDevice",
    "ParticipantStats",
    "Plan",
    "Repair",
    "RoomConnection",
    "SentStats",
    "SfuCredentials",
    "TokenResponseError",
    "TokenServiceError",
    "TokenServiceUnreachable",
    "element_call_e2ee_options",
    "jwt_claims",
    "parse_credentials",
    "plan_connections",
    "request_credentials",
]
