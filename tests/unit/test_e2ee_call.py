"""The pure E2EE pieces composed: key managers + key messages + key rings + frame cryptors.

Several simulated devices in one call, simulated time, key messages carried as
``io.element.call.encryption_keys`` JSON (serialised, parsed back) between them. This is the
sans-I/O half of the issue's three-agent scenario; the real Synapse/Olm half belongs to the
agent's integration tests.
"""

from __future__ import annotations

import os

from matrixrtc.e2ee import (
    ElementCallKeys,
    FrameCryptor,
    KeyManager,
    KeyRings,
    Member,
    SendKey,
    parse_key_message,
)
from matrixrtc.e2ee.keys import KeyAction
from matrixrtc.e2ee.messages import ELEMENT_CALL_KEYS_TYPE

ROOM = "!call:hs"


def apply_to_rings(actions: list[KeyAction], rings: KeyRings) -> list[SendKey]:
    """What CallKeys does with the manager's actions: installs go into the rings."""
    sends: list[SendKey] = []
    for a in actions:
        if isinstance(a, SendKey):
            sends.append(a)
        else:
            rings.install(a.identity, a.index, a.key)
    return sends


OPUS = b"\x78" + os.urandom(60)


class Device:
    def __init__(
        self, name: str, joined_ts: int, *, sticky: bool = False, prepare: bool = False
    ) -> None:
        user, device = f"@{name}:hs", f"{name.upper()}DEV"
        self.member = (
            Member.sticky_form(user, device, joined_ts, f"mid-{name}")
            if sticky
            else Member.state_form(user, device, joined_ts, f"mid-{name}")
        )
        self.keys = KeyManager(self.member, prepare_next_key=prepare)
        self.rings = KeyRings()
        self.sender = self.rings.cryptor(self.member.identity)
        self.outbox: list[SendKey] = []

    def frame(self, ts: int) -> bytes:
        out = self.sender.encrypt(
            OPUS, kind="audio", ssrc=sum(self.member.identity.encode()), timestamp=ts
        )
        assert out is not None
        return out

    def can_read(self, other: Device, frame: bytes) -> bool:
        # A fresh cryptor over the ring this device holds for ``other``.
        if other.member.identity not in self.rings:
            return False
        rx = FrameCryptor(self.rings.ring(other.member.identity))
        return rx.decrypt(frame, kind="audio") == OPUS


class Call:
    def __init__(self, *, prepare: bool = False) -> None:
        self.prepare = prepare  # False: matrix-js-sdk's policy exactly
        self.devices: dict[str, Device] = {}
        self.now = 0
        self.sent_keys: list[bytes] = []

    def by_device(self, user: str, device: str) -> Device:
        return next(d for d in self.devices.values() if d.member.device == (user, device))

    def membership_changed(self) -> None:
        members = [d.member for d in self.devices.values()]
        for d in self.devices.values():
            d.outbox += apply_to_rings(d.keys.update_members(members, self.now), d.rings)
        self.deliver()

    def deliver(self) -> None:
        """Carry every pending SendKey as to-device JSON and report success (50 ms later)."""
        while any(d.outbox for d in self.devices.values()):
            for sender in list(self.devices.values()):
                sends, sender.outbox = sender.outbox, []
                for s in sends:
                    content = ElementCallKeys(
                        room_id=ROOM,
                        index=s.index,
                        key=s.key,
                        claimed_device_id=sender.member.device_id,
                        member_id=sender.member.member_id,
                        sent_ts=self.now,
                    ).to_json()
                    self.sent_keys.append(s.key)
                    for user, device in s.to:
                        rx = self.by_device(user, device)
                        msg = parse_key_message(ELEMENT_CALL_KEYS_TYPE, content, room_id=ROOM)
                        assert msg is not None
                        rx.outbox += apply_to_rings(
                            rx.keys.receive_key(
                                sender.member.user_id,
                                device_id=msg.claimed_device_id or "",
                                member_id=msg.member_id,
                                index=msg.index,
                                key=msg.key,
                                now_ms=self.now,
                            ),
                            rx.rings,
                        )
                    sender.outbox += apply_to_rings(
                        sender.keys.send_result(s.rollout, True, self.now + 50), sender.rings
                    )

    def run_until(self, t: int) -> None:
        """Advance the clock, firing every key manager's deadline on time."""
        while True:
            deadlines = [
                (dl, d) for d in self.devices.values() if (dl := d.keys.next_deadline()) is not None
            ]
            due = [x for x in deadlines if x[0] <= t]
            if not due:
                break
            dl, d = min(due, key=lambda x: x[0])
            self.now = max(self.now, dl)
            d.outbox += apply_to_rings(d.keys.tick(self.now), d.rings)
            self.deliver()
        self.now = t

    def join(self, name: str, **kw: bool) -> Device:
        d = self.devices[name] = Device(name, self.now, prepare=self.prepare, **kw)
        self.membership_changed()
        return d

    def leave(self, name: str) -> Device:
        d = self.devices.pop(name)
        d.keys.leave()
        self.membership_changed()
        return d

    def everyone_reads_everyone(self) -> bool:
        frames = {n: d.frame(self.now) for n, d in self.devices.items()}
        return all(
            rx.can_read(self.devices[n], f)
            for n, f in frames.items()
            for m, rx in self.devices.items()
            if m != n
        )


def test_three_devices_rotate_on_leave_share_on_quick_join_rotate_on_late_join() -> None:
    call = Call()
    a = call.join("alice")
    call.run_until(100)
    b = call.join("bob")
    call.run_until(200)
    c = call.join("carol", sticky=True)  # the other membership dialect: hashed identity
    call.run_until(1_200)  # every key in use within 1 s of the last join
    assert call.everyone_reads_everyone()
    assert a.keys.current_index == 0  # joins within 10 s of the first key: no rotation
    # Alice holds carol's key under carol's hashed LiveKit identity.
    assert c.member.identity in a.rings
    assert c.member.identity != f"{c.member.user_id}:{c.member.device_id}"

    call.run_until(20_000)
    gone = call.leave("carol")
    call.run_until(21_100)  # key sent (50 ms) + use-key delay (1 s)
    assert a.keys.current_index == 1
    assert b.keys.current_index == 1
    assert call.everyone_reads_everyone()
    # Frames under the new keys are unreadable with any key carol held.
    for d in (a, b):
        assert not gone.can_read(d, d.frame(call.now))

    call.run_until(25_000)  # 5 s after the rotation: dave gets the current keys, no rotation
    call.join("dave")
    call.run_until(26_000)
    assert (a.keys.current_index, b.keys.current_index) == (1, 1)
    assert call.everyone_reads_everyone()

    call.run_until(40_000)  # 20 s after: erin's join makes everybody rotate
    call.join("erin")
    call.run_until(41_000)
    assert a.keys.current_index == 1  # still the old key during the use-key delay …
    call.run_until(41_100)
    assert a.keys.current_index == 2  # … then the new one
    assert call.everyone_reads_everyone()


def test_prepared_next_key_lets_a_late_joiner_read_at_once() -> None:
    call = Call(prepare=True)
    a = call.join("alice")
    call.run_until(100)
    b = call.join("bob")
    call.run_until(9_500)  # alice's key 0 is 9 s old: key 1 prepared, sent, not used
    assert a.keys.current_index == 0
    assert b.can_read(a, a.frame(call.now))
    call.run_until(20_000)
    carol = call.join("carol")  # after the grace period
    # Carol got key 1 only (never used before she joined) and alice uses it from the moment
    # the send succeeded: no use-key delay, nothing carol cannot read.
    assert a.keys.current_index == 1
    assert carol.can_read(a, a.frame(call.now))
    assert b.can_read(a, a.frame(call.now))
    assert call.everyone_reads_everyone()

    call.run_until(25_000)
    gone = call.leave("carol")  # she holds alice's key 1: rotate
    call.run_until(26_100)
    assert a.keys.current_index == 2
    assert call.everyone_reads_everyone()
    assert not gone.can_read(a, a.frame(call.now))
