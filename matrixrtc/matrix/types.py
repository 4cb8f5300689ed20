"""Value types of the homeserver adapter (no I/O): login, device references, received
to-device events, per-room sync updates, OpenID tokens, delayed-event actions, and the
:class:`Broadcaster`/:class:`Subscription` streams the sync loop (and the agent) feed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Generic, Self, TypeVar

from matrixrtc.errors import RemoteError
from matrixrtc.model.devices import DeviceRef

__all__ = [
    "Broadcaster",
    "DelayAction",
    "DeviceRef",
    "JsonDict",
    "Login",
    "OpenIdToken",
    "RoomUpdate",
    "Subscription",
    "ToDeviceEvent",
    "ToDeviceSendResult",
]

T = TypeVar("T")
JsonDict = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Login:
    """How to log in. ``user`` is a full mxid or a localpart on the homeserver.

    Give a password or an access token (the CLI reads them from the environment). With a
    state directory that already holds a session for this user, neither is needed.
    ``refresh_tokens``: ask for an MSC2918 refresh token at a password login, so an access
    token that expires mid-call is renewed (spec v1.3 ``/refresh``); a ``refresh_token`` given
    with an access token is used the same way.
    """

    user: str
    password: str | None = None
    access_token: str | None = None
    device_name: str = "matrixrtc"
    refresh_tokens: bool = False
    refresh_token: str | None = None

    def __repr__(self) -> str:
        return f"Login(user={self.user!r}, password={'***' if self.password else None})"


@dataclass(frozen=True, slots=True)
class ToDeviceEvent:
    """A received to-device event.

    For ``encrypted`` events, ``sender_device`` is the device whose Olm identity key
    (``sender_curve25519``) decrypted the message and whose signed device keys (from the key
    query) match it: a verified binding, unlike a ``device_id`` claimed in the content. For
    plaintext events both are None: consumers that need authenticity must drop them.
    """

    type: str
    content: JsonDict
    sender: str
    sender_device: str | None
    sender_curve25519: str | None
    encrypted: bool


@dataclass(frozen=True, slots=True)
class ToDeviceSendResult:
    """Which devices got the message; ``failed`` have no keys or no Olm session."""

    sent: tuple[DeviceRef, ...]
    failed: tuple[DeviceRef, ...]


@dataclass(frozen=True, slots=True)
class RoomUpdate:
    """One joined room's part of one sync response, raw events, decrypted where possible.

    ``state`` holds the ``state`` section followed by state events of the timeline, in
    order, or, where the homeserver answered with MSC4222's ``state_after`` (``resolved``),
    the timeline's state events followed by ``state_after``: the room's resolved state at
    the end of the timeline comes last and wins (after a state reset it may hold an older
    event than the newest of the timeline); ``timeline`` every timeline event; ``sticky``
    the events of the ``msc4354_sticky`` section plus timeline events carrying the
    ``msc4354_sticky`` field.
    ``initial`` is set on the first sync (full state). ``left`` means we are no longer joined.
    ``sync_request`` numbers the /sync request that brought it (1, 2, …; 0 = not from a sync),
    so a reader can tell whether it was asked for after some write of its own was answered.
    """

    room_id: str
    state: tuple[JsonDict, ...]
    timeline: tuple[JsonDict, ...]
    sticky: tuple[JsonDict, ...]
    initial: bool
    left: bool = False
    sync_request: int = 0
    resolved: bool = False


@dataclass(frozen=True, slots=True)
class OpenIdToken:
    access_token: str
    token_type: str
    matrix_server_name: str
    expires_in: int

    def as_json(self) -> JsonDict:
        return {
            "access_token": self.access_token,
            "token_type": self.token_type,
            "matrix_server_name": self.matrix_server_name,
            "expires_in": self.expires_in,
        }

    def __repr__(self) -> str:
        return f"OpenIdToken(server={self.matrix_server_name!r}, expires_in={self.expires_in})"


class DelayAction(Enum):
    RESTART = "restart"
    CANCEL = "cancel"
    SEND = "send"


class _Closed:
    """Queue sentinel: the producer ended (``error`` says why, None for a normal close)."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


class Subscription(Generic[T]):
    """An unbounded stream of one :class:`Broadcaster`'s items; ``async for`` it or
    ``await get()``.

    Closing it (or leaving ``with``) unsubscribes. When the producer ends the stream,
    pending items are still delivered, then iteration stops (or raises the producer's error
    as :class:`~matrixrtc.errors.RemoteError`).
    """

    def __init__(self, source: Broadcaster[T]) -> None:
        self._queue: asyncio.Queue[T | _Closed] = asyncio.Queue()
        self._source: Broadcaster[T] | None = source

    def _put(self, item: T) -> None:  # only the Broadcaster calls these two
        self._queue.put_nowait(item)

    def _end(self, error: BaseException | None) -> None:
        self._queue.put_nowait(_Closed(error))

    async def get(self) -> T:
        item = await self._queue.get()
        if isinstance(item, _Closed):
            self._queue.put_nowait(item)  # keep later get() calls failing the same way
            if item.error is not None:
                raise RemoteError(f"stream ended: {item.error}") from item.error
            raise StopAsyncIteration
        return item

    def get_nowait(self) -> T | None:
        """An item if one is queued, else None (never blocks)."""
        try:
            item = self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None
        if isinstance(item, _Closed):
            self._queue.put_nowait(item)
            return None
        return item

    def close(self) -> None:
        if self._source is not None:
            self._source._unsubscribe(self)
            self._source = None

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        return await self.get()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Broadcaster(Generic[T]):
    """The producer side of a stream: owns its subscriptions, hands every published item to
    each of them, and ends them all at once.

    After :meth:`end`, new subscriptions are ended at once too, so a late subscriber never
    waits forever on a stream that is over.
    """

    def __init__(self) -> None:
        self._subs: set[Subscription[T]] = set()
        self._ended: _Closed | None = None

    def subscribe(self, first: Iterable[T] = ()) -> Subscription[T]:
        """A new subscription; ``first``: items it gets before anything published later
        (e.g. the current state, for a stream of changes)."""
        sub = Subscription(self)
        for item in first:
            sub._put(item)
        if self._ended is not None:
            sub._end(self._ended.error)
        else:
            self._subs.add(sub)
        return sub

    def publish(self, item: T) -> None:
        """Queue ``item`` for every current subscriber (never blocks)."""
        for sub in list(self._subs):
            sub._put(item)

    def end(self, error: BaseException | None = None) -> None:
        """End the stream: subscribers get what is queued, then stop (``error``: raise it)."""
        self._ended = _Closed(error)
        subs, self._subs = self._subs, set()
        for sub in subs:
            sub._end(error)

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def _unsubscribe(self, sub: Subscription[T]) -> None:
        self._subs.discard(sub)
