"""Megolm for room events, through nio: encrypt what we send to encrypted rooms, decrypt what
the sync loop hands on, and the key housekeeping after each sync (upload, query, claim, and
nio's queued to-device messages). Every nio call holds the adapter's crypto lock: nio's Olm and
Megolm state is not reentrant."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import aiohttp
import structlog
from nio import MegolmEvent
from nio.exceptions import LocalProtocolError

from matrixrtc.matrix._nio import NioClient, nio_errors
from matrixrtc.matrix.types import JsonDict

__all__ = ["RoomCrypto"]

log = structlog.get_logger(__name__)


class RoomCrypto:
    """See the module docstring."""

    def __init__(self, nio: NioClient, lock: asyncio.Lock) -> None:
        self._nio = nio
        self._lock = lock

    async def encrypt(
        self, room_id: str, event_type: str, content: JsonDict
    ) -> tuple[str, JsonDict]:
        """``(type, content)`` to send: Megolm-encrypted in an encrypted room, else as given."""
        nio = self._nio
        room = nio.rooms.get(room_id)
        if room is None or not room.encrypted:
            return event_type, content
        async with self._lock:
            with nio_errors("encrypt"):
                if not room.members_synced:
                    await nio.joined_members(room_id)
                if nio.should_query_keys:
                    await nio.keys_query()
                if nio.olm.should_share_group_session(room_id):
                    await nio.share_group_session(room_id, ignore_unverified_devices=True)
                etype, enc = nio.encrypt(room_id, event_type, content)
        return str(etype), dict(enc)

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
