"""Mesh ↔ SFU policy (design.md principle 5): every branch, and that it is order-free."""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from matrixrtc.model import (
    CallMembership,
    FullMeshTransport,
    LivekitTransport,
    RtcMemberData,
    SessionMembershipData,
    Transport,
    UnknownTransport,
    parse_membership_event,
)
from matrixrtc.session.media_policy import (
    DEFAULT_MESH_MAX,
    MediaKind,
    choose_media,
    choose_media_for,
)

SFU = LivekitTransport(livekit_service_url="https://sfu.example/livekit/jwt")
OTHER_SFU = LivekitTransport(livekit_service_url="https://other.example/livekit/jwt")
MESH = FullMeshTransport()
ODD = UnknownTransport(type="org.example.p2p", raw_json='{"type":"org.example.p2p"}')
_ids = itertools.count()


def test_default_mesh_max_is_four() -> None:
    assert DEFAULT_MESH_MAX == 4
    assert choose_media([[SFU, MESH]] * 4).kind is MediaKind.MESH
    assert choose_media([[SFU, MESH]] * 5).kind is MediaKind.SFU


def test_all_mesh_and_no_sfu_is_mesh_at_any_size() -> None:
    d = choose_media([[MESH]] * 9, mesh_max=3)
    assert d.kind is MediaKind.MESH
    assert (d.members, d.mesh_capable, d.sfu_available, d.mesh_max) == (9, 9, False, 3)
    assert "no SFU" in d.reason


def test_all_mesh_with_sfu_up_to_mesh_max_is_mesh() -> None:
    for n in (1, 2, 3):
        d = choose_media([[SFU, MESH]] * n, mesh_max=3)
        assert d.kind is MediaKind.MESH, n
        assert "mesh_max 3" in d.reason


def test_all_mesh_with_sfu_above_mesh_max_is_sfu() -> None:
    d = choose_media([[SFU, MESH]] * 4, mesh_max=3)
    assert d.kind is MediaKind.SFU
    assert d.reason == "4 members > mesh_max 3"


def test_one_sfu_advertiser_is_enough_for_sfu_availability() -> None:
    # Only the last member lists a LiveKit transport: above mesh_max the call still goes SFU.
    d = choose_media([[MESH], [MESH], [MESH], [OTHER_SFU, MESH]], mesh_max=3)
    assert d.kind is MediaKind.SFU
    assert d.sfu_available


def test_a_member_without_mesh_forces_sfu_even_in_a_small_call() -> None:
    d = choose_media([[SFU, MESH], [SFU]], mesh_max=4)  # e.g. Element Call joined
    assert d.kind is MediaKind.SFU
    assert d.reason == "1 of 2 members cannot mesh"
    assert d.mesh_capable == 1


def test_a_member_without_mesh_and_no_sfu_is_none() -> None:
    d = choose_media([[MESH], [ODD], []], mesh_max=4)
    assert d.kind is MediaKind.NONE
    assert d.reason == "2 of 3 members cannot mesh and no SFU is advertised"


def test_unknown_transports_neither_help_nor_hurt() -> None:
    assert choose_media([[ODD, MESH], [MESH]], mesh_max=1).kind is MediaKind.MESH


def test_empty_call_is_mesh() -> None:
    d = choose_media([], mesh_max=3)
    assert d.kind is MediaKind.MESH
    assert d.members == 0


def _state(user: str, transports: list[Any]) -> CallMembership:
    content = SessionMembershipData.for_join(
        user_id=user, device_id="D", transports=transports
    ).to_json()
    m = parse_membership_event(
        {
            "type": "org.matrix.msc3401.call.member",
            "state_key": f"_{user}_D_m.call",
            "sender": user,
            "event_id": f"$s{next(_ids)}",
            "origin_server_ts": 1000 + next(_ids),
            "content": content,
        }
    )
    assert isinstance(m, CallMembership)
    return m


def _sticky(user: str, transports: list[Any]) -> CallMembership:
    content = RtcMemberData.for_join(
        user_id=user, device_id="D", member_id=f"m-{user}", transports=transports
    ).to_json()
    m = parse_membership_event(
        {
            "type": "org.matrix.msc4143.rtc.member",
            "sender": user,
            "event_id": f"$k{next(_ids)}",
            "origin_server_ts": 1000 + next(_ids),
            "content": content,
        }
    )
    assert isinstance(m, CallMembership)
    return m


def test_over_parsed_memberships_of_both_dialects() -> None:
    ms = [_state("@a:x", [SFU, MESH]), _sticky("@b:x", [SFU, MESH]), _state("@c:x", [SFU, MESH])]
    assert choose_media_for(ms, mesh_max=3).kind is MediaKind.MESH
    ms.append(_sticky("@d:x", [SFU, MESH]))
    assert choose_media_for(ms, mesh_max=3).kind is MediaKind.SFU
    ms.append(_sticky("@e:x", [SFU]))
    assert choose_media_for(ms, mesh_max=9).reason == "1 of 5 members cannot mesh"


_transport = st.sampled_from([SFU, OTHER_SFU, MESH, ODD])
_member = st.lists(_transport, max_size=4)


@given(st.lists(_member, max_size=8), st.integers(min_value=0, max_value=8), st.randoms())
def test_every_member_computes_the_same_decision_whatever_the_order(
    members: list[list[Transport]], mesh_max: int, rnd: Any
) -> None:
    """Deterministic and order-free: each member sees the list in its own order."""
    first = choose_media(members, mesh_max)
    shuffled = list(members)
    rnd.shuffle(shuffled)
    assert choose_media(shuffled, mesh_max) == first
    everyone_meshes = all(any(t == MESH for t in ts) for ts in members)
    any_sfu = any(isinstance(t, LivekitTransport) for ts in members for t in ts)
    if first.kind is MediaKind.MESH:
        assert everyone_meshes
        assert not any_sfu or len(members) <= mesh_max
    elif first.kind is MediaKind.SFU:
        assert any_sfu
        assert not everyone_meshes or len(members) > mesh_max
    else:
        assert not everyone_meshes
        assert not any_sfu


def test_an_unreachable_sfu_sends_a_call_that_can_mesh_to_the_mesh_at_any_size() -> None:
    d = choose_media([[SFU, MESH]] * 7, mesh_max=3, sfu_reachable=False)
    assert d.kind is MediaKind.MESH
    assert d.reason == "the SFU is unreachable and all 7 members can mesh"
    assert d.sfu_reachable is False
    # Reachable again: back to the size rule.
    assert choose_media([[SFU, MESH]] * 7, mesh_max=3).kind is MediaKind.SFU


def test_an_unreachable_sfu_keeps_a_call_with_a_member_that_cannot_mesh_on_the_sfu() -> None:
    d = choose_media([[SFU, MESH], [SFU]], sfu_reachable=False)
    assert d.kind is MediaKind.SFU
    assert d.sfu_reachable is False
    assert choose_media([[MESH], [MESH]], sfu_reachable=False).kind is MediaKind.MESH
