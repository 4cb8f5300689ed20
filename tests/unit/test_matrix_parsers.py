"""Property tests for what the homeserver adapter parses from the wire: error answers, raw
sync room sections, the saved session file. Whatever arrives, nothing raises, and only
well-formed values come out. (Pure and fast; it lives here because it tests the I/O adapter.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from matrixrtc.matrix import DelayTooLong, HomeserverError, RateLimited
from matrixrtc.matrix.rooms import RoomCache
from matrixrtc.matrix.state_dir import SavedSession, StateDir
from matrixrtc.matrix.wire import error_from, sticky_ttl_ms, transport_list

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
keys = st.sampled_from(
    ["type", "state_key", "event_id", "content", "sender", "msc4354_sticky", "unsigned", "events"]
)
event_like = st.dictionaries(keys, json_values, max_size=6)


@given(
    st.integers(100, 599),
    st.dictionaries(st.text(max_size=30), json_values, max_size=5),
    st.none() | st.text(max_size=5),
)
def test_error_mapping_never_raises(
    status: int, body: dict[str, Any], retry_after: str | None
) -> None:
    err = error_from(status, body, retry_after)
    assert isinstance(err, HomeserverError)
    assert isinstance(err.errcode, str)
    if isinstance(err, RateLimited):
        assert err.retry_after_ms is None or isinstance(err.retry_after_ms, int)


def test_error_mapping_known_answers() -> None:
    limited = error_from(429, {"errcode": "M_LIMIT_EXCEEDED", "retry_after_ms": 1234}, None)
    assert isinstance(limited, RateLimited)
    assert limited.retry_after_ms == 1234
    assert error_from(429, {}, "3").retry_after_ms == 3000  # type: ignore[attr-defined]
    synapse = error_from(
        400,
        {
            "errcode": "ORG.MATRIX.MSC4140_DELAY_TOO_LARGE",
            "error": "The requested delay (999ms) exceeds the allowed maximum (86400000ms)",
        },
        None,
    )
    assert isinstance(synapse, DelayTooLong)
    assert synapse.max_delay_ms == 86_400_000
    msc = error_from(
        400,
        {
            "errcode": "M_UNKNOWN",
            "org.matrix.msc4140.errcode": "M_MAX_DELAY_EXCEEDED",
            "org.matrix.msc4140.max_delay": 5000,
        },
        None,
    )
    assert isinstance(msc, DelayTooLong)
    assert msc.max_delay_ms == 5000
    assert error_from(502, {}, None).transient


@given(json_values)
def test_transport_lists_keep_only_typed_objects(value: Any) -> None:
    out = transport_list(value, "test")
    assert all(isinstance(t, dict) and isinstance(t["type"], str) for t in out)


@given(event_like)
def test_sticky_ttl_is_bounded(ev: dict[str, Any]) -> None:
    assert 0 <= sticky_ttl_ms(ev) <= 3_600_000


@settings(max_examples=200)
@given(
    st.dictionaries(
        st.sampled_from(["state", "timeline", "msc4354_sticky", "summary"]),
        st.dictionaries(st.just("events"), st.lists(event_like | json_values, max_size=5))
        | json_values,
        max_size=4,
    )
)
def test_raw_room_sections_never_break_the_sync_dispatch(section: dict[str, Any]) -> None:
    cache = RoomCache()
    (update,) = cache.updates({"rooms": {"join": {"!r": section}}}, lambda _, e: e, True)
    assert all(isinstance(e, dict) for e in update.state + update.timeline + update.sticky)
    for (etype, key), ev in cache.state("!r").items():
        assert isinstance(etype, str)
        assert isinstance(key, str)
        assert ev["type"] == etype
    for ev, received in cache.sticky("!r"):
        assert isinstance(ev, dict)
        assert isinstance(received, int)


@given(json_values)
def test_saved_session_file_of_any_shape_is_rejected_or_complete(
    tmp_path_factory: Any, value: Any
) -> None:
    d = StateDir(Path(tmp_path_factory.mktemp("state")))
    d.ensure()
    d.session_file.write_text(json.dumps(value))
    saved = d.load()
    assert saved is None or all(
        isinstance(v, str) and v
        for v in (saved.homeserver, saved.user_id, saved.device_id, saved.access_token)
    )


def test_saved_session_round_trip_is_private(tmp_path: Path) -> None:
    d = StateDir(tmp_path / "s")
    s = SavedSession("http://h", "@u:h", "DEV", "secret-token")
    d.save(s)
    assert d.load() == s
    assert d.session_file.stat().st_mode & 0o077 == 0
    assert "secret-token" not in repr(s)
    d.session_file.write_text("{not json")
    assert d.load() is None


def test_an_undecryptable_sticky_event_is_delivered_once_its_key_arrives() -> None:
    """Like js-sdk's sticky store: an event that came before its Megolm key is tried again
    with each sync and handed on, decrypted, once it decrypts (also when its room is not in
    that sync), with its original receipt time."""
    now = [1_000]
    cache = RoomCache(now_ms=lambda: now[0])
    sealed = {
        "type": "m.room.encrypted",
        "event_id": "$m",
        "content": {"ciphertext": "x"},
        "msc4354_sticky": {"duration_ms": 60_000},
    }
    keys: set[str] = set()

    def decrypt(room_id: str, ev: dict[str, Any]) -> dict[str, Any]:
        if ev["type"] != "m.room.encrypted" or ev["event_id"] not in keys:
            return ev
        return {**ev, "type": "org.matrix.msc4143.rtc.member", "content": {"k": 1}}

    (first,) = cache.updates(
        {"rooms": {"join": {"!r": {"timeline": {"events": [sealed]}}}}}, decrypt, True
    )
    assert [e["type"] for e in first.sticky] == ["m.room.encrypted"]
    now[0] = 5_000
    assert list(cache.updates({"rooms": {"join": {}}}, decrypt, False)) == []
    keys.add("$m")  # the room key arrives (a to-device message in some later sync)
    (late,) = cache.updates({"rooms": {"join": {}}}, decrypt, False)
    assert late.room_id == "!r"
    assert [e["type"] for e in late.sticky] == ["org.matrix.msc4143.rtc.member"]
    assert late.timeline == ()
    assert late.state == ()
    ((held, received),) = cache.sticky("!r")
    assert held["content"] == {"k": 1}
    assert received == 1_000
    # Handed on once: the next sync has nothing new for the room.
    assert list(cache.updates({"rooms": {"join": {}}}, decrypt, False)) == []


def test_state_after_is_applied_last_and_wins_over_stream_order() -> None:
    """MSC4222: after a state reset the resolved state (``state_after``) holds our leave
    although our re-join is newest in the timeline; the session must end up with the leave,
    so the membership machine publishes again."""
    from matrixrtc.session.rtc_session import RTCSession

    key = "_@a:hs_DEV_m.call"
    member = {
        "type": "m.room.member",
        "state_key": "@a:hs",
        "sender": "@a:hs",
        "event_id": "$m",
        "content": {"membership": "join"},
    }

    def call(event_id: str, ts: int, *, join: bool) -> dict[str, Any]:
        content: dict[str, Any] = (
            {
                "application": "m.call",
                "call_id": "",
                "scope": "m.room",
                "device_id": "DEV",
                "expires": 3_600_000,
                "created_ts": ts,
                "focus_active": {"type": "livekit", "focus_selection": "oldest_membership"},
                "foci_preferred": [{"type": "livekit", "livekit_service_url": "https://x"}],
            }
            if join
            else {}
        )
        return {
            "type": "org.matrix.msc3401.call.member",
            "state_key": key,
            "sender": "@a:hs",
            "event_id": event_id,
            "origin_server_ts": ts,
            "content": content,
        }

    leave, rejoin = call("$l", 2_000, join=False), call("$j2", 3_000, join=True)
    for field, expect_in_call in (("org.matrix.msc4222.state_after", False), ("state", True)):
        cache = RoomCache(now_ms=lambda: 4_000)
        session = RTCSession("!r")
        first = {"state": {"events": [member, call("$j1", 1_000, join=True)]}}
        (u0,) = cache.updates({"rooms": {"join": {"!r": first}}}, lambda _, e: e, True)
        session.receive_room_update(state=u0.state, timeline=u0.timeline, now_ms=4_000)
        section = {"timeline": {"events": [leave, rejoin]}, field: {"events": [leave]}}
        (u,) = cache.updates({"rooms": {"join": {"!r": section}}}, lambda _, e: e, False)
        assert u.resolved is (field != "state")
        session.receive_room_update(state=u.state, timeline=u.timeline, now_ms=4_000)
        session.update(4_000)
        assert (session.own_membership("@a:hs", "DEV") is not None) is expect_in_call, field
        assert cache.state("!r")[("org.matrix.msc3401.call.member", key)]["event_id"] == (
            "$j2" if expect_in_call else "$l"
        )


def test_nio_gets_state_after_as_its_state_section() -> None:
    from matrixrtc.matrix.rooms import with_legacy_state

    member = {"type": "m.room.member", "state_key": "@b:hs", "content": {"membership": "join"}}
    raw: dict[str, Any] = {
        "next_batch": "s",
        "rooms": {
            "join": {
                "!a": {"org.matrix.msc4222.state_after": {"events": [member]}},
                "!b": {"state": {"events": []}},
            },
            "leave": {"!c": {}},
        },
    }
    out = with_legacy_state(raw)
    assert out["rooms"]["join"]["!a"]["state"] == {"events": [member]}
    assert out["rooms"]["join"]["!b"] == {"state": {"events": []}}
    assert out["rooms"]["leave"] == {"!c": {}}
    assert "state" not in raw["rooms"]["join"]["!a"]  # the input is left alone
    assert with_legacy_state({"next_batch": "s"}) == {"next_batch": "s"}
