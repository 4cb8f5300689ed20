"""ICE configuration for mesh peer connections: moved to :mod:`matrixrtc.media.ice` so the
LiveKit transport's own peer connections (``matrixrtc.livekit.rtc_client``) restrict their
candidates the same way; the names stay importable from here."""

from matrixrtc.media.ice import (
    CONSENT_EXPIRY_S,
    CONSENT_INTERVAL_S,
    CONSENT_RETRANSMISSIONS,
    IceServerConfig,
    candidate_allowed,
    filter_sdp_candidates,
    gather_on,
    ice_servers_from_turn_response,
    keep_consent,
    keep_consent_on,
    parse_networks,
    rtc_configuration,
)

__all__ = [
    "CONSENT_EXPIRY_S",
    "CONSENT_INTERVAL_S",
    "CONSENT_RETRANSMISSIONS",
    "IceServerConfig",
    "candidate_allowed",
    "filter_sdp_candidates",
    "gather_on",
    "ice_servers_from_turn_response",
    "keep_consent",
    "keep_consent_on",
    "parse_networks",
    "rtc_configuration",
]
