"""Which LiveKit focus a member advertises: the homeserver's ``rtc/transports`` (MSC4143),
else ``.well-known`` foci, else the configured one (spec/matrixrtc.md §1.2), as Element Call
picks it. Used by :class:`matrixrtc.Call` and ``python -m matrixrtc join``."""

from __future__ import annotations

from typing import Any

import structlog

from matrixrtc.errors import MatrixRTCError
from matrixrtc.matrix import Homeserver
from matrixrtc.model import Dialect, LivekitTransport
from matrixrtc.session.transports import discover_transport

__all__ = ["discover_livekit"]

log = structlog.get_logger(__name__)


async def discover_livekit(
    hs: Homeserver, room_id: str, configured: str | None, dialect: Dialect
) -> LivekitTransport | None:
    """The LiveKit transport to advertise in ``room_id``, or None when there is none."""
    try:
        offered: list[dict[str, Any]] | None = await hs.rtc_transports()
    except MatrixRTCError as e:
        log.info("discovery.no_rtc_transports", reason=str(e))
        offered = None
    well_known = {"org.matrix.msc4143.rtc_foci": await hs.well_known_rtc_foci()}
    found = discover_transport(
        rtc_transports={"rtc_transports": offered} if offered is not None else None,
        well_known=well_known,
        configured=[LivekitTransport(livekit_service_url=configured)] if configured else None,
    )
    if found is None:
        return None
    log.info(
        "discovery.transport", source=found.source.value, url=found.transport.livekit_service_url
    )
    url = found.transport.livekit_service_url
    if dialect is Dialect.STICKY:  # rtc_transports carry no alias (spec §1.2)
        return LivekitTransport(livekit_service_url=url)
    # Element Call's compatibility mode writes the room id as the alias (state form).
    return LivekitTransport(livekit_service_url=url, livekit_alias=room_id)
