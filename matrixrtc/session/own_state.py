"""When to ask the homeserver for the resolved state at our own call membership key (pure).

A member sees room state through /sync in stream order: the ``state`` section, then the
timeline's state events, the latest per key winning. The room's *current* state is what
state resolution decides, and the two can disagree. Seen on Synapse 1.163: a homeserver
stall fired our delayed leave, we published our membership again, the two events forked the
room's DAG, and state resolution kept the leave as current state while our re-join was the
newest event in stream order. We believed we were in the call; everyone reading current
state (the SFU controller) saw us gone, and the controller removed us from the media room.

Where the homeserver answers with MSC4222's ``state_after`` (asked for on every sync), the
update carries the resolved state and nothing is needed. Elsewhere :class:`OwnStateWatch`
says when the stream looks like such a fork may have happened at our own key, so the caller
reads ``GET /rooms/{room}/state/{type}/{our key}?format=event`` (the resolved current state)
and feeds the answer to the RTC session after the update: if it is a leave, our membership
is missing and the membership machine publishes it again.

Rules (each a test in tests/unit/test_own_state.py); a check is due when an update without
``state_after`` shows, at our key:

1. an event with an older ``origin_server_ts`` than one seen before at our key (stream order
   and time disagree: a fork was merged), or
2. a join within ``window_ms`` of a leave seen at our key (same or an earlier update): our
   delayed leave fired and we re-joined, the moment a fork is likely. (A leave shown last
   needs no check: the session sees our membership missing and we publish it again.)

The caller asks twice, ``CHECK_AFTER_MS`` after the update (resolution settles once the
forks are merged, usually by the next event), and is told nothing more until the next
suspicious update.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from matrixrtc.model._json import as_int, get_dict
from matrixrtc.model.event_types import EventType

__all__ = ["CHECK_AFTER_MS", "OwnStateWatch", "at_own_key", "resolved_differs"]

# Delays (after the suspicious update) of the two reads of the resolved state.
CHECK_AFTER_MS: Final = (1_000, 5_000)


@dataclass
class OwnStateWatch:
    """Per joined call: remembers the newest event time and the last leave at our key."""

    window_ms: int = 30_000
    _newest_ts: int = -1
    _last_leave_ts: int | None = None
    _seen: set[str] = field(default_factory=set)

    def observe(self, events_at_key: Iterable[object], *, resolved: bool) -> bool:
        """Events at our state key in one update, in the order applied; True when the
        resolved state should be read (see the module docstring)."""
        due = False
        for raw in events_at_key:
            ev = get_dict(raw)
            if ev is None:
                continue
            event_id = ev.get("event_id")
            if isinstance(event_id, str):
                if event_id in self._seen:
                    continue  # the same event again (state_after repeats the timeline's)
                self._seen.add(event_id)
            ts = as_int(ev.get("origin_server_ts"))
            if ts is None:
                continue
            if ts < self._newest_ts:
                due = True
            self._newest_ts = max(self._newest_ts, ts)
            if get_dict(ev.get("content")):  # a join (any membership content)
                leave = self._last_leave_ts
                if leave is not None and abs(ts - leave) <= self.window_ms:
                    due = True
            else:  # a leave shown last needs no check: the session already re-joins
                self._last_leave_ts = ts
        return due and not resolved


def at_own_key(state: Iterable[Mapping[str, Any]], key: str | None) -> list[Mapping[str, Any]]:
    """The call membership events of an update's ``state`` at our state ``key``, in order
    (what :meth:`OwnStateWatch.observe` takes); none without a key (the sticky form)."""
    if key is None:
        return []
    return [
        ev for ev in state if ev.get("type") == EventType.CALL_MEMBER and ev.get("state_key") == key
    ]


def resolved_differs(resolved: object, held: object) -> bool:
    """Whether the event the homeserver answered as current state at our key (``format=
    event``) is not the one the session holds there (then it is fed to the session)."""
    ev, mine = get_dict(resolved), get_dict(held)
    if ev is None or not isinstance(ev.get("event_id"), str):
        return False
    return mine is None or ev.get("event_id") != mine.get("event_id")
