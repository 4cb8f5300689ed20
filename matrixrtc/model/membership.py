"""Call memberships in both dialects: parse, validate, serialise (pure).

Two wire forms describe "device D of user U is in the call" (spec/matrixrtc.md §1):

* **state form** — state event ``org.matrix.msc3401.call.member`` at state key
  ``_{user}_{device}_m.call`` (``{user}_{device}_m.call`` in MSC3757 rooms), content
  :class:`SessionMembershipData`; leave is content ``{}``. Element Call's default.
* **sticky form** — room event ``org.matrix.msc4143.rtc.member`` sent sticky (MSC4354),
  content :class:`RtcMemberData`; leave is ``{"slot_id": …, "msc4354_sticky_key": <member.id>}``.
  Written in js-sdk 43's shape (``transports: {published, can_subscribe}``); the older
  ``rtc_transports`` shape is still read (js-sdk 43 drops it; spec §1.2 correction).

Public API (every parser returns None on invalid input and logs why; none raises)::

    parse_membership_event(event, room_version=None) -> CallMembership | MembershipLeft | None
    SessionMembershipData.from_json(content) / .to_json()          # state-form join content
    SessionMembershipData.for_join(user_id=…, device_id=…, transports=…, …)  # what EC sends
    RtcMemberData.from_json(content) / .to_json()                  # sticky-form content
    RtcMemberData.for_join(user_id=…, device_id=…, member_id=…, transports=…, …)
    state_key_for(user_id, device_id, room_version=None)           # our own state key
    state_leave_content() -> {}
    sticky_leave_content(member_id, slot_id) -> {"slot_id": …, "msc4354_sticky_key": member_id}
    classify_content(content) -> ContentKind                        # js-sdk's quick filter

A :class:`CallMembership` is one valid join from either dialect, with the derived values the
session needs: ``slot_id``, ``created_ts`` (ordering), ``expires_at`` (state form only),
``member_id``, ``rtc_backend_identity`` (LiveKit identity), ``transports``, ``key`` (what a
later event at the same place replaces).

Validation is js-sdk 43's quick filter + ``checkSessionsMembershipData`` /
``checkRtcMembershipData`` field for field (fields it does not type-check never reject; a
wrong type counts as absent), checked against js-sdk itself by
``tests/unit/test_membership_js_verdicts.py``. Every rejected membership is logged at info
with sender, field and reason, rate-limited per sender (:mod:`matrixrtc.model.rejections`).
Two deliberate differences: the old sticky ``rtc_transports`` shape is read, and this
hardening: a state-form event is dropped unless its state key belongs to its sender and
names the content's device (on Synapse anyone with the power level may overwrite another
user's ``_@…`` key); sticky ``member.user_id`` must equal the sender (js-sdk does this too).
"""

from __future__ import annotations

import math
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
    log_parser_bug,
    log_reject,
    parse_or_none,
)
from matrixrtc.model.event_types import EventType
from matrixrtc.model.livekit_ids import DEFAULT_SLOT_ID, legacy_identity, livekit_identity
from matrixrtc.model.msc4354 import STICKY_KEY_FIELD
from matrixrtc.model.rejections import MEMBERSHIP_REJECTIONS, RejectionLog
from matrixrtc.model.transports import (
    LIVEKIT_TYPE,
    FocusActive,
    FocusSelection,
    LivekitTransport,
    Transport,
    focus_selection,
    parse_transport,
)

__all__ = [
    "CALL_APPLICATION",
    "DEFAULT_EXPIRES_MS",
    "DEFAULT_SLOT_ID",
    "CallMembership",
    "ContentKind",
    "Dialect",
    "MembershipKey",
    "MembershipLeft",
    "RtcApplication",
    "RtcMember",
    "RtcMemberData",
    "RtcTransports",
    "SessionMembershipData",
    "TransportsShape",
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
_STICKY_KEY_STABLE: Final = "sticky_key"
_MSC3757_RE = re.compile(r"^org\.matrix\.msc(3757|3779)\b")


class Dialect(StrEnum):
    STATE = "state"  # org.matrix.msc3401.call.member state event
    STICKY = "sticky"  # org.matrix.msc4143.rtc.member sticky room event
    # org.matrix.msc3401.call.member keyed by user, ``m.calls`` (Hydrogen, legacy js-sdk
    # GroupCall): read by session/legacy_call.py, never a CallMembership.
    MSC3401_2022 = "msc3401_2022"


class ContentKind(StrEnum):
    """Result of js-sdk's quick filter on membership content (§1.3 step 2)."""

    LEFT = "left"  # no keys besides the sticky key
    LEGACY_ARRAY = "legacy_array"  # only `memberships`: the dead per-user format, ignored
    CANDIDATE = "candidate"  # worth a strict parse
    INVALID = "invalid"  # one key only, or no `application`


def classify_content(content: Mapping[str, object]) -> ContentKind:
    # js-sdk 43 isLeftMembershipContent: nothing besides the slot id and the sticky key.
    if all(k in (STICKY_KEY_FIELD, "slot_id") for k in content):
        return ContentKind.LEFT
    keys = [k for k in content if k != STICKY_KEY_FIELD]
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


def sticky_leave_content(member_id: str, slot_id: str = DEFAULT_SLOT_ID) -> JsonDict:
    """js-sdk 43's sticky leave (also its delayed leave): the slot and the sticky key only."""
    return {"slot_id": slot_id, STICKY_KEY_FIELD: member_id}


def _opt_str(d: Mapping[str, object], key: str, *, null_ok: bool = False) -> str | None:
    # js-sdk rejects an explicit null for the optional fields it type-checks.
    if key not in d or (null_ok and d[key] is None):
        return None
    value = d[key]
    if not isinstance(value, str):
        raise Reject(f"{key} is not a string", field=key)
    return value


def _lax_str(d: Mapping[str, object], key: str) -> str | None:
    """A field js-sdk does not type-check: a string is used, anything else counts as absent."""
    value = d.get(key)
    return value if isinstance(value, str) else None


def _js_number(value: object) -> int | None:
    """A JSON number as js-sdk's ``typeof v === "number"`` sees it, as an int; else None.

    Floats are floored (timestamps in ms; the fraction never matters); infinities (``1e400``
    in JSON) are clamped so that ordering still works.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return _CLAMP if value > 0 else -_CLAMP
        return math.floor(value)
    return None


def _req_str(d: Mapping[str, object], key: str, *, path: str | None = None) -> str:
    value = as_str(d.get(key))
    if value is None:
        raise Reject(f"{path or key} is not a string", field=path or key)
    return value


def _transports(value: object, field: str) -> tuple[Transport, ...]:
    if not isinstance(value, list):
        raise Reject(f"{field} is not an array", field=field)
    out: list[Transport] = []
    for item in value:
        t = _parse_transport_quiet(item)
        if t is None:
            raise Reject(f"{field} has an entry without a string type", field=field)
        out.append(t)
    return tuple(out)


def _parse_transport_quiet(item: object) -> Transport | None:
    d = get_dict(item)
    if d is None or not isinstance(d.get("type"), str):
        return None
    return parse_transport(d)


# js-sdk 43 MXID_PATTERN, unanchored (`.` stops at JS line terminators).
_JS_MXID_RE = re.compile(r"@[^\n\r\u2028\u2029]+:[^\n\r\u2028\u2029]+")
_CLAMP: Final = 2**63 - 1


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
        room_id: str | None = None,
    ) -> SessionMembershipData:
        """The content Element Call sends (§1.1, js-sdk 43 ``makeMyMembership``).

        ``multi_sfu=True`` is EC's default compatibility mode: ``transports[0]`` is where we
        publish. ``created_ts`` is None on the first join and the first join's
        ``origin_server_ts`` on every later send. With ``room_id``, every LiveKit transport
        without a ``livekit_alias`` gets the room id as its alias, as Element Call writes it.
        """
        selection = FocusSelection.MULTI_SFU if multi_sfu else FocusSelection.OLDEST_MEMBERSHIP
        foci = tuple(
            replace(t, livekit_alias=room_id)
            if room_id is not None and isinstance(t, LivekitTransport) and t.livekit_alias is None
            else t
            for t in transports
        )
        return cls(
            application=application,
            call_id=call_id,
            device_id=device_id,
            focus_active=FocusActive(focus_selection=selection),
            foci_preferred=foci,
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
        # Field order as js-sdk's makeMyMembership writes it.
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
    """js-sdk 43 ``checkSessionsMembershipData``, field for field (after its quick filter).

    Fields js-sdk does not type-check (``expires``, ``membershipID``,
    ``focus_active.focus_selection``) never reject: a wrong type counts as absent.
    """
    d = get_dict(content)
    if d is None:
        raise Reject("content is not an object")
    kind = classify_content(d)
    if kind is not ContentKind.CANDIDATE:
        raise Reject(f"content is {kind.value}", field="application")
    device_id = _req_str(d, "device_id")
    call_id = _req_str(d, "call_id")
    application = _req_str(d, "application")
    if "focus_active" not in d:
        raise Reject("focus_active missing", field="focus_active")
    fa = get_dict(d["focus_active"])
    if fa is None or not isinstance(fa.get("type"), str):
        raise Reject("focus_active.type is not a string", field="focus_active.type")
    raw_selection = fa.get("focus_selection")
    focus_active = FocusActive(
        type=str(fa["type"]),
        focus_selection=focus_selection(raw_selection) if isinstance(raw_selection, str) else None,
    )
    foci: tuple[Transport, ...] = ()
    if "foci_preferred" in d:
        foci = _transports(d["foci_preferred"], "foci_preferred")
    created_ts: int | None = None
    if "created_ts" in d:
        created_ts = _js_number(d["created_ts"])
        if created_ts is None:
            raise Reject("created_ts is not a number", field="created_ts")
    # js-sdk: `expires ?? DEFAULT_EXPIRE_DURATION`, never type-checked.
    expires = _js_number(d.get("expires"))
    return SessionMembershipData(
        application=application,
        call_id=call_id,
        device_id=device_id,
        focus_active=focus_active,
        foci_preferred=foci,
        scope=_opt_str(d, "scope"),
        membership_id=_lax_str(d, "membershipID"),
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


class TransportsShape(StrEnum):
    """Which wire shape a sticky membership's transports came in."""

    TRANSPORTS = "transports"  # js-sdk ≥ 42.2: {"published": […], "can_subscribe": […]}
    RTC_TRANSPORTS = "rtc_transports"  # older clients (and this project before issue 12)


@dataclass(frozen=True, slots=True, kw_only=True)
class RtcTransports:
    """Sticky ``transports``: where the member publishes, and which types it can receive."""

    published: tuple[Transport, ...] = ()  # "published"; [0] is where it publishes
    can_subscribe: tuple[str, ...] = (LIVEKIT_TYPE,)  # "can_subscribe": transport types
    shape: TransportsShape = TransportsShape.TRANSPORTS

    def to_json(self) -> JsonDict:
        return {
            "published": [t.to_json() for t in self.published],
            "can_subscribe": list(self.can_subscribe),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class RtcMemberData:
    """Sticky-form join content (js-sdk 43 ``RtcMembershipData``)."""

    application: RtcApplication
    slot_id: str  # "slot_id", e.g. "m.call#ROOM"
    member: RtcMember
    transports: RtcTransports = RtcTransports()  # "transports"
    versions: tuple[str, ...] = ()  # "versions"
    sticky_key: str  # "msc4354_sticky_key" (== member.id when EC sends it)
    relates_to: str | None = None  # "m.relates_to".event_id (m.reference) on re-sends

    @property
    def published(self) -> tuple[Transport, ...]:
        """``transports.published`` (or the old ``rtc_transports``), in advertised order."""
        return self.transports.published

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
        can_subscribe: Sequence[str] | None = None,
    ) -> RtcMemberData:
        """The content js-sdk 43's sticky ``makeMyMembership`` sends (§1.2 correction).

        LiveKit transports lose ``livekit_alias`` here, as js-sdk strips it in this form.
        ``can_subscribe`` defaults to ``["livekit"]`` (what js-sdk writes) plus the type of
        every other transport we publish (a mesh-capable member can also receive mesh).
        """
        application = slot_id.split("#", 1)[0]
        published = tuple(
            LivekitTransport(livekit_service_url=t.livekit_service_url)
            if isinstance(t, LivekitTransport)
            else t
            for t in transports
        )
        if can_subscribe is None:
            types = [LIVEKIT_TYPE]
            types += [t.type for t in published if t.type not in types]
            can_subscribe = types
        return cls(
            application=RtcApplication(type=application, intent=intent),
            slot_id=slot_id,
            member=RtcMember(user_id=user_id, device_id=device_id, id=member_id),
            transports=RtcTransports(published=published, can_subscribe=tuple(can_subscribe)),
            sticky_key=member_id,
            relates_to=previous_event_id,
        )

    def to_json(self) -> JsonDict:
        # Field order as js-sdk 43 sends it. js-sdk writes the relation as "m.relation" (a
        # bug nobody reads); we write the field its own validator reads, which is also what
        # the event type declares.
        out: JsonDict = {
            "slot_id": self.slot_id,
            "application": self.application.to_json(),
            "transports": self.transports.to_json(),
            "member": self.member.to_json(),
            "versions": list(self.versions),
        }
        if self.relates_to is not None:
            out["m.relates_to"] = {"rel_type": "m.reference", "event_id": self.relates_to}
        out[STICKY_KEY_FIELD] = self.sticky_key
        return out

    @classmethod
    def from_json(cls, content: object, *, sender: str | None = None) -> RtcMemberData | None:
        """Strict parse; with ``sender``, also require ``member.user_id == sender``."""
        return parse_or_none("rtc.member content", lambda: _parse_rtc(content, sender))


def _sticky_key(d: Mapping[str, object]) -> str:
    """js-sdk: ``sticky_key ?? msc4354_sticky_key`` defined; each, when present, a string;
    equal when both are present. An explicit null counts as present (and is not a string)."""
    has_unstable, has_stable = STICKY_KEY_FIELD in d, _STICKY_KEY_STABLE in d
    unstable, stable = d.get(STICKY_KEY_FIELD), d.get(_STICKY_KEY_STABLE)
    if stable is None and unstable is None:
        raise Reject("no sticky key", field=STICKY_KEY_FIELD)
    if has_stable and not isinstance(stable, str):
        raise Reject("sticky_key is not a string", field=_STICKY_KEY_STABLE)
    if has_unstable and not isinstance(unstable, str):
        raise Reject("msc4354_sticky_key is not a string", field=STICKY_KEY_FIELD)
    if isinstance(unstable, str) and isinstance(stable, str) and unstable != stable:
        raise Reject("sticky_key and msc4354_sticky_key differ", field=_STICKY_KEY_STABLE)
    if isinstance(unstable, str):
        return unstable
    if isinstance(stable, str):
        return stable
    raise Reject("no sticky key", field=STICKY_KEY_FIELD)  # unreachable


def _rtc_transports(d: Mapping[str, object]) -> RtcTransports:
    raw = d.get("transports")
    if raw is None and "transports" not in d and "rtc_transports" in d:
        # The shape before js-sdk 42.2 (js-sdk 43 rejects it; we still read it, issue 12).
        published = _transports(d["rtc_transports"], "rtc_transports")
        return RtcTransports(
            published=published, can_subscribe=(), shape=TransportsShape.RTC_TRANSPORTS
        )
    t = get_dict(raw)
    published_raw = t.get("published") if t is not None else None
    if not isinstance(published_raw, list):
        raise Reject("transports.published is not an array", field="transports.published")
    published = _transports(published_raw, "transports.published")
    subs = t.get("can_subscribe") if t is not None else None
    if not isinstance(subs, list) or not all(isinstance(s, str) for s in subs):
        raise Reject(
            "transports.can_subscribe is not an array of strings", field="transports.can_subscribe"
        )
    return RtcTransports(
        published=published, can_subscribe=tuple(s for s in subs if isinstance(s, str))
    )


def _parse_rtc(content: object, sender: str | None) -> RtcMemberData:
    """js-sdk 43 ``checkRtcMembershipData``, field for field (after its quick filter)."""
    d = get_dict(content)
    if d is None:
        raise Reject("content is not an object")
    kind = classify_content(d)
    if kind is not ContentKind.CANDIDATE:
        raise Reject(f"content is {kind.value}", field="application")
    app = get_dict(d.get("application"))
    if app is None:
        raise Reject("application is not an object", field="application")
    app_type = _req_str(app, "type", path="application.type")
    if "#" in app_type:
        raise Reject("application.type contains '#'", field="application.type")
    slot_id = _req_str(d, "slot_id")
    if not slot_id.startswith(f"{app_type}#") or slot_id.count("#") != 1:
        raise Reject("slot_id is not {application.type}#{id}", field="slot_id")
    member = get_dict(d.get("member"))
    if member is None:
        raise Reject("member is not an object", field="member")
    user_id = _req_str(member, "user_id", path="member.user_id")
    if _JS_MXID_RE.search(user_id) is None:
        raise Reject("member.user_id is not a user id", field="member.user_id")
    if sender is not None and user_id != sender:
        raise Suspicious(
            "member.user_id is not the sender",
            field="member.user_id",
            user_id=user_id,
            sender=sender,
        )
    device_id = _req_str(member, "device_id", path="member.device_id")
    member_id = _req_str(member, "id", path="member.id")
    transports = _rtc_transports(d)
    versions_raw = d.get("versions")
    if not isinstance(versions_raw, list) or not all(isinstance(v, str) for v in versions_raw):
        raise Reject("versions is not an array of strings", field="versions")
    versions = tuple(v for v in versions_raw if isinstance(v, str))
    sticky_key = _sticky_key(d)
    relates_to: str | None = None
    if "m.relates_to" in d:
        rel = get_dict(d["m.relates_to"])
        if rel is None:
            raise Reject("m.relates_to is not an object", field="m.relates_to")
        relates_to = _req_str(rel, "event_id", path="m.relates_to.event_id")
        if rel.get("rel_type") != "m.reference":
            raise Reject("m.relates_to is not an m.reference", field="m.relates_to.rel_type")
    return RtcMemberData(
        application=RtcApplication(type=app_type, intent=_lax_str(app, "m.call.intent")),
        slot_id=slot_id,
        member=RtcMember(user_id=user_id, device_id=device_id, id=member_id),
        transports=transports,
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
        """``foci_preferred`` (state) or ``transports.published`` (sticky), in advertised
        order."""
        if isinstance(self.data, RtcMemberData):
            return self.data.published
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


_REJECTION_KEYS: Final = frozenset({"kind", "sender", "field", "reason", "event_id"})


class _Quiet(Reject):
    """A rejection that is not a rejected membership (the dead ``memberships`` array, a
    sticky leave without a sticky key): logged at debug only."""


def _parse_event(event: object, room_version: str | None) -> CallMembership | MembershipLeft:
    ev, sender, event_id, ts, content = _event_fields(event)
    etype = ev["type"]
    if etype == EventType.CALL_MEMBER and "m.calls" in content:
        # The 2022 per-user form (Hydrogen, legacy GroupCall): model/msc3401_2022.py reads it.
        raise _Quiet("2022 m.calls content (read by the msc3401_2022 dialect)", field="m.calls")
    kind = classify_content(content)
    if kind is ContentKind.LEGACY_ARRAY:
        raise _Quiet("legacy memberships array (ignored, as js-sdk does)", field="memberships")
    if etype == EventType.CALL_MEMBER:
        state_key = as_str(ev.get("state_key"))
        if state_key is None:
            raise Reject("call.member without a string state_key", field="state_key")
        key = MembershipKey(Dialect.STATE, sender, state_key)
        if kind is ContentKind.LEFT:
            return MembershipLeft(key=key, event_id=event_id, origin_server_ts=ts)
        data = _parse_session(content)
        bad_key = _state_key_owner_ok(state_key, sender, data.device_id, room_version)
        if bad_key is not None:
            raise Suspicious(
                bad_key, field="state_key", state_key=state_key, device_id=data.device_id
            )
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
            try:
                sticky_key = _sticky_key(content)
            except Reject as err:
                raise _Quiet(f"sticky leave: {err.reason}", field=err.field) from None
            return MembershipLeft(
                key=MembershipKey(Dialect.STICKY, sender, sticky_key),
                event_id=event_id,
                origin_server_ts=ts,
            )
        rtc = _parse_rtc(content, sender)
        return CallMembership(
            dialect=Dialect.STICKY, event_id=event_id, sender=sender, origin_server_ts=ts, data=rtc
        )
    raise _Quiet("not a membership event type", field="type", type=etype)


def parse_membership_event(
    event: object,
    room_version: str | None = None,
    *,
    rejections: RejectionLog = MEMBERSHIP_REJECTIONS,
) -> CallMembership | MembershipLeft | None:
    """Parse a full client-format event of either membership type.

    ``event`` is the sync JSON (``type``, ``sender``, ``event_id``, ``origin_server_ts``,
    ``content``, ``state_key`` for the state form). ``room_version`` (from ``m.room.create``)
    decides whether ``@user…`` state keys are legitimate; None accepts them (the homeserver
    rejects them in other rooms anyway). Returns a join, a leave, or None for anything
    invalid, forged or ignorable (the legacy ``memberships`` array).

    Every rejected membership is logged at info (sender, field, reason, event id) through
    ``rejections``, which rate-limits per sender.
    """
    ev = get_dict(event)
    sender = as_str(ev.get("sender")) if ev is not None else None
    event_id = as_str(ev.get("event_id")) if ev is not None else None
    etype = as_str(ev.get("type")) if ev is not None else None
    try:
        return _parse_event(event, room_version)
    except _Quiet as err:
        log_reject("membership event", err, sender=sender, event_id=event_id)
    except Reject as err:
        extra = {k: v for k, v in err.fields.items() if k not in _REJECTION_KEYS}
        rejections.rejected(
            kind=str(etype),
            sender=sender or "<no sender>",
            field=err.field,
            reason=err.reason,
            event_id=event_id,
            **extra,
        )
    except Exception as exc:
        log_parser_bug("membership event", exc, sender=sender, event_id=event_id)
    return None
