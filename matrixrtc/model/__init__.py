"""Wire types (pure): memberships in both dialects, transports, notifications, key messages,
MSC2746 call events, LiveKit room-alias and identity hashes. Parsers never raise: they log
and return None for invalid input.

Modules: ``event_types`` (``EventType``), ``transports`` (``LivekitTransport``,
``FullMeshTransport``, ``UnknownTransport``, ``FocusActive``), ``membership`` (both membership
dialects, ``parse_membership_event``), ``notification`` (ring and decline), ``livekit_ids``
(room alias and identity hashes). The names below are re-exported for convenience.
"""

from matrixrtc.model.event_types import EventType, event_type
from matrixrtc.model.membership import (
    CALL_APPLICATION,
    DEFAULT_EXPIRES_MS,
    DEFAULT_SLOT_ID,
    CallMembership,
    ContentKind,
    Dialect,
    MembershipKey,
    MembershipLeft,
    RtcApplication,
    RtcMember,
    RtcMemberData,
    RtcTransports,
    SessionMembershipData,
    TransportsShape,
    classify_content,
    is_msc3757_room_version,
    parse_membership_event,
    slot_id_for,
    state_key_for,
    state_leave_content,
    sticky_leave_content,
)
from matrixrtc.model.notification import NotificationType, RtcDecline, RtcNotification
from matrixrtc.model.transports import (
    FULL_MESH_TYPE,
    LIVEKIT_TYPE,
    FocusActive,
    FocusSelection,
    FullMeshTransport,
    LivekitTransport,
    Transport,
    UnknownTransport,
    parse_focus_active,
    parse_transport,
    transport_to_json,
)

__all__ = [
    "CALL_APPLICATION",
    "DEFAULT_EXPIRES_MS",
    "DEFAULT_SLOT_ID",
    "FULL_MESH_TYPE",
    "LIVEKIT_TYPE",
    "CallMembership",
    "ContentKind",
    "Dialect",
    "EventType",
    "FocusActive",
    "FocusSelection",
    "FullMeshTransport",
    "LivekitTransport",
    "MembershipKey",
    "MembershipLeft",
    "NotificationType",
    "RtcApplication",
    "RtcDecline",
    "RtcMember",
    "RtcMemberData",
    "RtcNotification",
    "RtcTransports",
    "SessionMembershipData",
    "Transport",
    "TransportsShape",
    "UnknownTransport",
    "classify_content",
    "event_type",
    "is_msc3757_room_version",
    "parse_focus_active",
    "parse_membership_event",
    "parse_transport",
    "slot_id_for",
    "state_key_for",
    "state_leave_content",
    "sticky_leave_content",
    "transport_to_json",
]
