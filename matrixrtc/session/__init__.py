"""RTC session logic (pure): memberships -> participants, expiry, transport choice, and the
own-membership state machine (delayed leave, heartbeat, refresh), driven by an injected clock.

Modules (each documents its API in its docstring):

* ``rtc_session``         ``RTCSession``: room events in, ordered active memberships and
                          ``MembershipChanges`` out, ``next_wakeup_ms`` for the expiry timer.
* ``transports``          ``publish_transport``, ``transports_to_connect``,
                          ``discover_transport`` (rtc/transports → .well-known → config).
* ``membership_machine``  ``OwnMembershipMachine``: emits requests (``ScheduleDelayedLeave``,
                          ``SendJoin``, ``RestartDelayedLeave``, …), takes results (``Ok``,
                          ``NotFound``, ``RetryAfter``, …) and observations.
"""

from matrixrtc.session.membership_machine import (
    CancelDelayedLeave,
    DelayedEventsUnsupported,
    LocalTimeout,
    MachineEvent,
    MaxDelayExceeded,
    MembershipAction,
    MembershipConfig,
    MembershipStatus,
    NetworkError,
    NotFound,
    Observation,
    Ok,
    OwnMembershipExpiredLocally,
    OwnMembershipMachine,
    OwnMembershipMissing,
    OwnMembershipSeen,
    ProbablyLeftChanged,
    Rejected,
    Request,
    RestartDelayedLeave,
    Result,
    RetryAfter,
    ScheduleDelayedLeave,
    SendDelayedLeaveNow,
    SendJoin,
    SendLeave,
    StatusChanged,
    Stopped,
    Wait,
)
from matrixrtc.session.rtc_session import MembershipChanges, RTCSession, membership_sort_key
from matrixrtc.session.transports import (
    DiscoveredTransport,
    TransportSource,
    discover_transport,
    publish_transport,
    transports_to_connect,
)

__all__ = [
    "CancelDelayedLeave",
    "DelayedEventsUnsupported",
    "DiscoveredTransport",
    "LocalTimeout",
    "MachineEvent",
    "MaxDelayExceeded",
    "MembershipAction",
    "MembershipChanges",
    "MembershipConfig",
    "MembershipStatus",
    "NetworkError",
    "NotFound",
    "Observation",
    "Ok",
    "OwnMembershipExpiredLocally",
    "OwnMembershipMachine",
    "OwnMembershipMissing",
    "OwnMembershipSeen",
    "ProbablyLeftChanged",
    "RTCSession",
    "Rejected",
    "Request",
    "RestartDelayedLeave",
    "Result",
    "RetryAfter",
    "ScheduleDelayedLeave",
    "SendDelayedLeaveNow",
    "SendJoin",
    "SendLeave",
    "StatusChanged",
    "Stopped",
    "TransportSource",
    "Wait",
    "discover_transport",
    "membership_sort_key",
    "publish_transport",
    "transports_to_connect",
]
