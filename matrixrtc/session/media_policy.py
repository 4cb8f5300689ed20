"""Mesh or SFU for a call (design.md principle 5, spec/matrixrtc.md §3), pure.

Public API::

    choose_media(members, mesh_max=4, *, sfu_reachable=True) -> MediaDecision
    choose_media_for(memberships, mesh_max=4, *, sfu_reachable=True) -> MediaDecision

Rule: **mesh** when every active member advertises the mesh transport
(``{"type":"org.matrix.msc3401.full_mesh"}``) and either no member advertises an SFU
(LiveKit) transport or the call has at most ``mesh_max`` members; **SFU** otherwise, as long as
some member advertises one; **none** when a member cannot do mesh and nobody offers an SFU.

**SFU failure**: with ``sfu_reachable=False`` (the caller's SFU connection has been lost and
a probe has not got through since) a call whose members can all mesh goes to the mesh at any
size, and comes back to the rule above once the SFU is reachable again; a call with a member
that cannot mesh stays on the SFU (its connection keeps repairing itself). The web client
(web/src/policy.ts) applies the same rule with the same input.

Apart from that one input, the decision depends only on the membership list (no clock, no
local configuration, no order), so every member computes the same answer from the same list:
nobody has to lead a switch. Every member connected to a failing SFU sees it fail, so they fall
back together. There is no hysteresis: a call at exactly ``mesh_max`` members switches each time the
count crosses the line, which is what makes it predictable for the others.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from matrixrtc.model.membership import CallMembership
from matrixrtc.model.transports import FULL_MESH_TYPE, LivekitTransport, Transport

__all__ = [
    "DEFAULT_MESH_MAX",
    "MediaDecision",
    "MediaKind",
    "choose_media",
    "choose_media_for",
]

DEFAULT_MESH_MAX: Final = 4


class MediaKind(StrEnum):
    MESH = "mesh"
    SFU = "sfu"
    NONE = "none"  # no transport every member can use


@dataclass(frozen=True, slots=True, kw_only=True)
class MediaDecision:
    """Which media transport the call uses, and why (``reason`` is for people and logs)."""

    kind: MediaKind
    reason: str
    members: int
    mesh_capable: int  # members advertising the mesh transport
    sfu_available: bool  # some member advertises a LiveKit transport
    mesh_max: int
    sfu_reachable: bool = True  # False: our SFU connection is lost (see module docstring)


def _is_mesh(t: Transport) -> bool:
    return t.type == FULL_MESH_TYPE


def choose_media(
    members: Iterable[Sequence[Transport]],
    mesh_max: int = DEFAULT_MESH_MAX,
    *,
    sfu_reachable: bool = True,
) -> MediaDecision:
    """The decision for a call whose active members advertise ``members`` (one transport
    list per member, ours included); ``sfu_reachable`` False: the SFU failed (fall back to
    the mesh when every member can)."""
    lists = list(members)
    n = len(lists)
    capable = sum(1 for ts in lists if any(_is_mesh(t) for t in ts))
    sfu = any(isinstance(t, LivekitTransport) for ts in lists for t in ts)

    def decide(kind: MediaKind, reason: str) -> MediaDecision:
        return MediaDecision(
            kind=kind,
            reason=reason,
            members=n,
            mesh_capable=capable,
            sfu_available=sfu,
            mesh_max=mesh_max,
            sfu_reachable=sfu_reachable,
        )

    if capable == n:
        if sfu and not sfu_reachable:
            return decide(MediaKind.MESH, f"the SFU is unreachable and all {n} members can mesh")
        if not sfu:
            return decide(MediaKind.MESH, f"all {n} members can mesh and no SFU is advertised")
        if n <= mesh_max:
            return decide(
                MediaKind.MESH, f"all {n} members can mesh and {n} <= mesh_max {mesh_max}"
            )
        return decide(MediaKind.SFU, f"{n} members > mesh_max {mesh_max}")
    missing = n - capable
    if sfu:
        return decide(MediaKind.SFU, f"{missing} of {n} members cannot mesh")
    return decide(MediaKind.NONE, f"{missing} of {n} members cannot mesh and no SFU is advertised")


def choose_media_for(
    memberships: Iterable[CallMembership],
    mesh_max: int = DEFAULT_MESH_MAX,
    *,
    sfu_reachable: bool = True,
) -> MediaDecision:
    """:func:`choose_media` over parsed active memberships."""
    return choose_media((m.transports for m in memberships), mesh_max, sfu_reachable=sfu_reachable)
