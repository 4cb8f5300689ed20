"""Key rotation/distribution rules (spec/matrixrtc.md §4.4) with simulated time."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from matrixrtc.e2ee import keys as km
from matrixrtc.e2ee.keys import InstallRemoteKey, KeyAction, KeyManager, Member, SendKey, UseKey
from matrixrtc.model.livekit_ids import livekit_identity

ME = Member.state_form("@me:hs", "MEDEV", 1000)
BOB = Member.state_form("@bob:hs", "BOBDEV", 2000)
CAROL = Member.state_form("@carol:hs", "CARDEV", 3000)
DAVE = Member.state_form("@dave:hs", "DAVDEV", 4000)


def _keys() -> Iterator[bytes]:
    i = 0
    while True:
        i += 1
        yield bytes([i % 256]) * 16


class Call:
    """The manager plus a simulated clock; SendKey results are reported explicitly."""

    def __init__(self, own: Member = ME, *, prepare: bool = False) -> None:
        # prepare=False: matrix-js-sdk's policy exactly (no prepared next key).
        gen = _keys()
        self.m = KeyManager(own, random_bytes=lambda n: next(gen)[:n], prepare_next_key=prepare)
        self.now = 0

    def at(self, t: int) -> Call:
        self.now = t
        return self

    def members(self, *ms: Member) -> list[KeyAction]:
        return self.m.update_members([ME, *ms], self.now)

    def sent(self, action: KeyAction, ok: bool = True) -> list[KeyAction]:
        assert isinstance(action, SendKey)
        return self.m.send_result(action.rollout, ok, self.now)

    def advance_to(self, t: int) -> list[KeyAction]:
        self.now = t
        return self.m.tick(t)


def _only(actions: list[KeyAction], kind: type) -> list[KeyAction]:
    return [a for a in actions if isinstance(a, kind)]


def test_first_key_is_used_immediately() -> None:
    c = Call()
    actions = c.at(500).members()
    assert actions == [UseKey(ME.identity, 0, bytes([1]) * 16, 500)]
    assert c.m.current_index == 0
    assert not c.m.rollout_in_flight  # nobody else to send to


def test_first_key_sent_to_others_and_used_at_once() -> None:
    c = Call()
    actions = c.at(0).members(BOB, CAROL)
    use, send = actions
    assert use == UseKey(ME.identity, 0, bytes([1]) * 16, 0)
    assert isinstance(send, SendKey)
    assert send.to == (BOB.device, CAROL.device)  # never to our own device
    assert send.index == 0
    assert c.sent(send) == []  # already in use: no delay, no second UseKey


def test_join_within_grace_gets_current_key_only() -> None:
    c = Call()
    c.at(0).members()
    (send,) = c.at(9_999).members(BOB)
    assert send == SendKey((BOB.device,), 0, bytes([1]) * 16, send.rollout)  # type: ignore[union-attr]
    assert c.sent(send) == []
    assert c.m.current_index == 0


def test_join_after_grace_rotates_to_all_with_use_delay() -> None:
    c = Call()
    c.sent(c.at(0).members(BOB)[1])
    (send,) = c.at(10_000).members(BOB, CAROL)
    assert isinstance(send, SendKey)
    assert send.index == 1
    assert send.to == (BOB.device, CAROL.device)
    assert send.key != bytes([1]) * 16
    assert c.at(10_040).sent(send) == []  # sent: now wait useKeyDelay
    assert c.m.next_deadline() == 11_040
    assert c.advance_to(11_039) == []
    assert c.m.current_index == 0  # still encrypting with the old key
    assert c.advance_to(11_040) == [UseKey(ME.identity, 1, send.key, 11_040)]
    assert c.m.current_index == 1
    assert not c.m.rollout_in_flight


def test_leave_rotates_to_all_remaining() -> None:
    c = Call()
    first = c.at(0).members(BOB, CAROL)
    c.sent(first[1])
    (send,) = c.at(1_000).members(BOB)  # carol left, within the grace period: still rotates
    assert isinstance(send, SendKey)
    assert (send.index, send.to) == (1, (BOB.device,))
    c.sent(send)
    assert c.advance_to(2_000) == [UseKey(ME.identity, 1, send.key, 2_000)]


def test_rejoin_with_new_created_ts_is_a_join_not_a_leave() -> None:
    c = Call()
    c.sent(c.at(0).members(BOB)[1])
    bob_again = Member.state_form("@bob:hs", "BOBDEV", 9_000)
    (send,) = c.at(5_000).members(bob_again)
    assert isinstance(send, SendKey)
    assert (send.index, send.to) == (0, (BOB.device,))  # current key, to the rejoiner only
    c.sent(send)
    bob_third = Member.state_form("@bob:hs", "BOBDEV", 20_000)
    (send,) = c.at(20_000).members(bob_third)
    assert isinstance(send, SendKey)
    assert send.index == 1  # after the grace period: rotation


def test_index_wraps_modulo_256() -> None:
    c = Call()
    c.sent(c.at(0).members(BOB, CAROL)[1])
    t = 0
    present = True
    for expected in [*range(1, 256), 0, 1]:
        t += 20_000
        present = not present
        actions = c.at(t).members(BOB, CAROL) if present else c.at(t).members(BOB)
        (send,) = actions
        assert isinstance(send, SendKey)
        assert send.index == expected
        c.sent(send)
        c.advance_to(t + 1_000)


def test_one_rollout_in_flight_and_follow_ups_collapse() -> None:
    c = Call()
    c.sent(c.at(0).members(BOB)[1])
    (send,) = c.at(20_000).members(BOB, CAROL)  # after grace: rotation, in flight
    assert c.at(20_100).members(BOB, CAROL, DAVE) == []
    assert c.at(20_200).members(BOB, CAROL, DAVE) == []
    assert c.m.rollout_in_flight
    assert c.at(20_300).sent(send) == []
    actions = c.advance_to(21_300)
    # UseKey ends the rollout; exactly one follow-up for dave, with the (young) current key.
    assert actions[0] == UseKey(ME.identity, 1, send.key, 21_300)
    (follow,) = actions[1:]
    assert isinstance(follow, SendKey)
    assert (follow.index, follow.to) == (1, (DAVE.device,))
    assert c.sent(follow) == []
    assert not c.m.rollout_in_flight


def test_send_failure_is_retried_on_next_update_and_the_key_still_gets_used() -> None:
    c = Call()
    c.sent(c.at(0).members(BOB, CAROL)[1])
    (send,) = c.at(1_000).members(BOB)  # carol left → new key 1
    assert c.sent(send, ok=False) == []
    assert not c.m.rollout_in_flight
    assert c.m.current_index == 0
    (retry,) = c.at(2_000).members(BOB)
    assert isinstance(retry, SendKey)
    assert (retry.index, retry.key) == (1, send.key)
    c.sent(retry)
    # matrix-js-sdk would never switch to key 1 here; we do (carol holds key 0).
    assert c.advance_to(3_000) == [UseKey(ME.identity, 1, retry.key, 3_000)]


def test_stale_send_results_are_ignored() -> None:
    c = Call()
    (_, send) = c.at(0).members(BOB)
    assert isinstance(send, SendKey)
    assert c.m.send_result(send.rollout + 7, True, 0) == []
    assert c.m.rollout_in_flight
    c.sent(send)
    assert c.m.send_result(send.rollout, True, 0) == []


def test_leave_resets_the_counter() -> None:
    c = Call()
    c.sent(c.at(0).members(BOB)[1])
    c.at(20_000).members(BOB, CAROL)
    c.m.leave()
    assert c.m.current_index is None
    assert c.at(30_000).members()[0].index == 0


# ---------------------------------------------------------------- received keys
def test_remote_key_installed_under_the_members_livekit_identity() -> None:
    c = Call()
    c.at(0).members(BOB)
    (inst,) = c.m.receive_key("@bob:hs", "BOBDEV", "uuid-1", 3, b"k" * 16, 100)
    assert inst == InstallRemoteKey("@bob:hs:BOBDEV", 3, b"k" * 16, "@bob:hs:BOBDEV(uuid-1)")
    assert c.m.rings == {"@bob:hs:BOBDEV(uuid-1)": {3: b"k" * 16}}


def test_sticky_form_members_use_the_hashed_identity() -> None:
    bob = Member.sticky_form("@bob:hs", "BOBDEV", 2000, "mem-9")
    assert bob.identity == livekit_identity("@bob:hs", "BOBDEV", "mem-9")
    c = Call()
    c.m.update_members([ME, bob], 0)
    (inst,) = c.m.receive_key("@bob:hs", "BOBDEV", "mem-9", 0, b"x" * 16, 1)
    assert isinstance(inst, InstallRemoteKey)
    assert inst.identity == bob.identity


def test_early_keys_wait_for_the_membership_matching_user_and_device() -> None:
    c = Call()
    c.at(0).members()
    assert c.m.receive_key("@bob:hs", "BOBDEV", "uuid-1", 0, b"a" * 16, 10) == []
    assert c.m.receive_key("@bob:hs", "OTHER", None, 0, b"b" * 16, 11) == []
    assert c.m.early_keys == 2
    actions = c.at(50).members(BOB)  # BOB's member_id differs from "uuid-1": still matches
    installs = _only(actions, InstallRemoteKey)
    assert installs == [InstallRemoteKey(BOB.identity, 0, b"a" * 16, "@bob:hs:BOBDEV(uuid-1)")]
    assert c.m.early_keys == 1


def test_early_key_buffer_is_bounded() -> None:
    c = Call()
    for i in range(km.MAX_EARLY_KEYS + 10):
        c.m.receive_key("@x:hs", f"D{i}", None, 0, b"k" * 16, i)
    assert c.m.early_keys == km.MAX_EARLY_KEYS


def test_outdated_key_filter() -> None:
    c = Call()
    c.at(0).members(BOB)
    assert c.m.receive_key("@bob:hs", "BOBDEV", None, 0, b"new" * 5, 200)
    # Delivered out of order: an older key (earlier local timestamp) for the same index.
    assert c.m.receive_key("@bob:hs", "BOBDEV", None, 0, b"old" * 5, 100) == []
    assert c.m.rings["@bob:hs:BOBDEV(@bob:hs:BOBDEV)"][0] == b"new" * 5
    # Another index or another ring is unaffected.
    assert c.m.receive_key("@bob:hs", "BOBDEV", None, 1, b"one" * 5, 100)
    assert c.m.receive_key("@bob:hs", "BOBDEV", "m2", 0, b"two" * 5, 100)


@pytest.mark.parametrize(("index", "key"), [(-1, b"k"), (256, b"k"), (0, b"")])
def test_bad_keys_are_ignored(index: int, key: bytes) -> None:
    c = Call()
    c.at(0).members(BOB)
    assert c.m.receive_key("@bob:hs", "BOBDEV", None, index, key, 1) == []
    assert c.m.rings == {}


def test_a_rejoiner_that_never_got_the_key_still_counts_as_a_leaver() -> None:
    c = Call()
    c.sent(c.at(0).members(BOB)[1])
    (send,) = c.at(2_000).members(Member.state_form("@bob:hs", "BOBDEV", 9_000))
    c.sent(send, ok=False)
    # Bob is gone and holds key 0: rotate (nobody left to send to, so only the use delay).
    assert c.at(3_000).members() == []
    assert c.m.next_deadline() == 4_000
    assert c.advance_to(4_000) == [UseKey(ME.identity, 1, bytes([2]) * 16, 4_000)]


# ---------------------------------------------------------------- prepared next key
def test_next_key_is_prepared_before_the_grace_period_ends_and_not_used() -> None:
    c = Call(prepare=True)
    c.sent(c.at(0).members(BOB, CAROL)[1])
    assert c.m.next_deadline() == 9_000  # grace − use-key delay
    assert c.advance_to(8_999) == []
    (prep,) = c.advance_to(9_000)
    assert isinstance(prep, SendKey)
    assert (prep.index, prep.to) == (1, (BOB.device, CAROL.device))
    assert c.at(9_050).sent(prep) == []  # no UseKey: still encrypting with key 0
    assert c.m.current_index == 0
    assert c.m.next_deadline() is None
    assert c.at(9_500).members(BOB, CAROL) == []  # nothing changed: nothing to do


def test_late_joiner_gets_only_the_prepared_key_which_is_used_once_sent() -> None:
    c = Call(prepare=True)
    c.sent(c.at(0).members(BOB)[1])
    prep = c.advance_to(9_000)[0]
    c.at(9_050).sent(prep)
    (send,) = c.at(30_000).members(BOB, CAROL)
    assert isinstance(send, SendKey)
    assert (send.index, send.to, send.key) == (1, (CAROL.device,), prep.key)
    assert c.m.current_index == 0  # not before carol has it …
    assert c.at(30_040).sent(send) == [UseKey(ME.identity, 1, prep.key, 30_040)]  # … then at once
    assert c.m.current_index == 1
    # Its age counts from its first use: dave within 10 s gets key 1, nothing rotates.
    (share,) = c.at(39_000).members(BOB, CAROL, DAVE)
    assert (share.index, share.to) == (1, (DAVE.device,))  # type: ignore[union-attr]


def test_prepared_key_is_not_used_before_the_others_had_it_for_the_use_key_delay() -> None:
    c = Call(prepare=True)
    c.sent(c.at(0).members(BOB)[1])
    prep = c.advance_to(9_000)[0]
    c.at(10_000).sent(prep)  # bob has it from 10 000
    (send,) = c.at(10_100).members(BOB, CAROL)
    assert c.at(10_200).sent(send) == []
    assert c.m.next_deadline() == 11_000
    assert c.advance_to(11_000) == [UseKey(ME.identity, 1, prep.key, 11_000)]


def test_alone_the_prepared_key_needs_no_send() -> None:
    c = Call(prepare=True)
    c.at(0).members()
    assert c.advance_to(9_000) == []  # prepared, sent to nobody
    (send,) = c.at(60_000).members(BOB)
    assert (send.index, send.to) == (1, (BOB.device,))  # type: ignore[union-attr]
    assert c.sent(send) == [UseKey(ME.identity, 1, send.key, 60_000)]


def test_a_leave_discards_the_prepared_key_and_skips_its_index() -> None:
    c = Call(prepare=True)
    c.sent(c.at(0).members(BOB, CAROL)[1])
    prep = c.advance_to(9_000)[0]
    c.sent(prep)
    (send,) = c.at(12_000).members(BOB)  # carol holds keys 0 and 1
    assert isinstance(send, SendKey)
    assert send.index == 2
    assert send.key not in (prep.key, bytes([1]) * 16)
    c.sent(send)
    assert c.advance_to(13_000) == [UseKey(ME.identity, 2, send.key, 13_000)]
    assert c.m.next_deadline() == 12_000 + 9_000  # the next preparation (age from creation)


def test_a_failed_preparation_is_retried_later() -> None:
    c = Call(prepare=True)
    c.sent(c.at(0).members(BOB)[1])
    prep = c.advance_to(9_000)[0]
    assert c.sent(prep, ok=False) == []
    assert c.m.next_deadline() == 9_000 + km.PREPARE_RETRY_MS
    (again,) = c.advance_to(14_000)
    assert isinstance(again, SendKey)
    assert again.index == 1
    # A joiner meanwhile (no prepared key) falls back to js-sdk's rotation with the delay.
    c.sent(again, ok=False)
    (send,) = c.at(15_000).members(BOB, CAROL)
    assert (send.index, send.to) == (1, (BOB.device, CAROL.device))  # type: ignore[union-attr]
    assert c.sent(send) == []
    assert c.advance_to(16_000) == [UseKey(ME.identity, 1, send.key, 16_000)]
