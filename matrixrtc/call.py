"""``matrixrtc.Call``: one device in one room's MatrixRTC call, media included.

``async with Call(room, homeserver=URL, user=U, password=P) as call`` logs in (or uses the
:class:`~matrixrtc.matrix.Homeserver` given as ``client``, which it then does not close),
joins the room and its call, distributes and receives media keys (in encrypted rooms, or as
``e2ee`` says), and runs the
call's media over a full mesh or the room's LiveKit SFU, switching live as members come and
go (``transport="auto"``), or over one of them only (``"mesh"``, ``"sfu"``: then only that
transport is advertised). Leaving the block leaves the call and closes what the call opened.

What the call shows:

- :attr:`Call.participants`: the active members, oldest first, ourselves included;
- :meth:`Call.events`: an async iterator of :data:`CallEvent` (participants joined or left,
  key events, transport starts and switches); :meth:`Call.on` registers a callback instead;
- :meth:`Call.frames`: an async iterator of :class:`RemoteFrame`, every decoded remote ``av``
  frame with its sender and the transport that carried it (frames are converted only while
  something listens; a slow reader loses the oldest frames, never the newest).

What it sends: nothing until :meth:`Call.publish` gets a track (any aiortc
``MediaStreamTrack`` that yields ``av`` frames: aiortc's ``MediaPlayer`` tracks, a camera, a
synthetic source); publishing another track of the same kind replaces it without touching the
running transport, :meth:`Call.unpublish` stops sending that kind. The call never stops a
track it was given.

The building blocks underneath (``CallAgent``, ``CallKeys``, ``MediaSwitcher``) stay
importable from their modules for tests and tools; this class is the supported way in.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeAlias, TypeVar, cast

import av
import structlog
from aiortc.mediastreams import MediaStreamTrack

from matrixrtc.agent import (
    AgentConfig,
    CallAgent,
    Participant,
    ParticipantsChanged,
    dialect_choice,
)
from matrixrtc.call_keys import CallKeys, CallKeysConfig, KeyEvent
from matrixrtc.discovery import discover_livekit
from matrixrtc.errors import ConfigError, LocalError
from matrixrtc.livekit.connection import MediaOptions
from matrixrtc.logging import library_default
from matrixrtc.matrix import Broadcaster, Homeserver, Login, Subscription
from matrixrtc.matrix.wire import now_ms
from matrixrtc.media.call_media import CallRecording
from matrixrtc.media.file_source import MediaFile
from matrixrtc.media.frames import AvFrame, EncodedFrame, FrameTap, TapFrame
from matrixrtc.media.published import PublishedTrack
from matrixrtc.media.sealed_file import parse_key
from matrixrtc.model import Dialect, FullMeshTransport, Transport
from matrixrtc.session.media_policy import DEFAULT_MESH_MAX, MediaKind
from matrixrtc.switching import SWITCH_MESH, MediaSwitcher, SwitchConfig, SwitchRecord
from matrixrtc.tasks import OwnedTasks

__all__ = [
    "Call",
    "CallEvent",
    "CallOptions",
    "FrameStream",
    "RemoteEncodedFrame",
    "RemoteFrame",
    "TransportChoice",
]

log = structlog.get_logger(__name__)


TransportChoice: TypeAlias = Literal["auto", "mesh", "sfu"]
CallEvent: TypeAlias = ParticipantsChanged | KeyEvent | SwitchRecord
"""What :meth:`Call.events` yields: a participant-list change (with who joined and left), a
key event (never key material), or a completed transport start or switch."""

E = TypeVar("E")

_KINDS = ("audio", "video")


@dataclass(frozen=True, slots=True)
class RemoteFrame:
    """One decoded frame from a remote participant."""

    participant: Participant
    kind: str  # "audio" | "video"
    frame: AvFrame  # av.VideoFrame or av.AudioFrame
    transport: MediaKind  # what carried it (mesh or sfu)


@dataclass(frozen=True, slots=True)
class RemoteEncodedFrame:
    """One received, decrypted frame before decoding (``call.on(RemoteEncodedFrame, cb)``).

    Only the mesh hands these on (LiveKit's Python SDK gives no encoded frames), and only
    while someone listens; the decoded frame follows as a :class:`RemoteFrame` as usual."""

    participant: Participant
    frame: EncodedFrame
    transport: MediaKind


@dataclass(frozen=True, slots=True, kw_only=True)
class CallOptions:
    """Less common settings of a :class:`Call`; the defaults suit a bot on a real server."""

    intent: str | None = None  # "m.call.intent": "audio" | "video"
    mesh_max: int = DEFAULT_MESH_MAX  # auto: mesh while the call has at most this many
    # Host candidate addresses for the mesh; None: every address but loopback (aioice).
    mesh_host_addresses: tuple[str, ...] | None = None
    turn_from_homeserver: bool = True  # mesh ICE servers from /voip/turnServer
    allow_plaintext_keys: bool = False  # E2EE keys in an unencrypted room (test pages only)
    join_timeout_s: float = 30.0  # until the room shows our membership
    frame_queue: int = 64  # frames a slow frames() reader may fall behind before losing some
    delayed_leave_ms: int = 8_000
    # The SFU client: "sdk" (the livekit Python SDK: decodes every subscribed video) or
    # "aiortc" (ours over aiortc: decodes only the first render_max remote videos and
    # receives, decrypts and counts the others; what holds 12 members on a 2-core box).
    sfu_engine: Literal["sdk", "aiortc"] = "sdk"
    render_max: int | None = None  # SFU: remote videos decoded into frames(); None: all
    # SFU: publish video as simulcast layers (full size and half each side), as Element Call
    # does for large calls; on the aiortc engine a larger layer nobody takes is not encoded.
    simulcast: bool = False
    # SFU: take the low layer of every remote video once others publish more than this many
    # (a grid of small tiles); None: the SFU's default.
    low_layer_above: int | None = None
    agent: AgentConfig = field(default_factory=AgentConfig)  # transports/dialect/intent set here


class FrameStream:
    """Decoded remote frames (``async for frame in call.frames()``); ends with the call.

    Bounded: a reader that falls more than ``maxsize`` frames behind loses the oldest ones
    (counted in :attr:`dropped`)."""

    def __init__(self, call: Call, kind: str | None, maxsize: int) -> None:
        self.kind = kind
        self.dropped = 0
        self._call: Call | None = call
        self._queue: asyncio.Queue[RemoteFrame | None] = asyncio.Queue(maxsize=maxsize)

    def _put(self, item: RemoteFrame | None) -> None:
        if self._queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self._queue.get_nowait()
                self.dropped += 1
        self._queue.put_nowait(item)

    async def get(self) -> RemoteFrame:
        item = await self._queue.get()
        if item is None:
            self._queue.put_nowait(None)  # later get() calls end the same way
            raise StopAsyncIteration
        return item

    def close(self) -> None:
        if self._call is not None:
            self._call._streams.discard(self)
            self._call = None

    def __aiter__(self) -> AsyncIterator[RemoteFrame]:
        return self

    async def __anext__(self) -> RemoteFrame:
        return await self.get()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Call:
    """See the module docstring."""

    def __init__(
        self,
        room: str,
        *,
        client: Homeserver | None = None,
        homeserver: str | None = None,
        user: str | None = None,
        password: str | None = None,
        access_token: str | None = None,
        state_dir: Path | None = None,
        transport: TransportChoice = "auto",
        dialect: Dialect | str = Dialect.STATE,  # or "msc3401_2022", "auto"
        e2ee: bool | None = None,
        sfu_url: str | None = None,
        publish: Sequence[MediaStreamTrack] = (),
        options: CallOptions | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock_ms: Callable[[], int] = now_ms,
    ) -> None:
        """Join ``room`` (an id or alias; joined if needed) with ``client``, or log in at
        ``homeserver`` as ``user`` with ``password`` or ``access_token`` (a ``state_dir``
        keeps the device and its crypto store between runs). ``sfu_url`` is the LiveKit
        authorization service to advertise when the homeserver names none. ``publish``: tracks
        to send from the start. ``clock`` (monotonic seconds) and ``wall_clock_ms`` are the
        clocks every part of the call reads (tests inject their own)."""
        library_default()  # logs to stderr, warnings up, unless the application set logging up
        if client is None and (homeserver is None or user is None):
            raise ConfigError("give client=, or homeserver= and user=")
        if transport not in ("auto", "mesh", "sfu"):
            raise ConfigError(f"transport must be auto, mesh or sfu, not {transport!r}")
        opts = options or CallOptions()
        if opts.sfu_engine not in ("sdk", "aiortc"):
            raise ConfigError(f"sfu_engine must be sdk or aiortc, not {opts.sfu_engine!r}")
        if opts.render_max is not None and opts.render_max < 0:
            raise ConfigError(f"render_max must be None or >= 0, not {opts.render_max}")
        if opts.low_layer_above is not None and opts.low_layer_above < 0:
            raise ConfigError(f"low_layer_above must be None or >= 0, not {opts.low_layer_above}")
        self.room = room
        self.transport_choice: TransportChoice = transport
        self.dialect, self.auto_dialect = dialect_choice(dialect)
        self.e2ee = e2ee
        self.options = opts
        self._clock = clock
        self._wall_clock_ms = wall_clock_ms
        self._client = client
        self._login = (
            # refresh tokens (MSC2918): an access token expiring mid-call is renewed
            Login(user, password=password, access_token=access_token, refresh_tokens=True)
            if user is not None
            else None
        )
        self._homeserver = homeserver
        self._state_dir = state_dir
        self._sfu_url = sfu_url
        self._published = {kind: PublishedTrack(kind) for kind in _KINDS}
        self._initial = tuple(publish)
        self._stack: contextlib.AsyncExitStack | None = None
        self._hs: Homeserver | None = None
        self._agent: CallAgent | None = None
        self._keys: CallKeys | None = None
        self._switcher: MediaSwitcher | None = None
        self._events: Broadcaster[CallEvent] = Broadcaster()
        self._callbacks: dict[type[Any], list[Callable[[Any], None]]] = {}
        self._streams: set[FrameStream] = set()
        self._tasks = OwnedTasks("call", log, event_prefix="call")
        self._files: list[MediaFile] = []
        self._recordings: list[CallRecording] = []

    # -- lifetime ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        stack = contextlib.AsyncExitStack()
        try:
            await self._open(stack)
        except BaseException:
            await stack.aclose()
            await self._end()
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.leave()

    async def _open(self, stack: contextlib.AsyncExitStack) -> None:
        opts = self.options
        stack.push_async_callback(self._stop_tasks)  # runs last: the final events get out
        hs = self._client
        if hs is None:
            assert self._homeserver is not None
            assert self._login is not None
            hs = await stack.enter_async_context(
                Homeserver(self._homeserver, self._login, state_dir=self._state_dir)
            )
        self._hs = hs
        room_id = await hs.join_room(self.room)
        agent_cfg = replace(
            opts.agent,
            transports=await self._advertised(hs, room_id),
            dialect=self.dialect,
            auto_dialect=self.auto_dialect,
            intent=opts.intent if opts.intent is not None else opts.agent.intent,
            delayed_leave_ms=opts.delayed_leave_ms,
        )
        agent = await stack.enter_async_context(
            CallAgent(hs, room_id, agent_cfg, clock_ms=self._wall_clock_ms)
        )
        self._agent = agent
        # Listen before the keys and the media start: their first events count too.
        changes = stack.enter_context(agent.changes())
        self._spawn(self._forward(changes), "participants")
        keys = None
        encrypted = hs.is_encrypted(room_id) or (
            ("m.room.encryption", "") in hs.room_state(room_id)
        )
        if self.e2ee or (self.e2ee is None and encrypted):
            keys = await stack.enter_async_context(
                CallKeys(
                    agent,
                    CallKeysConfig(allow_plaintext_keys=opts.allow_plaintext_keys),
                    clock_ms=self._wall_clock_ms,
                    monotonic=self._clock,
                )
            )
            self._spawn(self._forward(stack.enter_context(keys.events())), "keys")
        self._keys = keys
        stack.push_async_callback(self._close_published)
        for track in self._initial:
            self.publish(track)
        mesh = replace(
            SWITCH_MESH,
            mesh=replace(SWITCH_MESH.mesh, host_addresses=opts.mesh_host_addresses),
            turn_from_homeserver=opts.turn_from_homeserver,
        )
        switch_cfg = SwitchConfig(
            mesh_max=opts.mesh_max,
            mesh=mesh,
            sources=self._sources,
            media=MediaOptions(
                engine=opts.sfu_engine,
                render_max=opts.render_max,
                simulcast=opts.simulcast,
                low_layer_above=opts.low_layer_above,
            ),
        )
        switcher = await stack.enter_async_context(
            MediaSwitcher(
                agent,
                keys,
                switch_cfg,
                clock=self._clock,
                frames=FrameTap(self._frame, self._listening, self._listening_encoded),
            )
        )
        self._switcher = switcher
        self._spawn(self._forward(stack.enter_context(switcher.switches())), "transport")
        await agent.wait_joined(opts.join_timeout_s)

    async def _advertised(self, hs: Homeserver, room_id: str) -> tuple[Transport, ...]:
        mesh: tuple[Transport, ...] = (FullMeshTransport(),)
        if self.transport_choice == "mesh" or self.dialect is Dialect.MSC3401_2022:
            return mesh
        sfu = await discover_livekit(hs, room_id, self._sfu_url, self.dialect)
        if sfu is None:
            if self.transport_choice == "sfu":
                raise ConfigError("transport='sfu' but no LiveKit focus: pass sfu_url=")
            return mesh
        # The mesh transport goes after the LiveKit one (design.md principle 5).
        return (sfu,) if self.transport_choice == "sfu" else (sfu, *mesh)

    async def leave(self) -> None:
        """Leave the call and close what the call opened (idempotent)."""
        stack, self._stack = self._stack, None
        if stack is None:
            return
        try:
            if self._agent is not None:
                # The leave event goes out before the media is torn down: others see us
                # gone at once, however long closing the transports takes.
                await self._agent.leave()
            await self._close_media()
            await stack.aclose()
        finally:
            await self._end()

    async def _close_media(self) -> None:
        """Recordings first (every file finished while the call still runs), then files."""
        recordings, self._recordings = self._recordings, []
        for rec in recordings:
            try:
                await rec.aclose()
            except Exception as exc:  # a recording's failure must not keep us in the call
                log.error("call.recording_close_failed", error=repr(exc))
        files, self._files = self._files, []
        for media in files:
            await asyncio.to_thread(media.close)

    async def _end(self) -> None:
        self._events.end()
        for stream in list(self._streams):
            stream._put(None)
            stream.close()

    async def _stop_tasks(self) -> None:
        await self._tasks.aclose()

    async def _close_published(self) -> None:
        for published in self._published.values():
            await published.aclose()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.spawn(coro, name)

    # -- what the call shows ------------------------------------------------------------------

    @property
    def client(self) -> Homeserver:
        if self._hs is None:
            raise LocalError("the call is not open (use `async with Call(...)`)")
        return self._hs

    @property
    def room_id(self) -> str:
        return self._require_agent().room_id

    @property
    def participants(self) -> tuple[Participant, ...]:
        """Active members, oldest first, ourselves included (``is_self``)."""
        return self._require_agent().participants

    @property
    def left_reason(self) -> str | None:
        """Why we left the call by ourselves (e.g. its slot was closed), else None; the media
        keeps running until the ``async with`` block ends."""
        return self._agent.left_reason if self._agent is not None else None

    @property
    def transport(self) -> MediaKind | None:
        """What carries the media now (None before the first transport is up)."""
        return self._switcher.kind if self._switcher is not None else None

    @property
    def media_engine(self) -> Literal["mesh", "sdk", "aiortc"] | None:
        """What runs the transport carrying the media now: ``"mesh"``, or on the SFU the
        client its connections run on (``"sdk"``, ``"aiortc"``: ``CallOptions.sfu_engine``);
        None before the first transport is up."""
        return self._switcher.engine if self._switcher is not None else None

    def events(self) -> Subscription[CallEvent]:
        """Every :data:`CallEvent` from now on; ends when the call ends."""
        return self._events.subscribe()

    def frames(self, kind: str | None = None) -> FrameStream:
        """Decoded remote frames from now on (``kind``: only ``"audio"`` or ``"video"``)."""
        if kind is not None and kind not in _KINDS:
            raise ValueError(f"kind must be audio or video, not {kind!r}")
        stream = FrameStream(self, kind, self.options.frame_queue)
        if self._stack is None and self._agent is not None:
            stream._put(None)  # the call is over
        else:
            self._streams.add(stream)
        return stream

    def on(self, event_type: type[E], callback: Callable[[E], None]) -> Callable[[], None]:
        """Call ``callback`` for every event of ``event_type`` (``ParticipantsChanged``,
        ``KeyEvent``, ``SwitchRecord`` or ``RemoteFrame``); returns a function that removes it.

        Callbacks run in the call's tasks and must not block; an exception is logged."""
        callbacks = self._callbacks.setdefault(event_type, [])
        cb = cast(Callable[[Any], None], callback)
        callbacks.append(cb)
        return lambda: callbacks.remove(cb) if cb in callbacks else None

    async def wait_for_participants(self, count: int, timeout_s: float = 30.0) -> None:
        """Until at least ``count`` members (ourselves included) are in the call."""
        with self.events() as events:
            async with asyncio.timeout(timeout_s):
                while len(self.participants) < count:
                    await events.get()

    # -- what the call sends -------------------------------------------------------------------

    def publish(self, track: MediaStreamTrack) -> None:
        """Send ``track`` (audio or video) from now on, replacing what was sent in its kind."""
        if track.kind not in _KINDS:
            raise ValueError(f"cannot publish a {track.kind!r} track")
        self._published[track.kind].set_source(track)

    def publish_file(
        self, path: str | Path, *, loop: bool = False, start: float = 0.0
    ) -> MediaFile:
        """Send the audio and video of a media file (anything FFmpeg reads), paced in real
        time from ``start`` seconds, again and again with ``loop``. The file is checked first:
        :class:`~matrixrtc.media.file_source.MediaFileError` says why it cannot be played, and
        nothing is sent. The call closes the file when it ends; ``MediaFile.stats`` counts what
        was played."""
        media = MediaFile(path, loop=loop, start=start)
        self._files.append(media)
        for track in media.tracks:
            self.publish(track)
        return media

    def record(
        self,
        directory: str | Path,
        *,
        encrypt_to: bytes | str | None = None,
        passthrough: bool = True,
    ) -> CallRecording:
        """Record every remote participant into ``directory`` (one WebM file per participant
        and presence, and ``index.json``; see ``matrixrtc.media.recorder``), sealed to the
        X25519 public key ``encrypt_to`` (32 bytes, or base64/hex text) when given (the index
        too, as ``index.json.sealed``). Recording
        runs until ``await recording.aclose()`` or the end of the call.

        ``passthrough``: where the transport hands on the received encoded video (the mesh,
        VP8), write it as received instead of decoding and re-encoding it (see
        ``matrixrtc.media.recorder``); the SFU's video and all audio are re-encoded."""
        recipient = parse_key(encrypt_to) if isinstance(encrypt_to, str) else encrypt_to
        rec = CallRecording(
            Path(directory),
            participants=self.participants,
            recipient=recipient,
            passthrough=passthrough,
        )
        rec.on_close(
            self.on(
                ParticipantsChanged,
                lambda change: rec.participants_changed(change.joined, change.left),
            )
        )
        rec.on_close(self.on(RemoteFrame, lambda f: rec.frame(f.participant, f.kind, f.frame)))
        if passthrough:
            rec.on_close(
                self.on(RemoteEncodedFrame, lambda f: rec.encoded_frame(f.participant, f.frame))
            )
        self._recordings.append(rec)
        return rec

    def unpublish(self, kind: str) -> None:
        """Stop sending ``kind`` (the track itself is not stopped)."""
        self._published[kind].set_source(None)

    def _sources(self) -> list[MediaStreamTrack]:
        return [p.subscribe() for p in self._published.values()]

    # -- plumbing -----------------------------------------------------------------------------

    def _require_agent(self) -> CallAgent:
        if self._agent is None:
            raise LocalError("the call is not open (use `async with Call(...)`)")
        return self._agent

    async def _forward(self, sub: Subscription[Any]) -> None:
        async for event in sub:
            self._events.publish(event)
            self._dispatch(event)

    def _dispatch(self, event: object) -> None:
        for cb in list(self._callbacks.get(type(event), ())):
            try:
                cb(event)
            except Exception as exc:  # the application's bug must not stop the call
                log.warning("call.callback_failed", event=type(event).__name__, error=repr(exc))

    def _listening(self) -> bool:
        return bool(self._streams) or bool(self._callbacks.get(RemoteFrame))

    def _listening_encoded(self) -> bool:
        return bool(self._callbacks.get(RemoteEncodedFrame))

    def _frame(self, origin: tuple[Participant, MediaKind], frame: TapFrame) -> None:
        participant, transport = origin
        if isinstance(frame, EncodedFrame):
            self._dispatch(RemoteEncodedFrame(participant, frame, transport))
            return
        kind = "video" if isinstance(frame, av.VideoFrame) else "audio"
        item = RemoteFrame(participant, kind, frame, transport)
        for stream in list(self._streams):
            if stream.kind is None or stream.kind == kind:
                stream._put(item)
        self._dispatch(item)
