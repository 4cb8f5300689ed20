"""Differential property tests: our membership verdicts against matrix-js-sdk's own.

The verdicts come from the pinned matrix-js-sdk (package.json) running in Node
(``tests/jssdk/verdict.mjs``: one persistent process, one JSON line per event), never from a
reimplementation. Hypothesis builds valid sticky and state memberships exactly as js-sdk 43
writes them (and the older sticky ``rtc_transports`` shape), then mutates their content.

For every event:
1. **parse**: we accept it iff js-sdk's ``CallMembership.parseFromEvent`` does, apart from the
   two documented differences (see ``expected_parse``): a state key that does not belong to
   the sender's device is refused (hardening), and the old ``rtc_transports`` shape is read
   (judged by js-sdk after moving it into ``transports.published``).
2. **session**: with the sender joined and a plausible clock, the member is active in our
   ``RTCSession`` iff it is in js-sdk's ``sessionMembershipsForSlot``, with the same LiveKit
   identity and the same transport (where a member publishes). Skipped only where
   ``expires`` is not a number: js-sdk then computes expiry by JavaScript string arithmetic.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from matrixrtc.model import (
    CallMembership,
    FullMeshTransport,
    LivekitTransport,
    RtcMemberData,
    SessionMembershipData,
    parse_membership_event,
)
from matrixrtc.model.rejections import RejectionLog
from matrixrtc.session import RTCSession
from matrixrtc.session.transports import publish_transport

ROOT = Path(__file__).resolve().parents[2]
VERDICT_JS = ROOT / "tests" / "jssdk" / "verdict.mjs"
JS_SDK = ROOT / "node_modules" / "matrix-js-sdk" / "package.json"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not JS_SDK.exists(),
    reason="node or node_modules/matrix-js-sdk missing (run make bootstrap)",
)

ROOM = "!verdict:example.org"
USERS = ["@alice:example.org", "@bob:example.org"]
DEVICES = ["DEV1", "DEV_2"]
LK = LivekitTransport(livekit_service_url="https://rtc.example.org/livekit/jwt")
LK_ALIAS = LivekitTransport(livekit_service_url=LK.livekit_service_url, livekit_alias=ROOM)
T0 = 1_764_000_000_000


class JsSdk:
    """One long-lived ``node verdict.mjs``; ``verdict(event, now)`` → its answer."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            ["node", str(VERDICT_JS)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self._read() == {"ready": True}
        self._n = 0

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("verdict.mjs exited")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def verdict(self, event: dict[str, Any], now: int) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self._n += 1
        self.proc.stdin.write(json.dumps({"id": self._n, "event": event, "now": now}) + "\n")
        self.proc.stdin.flush()
        answer = self._read()
        assert answer["id"] == self._n
        return answer

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def js() -> Iterator[JsSdk]:
    saved = structlog.get_config()
    # Thousands of rejections: keep them off the console (they are tested elsewhere).
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    sdk = JsSdk()
    yield sdk
    sdk.close()
    structlog.configure(**saved)


# ------------------------------------------------------------------------ generators

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**60), max_value=2**60)
    | st.floats(allow_nan=False, allow_infinity=False, width=64)
    | st.sampled_from(["", "m.call", "livekit", "ROOM", "m.call#ROOM", "#", "@alice:example.org"])
    | st.text(max_size=8)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
# Replacements that are close to valid: where the interesting boundaries are.
near_values = st.sampled_from(
    [
        [],
        {},
        [{"type": "livekit"}],
        [{"type": 1}],
        ["livekit"],
        [1],
        ["livekit", 1],
        [None],
        ["a", "b"],
        {"published": [], "can_subscribe": []},
        {"published": [{"type": "livekit"}], "can_subscribe": ["livekit", 2]},
        {"type": "livekit"},
        {"type": "m.call"},
        {"rel_type": "m.reference", "event_id": "$p"},
        {"rel_type": "m.thread", "event_id": "$p"},
        {"user_id": "@alice:example.org", "device_id": "DEV1", "id": "x"},
        "x@alice:example.org",
        "@alice:example.org\n",
        "m.call#ROOM#2",
        "m.call#",
        "other#ROOM",
        "m.call#other",
    ]
).map(copy.deepcopy)  # mutations edit in place: never hand out the shared objects


def _state_content(draw: st.DrawFn, user: str, dev: str) -> dict[str, Any]:
    data = SessionMembershipData.for_join(
        user_id=user,
        device_id=dev,
        transports=draw(st.lists(st.sampled_from([LK, LK_ALIAS, FullMeshTransport()]), max_size=2)),
        multi_sfu=draw(st.booleans()),
        intent=draw(st.sampled_from([None, "audio", "video"])),
        created_ts=draw(st.none() | st.integers(T0 - 10_000_000, T0)),
    )
    return data.to_json()


@st.composite
def state_events(draw: st.DrawFn) -> dict[str, Any]:
    user, dev = draw(st.sampled_from(USERS)), draw(st.sampled_from(DEVICES))
    return {
        "type": "org.matrix.msc3401.call.member",
        "state_key": f"_{user}_{dev}_m.call",
        "sender": user,
        "event_id": "$state",
        "origin_server_ts": T0,
        "content": _state_content(draw, user, dev),
    }


@st.composite
def sticky_events(draw: st.DrawFn) -> dict[str, Any]:
    user = draw(st.sampled_from(USERS))
    data = RtcMemberData.for_join(
        user_id=user,
        device_id=draw(st.sampled_from(DEVICES)),
        member_id=draw(st.uuids().map(str)),
        transports=draw(st.lists(st.sampled_from([LK, FullMeshTransport()]), max_size=2)),
        intent=draw(st.sampled_from([None, "audio", "video"])),
        previous_event_id=draw(st.none() | st.just("$prev")),
    )
    content: dict[str, Any] = data.to_json()
    if draw(st.integers(0, 4)) == 0:  # the shape before js-sdk 42.2
        content["rtc_transports"] = content.pop("transports")["published"]
    return {
        "type": "org.matrix.msc4143.rtc.member",
        "sender": user,
        "event_id": "$sticky",
        "origin_server_ts": T0,
        "content": content,
        "msc4354_sticky": {"duration_ms": 3_600_000},
    }


# Every field js-sdk 43's validators look at (both dialects).
FIELD_PATHS = {
    ("slot_id",),
    ("application",),
    ("application", "type"),
    ("application", "m.call.intent"),
    ("member",),
    ("member", "user_id"),
    ("member", "device_id"),
    ("member", "id"),
    ("transports",),
    ("transports", "published"),
    ("transports", "published", 0),
    ("transports", "published", 0, "type"),
    ("transports", "can_subscribe"),
    ("transports", "can_subscribe", 0),
    ("rtc_transports",),
    ("rtc_transports", 0),
    ("versions",),
    ("msc4354_sticky_key",),
    ("m.relates_to",),
    ("m.relates_to", "event_id"),
    ("m.relates_to", "rel_type"),
    ("call_id",),
    ("device_id",),
    ("focus_active",),
    ("focus_active", "type"),
    ("focus_active", "focus_selection"),
    ("foci_preferred",),
    ("foci_preferred", 0),
    ("foci_preferred", 0, "type"),
    ("created_ts",),
    ("expires",),
    ("scope",),
    ("m.call.intent",),
    ("membershipID",),
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
    """A valid event with 0–3 content mutations (delete, replace, add a key)."""
    ev = copy.deepcopy(draw(base))
    for _ in range(draw(st.integers(0, 3))):
        paths = [p for p in _paths(ev["content"]) if p]
        if not paths:
            break
        # Half the time aim at a field a validator checks; else anywhere.
        aimed = [p for p in paths if p in FIELD_PATHS]
        use_aimed = bool(aimed) and draw(st.booleans())
        path = draw(st.sampled_from(aimed if use_aimed else paths))
        parent: Any = ev["content"]
        for part in path[:-1]:
            parent = parent[part]
        op = draw(st.sampled_from(["delete", "replace", "near", "null", "add"]))
        last = path[-1]
        if op == "delete":
            del parent[last]
        elif op == "replace":
            parent[last] = draw(json_values)
        elif op == "near":
            parent[last] = draw(near_values)
        elif op == "null":
            parent[last] = None
        elif isinstance(parent, dict):
            key = draw(
                st.sampled_from(["sticky_key", "transports", "rtc_transports", "m.relates_to"])
                | st.text(max_size=5)
            )
            parent[key] = draw(json_values | near_values)
    return ev


# --------------------------------------------------------------------------- oracles


def _state_key_ok(ev: dict[str, Any]) -> bool:
    """Our hardening (not in js-sdk): the state key belongs to the sender and its device."""
    dev = ev["content"].get("device_id")
    rest = ev["state_key"][len(ev["sender"]) + 2 :]
    return isinstance(dev, str) and (rest == dev or rest.startswith(f"{dev}_"))


def expected_parse(js: JsSdk, ev: dict[str, Any], now: int) -> bool:
    """What we must make of ``ev``: js-sdk's verdict, adjusted for the documented differences."""
    content = ev["content"]
    if ev["type"] == "org.matrix.msc4143.rtc.member":
        if (
            isinstance(content, dict)
            and "transports" not in content
            and "rtc_transports" in content
        ):
            # Old shape: judged as js-sdk would judge it had it been sent as `transports`.
            moved = copy.deepcopy(ev)
            c = moved["content"]
            c["transports"] = {"published": c.pop("rtc_transports"), "can_subscribe": []}
            return bool(js.verdict(moved, now)["parsed"])
        return bool(js.verdict(ev, now)["parsed"])
    return bool(js.verdict(ev, now)["parsed"]) and _state_key_ok(ev)


def ours_in_session(ev: dict[str, Any], now: int) -> CallMembership | None:
    session = RTCSession(ROOM)
    session.set_joined_members([ev["sender"]])
    if "state_key" in ev:
        session.receive_state_event(ev)
    else:
        session.receive_sticky_event(ev, now)
    session.update(now)
    members = session.memberships
    assert len(members) <= 1
    return members[0] if members else None


def _norm(value: Any) -> Any:
    """Numbers as JavaScript holds them (doubles): JSON.stringify prints integral doubles as
    integers with the shortest round-trip digits. A field set to null means the same as an
    absent one to both sides (js-sdk hands the raw object on, we drop the null)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_norm(v) for v in value]
    return value


def _number_or_absent(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def check(js: JsSdk, ev: dict[str, Any], now: int) -> None:
    parsed = parse_membership_event(ev, rejections=RejectionLog())
    want = expected_parse(js, ev, now)
    assert isinstance(parsed, CallMembership) == want, (want, ev["content"])
    if ev["type"] == "org.matrix.msc4143.rtc.member" and "transports" not in ev["content"]:
        return  # old shape: js-sdk has no session view of it
    if ev["type"] == "org.matrix.msc3401.call.member" and (
        not _state_key_ok(ev) or not _number_or_absent(ev["content"].get("expires"))
    ):
        return
    answer = js.verdict(ev, now)
    ours = ours_in_session(ev, now)
    assert (ours is not None) == answer["accepted"], (answer, ev["content"])
    if ours is not None:
        assert ours.rtc_backend_identity == answer["identity"]
        assert ours.slot_id.split("#")[1] == answer["slot_id"].split("#")[1]
        transport = publish_transport(ours, ours)
        theirs = answer["transport"]
        if transport is None:
            assert theirs is None
        else:
            assert theirs is not None
            assert _norm(transport.to_json()) == _norm(theirs)


# 200 examples per test keep `make test` at a few seconds; set the variable for a long hunt
# (4000 each: ~2 min).
EXAMPLES = int(os.environ.get("MATRIXRTC_JS_VERDICT_EXAMPLES", "200"))
SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@SETTINGS
@given(ev=mutated(sticky_events()), age=st.integers(0, 3_000_000))
def test_sticky_verdicts_match_js_sdk(js: JsSdk, ev: dict[str, Any], age: int) -> None:
    check(js, ev, T0 + age)


@SETTINGS
@given(ev=mutated(state_events()), age=st.integers(0, 40_000_000))
def test_state_verdicts_match_js_sdk(js: JsSdk, ev: dict[str, Any], age: int) -> None:
    check(js, ev, T0 + age)


@settings(max_examples=40, deadline=None)
@given(ev=sticky_events() | state_events())
def test_what_we_write_js_sdk_accepts(js: JsSdk, ev: dict[str, Any]) -> None:
    """Every membership our for_join builds is accepted by js-sdk (sticky: current shape)."""
    assume("rtc_transports" not in ev["content"])
    answer = js.verdict(ev, T0 + 1000)
    assert answer["accepted"], answer
    assert answer["identity"] == parse_membership_event(ev).rtc_backend_identity  # type: ignore[union-attr]


def test_js_sdk_rejects_the_old_shape_and_we_still_read_it(js: JsSdk) -> None:
    """Pins the one deliberate acceptance difference, both ways, so it cannot drift."""
    ev = {
        "type": "org.matrix.msc4143.rtc.member",
        "sender": USERS[0],
        "event_id": "$old",
        "origin_server_ts": T0,
        "content": {
            "application": {"type": "m.call"},
            "slot_id": "m.call#ROOM",
            "rtc_transports": [LK.to_json()],
            "member": {"user_id": USERS[0], "device_id": "D", "id": "m"},
            "versions": [],
            "msc4354_sticky_key": "m",
        },
        "msc4354_sticky": {"duration_ms": 3_600_000},
    }
    assert js.verdict(ev, T0)["parsed"] is False
    assert isinstance(parse_membership_event(ev), CallMembership)


def test_floats_and_huge_numbers_are_not_a_crash(js: JsSdk) -> None:
    for created in (1.5, 2**70, -(2**70), T0 + 0.25):
        ev = {
            "type": "org.matrix.msc3401.call.member",
            "state_key": f"_{USERS[0]}_D_m.call",
            "sender": USERS[0],
            "event_id": "$f",
            "origin_server_ts": T0,
            "content": {
                **SessionMembershipData.for_join(
                    user_id=USERS[0], device_id="D", transports=[LK]
                ).to_json(),
                "created_ts": created,
            },
        }
        check(js, ev, T0 + 10)
        assert not math.isnan(float(created))
