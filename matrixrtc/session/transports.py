"""Transport choice (spec/matrixrtc.md §3.2) and discovery order (§3.3), pure.

Public API::

    publish_transport(member, oldest) -> Transport | None   # where `member` publishes media
    transports_to_connect(memberships) -> tuple[Transport, ...]  # distinct, in member order
    discover_transport(rtc_transports=…, well_known=…, configured=…) -> DiscoveredTransport | None

``publish_transport`` follows js-sdk ``CallMembership.getTransport(oldest)``:
* sticky form: ``transports.published[0]`` (or the old ``rtc_transports[0]``);
* state form, ``multi_sfu``: its own ``foci_preferred[0]``;
* state form, ``oldest_membership``: its own ``foci_preferred[0]`` if it is the oldest, else
  wherever the oldest member publishes (so an oldest ``multi_sfu`` member yields its own [0]);
* any other selection: None, the member's media is ignored.

``transports_to_connect`` is Element Call's rule: one connection per distinct transport over
all members, computed against ``memberships[0]`` (the oldest).

``discover_transport`` takes the three optional inputs in priority order and returns the first
usable LiveKit transport with the source it came from: the ``/rtc/transports`` response body,
then ``/.well-known/matrix/client``'s ``org.matrix.msc4143.rtc_foci``, then configuration.
Only ``http``/``https`` service URLs are accepted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

import structlog

from matrixrtc.model._json import get_dict
from matrixrtc.model.membership import CallMembership, RtcMemberData
from matrixrtc.model.transports import (
    FocusSelection,
    LivekitTransport,
    Transport,
    parse_transport,
)

__all__ = [
    "WELL_KNOWN_RTC_FOCI",
    "DiscoveredTransport",
    "TransportSource",
    "discover_transport",
    "publish_transport",
    "transports_to_connect",
]

_log = structlog.get_logger(__name__)

WELL_KNOWN_RTC_FOCI: Final = "org.matrix.msc4143.rtc_foci"


def publish_transport(member: CallMembership, oldest: CallMembership | None) -> Transport | None:
    """Where ``member`` publishes, given the session's oldest membership (see module doc)."""
    return _publish_transport(member, oldest, depth=0)


def _publish_transport(
    member: CallMembership, oldest: CallMembership | None, depth: int
) -> Transport | None:
    if isinstance(member.data, RtcMemberData):
        return member.data.published[0] if member.data.published else None
    # Like js-sdk, only focus_selection matters here, not focus_active.type.
    focus = member.data.focus_active
    own_first = member.data.foci_preferred[0] if member.data.foci_preferred else None
    if focus.focus_selection == FocusSelection.MULTI_SFU:
        return own_first
    if focus.focus_selection == FocusSelection.OLDEST_MEMBERSHIP:
        if oldest is None or oldest.key == member.key:
            return own_first
        # The oldest resolves against itself, so one level of recursion is enough.
        return None if depth else _publish_transport(oldest, oldest, depth + 1)
    return None


def transports_to_connect(memberships: Sequence[CallMembership]) -> tuple[Transport, ...]:
    """Distinct transports all members publish on, in membership order (oldest first)."""
    oldest = memberships[0] if memberships else None
    seen: dict[Transport, None] = {}
    for m in memberships:
        t = publish_transport(m, oldest)
        if t is not None:
            seen.setdefault(t, None)
    return tuple(seen)


class TransportSource(StrEnum):
    RTC_TRANSPORTS = "rtc_transports"  # GET …/org.matrix.msc4143/rtc/transports
    WELL_KNOWN = "well_known"  # /.well-known/matrix/client org.matrix.msc4143.rtc_foci
    CONFIG = "config"


@dataclass(frozen=True, slots=True)
class DiscoveredTransport:
    transport: LivekitTransport
    source: TransportSource


def _first_livekit(items: object, source: TransportSource) -> LivekitTransport | None:
    if not isinstance(items, list):
        if items is not None:
            _log.info("transport_discovery_skipped", source=source.value, reason="not a list")
        return None
    for item in items:
        t = item if isinstance(item, LivekitTransport) else parse_transport(item)
        if not isinstance(t, LivekitTransport):
            continue
        url = t.livekit_service_url
        if not (url.startswith("https://") or url.startswith("http://")):
            _log.info("transport_discovery_skipped", source=source.value, reason="bad url scheme")
            continue
        # Discovery answers say where to get tokens; an alias is per room, not per server.
        return LivekitTransport(livekit_service_url=url)
    return None


def discover_transport(
    *,
    rtc_transports: object = None,
    well_known: object = None,
    configured: Sequence[Transport] | None = None,
) -> DiscoveredTransport | None:
    """First usable LiveKit transport from the three sources, in priority order.

    ``rtc_transports`` is the JSON body of ``/rtc/transports`` (``{"rtc_transports":[…]}``),
    ``well_known`` the JSON body of ``/.well-known/matrix/client``; either may be None when
    the request failed. ``configured`` is the operator's list (e.g. from the CLI).
    """
    body = get_dict(rtc_transports)
    found = _first_livekit(
        body.get("rtc_transports") if body else None, TransportSource.RTC_TRANSPORTS
    )
    if found is not None:
        return DiscoveredTransport(found, TransportSource.RTC_TRANSPORTS)
    wk = get_dict(well_known)
    found = _first_livekit(wk.get(WELL_KNOWN_RTC_FOCI) if wk else None, TransportSource.WELL_KNOWN)
    if found is not None:
        return DiscoveredTransport(found, TransportSource.WELL_KNOWN)
    found = _first_livekit(list(configured or ()), TransportSource.CONFIG)
    if found is not None:
        return DiscoveredTransport(found, TransportSource.CONFIG)
    return None
