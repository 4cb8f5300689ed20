"""Property tests (hypothesis) on every parser of the membership core.

1. Arbitrary JSON never makes a parser raise.
2. Mutated valid events: the parser accepts exactly what an independent oracle (the rules of
   spec §1.1/§1.2/§6 written out plainly below) accepts, so invalid input never becomes an
   active membership and valid input is never lost.
3. Round trips: to_json → parse gives back the same value.
4. Through RTCSession: every active membership satisfies the oracle.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from matrixrtc.model import (
    CallMembership,
    FocusActive,
    FullMeshTransport,
    LivekitTransport,
    MembershipLeft,
    RtcMemberData,
    SessionMembershipData,
    parse_focus_active,
    parse_membership_event,
    parse_transport,
)
from matrixrtc.model.notification import RtcDecline, RtcNotification
from matrixrtc.session import RTCSession
from matrixrtc.session.rtc_session import sticky_expires_at
from matrixrtc.session.transports import discover_transport


@pytest.fixture(autouse=True, scope="module")
def _quiet_logs() -> Iterator[None]:
    # Every rejection is logged at debug; printing thousands of them dominates the run time.
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    yield
    structlog.configure(**saved)


SETTINGS = settings(max_examples=75, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LIGHT = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**60), max_value=2**60)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=10,
)
interesting_keys = st.sampled_from(
    [
        "application",
        "call_id",
        "device_id",
        "focus_active",
        "foci_preferred",
        "expires",
        "created_ts",
        "scope",
        "membershipID",
        "m.call.intent",
        "memberships",
        "msc4354_sticky_key",
        "sticky_key",
        "slot_id",
        "member",
        "rtc_transports",
        "transports",
        "published",
        "can_subscribe",
        "versions",
        "m.relates_to",
        "type",
        "livekit_service_url",
    ]
)
json_objects = st.dictionaries(interesting_keys | st.text(max_size=6), json_values, max_size=8)

USERS = ["@alice:example.org", "@bob:example.org"]
DEVICES = ["DEV1", "DEV_2"]
LK = LivekitTransport(livekit_service_url="https://rtc.example.org/livekit/jwt")


# ------------------------------------------------------------------------------ oracle

MAX_SAFE = 2**53 - 1


def _int(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return -MAX_SAFE <= v <= MAX_SAFE
    return isinstance(v, float) and math.isfinite(v) and v.is_integer() and abs(v) <= MAX_SAFE


def _mxid(v: Any) -> bool:
    if not isinstance(v, str) or not v.startswith("@") or len(v) > 255:
        return False
    local, sep, server = v[1:].partition(":")
    return bool(sep and local and server)


def _transport_list(v: Any) -> bool:
    return isinstance(v, list) and all(
        isinstance(t, dict) and isinstance(t.get("type"), str) for t in v
    )


def _opt(d: dict[str, Any], key: str, check: Any) -> bool:
    return key not in d or check(d[key])


def _number(v: Any) -> bool:
    """js ``typeof v === "number"``."""
    return isinstance(v, int | float) and not isinstance(v, bool)


def _left_or_filtered(c: dict[str, Any]) -> bool:
    """js-sdk 43 isLeftMembershipContent or its quick filter says: not a join."""
    if all(k in ("slot_id", "msc4354_sticky_key") for k in c):
        return True
    keys = [k for k in c if k != "msc4354_sticky_key"]
    return len(keys) < 2 or "application" not in c


def oracle_state(ev: Any) -> bool:
    """Is ``ev`` a state-form join? js-sdk 43 checkSessionsMembershipData + our hardening."""
    if not isinstance(ev, dict) or ev.get("type") != "org.matrix.msc3401.call.member":
        return False
    sender, key, c = ev.get("sender"), ev.get("state_key"), ev.get("content")
    if not (_mxid(sender) and isinstance(key, str) and isinstance(ev.get("event_id"), str)):
        return False
    if not _int(ev.get("origin_server_ts")) or not isinstance(c, dict):
        return False
    if _left_or_filtered(c):
        return False
    dev = c.get("device_id")
    fa = c.get("focus_active")
    ok = (
        isinstance(dev, str)
        and isinstance(c.get("call_id"), str)
        and isinstance(c.get("application"), str)
        and isinstance(fa, dict)
        and isinstance(fa.get("type"), str)
        and _opt(c, "foci_preferred", _transport_list)
        and _opt(c, "created_ts", _number)
        and _opt(c, "scope", lambda v: isinstance(v, str))
        and _opt(c, "m.call.intent", lambda v: isinstance(v, str))
    )
    if not ok:
        return False
    # Hardening: the key belongs to the sender and names the content's device.
    for prefix in (f"_{sender}_", f"{sender}_"):
        if key.startswith(prefix):
            rest = key[len(prefix) :]
            return rest == dev or rest.startswith(f"{dev}_")
    return False


_JS_MXID = re.compile(r"@[^\n\r\u2028\u2029]+:[^\n\r\u2028\u2029]+")


def oracle_sticky(ev: Any) -> bool:
    """js-sdk 43 checkRtcMembershipData, plus the old ``rtc_transports`` shape we still read."""
    if not isinstance(ev, dict) or ev.get("type") != "org.matrix.msc4143.rtc.member":
        return False
    sender, c = ev.get("sender"), ev.get("content")
    if not (_mxid(sender) and isinstance(ev.get("event_id"), str)):
        return False
    if not _int(ev.get("origin_server_ts")) or not isinstance(c, dict):
        return False
    if _left_or_filtered(c):
        return False
    app, member = c.get("application"), c.get("member")
    if not (isinstance(app, dict) and isinstance(app.get("type"), str) and "#" not in app["type"]):
        return False
    slot = c.get("slot_id")
    if not (isinstance(slot, str) and slot.startswith(app["type"] + "#") and slot.count("#") == 1):
        return False
    if not isinstance(member, dict) or not isinstance(member.get("user_id"), str):
        return False
    if not _JS_MXID.search(member["user_id"]) or member["user_id"] != sender:
        return False
    if not (isinstance(member.get("device_id"), str) and isinstance(member.get("id"), str)):
        return False
    if "transports" not in c and "rtc_transports" in c:
        if not _transport_list(c["rtc_transports"]):
            return False
    else:
        t = c.get("transports")
        if not isinstance(t, dict) or not _transport_list(t.get("published")):
            return False
        subs = t.get("can_subscribe")
        if not (isinstance(subs, list) and all(isinstance(x, str) for x in subs)):
            return False
    versions = c.get("versions")
    if not (isinstance(versions, list) and all(isinstance(v, str) for v in versions)):
        return False
    a, b = c.get("msc4354_sticky_key"), c.get("sticky_key")
    if a is None and b is None:
        return False
    if ("msc4354_sticky_key" in c and not isinstance(a, str)) or (
        "sticky_key" in c and not isinstance(b, str)
    ):
        return False
    if a is not None and b is not None and a != b:
        return False
    if "m.relates_to" in c:
        rel = c["m.relates_to"]
        if not (
            isinstance(rel, dict)
            and rel.get("rel_type") == "m.reference"
            and isinstance(rel.get("event_id"), str)
        ):
            return False
    return True


# ------------------------------------------------------------------------ valid events


@st.composite
def valid_state_events(draw: st.DrawFn) -> dict[str, Any]:
    user = draw(st.sampled_from(USERS))
    dev = draw(st.sampled_from(DEVICES))
    data = SessionMembershipData.for_join(
        user_id=user,
        device_id=dev,
        transports=draw(st.lists(st.sampled_from([LK, FullMeshTransport()]), max_size=2)),
        multi_sfu=draw(st.booleans()),
        intent=draw(st.sampled_from([None, "audio", "video"])),
        created_ts=draw(st.none() | st.integers(0, 2**45)),
    )
    prefix = draw(st.sampled_from(["_", ""]))
    return {
        "type": "org.matrix.msc3401.call.member",
        "state_key": f"{prefix}{user}_{dev}_m.call",
        "sender": user,
        "event_id": "$e",
        "origin_server_ts": draw(st.integers(0, 2**45)),
        "content": data.to_json(),
    }


@st.composite
def valid_sticky_events(draw: st.DrawFn) -> dict[str, Any]:
    user = draw(st.sampled_from(USERS))
    data = RtcMemberData.for_join(
        user_id=user,
        device_id=draw(st.sampled_from(DEVICES)),
        member_id=draw(st.text(min_size=1, max_size=8)),
        transports=draw(st.lists(st.sampled_from([LK, FullMeshTransport()]), max_size=2)),
        intent=draw(st.sampled_from([None, "audio", "video"])),
        previous_event_id=draw(st.none() | st.just("$prev")),
    )
    return {
        "type": "org.matrix.msc4143.rtc.member",
        "sender": user,
        "event_id": "$k",
        "origin_server_ts": draw(st.integers(0, 2**45)),
        "content": data.to_json(),
        "msc4354_sticky": {"duration_ms": 3_600_000},
    }


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    ev = copy.deepcopy(draw(base))
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(ev) if p]
        path = draw(st.sampled_from(paths))
        parent: Any = ev
        for part in path[:-1]:
            parent = parent[part]
        op = draw(st.sampled_from(["delete", "replace", "replace", "swap_user", "add"]))
        last = path[-1]
        if op == "delete":
            del parent[last]
        elif op == "replace":
            parent[last] = draw(json_values)
        elif op == "swap_user":
            parent[last] = draw(st.sampled_from([*USERS, "@mallory:evil.example", "alice"]))
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=6))] = draw(json_values)
    return ev


identity_values = st.sampled_from(
    [
        *USERS,
        *DEVICES,
        "@mallory:evil.example",
        "alice",
        "",
        "_@alice:example.org_DEV1_m.call",
        "_@bob:example.org_DEV1_m.call",
        "@alice:example.org_DEV_2_m.call",
        "_@alice:example.org_DEV1",
        "_@alice:example.org_DEV1X_m.call",
    ]
)


@st.composite
def identity_mutated(draw: st.DrawFn) -> dict[str, Any]:
    """Mutations aimed at who-is-who: sender, state key, device, member.user_id."""
    ev = copy.deepcopy(draw(valid_state_events() | valid_sticky_events()))
    targets = [("sender",), ("state_key",), ("content", "device_id"), ("content", "member")]
    for _ in range(draw(st.integers(1, 2))):
        path = draw(st.sampled_from(targets))
        parent: Any = ev
        for part in path[:-1]:
            parent = parent[part]
        if path[-1] == "member":
            if isinstance(parent.get("member"), dict):
                parent["member"]["user_id"] = draw(identity_values)
        else:
            parent[path[-1]] = draw(identity_values)
    return ev


# ----------------------------------------------------------------------------- tests


@SETTINGS
@given(identity_mutated())
def test_identity_mutations_match_the_oracle(ev: dict[str, Any]) -> None:
    parsed = parse_membership_event(ev)
    oracle = oracle_sticky if ev["type"].endswith("rtc.member") else oracle_state
    assert isinstance(parsed, CallMembership) == oracle(ev), parsed


@SETTINGS
@given(json_values)
def test_parsers_never_raise_on_arbitrary_json(value: Any) -> None:
    parse_membership_event(value)
    SessionMembershipData.from_json(value)
    RtcMemberData.from_json(value)
    parse_transport(value)
    parse_focus_active(value)
    RtcNotification.from_json(value)
    RtcDecline.from_json(value)
    discover_transport(rtc_transports=value, well_known=value)
    if isinstance(value, dict):
        sticky_expires_at(value, 1_000)
    s = RTCSession("!r:example.org")
    s.receive_state_event(value)
    s.receive_sticky_event(value, 1_000)
    s.receive_member_event(value)
    s.update(1_000)


@SETTINGS
@given(
    st.sampled_from(["org.matrix.msc3401.call.member", "org.matrix.msc4143.rtc.member"]),
    json_objects,
    st.sampled_from([*USERS, "x"]),
    json_values,
)
def test_arbitrary_content_in_an_envelope(etype: str, content: Any, sender: str, key: Any) -> None:
    ev = {
        "type": etype,
        "state_key": key,
        "sender": sender,
        "event_id": "$e",
        "origin_server_ts": 1,
        "content": content,
    }
    parsed = parse_membership_event(ev)
    if isinstance(parsed, CallMembership):
        assert (oracle_state if etype.endswith("call.member") else oracle_sticky)(ev)


@SETTINGS
@given(mutated(valid_state_events()))
def test_mutated_state_events_match_the_oracle(ev: dict[str, Any]) -> None:
    parsed = parse_membership_event(ev)
    assert isinstance(parsed, CallMembership) == oracle_state(ev), parsed


@SETTINGS
@given(mutated(valid_sticky_events()))
def test_mutated_sticky_events_match_the_oracle(ev: dict[str, Any]) -> None:
    parsed = parse_membership_event(ev)
    assert isinstance(parsed, CallMembership) == oracle_sticky(ev), parsed


@LIGHT
@given(valid_state_events())
def test_state_round_trip(ev: dict[str, Any]) -> None:
    parsed = parse_membership_event(ev)
    assert isinstance(parsed, CallMembership)
    assert isinstance(parsed.data, SessionMembershipData)
    assert parsed.data.to_json() == ev["content"]
    assert SessionMembershipData.from_json(parsed.data.to_json()) == parsed.data


@LIGHT
@given(valid_sticky_events())
def test_sticky_round_trip(ev: dict[str, Any]) -> None:
    parsed = parse_membership_event(ev)
    assert isinstance(parsed, CallMembership)
    assert isinstance(parsed.data, RtcMemberData)
    assert parsed.data.to_json() == ev["content"]


@LIGHT
@given(json_objects)
def test_transport_and_focus_round_trip(obj: dict[str, Any]) -> None:
    t = parse_transport(obj)
    if t is not None:
        assert parse_transport(t.to_json()) == t
        # Lossless, including unknown transports (compared as JSON text: NaN != NaN).
        assert json.dumps(t.to_json(), sort_keys=True) == json.dumps(obj, sort_keys=True)
    f = parse_focus_active(obj)
    if f is not None:
        assert parse_focus_active(f.to_json()) == f
        assert isinstance(f, FocusActive)


@LIGHT
@given(json_objects)
def test_notification_and_decline_round_trip(obj: dict[str, Any]) -> None:
    n = RtcNotification.from_json(obj)
    if n is not None:
        assert RtcNotification.from_json(n.to_json()) == n
        assert 0 <= n.effective_lifetime_ms <= 120_000
        assert isinstance(obj.get("notification_type"), str)
    d = RtcDecline.from_json(obj)
    if d is not None:
        assert RtcDecline.from_json(d.to_json()) == d


@LIGHT
@given(
    st.lists(
        st.one_of(
            mutated(valid_state_events()),
            valid_state_events(),
            mutated(valid_sticky_events()),
            valid_sticky_events(),
        ),
        max_size=8,
    )
)
def test_session_only_lists_oracle_valid_memberships(events: list[dict[str, Any]]) -> None:
    s = RTCSession("!r:example.org")
    s.set_joined_members(USERS)
    now = 2**45
    for i, ev in enumerate(events):
        if isinstance(ev.get("event_id"), str):
            ev["event_id"] = f"$e{i}"  # unique, so each membership maps back to its event
    for ev in events:
        if ev.get("type") == "org.matrix.msc4143.rtc.member":
            s.receive_sticky_event(ev, now)
        else:
            s.receive_state_event(ev)
    s.update(now)
    for m in s.memberships:
        assert m.slot_id.split("#")[1:] == ["ROOM"]
        assert m.sender in USERS
        assert not m.is_expired(now)
        source = next(
            ev for ev in events if ev.get("event_id") == m.event_id and ev.get("sender") == m.sender
        )
        assert (oracle_sticky if m.key.dialect.value == "sticky" else oracle_state)(source)
    # Identities are unique per membership key.
    assert len({m.key for m in s.memberships}) == len(s.memberships)


def test_leave_content_forms() -> None:
    for content in ({}, {"msc4354_sticky_key": "k"}):
        ev = {
            "type": "org.matrix.msc4143.rtc.member",
            "sender": USERS[0],
            "event_id": "$l",
            "origin_server_ts": 1,
            "content": content,
        }
        parsed = parse_membership_event(ev)
        assert (isinstance(parsed, MembershipLeft)) == bool(content)
