"""Per-peer protection choices in a heterogeneous mesh (pure).

A full-mesh call may mix peers of different generations (issue 20): Hydrogen accepts only
Olm-encrypted ``m.call.*`` to-device messages, in unencrypted rooms too; current js-sdk's
legacy ``GroupCall`` can only send plaintext (its Olm path throws since v37); our own peers
and Element Call's encrypt. And only some peers can decrypt media frames: Hydrogen and legacy
js-sdk send and expect plain DTLS-SRTP. So both choices are made per peer:

* **signalling** (:func:`signalling_protection`): Olm whenever the peer device has keys we
  can reach (an Olm session exists or can be claimed); plaintext only toward a device that has
  none, and only in an unencrypted room; never plaintext in an encrypted room (the message is
  then not sent, and the signalling core's retries take over).
* **receiving**: a plaintext ``m.call.*`` is accepted only in an unencrypted room
  (:func:`accept_signalling`); an encrypted one only from the verified device it names.
* **frame E2EE** (:func:`frame_e2ee_with`): only where both sides advertise it; otherwise the
  peer gets plain frames (still DTLS-SRTP protected hop by hop).
"""

from __future__ import annotations

import enum

__all__ = [
    "SignallingProtection",
    "accept_signalling",
    "frame_e2ee_with",
    "signalling_protection",
]


class SignallingProtection(enum.Enum):
    OLM = "olm"
    PLAINTEXT = "plaintext"
    WITHHELD = "withheld"  # cannot encrypt and the room forbids plaintext


def signalling_protection(*, room_encrypted: bool, peer_has_olm: bool) -> SignallingProtection:
    """How to send one ``m.call.*`` to one peer device."""
    if peer_has_olm:
        return SignallingProtection.OLM
    return SignallingProtection.WITHHELD if room_encrypted else SignallingProtection.PLAINTEXT


def accept_signalling(
    *, room_encrypted: bool, encrypted: bool, claimed_device: object, verified_device: object
) -> str | None:
    """None if a received ``m.call.*`` is acceptable, else the reason to drop it."""
    if encrypted:
        return None if claimed_device == verified_device else "device_id is not the sending device"
    return "plaintext signalling in an encrypted room" if room_encrypted else None


def frame_e2ee_with(*, we_encrypt: bool, peer_advertises: bool) -> bool:
    """Whether frames to and from this peer carry frame encryption."""
    return we_encrypt and peer_advertises
