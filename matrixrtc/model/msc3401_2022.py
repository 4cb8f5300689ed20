"""The 2022 MSC3401 dialect (Hydrogen, matrix-js-sdk's legacy ``GroupCall``): parse, validate,
read-modify-write (pure).

Two state events describe a full-mesh group call (shared/spec/mesh.md §1.1):

* ``org.matrix.msc3401.call`` at state key ``conf_id``: the call itself, content
  ``{"m.intent": "m.ring"|"m.prompt"|"m.room", "m.type": "m.video"|"m.voice", "m.name"?,
  "m.terminated"?}``. js-sdk drops a call whose type or intent is not one of those, and of
  several live calls in a room takes the one with the latest ``origin_server_ts``
  (``GroupCallEventHandler.createGroupCallForRoom``); so do we (:func:`choose_group_call`).
* ``org.matrix.msc3401.call.member`` at state key = **the user id** (the same event type as
  today's state form, which keys by device), content
  ``{"m.calls": [{"m.call_id": conf_id, "m.devices": [{device_id, session_id, expires_ts,
  feeds: [{purpose}]}, …]}, …]}``: one event per user lists every device of that user in
  every call.

Validity of a device entry is js-sdk's (``GroupCall.updateParticipants``): string
``device_id`` and ``session_id``, numeric ``expires_ts`` later than now, ``feeds`` an array.
Invalid entries are skipped, never fatal; an event whose state key is not its sender is
refused (the homeserver refuses it too, for ``@``-keys).

Writing is read-modify-write of our own user's event (:func:`update_member_content`): other
calls' entries and other devices' entries are kept as they are (Hydrogen and js-sdk on
another device of ours write the same event), expired or invalid entries of our user are
dropped (js-sdk ``updateDevices`` does the same), our own entry is replaced. Nothing here
does I/O or reads a clock: ``now_ms`` is always passed in.

Public API::

    parse_group_call_event(event) -> GroupCall | None
    choose_group_call(calls) -> GroupCall | None
    parse_member_event(event, now_ms) -> MemberEvent | None         # every device, every call
    MemberEvent.devices_in(conf_id, now_ms) -> tuple[LegacyDevice, ...]
    update_member_content(current, conf_id=…, device_id=…, own=LegacyDevice|None, now_ms=…)
    is_2022_member_content(content) -> bool                          # ``m.calls`` content
    new_group_call_content(call_type=…, intent=…, name=…)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from matrixrtc.model._json import (
    JsonDict,
    JsonValue,
    Reject,
    TolerantStrEnum,
    as_int,
    as_str,
    get_dict,
    is_mxid,
    parse_or_none,
)

__all__ = [
    "CALLS_KEY",
    "DEVICE_TIMEOUT_MS",
    "GROUP_CALL_EVENT",
    "MEMBER_EVENT",
    "RENEW_AFTER_MS",
    "GroupCall",
    "GroupCallIntent",
    "GroupCallType",
    "LegacyDevice",
    "MemberEvent",
    "choose_group_call",
    "devices_of",
    "is_2022_member_content",
    "new_group_call_content",
    "parse_group_call_event",
    "parse_member_event",
    "update_member_content",
]

GROUP_CALL_EVENT: Final = "org.matrix.msc3401.call"
MEMBER_EVENT: Final = "org.matrix.msc3401.call.member"
CALLS_KEY: Final = "m.calls"
# js-sdk DEVICE_TIMEOUT: expires_ts = now + 1 h, re-sent every 3/4 of it (45 min).
DEVICE_TIMEOUT_MS: Final = 60 * 60 * 1000
RENEW_AFTER_MS: Final = DEVICE_TIMEOUT_MS * 3 // 4
_MAX_CALLS: Final = 32
_MAX_DEVICES: Final = 256
_MAX_ID: Final = 255


class GroupCallIntent(TolerantStrEnum):
    RING = "m.ring"
    PROMPT = "m.prompt"
    ROOM = "m.room"


class GroupCallType(TolerantStrEnum):
    VIDEO = "m.video"
    VOICE = "m.voice"


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupCall:
    """One ``org.matrix.msc3401.call`` state event that js-sdk would take as a call."""

    conf_id: str
    intent: GroupCallIntent
    call_type: GroupCallType
    origin_server_ts: int
    event_id: str
    name: str | None = None
    terminated: str | None = None  # "call_ended": the call is over

    @property
    def live(self) -> bool:
        return self.terminated is None


def _event_head(event: object, expected_type: str) -> tuple[dict[str, JsonValue], str, str, int]:
    ev = get_dict(event)
    if ev is None:
        raise Reject("event is not an object")
    if ev.get("type") != expected_type:
        raise Reject("wrong event type", field="type")
    state_key = as_str(ev.get("state_key"))
    if state_key is None or not 0 < len(state_key) <= _MAX_ID:
        raise Reject("state_key must be a short non-empty string", field="state_key")
    sender = as_str(ev.get("sender"))
    if sender is None or not is_mxid(sender):
        raise Reject("sender is not a user id", field="sender")
    ts = as_int(ev.get("origin_server_ts"))
    if ts is None:
        raise Reject("origin_server_ts is not an integer", field="origin_server_ts")
    return ev, state_key, sender, ts


def _parse_group_call(event: object) -> GroupCall:
    ev, state_key, _sender, ts = _event_head(event, GROUP_CALL_EVENT)
    content = get_dict(ev.get("content"))
    if content is None:
        raise Reject("content is not an object", field="content")
    raw_intent, raw_type = as_str(content.get("m.intent")), as_str(content.get("m.type"))
    intent = None if raw_intent is None else GroupCallIntent(raw_intent)
    call_type = None if raw_type is None else GroupCallType(raw_type)
    # js-sdk ignores the call unless both are among its enum values.
    if intent is None or not intent.known:
        raise Reject("m.intent is not m.ring, m.prompt or m.room", field="m.intent")
    if call_type is None or not call_type.known:
        raise Reject("m.type is not m.video or m.voice", field="m.type")
    name = as_str(content.get("m.name"))
    terminated = content.get("m.terminated")
    return GroupCall(
        conf_id=state_key,
        intent=intent,
        call_type=call_type,
        origin_server_ts=ts,
        event_id=as_str(ev.get("event_id")) or "",
        name=name,
        # Any truthy m.terminated ends the call for js-sdk.
        terminated=(str(terminated) if terminated else None),
    )


def parse_group_call_event(event: object) -> GroupCall | None:
    """A ``org.matrix.msc3401.call`` state event, or None (logged) if js-sdk would drop it."""
    return parse_or_none("msc3401 call", lambda: _parse_group_call(event))


def choose_group_call(calls: Iterable[GroupCall]) -> GroupCall | None:
    """The room's call as js-sdk picks it: the latest live one (then the greatest conf_id)."""
    live = [c for c in calls if c.live]
    if not live:
        return None
    return max(live, key=lambda c: (c.origin_server_ts, c.conf_id))


def new_group_call_content(
    *,
    call_type: GroupCallType = GroupCallType.VIDEO,
    intent: GroupCallIntent = GroupCallIntent.ROOM,
    name: str | None = None,
) -> JsonDict:
    """Content of a new ``org.matrix.msc3401.call`` (state key: a fresh conf_id)."""
    out: JsonDict = {"m.intent": str(intent), "m.type": str(call_type)}
    if name is not None:
        out["m.name"] = name
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class LegacyDevice:
    """One device entry of ``m.calls[].m.devices[]``."""

    device_id: str
    session_id: str
    expires_ts: int
    feeds: tuple[str, ...] = ("m.usermedia",)  # purposes

    def is_expired(self, now_ms: int) -> bool:
        return self.expires_ts <= now_ms

    def to_json(self) -> JsonDict:
        return {
            "device_id": self.device_id,
            "session_id": self.session_id,
            "expires_ts": self.expires_ts,
            "feeds": [{"purpose": p} for p in self.feeds],
        }


def _device(raw: object) -> LegacyDevice | None:
    """js-sdk's filter; None for an entry it would skip (expiry is checked by callers)."""
    d = get_dict(raw)
    if d is None:
        return None
    device_id, session_id = as_str(d.get("device_id")), as_str(d.get("session_id"))
    expires = d.get("expires_ts")
    feeds = d.get("feeds")
    if device_id is None or session_id is None or not isinstance(feeds, list):
        return None
    if isinstance(expires, bool) or not isinstance(expires, int | float):
        return None
    purposes = tuple(
        p
        for f in feeds
        if (fd := get_dict(f)) is not None and (p := as_str(fd.get("purpose"))) is not None
    )
    # Float milliseconds are numbers for js-sdk too; compare them as the integer floor.
    return LegacyDevice(
        device_id=device_id,
        session_id=session_id,
        expires_ts=int(expires) if expires == expires and abs(expires) < 2**53 else 0,
        feeds=purposes,
    )


def is_2022_member_content(content: Mapping[str, object]) -> bool:
    """Whether a ``call.member`` content is the 2022 per-user form (``m.calls``)."""
    return CALLS_KEY in content


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberEvent:
    """One user's ``org.matrix.msc3401.call.member`` (2022 form): every call, every device."""

    user_id: str
    event_id: str
    origin_server_ts: int
    calls: Mapping[str, tuple[LegacyDevice, ...]] = field(default_factory=dict)

    def devices_in(self, conf_id: str, now_ms: int) -> tuple[LegacyDevice, ...]:
        """The user's valid, unexpired devices in call ``conf_id`` (the last entry per
        device id wins)."""
        by_id: dict[str, LegacyDevice] = {}
        for d in self.calls.get(conf_id, ()):
            if not d.is_expired(now_ms):
                by_id[d.device_id] = d
        return tuple(by_id.values())

    def next_expiry(self, conf_id: str, now_ms: int) -> int | None:
        times = [d.expires_ts for d in self.devices_in(conf_id, now_ms)]
        return min(times) if times else None


def _parse_member(event: object) -> MemberEvent:
    ev, state_key, sender, ts = _event_head(event, MEMBER_EVENT)
    if state_key != sender:
        raise Reject("state key is not the sender's user id", field="state_key")
    content = get_dict(ev.get("content"))
    if content is None:
        raise Reject("content is not an object", field="content")
    raw_calls = content.get(CALLS_KEY)
    calls: dict[str, tuple[LegacyDevice, ...]] = {}
    if isinstance(raw_calls, list):  # js-sdk: anything else counts as no calls
        for raw in raw_calls[:_MAX_CALLS]:
            call = get_dict(raw)
            if call is None:
                continue
            conf_id = as_str(call.get("m.call_id"))
            devices = call.get("m.devices")
            if conf_id is None or not isinstance(devices, list):
                continue
            parsed = tuple(d for d in map(_device, devices[:_MAX_DEVICES]) if d is not None)
            calls[conf_id] = calls.get(conf_id, ()) + parsed
    return MemberEvent(
        user_id=sender, event_id=as_str(ev.get("event_id")) or "", origin_server_ts=ts, calls=calls
    )


def parse_member_event(event: object) -> MemberEvent | None:
    """A 2022-form ``call.member`` event (any content: no ``m.calls`` means no calls), or
    None (logged) if it is not a well-formed state event of its sender."""
    return parse_or_none("msc3401 call.member", lambda: _parse_member(event))


def update_member_content(
    current: Mapping[str, object] | None,
    *,
    conf_id: str,
    device_id: str,
    own: LegacyDevice | None,
    now_ms: int,
) -> JsonDict:
    """Our user's next ``call.member`` content: ``current`` with our device's entry in
    ``conf_id`` replaced by ``own`` (or removed when ``own`` is None).

    Other calls are kept untouched; in ``conf_id`` the other devices' entries are kept as
    they are (unknown fields included) unless invalid or expired; the call entry's own extra
    fields are kept; a call left without devices is dropped (js-sdk ``updateDevices``).
    """
    raw_calls = current.get(CALLS_KEY) if current is not None else None
    calls: list[JsonValue] = list(raw_calls) if isinstance(raw_calls, list) else []
    others: list[JsonValue] = []
    entry: dict[str, JsonValue] = {}
    # Several entries of conf_id (a client's bug) are read as one call with all their devices
    # (parse_member_event): merge them, or the devices of all but the last would be dropped.
    raw_devices: list[JsonValue] = []
    for raw in calls:
        call = get_dict(raw)
        if call is not None and call.get("m.call_id") == conf_id:
            entry = {**entry, **call}
            devices = call.get("m.devices")
            if isinstance(devices, list):
                raw_devices.extend(devices)
        else:
            others.append(raw)
    kept: list[JsonValue] = []
    for raw in raw_devices:
        d = _device(raw)
        if d is None or d.is_expired(now_ms) or d.device_id == device_id:
            continue
        kept.append(raw)
    if own is not None:
        kept.append(own.to_json())
    out_calls: list[JsonValue] = others
    if kept:
        out_calls = [*others, {**entry, "m.call_id": conf_id, "m.devices": kept}]
    return {CALLS_KEY: out_calls}


def devices_of(
    events: Sequence[MemberEvent], conf_id: str, now_ms: int
) -> dict[tuple[str, str], LegacyDevice]:
    """``(user_id, device_id) -> entry`` over several users' events (helper for sessions)."""
    out: dict[tuple[str, str], LegacyDevice] = {}
    for ev in events:
        for d in ev.devices_in(conf_id, now_ms):
            out[(ev.user_id, d.device_id)] = d
    return out
