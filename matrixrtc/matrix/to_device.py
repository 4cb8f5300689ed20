"""To-device messaging for the homeserver adapter: Olm-encrypted sending to chosen devices,
and a stream of received to-device events that carries the *verified* sender device.

:class:`ToDevice` is owned by :class:`~matrixrtc.matrix.homeserver.Homeserver`, which keeps
the public methods (``send_to_device``, ``to_device_events``) and feeds each sync response's
``to_device`` section to :meth:`ToDevice.dispatch`.

Sending: unknown devices' keys are queried, one-time keys claimed where no Olm session exists,
and each message is Olm-encrypted for its device; devices without keys or a session are
reported, not raised, so one vanished peer does not stop delivery to the others.

Receiving: nio's Olm machine decrypts (``olm_hook.CapturingOlm`` keeps the inner types nio
would drop); a payload is published only when the Curve25519 key that decrypted it belongs to
a device of the sender in the device store whose Ed25519 key and device id match the payload's
claims. Plaintext to-device events are published with no sender device: consumers that need
authenticity drop them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Protocol
from urllib.parse import quote

import structlog

from matrixrtc.errors import MatrixRTCError
from matrixrtc.matrix import wire
from matrixrtc.matrix._nio import NioClient, device_of, nio_errors
from matrixrtc.matrix.olm_hook import CapturingOlm
from matrixrtc.matrix.types import (
    Broadcaster,
    DeviceRef,
    JsonDict,
    Subscription,
    ToDeviceEvent,
    ToDeviceSendResult,
)

__all__ = ["ToDevice"]

log = structlog.get_logger(__name__)


class _Request(Protocol):
    def __call__(self, method: str, path: str, *, body: Any = None) -> Awaitable[JsonDict]: ...


class ToDevice:
    """See the module docstring. ``nio`` returns the logged-in client (raises when closed);
    ``crypto_lock`` is the adapter's lock around nio's crypto state."""

    def __init__(
        self, nio: Callable[[], NioClient], request: _Request, crypto_lock: asyncio.Lock
    ) -> None:
        self._nio = nio
        self._request = request
        self._crypto_lock = crypto_lock
        self._events: Broadcaster[ToDeviceEvent] = Broadcaster()

    def subscribe(self) -> Subscription[ToDeviceEvent]:
        return self._events.subscribe()

    def end(self, error: BaseException | None) -> None:
        self._events.end(error)

    async def send(
        self,
        event_type: str,
        messages: Mapping[DeviceRef, Mapping[str, Any]],
        *,
        encrypted: bool = True,
    ) -> ToDeviceSendResult:
        """Send to-device messages, Olm-encrypted per device by default.

        Queries device keys of unknown devices and claims one-time keys to start Olm sessions
        where none exists. Devices without keys or without a session are returned in
        ``failed`` (not raised): a peer that vanished must not stop the others' delivery.
        """
        if not messages:
            return ToDeviceSendResult((), ())
        if not encrypted:
            body: dict[str, dict[str, JsonDict]] = {}
            for ref, content in messages.items():
                body.setdefault(ref.user_id, {})[ref.device_id] = dict(content)
            await self._put(event_type, body)
            return ToDeviceSendResult(tuple(messages), ())
        nio = self._nio()
        sent: list[DeviceRef] = []
        failed: list[DeviceRef] = []
        out: dict[str, dict[str, JsonDict]] = {}
        async with self._crypto_lock:
            with nio_errors("to-device encrypt"):
                olm = nio.olm
                await self._ensure_device_keys(nio, messages.keys())
                claim: dict[str, list[str]] = {}
                for ref in messages:
                    dev = device_of(nio, ref)
                    if dev is not None and olm.session_store.get(dev.curve25519) is None:
                        claim.setdefault(ref.user_id, []).append(ref.device_id)
                if claim:
                    resp = await nio.keys_claim(claim)
                    if not hasattr(resp, "one_time_keys"):
                        log.warning("homeserver.keys_claim_failed", error=str(resp))
                for ref, content in messages.items():
                    dev = device_of(nio, ref)
                    session = olm.session_store.get(dev.curve25519) if dev is not None else None
                    if dev is None or session is None:
                        failed.append(ref)
                        continue
                    enc = olm._olm_encrypt(session, dev, event_type, dict(content))
                    out.setdefault(ref.user_id, {})[ref.device_id] = enc
                    sent.append(ref)
        if out:
            await self._put("m.room.encrypted", out)
        if failed:
            log.warning(
                "homeserver.to_device_undeliverable",
                type=event_type,
                devices=[f"{r.user_id}/{r.device_id}" for r in failed],
            )
        return ToDeviceSendResult(tuple(sent), tuple(failed))

    async def _put(self, event_type: str, body: Mapping[str, Any]) -> None:
        etype, txn = quote(event_type, safe=""), quote(wire.txn(), safe="")
        path = f"/_matrix/client/v3/sendToDevice/{etype}/{txn}"
        await self._request("PUT", path, body={"messages": body})

    async def _ensure_device_keys(self, nio: NioClient, refs: Iterable[DeviceRef]) -> None:
        missing = {r.user_id for r in refs if device_of(nio, r) is None}
        if not missing and not nio.should_query_keys:
            return
        nio.olm.users_for_key_query.update(missing)
        resp = await nio.keys_query()
        if not hasattr(resp, "device_keys"):
            log.warning("homeserver.keys_query_failed", error=str(resp))

    def _verified_device(self, sender: str, curve: str, payload: JsonDict) -> str | None:
        nio = self._nio()
        claimed = payload.get("sender_device")
        keys = payload.get("keys")
        ed = keys.get("ed25519") if isinstance(keys, dict) else None
        for dev in nio.device_store.active_user_devices(sender):
            if dev.curve25519 == curve:
                if ed is not None and dev.ed25519 != ed:
                    log.warning("homeserver.olm_key_mismatch", sender=sender, device=dev.id)
                    return None
                if isinstance(claimed, str) and claimed != dev.id:
                    log.warning("homeserver.olm_device_mismatch", sender=sender, device=dev.id)
                    return None
                return str(dev.id)
        return None

    async def dispatch(self, raw_events: list[JsonDict]) -> None:
        """Publish one sync response's to-device events (Olm ones after nio decrypted them)."""
        nio = self._nio()
        captured = nio.olm.take_captured() if isinstance(nio.olm, CapturingOlm) else []
        if captured:
            unknown = {
                c.sender
                for c in captured
                if self._verified_device(c.sender, c.sender_curve25519, c.payload) is None
            }
            if unknown:  # a device we have not seen yet: fetch its keys once, then verify
                async with self._crypto_lock:
                    nio.olm.users_for_key_query.update(unknown)
                    try:
                        with nio_errors("key query"):
                            await nio.keys_query()
                    except MatrixRTCError as e:
                        log.warning("homeserver.keys_query_failed", error=str(e))
        for c in captured:
            device = self._verified_device(c.sender, c.sender_curve25519, c.payload)
            etype, content = c.payload.get("type"), c.payload.get("content")
            if device is None or not isinstance(etype, str) or not isinstance(content, dict):
                log.warning("homeserver.to_device_unverified", sender=c.sender, type=etype)
                continue
            self._events.publish(
                ToDeviceEvent(etype, content, c.sender, device, c.sender_curve25519, True)
            )
        for ev in raw_events:
            etype, sender, content = ev.get("type"), ev.get("sender"), ev.get("content")
            if etype == "m.room.encrypted" or not isinstance(etype, str):
                continue
            if not isinstance(sender, str) or not isinstance(content, dict):
                continue
            self._events.publish(ToDeviceEvent(etype, content, sender, None, None, False))
