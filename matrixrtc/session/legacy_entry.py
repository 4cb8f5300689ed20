"""Our device's side of the room's 2022 MSC3401 call, whatever dialect we write (pure).

Theory of operation
-------------------
Every call client reads the room's 2022 call (``org.matrix.msc3401.call`` plus the per-user
``m.calls`` member events of Hydrogen and legacy js-sdk ``GroupCall``), in any dialect it
writes itself. :class:`OwnLegacyEntry` holds that reading
(:class:`~matrixrtc.session.legacy_call.LegacyCallSession`) and decides whether and how our
own device is listed there (:class:`~matrixrtc.session.legacy_call.LegacyMembership`). It
returns :class:`~matrixrtc.session.legacy_call.PutState` actions; the caller performs them
in order and never decides anything itself.

Who writes an entry:

============================  ================================================================
how we joined                 our entry in the 2022 call
============================  ================================================================
``msc3401_2022``              :meth:`join_2022` at once; it is our only membership
``auto``, every other member  :meth:`plan` answers MSC3401_2022; then as above
2022-only
``auto``, anything else       :meth:`plan` answers the current dialect most others use; an
                              entry is added (:meth:`after_change`) once a 2022-only member is
                              there, under the mesh session id of our current membership, and
                              follows that id when our membership is re-sent
``state`` / ``sticky``        none
============================  ================================================================

Keeping it (:meth:`after_change`, after every room change): an entry that vanished from our
user's event is put back, unless the call we joined is not the room's (creating it failed:
the repair guard of ``LegacyMembership.observe``). :meth:`tick` renews it before its 1 h
expiry (:meth:`next_renewal_ms`); :meth:`leave` removes it.

Every method takes the time (``now_ms``) from the caller's injected clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import structlog

from matrixrtc.model import CallMembership, Dialect
from matrixrtc.model.msc3401_2022 import GROUP_CALL_EVENT, MEMBER_EVENT, GroupCallType
from matrixrtc.session.legacy_call import (
    LegacyCallSession,
    LegacyMember,
    LegacyMembership,
    PutState,
    WriteDialect,
    needs_legacy_entry,
    new_session_id,
    plan_write,
)
from matrixrtc.session.mesh_signalling import member_session_id

__all__ = ["DIALECT_CHOICES", "OwnLegacyEntry", "dialect_choice"]

_log = structlog.get_logger(__name__)


DIALECT_CHOICES: tuple[str, ...] = tuple(d.value for d in WriteDialect)


def dialect_choice(value: Dialect | WriteDialect | str) -> tuple[Dialect, bool]:
    """``state | sticky | msc3401_2022 | auto`` as (``AgentConfig.dialect``,
    ``AgentConfig.auto_dialect``)."""
    choice = WriteDialect(str(value))
    if choice is WriteDialect.AUTO:
        return Dialect.STATE, True
    return Dialect(choice.value), False


class OwnLegacyEntry:
    """The room's 2022 call and our entry in it (see the module doc)."""

    def __init__(self, room_id: str, user_id: str, device_id: str) -> None:
        self.user_id = user_id
        self.device_id = device_id
        self.session = LegacyCallSession(room_id)
        self.write: LegacyMembership | None = None
        # AUTO writing a current dialect: add an entry once a 2022-only member is there.
        self.when_needed = False
        self.devices: tuple[LegacyMember, ...] = ()
        self._log = _log.bind(room_id=room_id, user_id=user_id, device_id=device_id)

    # -- reading the room ---------------------------------------------------------------

    def receive_state(
        self, events: Iterable[Mapping[str, Any]], joined_members: Iterable[str]
    ) -> None:
        """State events of any type (the 2022 ones are kept) and the room's joined users."""
        for ev in events:
            if ev.get("type") in (GROUP_CALL_EVENT, MEMBER_EVENT):
                self.session.receive_state_event(ev)
        self.session.set_joined_members(joined_members)

    def refresh_devices(self, now_ms: int) -> bool:
        """Re-read the listed devices at ``now_ms`` (:attr:`devices`); whether they changed."""
        devices = self.session.devices(now_ms)
        changed = devices != self.devices
        self.devices = devices
        return changed

    @property
    def conf_id(self) -> str | None:
        """The room's 2022 call, or None."""
        return self.session.conf_id

    def next_expiry_ms(self, now_ms: int) -> int | None:
        """When a listed device expires next (call :meth:`refresh_devices` then)."""
        return self.session.next_wakeup_ms(now_ms)

    # -- our entry ----------------------------------------------------------------------

    @property
    def written_conf_id(self) -> str | None:
        """The conf_id of the 2022 call we are listed in (None: we write no entry)."""
        return None if self.write is None else self.write.conf_id

    def plan(self, others: Iterable[str]) -> Dialect:
        """``auto``: the dialect to write given the other members' dialects; remembers
        whether an entry is to be added later."""
        others = list(others)
        plan = plan_write(WriteDialect.AUTO, others)
        self.when_needed = plan.current is not None
        dialect = Dialect.MSC3401_2022 if plan.current is None else Dialect(plan.current.value)
        self._log.info("legacy_entry.dialect_chosen", dialect=dialect.value, others=others)
        return dialect

    def join_2022(
        self, now_ms: int, *, intent: str | None, session_id: str | None = None
    ) -> list[PutState]:
        """Join in the 2022 dialect only (creating the room's call if it has none)."""
        self.write = LegacyMembership(
            self.session,
            user_id=self.user_id,
            device_id=self.device_id,
            session_id=session_id or new_session_id(),
            call_type=GroupCallType.VOICE if intent == "audio" else GroupCallType.VIDEO,
        )
        return self.write.join(now_ms)

    def present(self, now_ms: int) -> bool:
        """Whether the room lists our entry (under our session id) now."""
        w = self.write
        return w is not None and self.session.has_device(
            self.user_id, self.device_id, w.session_id, now_ms
        )

    def after_change(
        self,
        now_ms: int,
        *,
        writes_current: bool,
        own: CallMembership | None,
        others: Iterable[str],
    ) -> list[PutState]:
        """The room changed while we are in the call. ``writes_current``: we also write a
        current-dialect membership, ``own`` is it as the room shows it (None: not yet);
        ``others``: the other participants' dialects."""
        w = self.write
        if writes_current and self.when_needed:
            if own is None:
                return []
            session_id = member_session_id(own.member_id, own.created_ts)
            if w is None:
                if not needs_legacy_entry(others):
                    return []
                w = self.write = LegacyMembership(
                    self.session,
                    user_id=self.user_id,
                    device_id=self.device_id,
                    session_id=session_id,
                )
                self._log.info("legacy_entry.added", session_id=session_id)
                return w.join(now_ms)
            moved = w.set_session_id(session_id, now_ms)
            return moved + w.observe(now_ms)
        return [] if w is None else w.observe(now_ms)

    def next_renewal_ms(self) -> int | None:
        """When our entry is due for renewal (:meth:`tick` then), or None."""
        return None if self.write is None else self.write.next_wakeup_ms()

    def tick(self, now_ms: int) -> list[PutState]:
        return [] if self.write is None else self.write.tick(now_ms)

    def leave(self, now_ms: int) -> list[PutState]:
        return [] if self.write is None else self.write.leave(now_ms)
