"""What the sync loop knows about rooms: raw ``/sync`` room sections turned into
:class:`~matrixrtc.matrix.types.RoomUpdate` s, and the state and live sticky events of every
joined room kept up to date from them. No I/O: decryption and the clock are passed in.

State: where the homeserver answers with MSC4222's ``state_after`` (the sync loop asks for
it), that resolved state is applied after the timeline's state events, so a state reset
(state resolution keeping an older event than the newest in stream order, seen after a
homeserver stall forked a room's DAG) reaches the RTC session; otherwise the ``state``
section and then the timeline, in stream order.

Sticky events (MSC4354, as Synapse 1.163 delivers them) come in the joined room's timeline
with the PDU field ``msc4354_sticky`` and, when still live but outside the timeline window, in
the room's ``msc4354_sticky`` section; an update carries both, once each.

A sticky event that arrives Megolm-encrypted before its room key is held as it came and tried
again with every later sync (the key may come later, or the sender may share it again); once
it decrypts, the next update carries it in ``sticky``, like js-sdk's sticky store, which files
an event once it is decrypted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from matrixrtc.matrix import wire
from matrixrtc.matrix.types import JsonDict, RoomUpdate
from matrixrtc.model import msc4354

__all__ = ["Decrypt", "RoomCache", "with_legacy_state"]

# (room id, event) -> the event with its Megolm plaintext in place, or unchanged.
Decrypt = Callable[[str, JsonDict], JsonDict]

_ENCRYPTED = "m.room.encrypted"
# MSC4222 (asked for with ``org.matrix.msc4222.use_state_after=true``): the state at the end
# of the timeline, the resolved one, instead of the state before it.
STATE_AFTER_FIELDS = ("org.matrix.msc4222.state_after", "state_after")


def with_legacy_state(raw_sync: JsonDict) -> JsonDict:
    """``raw_sync`` for readers that only know the ``state`` section (nio: its room members
    decide who gets our Megolm keys): a joined room answered with ``state_after`` gets it
    as ``state`` too (shallow copies; the input is not changed). Those readers then apply
    the timeline after it, which is how they treat every sync anyway."""
    rooms = raw_sync.get("rooms")
    if not isinstance(rooms, dict) or not isinstance(joined := rooms.get("join"), dict):
        return raw_sync
    patched: dict[str, object] = {}
    for room_id, section in joined.items():
        after = (
            next((section[f] for f in STATE_AFTER_FIELDS if f in section), None)
            if isinstance(section, dict)
            else None
        )
        if isinstance(section, dict) and after is not None and "state" not in section:
            patched[room_id] = {**section, "state": after}
        else:
            patched[room_id] = section
    return {**raw_sync, "rooms": {**rooms, "join": patched}}


class RoomCache:
    """Per joined room: the current state (by type and state key) and the sticky events
    received and not yet expired (with the wall-clock ms of receipt)."""

    def __init__(self, now_ms: Callable[[], int] = wire.now_ms) -> None:
        self._now_ms = now_ms
        self._state: dict[str, dict[tuple[str, str], JsonDict]] = {}
        self._sticky: dict[str, dict[str, tuple[JsonDict, int]]] = {}

    def state(self, room_id: str) -> Mapping[tuple[str, str], JsonDict]:
        return dict(self._state.get(room_id, {}))

    def sticky(self, room_id: str) -> list[tuple[JsonDict, int]]:
        self._prune(room_id, self._now_ms())
        return list(self._sticky.get(room_id, {}).values())

    def updates(self, raw_sync: JsonDict, decrypt: Decrypt, initial: bool) -> Iterator[RoomUpdate]:
        """The room updates of one ``/sync`` response (joined rooms, then rooms we left),
        applied to the cache as they are yielded."""
        rooms = raw_sync.get("rooms")
        if not isinstance(rooms, dict):
            return
        joined = rooms.get("join")
        seen: set[str] = set()
        if isinstance(joined, dict):
            for room_id, section in joined.items():
                if isinstance(room_id, str) and isinstance(section, dict):
                    seen.add(room_id)
                    yield self._joined(room_id, section, decrypt, initial)
        for room_id in [r for r in self._sticky if r not in seen]:
            late = self._decrypt_held(room_id, decrypt, set())
            if late:
                yield RoomUpdate(room_id, (), (), tuple(late), initial)
        left = rooms.get("leave")
        if isinstance(left, dict):
            for room_id in left:
                if isinstance(room_id, str):
                    self._state.pop(room_id, None)
                    self._sticky.pop(room_id, None)
                    yield RoomUpdate(room_id, (), (), (), initial, left=True)

    def _joined(
        self, room_id: str, section: JsonDict, decrypt: Decrypt, initial: bool
    ) -> RoomUpdate:
        state_events = wire.events(section.get("state"))
        timeline = [decrypt(room_id, e) for e in wire.events(section.get("timeline"))]
        sticky = [decrypt(room_id, e) for e in wire.events(section.get(msc4354.STICKY_FIELD))]
        seen = {str(e.get("event_id")) for e in sticky}
        sticky += [
            e for e in timeline if msc4354.STICKY_FIELD in e and str(e.get("event_id")) not in seen
        ]
        now = self._now_ms()
        held = self._sticky.setdefault(room_id, {})
        arrived = {str(ev.get("event_id")) for ev in sticky}
        sticky += self._decrypt_held(room_id, decrypt, arrived)
        for ev in sticky:
            event_id = str(ev.get("event_id"))
            kept = held.get(event_id)
            if kept is None or kept[0].get("type") == _ENCRYPTED:
                held[event_id] = (ev, now if kept is None else kept[1])
        self._prune(room_id, now)
        timeline_state = [e for e in timeline if isinstance(e.get("state_key"), str)]
        after = next((section[f] for f in STATE_AFTER_FIELDS if f in section), None)
        resolved = after is not None
        # resolved: the state after the timeline comes last, it wins over stream order
        applied = (
            (timeline_state + wire.events(after)) if resolved else state_events + timeline_state
        )
        store = self._state.setdefault(room_id, {})
        for ev in applied:
            etype, key = ev.get("type"), ev.get("state_key")
            if isinstance(etype, str) and isinstance(key, str):
                store[(etype, key)] = ev
        return RoomUpdate(
            room_id, tuple(applied), tuple(timeline), tuple(sticky), initial, resolved=resolved
        )

    def _decrypt_held(self, room_id: str, decrypt: Decrypt, skip: set[str]) -> list[JsonDict]:
        """Held sticky events still encrypted that decrypt now (replaced in the store)."""
        held = self._sticky.get(room_id)
        if not held:
            return []
        out: list[JsonDict] = []
        for event_id, (ev, received) in list(held.items()):
            if event_id in skip or ev.get("type") != _ENCRYPTED:
                continue
            plain = decrypt(room_id, ev)
            if plain.get("type") != _ENCRYPTED:
                held[event_id] = (plain, received)
                out.append(plain)
        return out

    def _prune(self, room_id: str, now_ms: int) -> None:
        held = self._sticky.get(room_id)
        if not held:
            return
        for event_id, (ev, received) in list(held.items()):
            if received + wire.sticky_ttl_ms(ev) <= now_ms:
                del held[event_id]
