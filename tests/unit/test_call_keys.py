"""Which received key messages reach the key manager (matrixrtc.e2ee.inbound), and the
transport's defaults."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from matrixrtc.call_keys import CallKeysConfig
from matrixrtc.e2ee.inbound import (
    AcceptedKey,
    DropReason,
    RejectedKey,
    screen_key_message,
)
from matrixrtc.e2ee.messages import ELEMENT_CALL_KEYS_TYPE, ElementCallKeys

ROOM = "!call:hs"
ME = ("@me:hs", "MEDEV")
BOB, BOB_DEV = "@bob:hs", "BOBDEV"
KEY = bytes(range(16))
DRAFT = "org.matrix.msc4143.rtc.encryption_key"


def ec(claimed: str = BOB_DEV, room: str = ROOM, index: int = 3) -> dict[str, object]:
    return ElementCallKeys(
        room_id=room,
        index=index,
        key=KEY,
        claimed_device_id=claimed,
        member_id="bob-member",
        sent_ts=1_753_000_000_000,
    ).to_json()


def draft(room: str = ROOM) -> dict[str, object]:
    return {
        "room_id": room,
        "member_id": "bob-member",
        "media_key": {"index": 4, "key": base64.b64encode(KEY).decode().rstrip("=")},
    }


def screen(
    content: Any,
    *,
    event_type: str = ELEMENT_CALL_KEYS_TYPE,
    sender: str = BOB,
    sender_device: str | None = BOB_DEV,
    encrypted: bool = True,
    room_encrypted: bool = True,
    allow_plaintext: bool = False,
) -> AcceptedKey | RejectedKey | None:
    return screen_key_message(
        event_type=event_type,
        content=content,
        sender=sender,
        sender_device=sender_device if encrypted else None,
        encrypted=encrypted,
        room_id=ROOM,
        room_encrypted=room_encrypted,
        own_device=ME,
        allow_plaintext=allow_plaintext,
    )


def reason(result: object) -> DropReason:
    assert isinstance(result, RejectedKey), result
    return result.reason


def test_olm_message_from_the_device_it_claims_is_accepted() -> None:
    got = screen(ec())
    assert got == AcceptedKey(
        user_id=BOB,
        device_id=BOB_DEV,
        member_id="bob-member",
        index=3,
        key=KEY,
        sent_ts=1_753_000_000_000,
        dialect=ELEMENT_CALL_KEYS_TYPE,
        encrypted=True,
    )


def test_olm_message_claiming_another_device_is_dropped() -> None:
    got = screen(ec(claimed="OTHERDEV"))
    assert reason(got) is DropReason.CLAIMED_DEVICE_MISMATCH
    assert isinstance(got, RejectedKey)
    assert "OTHERDEV" in got.detail
    assert got.reason.suspicious


def test_olm_message_without_a_verified_device_is_dropped() -> None:
    assert reason(screen(ec(), sender_device=None)) is DropReason.UNVERIFIED_SENDER


@pytest.mark.parametrize("allow", [False, True])
def test_plaintext_in_an_encrypted_room_is_dropped_even_with_the_opt_in(allow: bool) -> None:
    got = screen(ec(), encrypted=False, allow_plaintext=allow)
    assert reason(got) is DropReason.PLAINTEXT_IN_ENCRYPTED_ROOM


def test_plaintext_in_an_unencrypted_room_needs_the_opt_in() -> None:
    assert (
        reason(screen(ec(), encrypted=False, room_encrypted=False))
        is DropReason.PLAINTEXT_NOT_ALLOWED
    )
    got = screen(ec(), encrypted=False, room_encrypted=False, allow_plaintext=True)
    assert isinstance(got, AcceptedKey)
    assert (got.device_id, got.encrypted) == (BOB_DEV, False)  # only the claim to go on


def test_draft_dialect_takes_the_olm_sender_device() -> None:
    got = screen(draft(), event_type=DRAFT)
    assert isinstance(got, AcceptedKey)
    assert (got.device_id, got.member_id, got.index, got.key) == (BOB_DEV, "bob-member", 4, KEY)
    assert got.dialect == DRAFT
    plain = screen(
        draft(), event_type=DRAFT, encrypted=False, room_encrypted=False, allow_plaintext=True
    )
    assert reason(plain) is DropReason.NO_DEVICE


def test_other_rooms_own_device_and_junk() -> None:
    other = screen(ec(room="!elsewhere:hs"))
    assert reason(other) is DropReason.OTHER_ROOM
    assert not DropReason.OTHER_ROOM.suspicious
    assert reason(screen(ec(claimed=ME[1]), sender=ME[0], sender_device=ME[1])) is (
        DropReason.OWN_DEVICE
    )
    assert reason(screen({"keys": []})) is DropReason.MALFORMED
    assert reason(screen(ec(index=256))) is DropReason.MALFORMED
    assert screen(ec(), event_type="m.call.invite") is None


def test_defaults_are_js_sdk_policy() -> None:
    cfg = CallKeysConfig()
    assert (cfg.grace_ms, cfg.use_key_delay_ms, cfg.allow_plaintext_keys) == (10_000, 1_000, False)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


def _mutated(base: dict[str, object]) -> st.SearchStrategy[object]:
    return st.builds(
        lambda extra, drop: {k: v for k, v in {**base, **extra}.items() if k not in drop},
        st.dictionaries(st.sampled_from(sorted(base)), _json, max_size=2),
        st.sets(st.sampled_from(sorted(base)), max_size=2),
    )


@settings(max_examples=300, deadline=None)
@given(
    content=_json | _mutated(ec()) | _mutated(draft()),
    event_type=st.sampled_from([ELEMENT_CALL_KEYS_TYPE, DRAFT, "m.room_key"]),
    sender_device=st.sampled_from([BOB_DEV, "OTHERDEV", None]),
    encrypted=st.booleans(),
    room_encrypted=st.booleans(),
    allow_plaintext=st.booleans(),
)
def test_screen_never_raises_and_accepts_only_authenticated_keys(
    content: object,
    event_type: str,
    sender_device: str | None,
    encrypted: bool,
    room_encrypted: bool,
    allow_plaintext: bool,
) -> None:
    got = screen(
        content,
        event_type=event_type,
        sender_device=sender_device,
        encrypted=encrypted,
        room_encrypted=room_encrypted,
        allow_plaintext=allow_plaintext,
    )
    if event_type == "m.room_key":
        assert got is None
        return
    assert isinstance(got, AcceptedKey | RejectedKey)
    if isinstance(got, AcceptedKey):
        if encrypted:
            assert got.device_id == sender_device
            claimed = content.get("member") if isinstance(content, dict) else None
            if event_type == ELEMENT_CALL_KEYS_TYPE:
                assert isinstance(claimed, dict)
                assert claimed.get("claimed_device_id") == sender_device
        else:
            assert allow_plaintext
            assert not room_encrypted
        assert 0 <= got.index <= 255
        assert got.key
