"""Call memberships in both dialects: parse, validate, serialise (pure).

Two wire forms describe "device D of user U is in the call" (spec/matrixrtc.md §1):

* **state form** — state event ``org.matrix.msc3401.call.member`` at state key
  ``_{user}_{device}_m.call`` (``{user}_{device}_m.call`` in MSC3757 rooms), content
  :class:`SessionMembershipData`; leave is content ``{}``. Element Call's default.
* **sticky form** — room event ``org.matrix.msc4143.rtc.member`` sent sticky (MSC4354),
  content :class:`RtcMemberData`; leave is ``{"msc4354_sticky_key": <member.id>}``.

Public API (every parser returns None on invalid input and logs why; none raises)::

    parse_membership_event(event, room_version=None) -> CallMembership | MembershipLeft | None
    SessionMembershipData.from_json(content) / .to_json()          # state-form join content
    SessionMembershipData.for_join(user_id=…, device_id=…, transports=…, …)  # what EC sends
    RtcMemberData.from_json(content) / .to_json()                  # sticky-form content
    RtcMemberData.for_join(user_id=…, device_id=…, member_id=…, transports=…, …)
    state_key_for(user_id, device_id, room_version=None)           # our own state key
    state_leave_content() -> {}
    sticky_leave_content(member_id) -> {"msc4354_sticky_key": member_id}
    classify_content(content) -> ContentKind                        # js-sdk's quick filter

A :class:`CallMembership` is one valid join from either dialect, with the derived values the
session needs: ``slot_id``, ``created_ts`` (ordering), ``expires_at`` (state form only),
``member_id``, ``rtc_backend_identity`` (LiveKit identity), ``transports``, ``key`` (what a
later event at the same place replaces).

Validation follows js-sdk's ``checkSessionsMembershipData`` / ``checkRtcMembershipData`` and
adds hardening: a state-form event is dropped unless its state key belongs to its sender and
names the content's device (on Synapse anyone with the power level may overwrite another
user's ``_@…`` key); sticky ``member.user_id`` must equal the sender (js-sdk does this too).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Final

from matrixrtc.model._json import (
    JsonDict,
    JsonValue,
    Reject,
    Suspicious,
    as_int,
    as_str,
    get_dict,
    is_mxid,
    parse_or_none,
)
from matrixrtc.model.event_types import EventType
from matrixrtc.model.livekit_ids import DEFAULT_SLOT_ID, legacy_identity, livekit_identity
from matrixrtc.model.transports import (
    FocusActive,
    FocusSelection,
    LivekitTransport,
    Transport,
    parse_focus_active,
    parse_transport,
)

__all__ = [
    "CALL_APPLICATION",
    "DEFAULT_EXPIRES_MS",
    "DEFAULT_SLOT_ID",
    "STICKY_KEY_FIELD",
    "CallMembership",
    "ContentKind",
    "Dialect",
    "MembershipKey",
    "MembershipLeft",
    "RtcApplication",
    "RtcMember",
    "RtcMemberData",
    "SessionMembershipData",
    "classify_content",
    "is_msc3757_room_version",
    "parse_membership_event",
    "slot_id_for",
    "state_key_for",
    "state_leave_content",
    "sticky_leave_content",
]

CALL_APPLICATION: Final = "m.call"
# js-sdk DEFAULT_EXPIRE_DURATION: used when a state-form membership carries no `expires`.
DEFAULT_EXPIRES_MS: Final = 14_400_000
STICKY_KEY_FIELD: Final = "msc4354_sticky_key"
_STICKY_KEY_STABLE: Final = "sticky_key"
_MSC3757_RE = re.compile(r"^org\.matrix\.msc(3757|3779)\b")


class Dialect(StrEnum):
    STATE = "state"  # org.matrix.msc3401.call.member state event
    STICKY = "sticky"  # org.matrix.msc4143.rtc.member sticky room event


class ContentKind(StrEnum):
    """Result of js-sdk's quick filter on membership content (§1.3 step 2)."""

    LEFT = "left"  # no keys besides the sticky key
    LEGACY_ARRAY = "legacy_array"  # only `memberships`: the dead per-user format, ignored
    CANDIDATE = "candidate"  # worth a strict parse
    INVALID = "invalid"  # one key only, or no `application`


def classify_content(content: Mapping[str, object]) -> ContentKind:
    keys = [k for k in content if k != STICKY_KEY_FIELD]
    if not keys:
        return ContentKind.LEFT
    if keys == ["memberships"]:
        return ContentKind.LEGACY_ARRAY
    if len(keys) > 1 and "application" in content:
        return ContentKind.CANDIDATE
    return ContentKind.INVALID


def is_msc3757_room_version(room_version: str | None) -> bool:
    """Rooms whose version lets a user own ``@user…``-prefixed state keys (MSC3757/3779)."""
    return room_version is not None and _MSC3757_RE.match(room_version) is not None


def slot_id_for(application: str, call_id: str) -> str:
    """State form slot id: js-sdk maps the room call (``call_id == ""``) to ``ROOM``."""
    if application == CALL_APPLICATION and call_id == "":
        return DEFAULT_SLOT_ID
    return f"{application}#{call_id}"


def state_key_for(
    user_id: str,
    device_id: str,
    room_version: str | None = None,
    *,
    application: str = CALL_APPLICATION,
    call_id: str = "",
) -> str:
    """Our own state key: ``_{user}_{device}_{application}{slot}``, no ``_`` in MSC3757 rooms.

    For the room call the slot suffix is empty; otherwise js-sdk appends the call id directly.
    """
    key = f"{user_id}_{device_id}_{application}{call_id}"
    return key if is_msc3757_room_version(room_version) else f"_{key}"


def state_leave_content() -> JsonDict:
    return {}


def sticky_leave_content(member_id: str) -> JsonDict:
    return {STICKY_KEY_FIELD: member_id}


def _opt_str(d: Mapping[str, object], key: str, *, null_ok: bool = False) -> str | None:
    # js-sdk rejects an explicit null for the optional fields it type-checks.
    if key not in d or (null_ok and d[key] is None):
        return None
    value = d[key]
    if not isinstance(value, str):
        raise Reject(f"{key} is not a string")
    return value


def _opt_int(d: Mapping[str, object], key: str, *, null_ok: bool = False) -> int | None:
    if key not in d or (null_ok and d[key] is None):
        return None
    number = as_int(d[key])
    if number is None:
        raise Reject(f"{key} is not an integer")
    return number


def _req_str(d: Mapping[str, object], key: str) -> str:
    value = as_str(d.get(key))
    if value is None:
        raise Reject(f"{key} is not a string")
    return value


def _transports(value: object, field: str) -> tuple[Transport, ...]:
    if not isinstance(value, list):
        raise Reject(f"{field} is not an array")
    out: list[Transport] = []
    for item in value:
        t = parse_transport(item)
        if t is None:
            raise Reject(f"{field} has an entry without a string type")
        out.append(t)
    return tuple(out)


# --------------------------------------------------------------------------- state form


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionMembershipData:
    """State-form join content (js-sdk ``SessionMembershipData``), JSON names in comments."""

    application: str  # "application"
    call_id: str  # "call_id"; "" is the room call
    device_id: str  # "device_id"
    focus_active: FocusActive  # "focus_active"
    foci_preferred: tuple[Transport, ...] = ()  # "foci_preferred"; always written
    scope: str | None = "m.room"  # "scope"
    membership_id: str | None = None  # "membershipID"
    expires: int | None = None  # "expires", ms after created_ts
    intent: str | None = None  # "m.call.intent": "audio" | "video" | …
    created_ts: int | None = None  # "created_ts": first join's origin_server_ts, carried on

    @property
    def slot_id(self) -> str:
        return slot_id_for(self.application, self.call_id)

    @classmethod
    def for_join(
        cls,
        *,
        user_id: str,
        device_id: str,
        transports: Sequence[Transport],
        multi_sfu: bool = True,
        intent: str | None = None,
        expires: int = DEFAULT_EXPIRES_MS,
        created_ts: int | None = None,
        application: str = CALL_APPLICATION,
        call_id: str = "",
    ) -> SessionMembershipData:
        """The content Element Call sends (§1.1).

        ``multi_sfu=True`` is EC's default compatibility mode: ``transports[0]`` is where we
        publish. ``created_ts`` is None on the first join and the first join's
        ``origin_server_ts`` on every later send.
        """
        selection = FocusSelection.MULTI_SFU if multi_sfu else FocusSelection.OLDEST_MEMBERSHIP
        return cls(
            application=application,
            call_id=call_id,
            device_id=device_id,
            focus_active=FocusActive(focus_selection=selection),
            foci_preferred=tuple(transports),
            scope="m.room",
            membership_id=f"{user_id}:{device_id}",
            expires=expires,
            intent=intent,
            created_ts=created_ts,
        )

    def with_refresh(self, *, expires: int, created_ts: int) -> SessionMembershipData:
        """Same membership with a longer ``expires`` and the original ``created_ts``."""
        return replace(self, expires=expires, created_ts=created_ts)

    def to_json(self) -> JsonDict:
        out: JsonDict = {
            "application": self.application,
            "call_id": self.call_id,
        }
        if self.scope is not None:
            out["scope"] = self.scope
        out["device_id"] = self.device_id
        if self.membership_id is not None:
            out["membershipID"] = self.membership_id
        if self.expires is not None:
            out["expires"] = self.expires
        if self.intent is not None:
            out["m.call.intent"] = self.intent
        out["focus_active"] = self.focus_active.to_json()
        out["foci_preferred"] = [t.to_json() for t in self.foci_preferred]
        if self.created_ts is not None:
            out["created_ts"] = self.created_ts
        return out

    @classmethod
    def from_json(cls, content: object) -> SessionMembershipData | None:
        """Strict parse of join content; None (logged) if invalid."""
        return parse_or_none("call.member content", lambda: _parse_session(content))


def _parse_session(content: object) -> SessionMembershipData:
    d = get_dict(content)
    if d is None:
        raise Reject("content is not an object")
    kind = classify_content(d)
    if kind is not ContentKind.CANDIDATE:
        raise Reject(f"content is {kind.value}")
    device_id = _req_str(d, "device_id")
    if not device_id:
        raise Reject("device_id is empty")
    call_id = _req_str(d, "call_id")
    application = _req_str(d, "application")
    if "focus_active" not in d:
        raise Reject("focus_active missing")
    focus_active = parse_focus_active(d["focus_active"])
    if focus_active is None:
        raise Reject("focus_active invalid")
    foci: tuple[Transport, ...] = ()
    if "foci_preferred" in d:
        foci = _transports(d["foci_preferred"], "foci_preferred")
    # js-sdk does not type-check `expires` (null means the default); we require a number.
    expires = _opt_int(d, "expires", null_ok=True)
    if expires is not None and expires < 0:
        raise Reject("expires is negative")
    created_ts = _opt_int(d, "created_ts")
    return SessionMembershipData(
        application=application,
        call_id=call_id,
        device_id=device_id,
        focus_active=focus_active,
        foci_preferred=foci,
        scope=_opt_str(d, "scope"),
        membership_id=_opt_str(d, "membershipID", null_ok=True),
        expires=expires,
        intent=_opt_str(d, "m.call.intent"),
        created_ts=created_ts,
    )


# -------------------------------------------------------------------------- sticky form


@dataclass(frozen=True, slots=True, kw_only=True)
class RtcApplication:
    """Sticky ``application``: ``{"type": "m.call", "m.call.intent"?: …}``."""

    type: str = CALL_APPLICATION
    intent: str | None = None  # "m.call.intent"

    def to_json(self) -> JsonDict:
        out: JsonDict = {"type": self.type}
        if self.intent is not None:
            out["m.call.intent"] = self.intent
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class RtcMember:
    """Sticky ``member``: ``{"device_id", "user_id", "id"}``; ``id`` is a per-join UUID."""

    user_id: str
    device_id: str
    id: str

    def to_json(self) -> JsonDict:
        return {"device_id": self.device_id, "user_id": self.user_id, "id": self.id}


@dataclass(frozen=True, slots=True, kw_only=True)
class RtcMemberData:
    """Sticky-form join content (js-sdk ``RtcMembershipData``)."""

    application: RtcApplication
    slot_id: str  # "slot_id", e.g. "m.call#ROOM"
    member: RtcMember
    rtc_transports: tuple[Transport, ...] = ()  # "rtc_transports"; [0] is where it publishes
    versions: tuple[str, ...] = ()  # "versions"
    sticky_key: str  # "msc4354_sticky_key" (== member.id when EC sends it)
    relates_to: str | None = None  # "m.relates_to".event_id (m.reference) on re-sends

    @classmethod
    def for_join(
        cls,
        *,
        user_id: str,
        device_id: str,
        member_id: str,
        transports: Sequence[Transport],
        intent: str | None = None,
        slot_id: str = DEFAULT_SLOT_ID,
        previous_event_id: str | None = None,
    ) -> RtcMemberData:
        """The content Element Call's matrix_2_0 mode sends (§1.2).

        LiveKit transports lose ``livekit_alias`` here, as js-sdk strips it in this form.
        """
        application = slot_id.split("#", 1)[0]
        return cls(
            application=RtcApplication(type=application, intent=intent),
            slot_id=slot_id,
            member=RtcMember(user_id=user_id, device_id=device_id, id=member_id),
            rtc_transports=tuple(
                LivekitTransport(livekit_service_url=t.livekit_service_url)
                if isinstance(t, LivekitTransport)
                else t
                for t in transports
            ),
            sticky_key=member_id,
            relates_to=previous_event_id,
        )

    def to_json(self) -> JsonDict:
        # js-sdk writes the relation as "m.relation" (a bug); we write the field its own
        # validator reads, which is also what the event type declares.
        out: JsonDict = {
            "application": self.application.to_json(),
            "slot_id": self.slot_id,
            "rtc_transports": [t.to_json() for t in self.rtc_transports],
            "member": self.member.to_json(),
            "versions": list(self.versions),
            STICKY_KEY_FIELD: self.sticky_key,
        }
        if self.relates_to is not None:
            out["m.relates_to"] = {"rel_type": "m.reference", "event_id": self.relates_to}
        return out

    @classmethod
    def from_json(cls, content: object, *, sender: str | None = None) -> RtcMemberData | None:
        """Strict parse; with ``sender``, also require ``member.user_id == sender``."""
        return parse_or_none("rtc.member content", lambda: _parse_rtc(content, sender))


def _sticky_key(d: Mapping[str, object]) -> str:
    unstable = d.get(STICKY_KEY_FIELD)
    stable = d.get(_STICKY_KEY_STABLE)
    if unstable is None and stable is None:
        raise Reject("no sticky key")
    if unstable is not None and not isinstance(unstable, str):
        raise Reject("msc4354_sticky_key is not a string")
    if stable is not None and not isinstance(stable, str):
        raise Reject("sticky_key is not a string")
    if unstable is not None and stable is not None and unstable != stable:
        raise Reject("sticky_key and msc4354_sticky_key differ")
    if isinstance(unstable, str):
        return unstable
    if isinstance(stable, str):
        return stable
    raise Reject("no sticky key")  # unreachable: one of them is a string by now


def _parse_rtc(content: object, sender: str | None) -> RtcMemberData:
    d = get_dict(content)
    if d is None:
        raise Reject("content is not an object")
    kind = classify_content(d)
    if kind is not ContentKind.CANDIDATE:
        raise Reject(f"content is {kind.value}")
    app = get_dict(d.get("application"))
    if app is None:
        raise Reject("application is not an object")
    app_type = _req_str(app, "type")
    if "#" in app_type:
        raise Reject("application.type contains '#'")
    slot_id = _req_str(d, "slot_id")
    if not slot_id.startswith(f"{app_type}#") or slot_id.count("#") != 1:
        raise Reject("slot_id does not match application.type")
    member = get_dict(d.get("member"))
    if member is None:
        raise Reject("member is not an object")
    user_id = _req_str(member, "user_id")
    if not is_mxid(user_id):
        raise Reject("member.user_id is not a user id")
    if sender is not None and user_id != sender:
        raise Suspicious("member.user_id is not the sender", user_id=user_id, sender=sender)
    device_id = _req_str(member, "device_id")
    member_id = _req_str(member, "id")
    transports = _transports(d.get("rtc_transports"), "rtc_transports")
    versions_raw = d.get("versions")
    if not isinstance(versions_raw, list) or not all(isinstance(v, str) for v in versions_raw):
        raise Reject("versions is not an array of strings")
    versions = tuple(v for v in versions_raw if isinstance(v, str))
    sticky_key = _sticky_key(d)
    relates_to: str | None = None
    if "m.relates_to" in d:
        rel = get_dict(d["m.relates_to"])
        if rel is None or rel.get("rel_type") != "m.reference":
            raise Reject("m.relates_to is not an m.reference")
        relates_to = _req_str(rel, "event_id")
    return RtcMemberData(
        application=RtcApplication(
            type=app_type, intent=_opt_str(app, "m.call.intent", null_ok=True)
        ),
        slot_id=slot_id,
        member=RtcMember(user_id=user_id, device_id=device_id, id=member_id),
        rtc_transports=transports,
        versions=versions,
        sticky_key=sticky_key,
        relates_to=relates_to,
    )


# ---------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class MembershipKey:
    """Where a membership lives; a later event with the same key replaces it.

    State form: ``(STATE, sender, state_key)``. Sticky form: ``(STICKY, sender, sticky_key)``.
    """

    dialect: Dialect
    sender: str
    key: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CallMembership:
    """One valid join, from either dialect, with the event fields the session needs."""

    dialect: Dialect
    event_id: str
    sender: str
    origin_server_ts: int
    data: SessionMembershipData | RtcMemberData
    state_key: str | None = None  # state form only

    @property
    def key(self) -> MembershipKey:
        if isinstance(self.data, RtcMemberData):
            return MembershipKey(Dialect.STICKY, self.sender, self.data.sticky_key)
        return MembershipKey(Dialect.STATE, self.sender, self.state_key or "")

    @property
    def user_id(self) -> str:
        return self.sender

    @property
    def device_id(self) -> str:
        if isinstance(self.data, RtcMemberData):
            return self.data.member.device_id
        return self.data.device_id

    @property
    def slot_id(self) -> str:
        return self.data.slot_id

    @property
    def created_ts(self) -> int:
        """Ordering timestamp (js ``createdTs()``): state ``created_ts ?? origin_server_ts``."""
        if isinstance(self.data, SessionMembershipData) and self.data.created_ts is not None:
            return self.data.created_ts
        return self.origin_server_ts

    @property
    def expires_at(self) -> int | None:
        """State form: ``created_ts + (expires ?? 4 h)``. Sticky form: None (store expiry)."""
        if isinstance(self.data, SessionMembershipData):
            expires = self.data.expires if self.data.expires is not None else DEFAULT_EXPIRES_MS
            return self.created_ts + expires
        return None

    def is_expired(self, now_ms: int) -> bool:
        at = self.expires_at
        return at is not None and at <= now_ms

    @property
    def member_id(self) -> str:
        """Sticky: ``member.id``. State: ``membershipID`` or ``"{user}:{device}"``."""
        if isinstance(self.data, RtcMemberData):
            return self.data.member.id
        return self.data.membership_id or legacy_identity(self.sender, self.data.device_id)

    @property
    def rtc_backend_identity(self) -> str:
        """LiveKit participant identity: ``@u:hs:DEV`` (state) or the §4.5 hash (sticky)."""
        if isinstance(self.data, RtcMemberData):
            m = self.data.member
            return livekit_identity(m.user_id, m.device_id, m.id)
        return legacy_identity(self.sender, self.data.device_id)

    @property
    def transports(self) -> tuple[Transport, ...]:
        """``foci_preferred`` (state) or ``rtc_transports`` (sticky), in advertised order."""
        if isinstance(self.data, RtcMemberData):
            return self.data.rtc_transports
        return self.data.foci_preferred

    @property
    def focus_active(self) -> FocusActive | None:
        return self.data.focus_active if isinstance(self.data, SessionMembershipData) else None

    @property
    def intent(self) -> str | None:
        if isinstance(self.data, RtcMemberData):
            return self.data.application.intent
        return self.data.intent


@dataclass(frozen=True, slots=True, kw_only=True)
class MembershipLeft:
    """An explicit leave (``{}`` / sticky-key-only content) at ``key``."""

    key: MembershipKey
    event_id: str
    origin_server_ts: int


def _state_key_owner_ok(
    state_key: str, sender: str, device_id: str, room_version: str | None
) -> str | None:
    """None if the key belongs to sender+device, else the reason it does not."""
    if state_key.startswith(f"_{sender}_"):
        rest = state_key[len(sender) + 2 :]
    elif state_key.startswith(f"{sender}_"):
        # Only MSC3757 rooms let a user own an `@user…` key that is not exactly their id; in
        # other rooms the homeserver refuses it, so an unknown version is safe to accept.
        if room_version is not None and not is_msc3757_room_version(room_version):
            return "@-prefixed state key outside an MSC3757 room"
        rest = state_key[len(sender) + 1 :]
    else:
        return "state key does not belong to the sender"
    # `{device}_{application}{slot}`, or the older `{device}` alone.
    if rest != device_id and not rest.startswith(f"{device_id}_"):
        return "state key names another device"
    return None


def _event_fields(
    event: object,
) -> tuple[dict[str, JsonValue], str, str, int, dict[str, JsonValue]]:
    ev = get_dict(event)
    if ev is None:
        raise Reject("event is not an object")
    etype = ev.get("type")
    if not isinstance(etype, str):
        raise Reject("event type is not a string")
    sender = as_str(ev.get("sender"))
    if sender is None or not is_mxid(sender):
        raise Reject("sender is not a user id")
    event_id = as_str(ev.get("event_id"))
    if event_id is None:
        raise Reject("event_id is not a string")
    ts = as_int(ev.get("origin_server_ts"))
    if ts is None:
        raise Reject("origin_server_ts is not an integer")
    content = get_dict(ev.get("content"))
    if content is None:
        raise Reject("content is not an object")
    return ev, sender, event_id, ts, content


def _parse_event(event: object, room_version: str | None) -> CallMembership | MembershipLeft:
    ev, sender, event_id, ts, content = _event_fields(event)
    etype = ev["type"]
    ctx = {"event_id": event_id, "sender": sender}
    kind = classify_content(content)
    if etype == EventType.CALL_MEMBER:
        state_key = as_str(ev.get("state_key"))
        if state_key is None:
            raise Reject("call.member without a string state_key", **ctx)
        key = MembershipKey(Dialect.STATE, sender, state_key)
        if kind is ContentKind.LEFT:
            return MembershipLeft(key=key, event_id=event_id, origin_server_ts=ts)
        if kind is not ContentKind.CANDIDATE:
            raise Reject(f"content is {kind.value}", **ctx)
        data = SessionMembershipData.from_json(content)
        if data is None:
            raise Reject("invalid call.member content", **ctx)
        bad_key = _state_key_owner_ok(state_key, sender, data.device_id, room_version)
        if bad_key is not None:
            raise Suspicious(bad_key, state_key=state_key, device_id=data.device_id, **ctx)
        return CallMembership(
            dialect=Dialect.STATE,
            event_id=event_id,
            sender=sender,
            origin_server_ts=ts,
            data=data,
            state_key=state_key,
        )
    if etype == EventType.RTC_MEMBER:
        if kind is ContentKind.LEFT:
            return MembershipLeft(
                key=MembershipKey(Dialect.STICKY, sender, _sticky_key(content)),
                event_id=event_id,
                origin_server_ts=ts,
            )
        if kind is not ContentKind.CANDIDATE:
            raise Reject(f"content is {kind.value}", **ctx)
        rtc = RtcMemberData.from_json(content, sender=sender)
        if rtc is None:
            raise Reject("invalid rtc.member content", **ctx)
        return CallMembership(
            dialect=Dialect.STICKY, event_id=event_id, sender=sender, origin_server_ts=ts, data=rtc
        )
    raise Reject("not a membership event type", type=etype, **ctx)


def parse_membership_event(
    event: object, room_version: str | None = None
) -> CallMembership | MembershipLeft | None:
    """Parse a full client-format event of either membership type.

    ``event`` is the sync JSON (``type``, ``sender``, ``event_id``, ``origin_server_ts``,
    ``content``, ``state_key`` for the state form). ``room_version`` (from ``m.room.create``)
    decides whether ``@user…`` state keys are legitimate; None accepts them (the homeserver
    rejects them in other rooms anyway). Returns a join, a leave, or None (logged) for
    anything invalid, forged or ignorable (the legacy ``memberships`` array).
    """
    return parse_or_none("membership event", lambda: _parse_event(event, room_version))
