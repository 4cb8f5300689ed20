"""Per-peer signalling and frame protection in a heterogeneous mesh."""

from __future__ import annotations

import itertools

from matrixrtc.session.peer_policy import (
    SignallingProtection,
    accept_signalling,
    frame_e2ee_with,
    signalling_protection,
)


def test_olm_whenever_the_peer_has_keys_plaintext_only_in_unencrypted_rooms() -> None:
    table = {
        (room, keys): signalling_protection(room_encrypted=room, peer_has_olm=keys)
        for room, keys in itertools.product((False, True), repeat=2)
    }
    assert table == {
        # Hydrogen: Olm even in an unencrypted room (it accepts nothing else)
        (False, True): SignallingProtection.OLM,
        (True, True): SignallingProtection.OLM,
        # a device without keys (js-sdk's legacy GroupCall without crypto)
        (False, False): SignallingProtection.PLAINTEXT,
        (True, False): SignallingProtection.WITHHELD,  # never plaintext in an encrypted room
    }


def test_receiving_rules() -> None:
    ok = {"claimed_device": "D", "verified_device": "D"}
    assert accept_signalling(room_encrypted=True, encrypted=True, **ok) is None
    assert accept_signalling(room_encrypted=False, encrypted=True, **ok) is None
    assert accept_signalling(room_encrypted=False, encrypted=False, **ok) is None
    assert accept_signalling(room_encrypted=True, encrypted=False, **ok) is not None
    forged = {"claimed_device": "D", "verified_device": "E"}
    assert accept_signalling(room_encrypted=False, encrypted=True, **forged) is not None


def test_frame_e2ee_only_where_both_sides_advertise_it() -> None:
    assert frame_e2ee_with(we_encrypt=True, peer_advertises=True)
    assert not frame_e2ee_with(we_encrypt=True, peer_advertises=False)  # Hydrogen
    assert not frame_e2ee_with(we_encrypt=False, peer_advertises=True)
