"""Fan-out of LiveKit webhooks between ``--workers`` processes, over Redis pub/sub.

With SO_REUSEPORT the kernel hands each webhook to one worker, but the job it concerns may
live in another. When ``LIVEKIT_REDIS_URL`` is set and there is more than one worker, the
receiving worker publishes the (already verified) event and every worker, itself included,
routes it to its own jobs. Without Redis, a webhook only reaches the worker that received it
and the periodic presence check is what notices a departure elsewhere.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import structlog

from matrixrtc.tasks import OwnedTasks

__all__ = ["CHANNEL", "WebhookBus"]

log = structlog.get_logger(__name__)

CHANNEL = "matrixrtc-sfu:webhooks"

# kind (a webhook event name, or "replace"), room, identity, signal name (or delay id)
Handler = Callable[[str, str, str, str], None]


class WebhookBus:
    """Publishes verified webhook events and delivers every published one to ``handler``."""

    def __init__(self, redis_url: str, handler: Handler) -> None:
        import redis.asyncio as aioredis

        self._redis = aioredis.Redis.from_url(redis_url, socket_connect_timeout=5)
        self._handler = handler
        self._tasks = OwnedTasks("webhook bus", log, event_prefix="webhook_bus")
        self._subscribed = asyncio.Event()

    async def start(self) -> None:
        self._tasks.spawn(self._listen(), "listen")
        # Do not accept webhooks before we can hear our own publications.
        async with asyncio.timeout(10):
            await self._subscribed.wait()

    async def close(self) -> None:
        """Stop listening and disconnect; a failure of the listener (logged when it
        happened) is raised once Redis is closed."""
        try:
            await self._tasks.aclose()
        finally:
            await self._redis.aclose()

    async def publish(self, kind: str, room: str, identity: str, signal: str) -> None:
        msg = json.dumps({"k": kind, "r": room, "i": identity, "s": signal})
        await self._redis.publish(CHANNEL, msg)

    async def _listen(self) -> None:
        backoff = 0.5
        while True:
            try:
                pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(CHANNEL)
                self._subscribed.set()
                backoff = 0.5
                async for message in pubsub.listen():
                    self._deliver(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("webhook bus disconnected", reason=str(exc)[:200])
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    def _deliver(self, message: object) -> None:
        if not isinstance(message, dict) or message.get("type") != "message":
            return
        try:
            obj = json.loads(message["data"])
            kind, room, identity, signal = (str(obj[k]) for k in ("k", "r", "i", "s"))
        except (ValueError, KeyError, TypeError):
            log.warning("malformed webhook bus message")
            return
        self._handler(kind, room, identity, signal)
