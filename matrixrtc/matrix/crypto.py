"""Megolm for room events, through nio: encrypt what we send to encrypted rooms, decrypt what
the sync loop hands on, and the key housekeeping after each sync (upload, query, claim, and
nio's queued to-device messages). Every nio call holds the adapter's crypto lock: nio's Olm and
Megolm state is not reentrant.

nio shares an outbound Megolm session once, with the devices it knows at that moment, and
never with a device that appears later (Rust crypto does). A device that logs in after our
first encrypted event could then read nothing we send until the session expires (a week or
100 messages). :meth:`RoomCrypto.encrypt` therefore starts a new session, shared with every
member device, as soon as a member device exists that the current session was not offered
to; and it says which devices received the session of each event
(:attr:`Encrypted.recipients`), so that a sender can re-send what a newer device cannot read
(the agent does this for its sticky membership)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
import structlog
from nio import MegolmEvent
from nio.exceptions import LocalProtocolError

from matrixrtc.matrix._nio import NioClient, nio_errors
from matrixrtc.matrix.types import DeviceRef, JsonDict

__all__ = ["Encrypted", "RoomCrypto"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Encrypted:
    """What to send: the event type and content (Megolm-encrypted in an encrypted room) and,
    when encrypted, the devices that received the session it was encrypted with."""

    type: str
    content: JsonDict
    recipients: frozenset[DeviceRef] | None = None


class RoomCrypto:
    """See the module docstring."""

    def __init__(self, nio: NioClient, lock: asyncio.Lock) -> None:
        self._nio = nio
        self._lock = lock
        # Per room: the member devices known when the current outbound session was shared.
        self._offered: dict[str, frozenset[DeviceRef]] = {}

    async def encrypt(self, room_id: str, event_type: str, content: JsonDict) -> Encrypted:
        """The event to send: Megolm-encrypted in an encrypted room, else as given."""
        nio = self._nio
        room = nio.rooms.get(room_id)
        if room is None or not room.encrypted:
            return Encrypted(event_type, content)
        async with self._lock:
            with nio_errors("encrypt"):
                if not room.members_synced:
                    await nio.joined_members(room_id)
                if nio.should_query_keys:
                    await nio.keys_query()
                devices = self.member_devices(room_id)
                newcomers = devices - self._offered.get(room_id, frozenset())
                if nio.olm.should_share_group_session(room_id) or newcomers:
                    if not nio.olm.should_share_group_session(room_id):
                        log.info(
                            "homeserver.megolm_rotated",
                            room_id=room_id,
                            reason="new member devices",
                            devices=sorted(f"{d.user_id}:{d.device_id}" for d in newcomers),
                        )
                    # Shares a new session with every member device (nio makes a new one
                    # when the current one was already shared).
                    await nio.share_group_session(room_id, ignore_unverified_devices=True)
                    self._offered[room_id] = devices
                etype, enc = nio.encrypt(room_id, event_type, content)
                session = nio.olm.outbound_group_sessions.get(room_id)
                recipients = frozenset(
                    DeviceRef(u, d) for u, d in getattr(session, "users_shared_with", ())
                )
        return Encrypted(str(etype), dict(enc), recipients)

    def member_devices(self, room_id: str) -> frozenset[DeviceRef]:
        """Every device of the room's members that nio knows of, ours excepted."""
        nio = self._nio
        room = nio.rooms.get(room_id)
        if room is None:
            return frozenset()
        return frozenset(
            DeviceRef(user_id, device.id)
            for user_id in list(room.users)
            for device in nio.device_store.active_user_devices(user_id)
            if not (user_id == nio.user_id and device.id == nio.device_id)
        )

    def decrypted(self, room_id: str, ev: JsonDict, known: Mapping[str, JsonDict]) -> JsonDict:
        """The event with its type and content replaced by the Megolm plaintext, if we can
        (``known``: what nio already decrypted in this sync, by event id)."""
        if ev.get("type") != "m.room.encrypted" or "state_key" in ev:
            return ev
        plain = known.get(str(ev.get("event_id")))
        if plain is None:
            plain = self._decrypt(room_id, ev)
        if plain is None:
            return ev
        etype, content = plain.get("type"), plain.get("content")
        if not isinstance(etype, str) or not isinstance(content, dict):
            return ev
        # Keep the outer PDU fields (msc4354_sticky, unsigned, origin_server_ts): the
        # homeserver sets them, the sender cannot.
        return {**ev, "type": etype, "content": content, "decrypted": True}

    def _decrypt(self, room_id: str, ev: JsonDict) -> JsonDict | None:
        try:
            parsed = MegolmEvent.from_dict(ev)
            if not isinstance(parsed, MegolmEvent):
                return None
            if (
                self._nio.olm.inbound_group_store.get(room_id, parsed.sender_key, parsed.session_id)
                is None
            ):
                # No key yet (it may come later: callers retry). Asking nio would only log.
                return None
            parsed.room_id = room_id  # sync events omit it; nio needs it to find the session
            out = self._nio.decrypt_event(parsed)
        except Exception as e:  # nio raises its own EncryptionError and schema errors
            log.debug("homeserver.undecryptable", room_id=room_id, reason=str(e))
            return None
        src = getattr(out, "source", None)
        return src if isinstance(src, dict) else None

    async def housekeeping(self) -> None:
        """Upload, query and claim keys as nio asks, and send its queued to-device messages;
        a failure is logged (the next sync retries, a lost homeserver shows up there)."""
        nio = self._nio
        async with self._lock:
            try:
                if nio.should_upload_keys:
                    await nio.keys_upload()
                if nio.should_query_keys:
                    await nio.keys_query()
                if nio.should_claim_keys:
                    await nio.keys_claim(nio.get_users_for_key_claiming())
                await nio.send_to_device_messages()
            except (aiohttp.ClientError, TimeoutError, OSError, LocalProtocolError) as e:
                log.warning("homeserver.crypto_housekeeping_failed", error=str(e))
