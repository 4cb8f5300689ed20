"""Transport choice (§3.2) and discovery order (§3.3)."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from matrixrtc.model import (
    CallMembership,
    FocusActive,
    FocusSelection,
    FullMeshTransport,
    LivekitTransport,
    RtcMemberData,
    SessionMembershipData,
    parse_membership_event,
)
from matrixrtc.session import (
    TransportSource,
    discover_transport,
    publish_transport,
    transports_to_connect,
)

SFU_A = LivekitTransport(livekit_service_url="https://a.example/livekit/jwt", livekit_alias="!r")
SFU_B = LivekitTransport(livekit_service_url="https://b.example/livekit/jwt", livekit_alias="!r")
SFU_C = LivekitTransport(livekit_service_url="https://c.example/livekit/jwt")
_ids = itertools.count()


def state_member(
    user: str, transports: list[Any], *, selection: FocusSelection | str, ts: int
) -> CallMembership:
    data = SessionMembershipData.for_join(user_id=user, device_id="D", transports=transports)
    content = data.to_json()
    content["focus_active"] = FocusActive(focus_selection=selection).to_json()
    m = parse_membership_event(
        {
            "type": "org.matrix.msc3401.call.member",
            "state_key": f"_{user}_D_m.call",
            "sender": user,
            "event_id": f"$e{next(_ids)}",
            "origin_server_ts": ts,
            "content": content,
        }
    )
    assert isinstance(m, CallMembership)
    return m


def sticky_member(user: str, transports: list[Any], *, ts: int) -> CallMembership:
    content = RtcMemberData.for_join(
        user_id=user, device_id="D", member_id=f"m-{user}", transports=transports
    ).to_json()
    m = parse_membership_event(
        {
            "type": "org.matrix.msc4143.rtc.member",
            "sender": user,
            "event_id": f"$k{next(_ids)}",
            "origin_server_ts": ts,
            "content": content,
        }
    )
    assert isinstance(m, CallMembership)
    return m


MULTI = FocusSelection.MULTI_SFU
OLDEST = FocusSelection.OLDEST_MEMBERSHIP


def test_multi_sfu_members_publish_on_their_own_first_transport() -> None:
    a = state_member("@a:x", [SFU_A, SFU_C], selection=MULTI, ts=1)
    b = state_member("@b:x", [SFU_B], selection=MULTI, ts=2)
    assert publish_transport(a, a) == SFU_A
    assert publish_transport(b, a) == SFU_B
    assert transports_to_connect([a, b]) == (SFU_A, SFU_B)


def test_oldest_membership_follows_the_oldest() -> None:
    a = state_member("@a:x", [SFU_A], selection=OLDEST, ts=1)
    b = state_member("@b:x", [SFU_B], selection=OLDEST, ts=2)
    assert publish_transport(a, a) == SFU_A
    assert publish_transport(b, a) == SFU_A
    assert transports_to_connect([a, b]) == (SFU_A,)


def test_oldest_membership_with_multi_sfu_oldest_uses_its_first() -> None:
    a = state_member("@a:x", [SFU_A], selection=MULTI, ts=1)
    b = state_member("@b:x", [SFU_B], selection=OLDEST, ts=2)
    c = state_member("@c:x", [SFU_C], selection=MULTI, ts=3)
    assert publish_transport(b, a) == SFU_A
    assert transports_to_connect([a, b, c]) == (SFU_A, SFU_C)


def test_sticky_members_publish_on_rtc_transports_first() -> None:
    s = sticky_member("@s:x", [SFU_C, FullMeshTransport()], ts=1)
    b = state_member("@b:x", [SFU_B], selection=OLDEST, ts=2)
    assert publish_transport(s, s) == SFU_C
    # An oldest_membership member follows a sticky oldest member's rtc_transports[0].
    assert publish_transport(b, s) == SFU_C
    assert transports_to_connect([s, b]) == (SFU_C,)


def test_unknown_selection_or_focus_publishes_nowhere() -> None:
    a = state_member("@a:x", [SFU_A], selection="com.example.magic", ts=1)
    assert publish_transport(a, a) is None
    no_foci = state_member("@n:x", [], selection=MULTI, ts=2)
    assert publish_transport(no_foci, a) is None
    b = state_member("@b:x", [SFU_B], selection=MULTI, ts=3)
    assert transports_to_connect([a, no_foci, b]) == (SFU_B,)
    assert transports_to_connect([]) == ()


def test_mesh_first_member_publishes_on_mesh_transport() -> None:
    a = state_member("@a:x", [FullMeshTransport(), SFU_A], selection=MULTI, ts=1)
    assert publish_transport(a, a) == FullMeshTransport()


def test_discovery_order() -> None:
    rtc = {"rtc_transports": [{"type": "livekit", "livekit_service_url": "https://r/jwt"}]}
    wk = {
        "m.homeserver": {"base_url": "https://hs"},
        "org.matrix.msc4143.rtc_foci": [
            {"type": "livekit", "livekit_service_url": "https://w/jwt"}
        ],
    }
    cfg = [LivekitTransport(livekit_service_url="https://c/jwt")]
    found = discover_transport(rtc_transports=rtc, well_known=wk, configured=cfg)
    assert found is not None
    assert (found.transport.livekit_service_url, found.source) == (
        "https://r/jwt",
        TransportSource.RTC_TRANSPORTS,
    )
    found = discover_transport(rtc_transports=None, well_known=wk, configured=cfg)
    assert found is not None
    assert found.source is TransportSource.WELL_KNOWN
    found = discover_transport(rtc_transports={"rtc_transports": []}, well_known={}, configured=cfg)
    assert found is not None
    assert found.source is TransportSource.CONFIG
    assert discover_transport() is None


def test_discovery_skips_unusable_entries() -> None:
    rtc = {
        "rtc_transports": [
            {"type": "org.matrix.msc3401.full_mesh"},
            {"type": "livekit"},
            {"type": "livekit", "livekit_service_url": "file:///etc/passwd"},
            "junk",
            {"type": "livekit", "livekit_service_url": "https://ok/jwt", "livekit_alias": "x"},
        ]
    }
    found = discover_transport(rtc_transports=rtc)
    assert found is not None
    assert found.transport == LivekitTransport(livekit_service_url="https://ok/jwt")
    junks: list[object] = [None, [], "x", {"rtc_transports": "no"}, {"rtc_transports": [1, 2]}]
    for junk in junks:
        assert discover_transport(rtc_transports=junk, well_known=junk) is None


def test_only_focus_selection_matters_not_focus_type() -> None:
    # js-sdk getTransport reads focus_active.focus_selection only.
    a = state_member("@a:x", [SFU_A], selection=MULTI, ts=1)
    assert isinstance(a.data, SessionMembershipData)
    focus = FocusActive(type="com.example", focus_selection=MULTI)
    odd = dataclasses.replace(a, data=dataclasses.replace(a.data, focus_active=focus))
    assert publish_transport(odd, odd) == SFU_A
