"""RTC transports ("foci") advertised in memberships, and the deprecated ``focus_active``.

Public API::

    parse_transport(obj) -> Transport | None      # one entry of foci_preferred / rtc_transports
    transport_to_json(t) -> dict                  # symmetric: parse_transport(to_json(t)) == t
    parse_focus_active(obj) -> FocusActive | None
    FocusActive.to_json() -> dict

``Transport`` is ``LivekitTransport | FullMeshTransport | UnknownTransport``. Every transport
is frozen and hashable, so ``set``/``dict`` dedupe works (the session connects once per
distinct transport). An unknown ``type`` is kept verbatim (``UnknownTransport.raw``) so that a
membership we re-publish or compare never loses another client's data.

A ``livekit`` entry needs a string ``livekit_service_url``; without one it is useless to us and
is kept as ``UnknownTransport`` (js-sdk likewise ignores it when choosing a focus).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, TypeAlias

from matrixrtc.model._json import (
    JsonDict,
    Reject,
    as_str,
    canonical_json,
    get_dict,
    parse_or_none,
)

__all__ = [
    "FULL_MESH_TYPE",
    "LIVEKIT_TYPE",
    "FocusActive",
    "FocusSelection",
    "FullMeshTransport",
    "LivekitTransport",
    "Transport",
    "UnknownTransport",
    "focus_selection",
    "parse_focus_active",
    "parse_transport",
    "transport_to_json",
]

LIVEKIT_TYPE: Final = "livekit"
# MSC3401's placeholder name; no MSC defines a mesh transport yet (spec/mesh.md §2.2).
FULL_MESH_TYPE: Final = "org.matrix.msc3401.full_mesh"


@dataclass(frozen=True, slots=True, kw_only=True)
class LivekitTransport:
    """``{"type":"livekit","livekit_service_url":…,"livekit_alias"?:…}`` (MSC4195)."""

    livekit_service_url: str
    # State form only: Element Call writes the room id here; receivers do not rely on it.
    livekit_alias: str | None = None

    @property
    def type(self) -> str:
        return LIVEKIT_TYPE

    def to_json(self) -> JsonDict:
        out: JsonDict = {"type": LIVEKIT_TYPE, "livekit_service_url": self.livekit_service_url}
        if self.livekit_alias is not None:
            out["livekit_alias"] = self.livekit_alias
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class FullMeshTransport:
    """``{"type":"org.matrix.msc3401.full_mesh"}``: this member can do peer-to-peer media.

    Advertised *after* any LiveKit transport so clients that read ``[0]`` still find an SFU.
    """

    @property
    def type(self) -> str:
        return FULL_MESH_TYPE

    def to_json(self) -> JsonDict:
        return {"type": FULL_MESH_TYPE}


@dataclass(frozen=True, slots=True, kw_only=True)
class UnknownTransport:
    """Any other transport object with a string ``type``, kept verbatim.

    ``raw_json`` is canonical JSON (sorted keys) so equal objects compare and hash equal.
    """

    type: str
    raw_json: str

    @property
    def raw(self) -> JsonDict:
        value: JsonDict = json.loads(self.raw_json)
        return value

    def to_json(self) -> JsonDict:
        return self.raw


Transport: TypeAlias = LivekitTransport | FullMeshTransport | UnknownTransport


def transport_to_json(transport: Transport) -> JsonDict:
    return transport.to_json()


def _parse_transport(obj: object) -> Transport:
    d = get_dict(obj)
    if d is None:
        raise Reject("transport is not an object")
    ttype = as_str(d.get("type"))
    if ttype is None:
        raise Reject("transport type is not a string")
    if ttype == LIVEKIT_TYPE:
        url = as_str(d.get("livekit_service_url"))
        alias = d.get("livekit_alias")
        if (
            url is not None
            and (alias is None or isinstance(alias, str))
            and set(d)
            <= {
                "type",
                "livekit_service_url",
                "livekit_alias",
            }
        ):
            return LivekitTransport(livekit_service_url=url, livekit_alias=alias)
    elif ttype == FULL_MESH_TYPE and set(d) == {"type"}:
        return FullMeshTransport()
    # Anything we cannot model exactly is kept verbatim, so to_json stays lossless.
    return UnknownTransport(type=ttype, raw_json=canonical_json(d))


def parse_transport(obj: object) -> Transport | None:
    """Parse one transport object; None (logged) when it has no string ``type``."""
    return parse_or_none("transport", lambda: _parse_transport(obj))


class FocusSelection(StrEnum):
    """``focus_active.focus_selection`` values js-sdk understands."""

    OLDEST_MEMBERSHIP = "oldest_membership"
    MULTI_SFU = "multi_sfu"


def focus_selection(value: str) -> FocusSelection | str:
    """Known selection as the enum member, unknown kept as the plain string."""
    try:
        return FocusSelection(value)
    except ValueError:
        return value


@dataclass(frozen=True, slots=True, kw_only=True)
class FocusActive:
    """State form ``focus_active``: ``{"type":"livekit","focus_selection":…}`` (deprecated).

    ``focus_selection`` is a :class:`FocusSelection` when known, else the raw string; None when
    absent. A member whose selection is unknown publishes nowhere we can follow (§3.2).
    """

    type: str = LIVEKIT_TYPE
    focus_selection: FocusSelection | str | None = FocusSelection.MULTI_SFU

    def to_json(self) -> JsonDict:
        out: JsonDict = {"type": self.type}
        if self.focus_selection is not None:
            out["focus_selection"] = str(self.focus_selection)
        return out


def _parse_focus_active(obj: object) -> FocusActive:
    d = get_dict(obj)
    if d is None:
        raise Reject("focus_active is not an object")
    ftype = as_str(d.get("type"))
    if ftype is None:
        raise Reject("focus_active.type is not a string")
    raw_sel = d.get("focus_selection")
    if raw_sel is None:
        return FocusActive(type=ftype, focus_selection=None)
    if not isinstance(raw_sel, str):
        raise Reject("focus_active.focus_selection is not a string")
    return FocusActive(type=ftype, focus_selection=focus_selection(raw_sel))


def parse_focus_active(obj: object) -> FocusActive | None:
    return parse_or_none("focus_active", lambda: _parse_focus_active(obj))
