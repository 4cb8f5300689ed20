"""``python -m matrixrtc join``: join a room's call, print the participants, leave on Ctrl-C.

Credentials never go on the command line: the password comes from ``MATRIXRTC_PASSWORD``,
an access token from ``MATRIXRTC_ACCESS_TOKEN``, or a prompt when stdin is a terminal. A
state directory that already holds this user's session needs neither.

A full participant from the shell: ``--media auto|mesh|sfu`` sends a synthetic test pattern
and tone (``--publish none``: receive only) over the mesh or the room's LiveKit SFU, through
:class:`matrixrtc.Call`; ``--e2ee`` decides media keys (default: in encrypted rooms, also
without ``--media``), ``--dialect`` the membership form, ``--transport-selection`` the
state-form focus selection, and every other ``AgentConfig`` field has its switch.

``--output json`` prints one JSON object per line instead of tables (for scripts and tests):
``{"event": "ready", ...}``, ``{"event": "participants", "participants": [...], "ring": ...}``,
``{"event": "key", "kind": "used"|"sent"|"installed"|"dropped", "index": ..., ...}`` (never key
material), ``{"event": "transport", "from": ..., "to": ..., ...}``, then ``{"event": "left"}``;
each with ``"monotonic"``. With ``--media``, every ``--report-s``: ``{"event": "media", "video":
{member: frames}, "audio": {...}, "tone": {...}}`` (decoded frames so far per remote device;
``tone``: audio frames in which the sender's 440 Hz tone was found) and ``{"event": "status",
"tasks": ..., "task_kinds": {coroutine: n}, "fds": ..., "in_call": ..., "participants": [...]}``
(this process's asyncio tasks and open file descriptors: what a fault harness compares with a
baseline).

On SIGTERM or Ctrl-C the leave is sent first, then everything else is closed and the process
ends at once without the interpreter's slow teardown (js-sdk leaves in 42-62 ms).

``--ring --leave-when-unanswered`` makes it behave like Element Call's caller: when everyone
rung declined, or nobody joined within ``--ring-lifetime-ms``, it leaves and exits (status 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from matrixrtc import event_loop
from matrixrtc.agent import (
    DIALECT_CHOICES,
    AgentConfig,
    CallAgent,
    Participant,
    ParticipantsChanged,
    dialect_choice,
)
from matrixrtc.agent import participants_table as _table
from matrixrtc.call_keys import CallKeys, CallKeysConfig, KeyEvent, KeyEventKind
from matrixrtc.discovery import discover_livekit
from matrixrtc.errors import MatrixRTCError
from matrixrtc.matrix import Homeserver, Login, Subscription
from matrixrtc.model import Dialect, FullMeshTransport, Transport
from matrixrtc.session.media_policy import DEFAULT_MESH_MAX
from matrixrtc.switching import SwitchRecord
from matrixrtc.tasks import OwnedTasks, first_of

__all__ = ["register", "run"]

log = structlog.get_logger(__name__)

PASSWORD_ENV = "MATRIXRTC_PASSWORD"
TOKEN_ENV = "MATRIXRTC_ACCESS_TOKEN"


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "join",
        help="join a room's MatrixRTC call and print its participants until Ctrl-C",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run, fast_exit=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--homeserver", required=True, help="homeserver base URL")
    p.add_argument("--user", required=True, help="user id (@u:hs) or localpart")
    p.add_argument("--room", required=True, help="room id or alias (joined if needed)")
    p.add_argument("--intent", default=None, help="m.call.intent, e.g. audio or video")
    p.add_argument("--ring", action="store_true", help="ring the room if we start the call")
    p.add_argument("--ring-lifetime-ms", type=int, default=30_000)
    p.add_argument(
        "--leave-when-unanswered",
        action="store_true",
        help="with --ring: leave (and exit) when everyone declined or nobody joined in time",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="device state (credentials, crypto store); default $XDG_STATE_HOME/matrixrtc/USER",
    )
    p.add_argument(
        "--dialect",
        choices=DIALECT_CHOICES,
        default=Dialect.STATE.value,
        help="membership form: state (Element Call default), sticky (MSC4143+MSC4354), "
        "msc3401_2022 (m.calls: Hydrogen, legacy js-sdk GroupCall; mesh only) or auto "
        "(what the call's other members use)",
    )
    p.add_argument(
        "--livekit-service-url",
        default=None,
        help="focus to advertise when the homeserver offers none (rtc/transports, .well-known)",
    )
    p.add_argument(
        "--transport-selection",
        choices=("oldest_membership", "multi_sfu"),
        default="multi_sfu",
        help="state-form focus selection: the oldest member's SFU for everyone, or each "
        "member's own (Element Call's compatibility mode, the default)",
    )
    p.add_argument(
        "--media",
        choices=("none", "auto", "mesh", "sfu"),
        default="none",
        help="none: membership (and keys) only; auto: mesh or SFU, switching live; mesh/sfu: "
        "that transport only (only it is advertised)",
    )
    p.add_argument(
        "--e2ee",
        choices=("auto", "on", "off"),
        default="auto",
        help="media keys (per-participant frame E2EE): auto = in encrypted rooms",
    )
    p.add_argument(
        "--allow-plaintext-keys",
        action="store_true",
        help="with --e2ee on in an unencrypted room: keys in clear (test pages only)",
    )
    p.add_argument(
        "--publish",
        choices=("synthetic", "none"),
        default="synthetic",
        help="with --media: send a moving test pattern and a tone, or receive only",
    )
    p.add_argument(
        "--report-s",
        type=float,
        default=2.0,
        help="with --media: print decoded video frames per member this often",
    )
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--fps", type=float, default=15.0)
    p.add_argument("--mesh-max", type=int, default=DEFAULT_MESH_MAX, help="auto: mesh up to N")
    p.add_argument(
        "--mesh-host-address",
        action="append",
        default=[],
        metavar="ADDR",
        help="host ICE candidate address for the mesh (repeatable; default: all but loopback)",
    )
    p.add_argument("--delayed-leave-ms", type=int, default=8_000)
    p.add_argument("--restart-interval-ms", type=int, default=5_000)
    p.add_argument("--restart-timeout-ms", type=int, default=2_000)
    p.add_argument("--expires-ms", type=int, default=14_400_000, help="membership expiry")
    p.add_argument("--network-retry-ms", type=int, default=1_000)
    p.add_argument("--network-retries", type=int, default=10)
    p.add_argument("--sticky-duration-ms", type=int, default=AgentConfig().sticky_duration_ms)
    p.add_argument("--rejoin-backoff-ms", type=int, default=1_000)
    p.add_argument("--rejoin-max-backoff-ms", type=int, default=30_000)
    p.add_argument("--output", choices=("table", "json"), default="table")


def default_state_dir(user: str) -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", user.lstrip("@"))
    return Path(base) / "matrixrtc" / safe


def _login(user: str, state_dir: Path) -> Login:
    password = os.environ.get(PASSWORD_ENV) or None
    token = os.environ.get(TOKEN_ENV) or None
    saved = (state_dir / "session.json").exists()
    if password is None and token is None and not saved and sys.stdin.isatty():
        password = getpass.getpass(f"Password for {user}: ")
    # A refresh token (MSC2918) with a password login: an access token that expires mid-call
    # is renewed ahead of time instead of ending the call.
    return Login(user, password=password, access_token=token, refresh_tokens=True)


def run(args: argparse.Namespace) -> int:
    try:
        code = event_loop.run(_main(args))
    except MatrixRTCError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    if getattr(args, "fast_exit", False):
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """End the process now. Only once everything is closed (leave sent, state directory,
    crypto store and connections closed): this skips the interpreter's teardown of every
    imported module, which takes longer than all of that (~0.2-0.4 s with nio, aiohttp and
    the media stack loaded)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def _transports(
    hs: Homeserver, room_id: str, configured: str | None, dialect: Dialect
) -> tuple[Transport, ...]:
    if dialect is Dialect.MSC3401_2022:
        return (FullMeshTransport(),)  # the 2022 call is a full mesh, nothing else
    found = await discover_livekit(hs, room_id, configured, dialect)
    if found is None:
        log.warning("join.no_transport", hint="pass --livekit-service-url")
        return ()
    return (found,)


def _participant_json(p: Participant) -> dict[str, Any]:
    return {
        "user_id": p.user_id,
        "device_id": p.device_id,
        "member_id": p.member_id,
        "dialect": p.dialect.value,
        "created_ts": p.created_ts,
        "event_id": p.event_id,
        "transport": p.transport.to_json() if p.transport is not None else None,
        "is_self": p.is_self,
    }


def _print(output: str, change: ParticipantsChanged | None, **extra: Any) -> None:
    if output == "json":
        # "monotonic": when this process saw it (CLOCK_MONOTONIC, one clock for all local
        # processes), so a supervisor can compare agents without its own read delays.
        obj: dict[str, Any] = {"monotonic": time.monotonic(), **extra}
        if change is not None:
            obj.update(
                event="participants",
                participants=[_participant_json(p) for p in change.participants],
                ring=change.ring.value,
            )
        print(json.dumps(obj), flush=True)
        return
    if change is None:
        print(" ".join(f"{k}={v}" for k, v in extra.items()), flush=True)
        return
    print(f"\n{len(change.participants)} in call (ring: {change.ring.value})", flush=True)
    print(_table(change.participants), flush=True)


def _agent_config(args: argparse.Namespace, transports: tuple[Transport, ...]) -> AgentConfig:
    """Every ``AgentConfig`` field from its switch."""
    return AgentConfig(
        intent=args.intent,
        transports=transports,
        dialect=dialect_choice(args.dialect)[0],
        auto_dialect=dialect_choice(args.dialect)[1],
        multi_sfu=args.transport_selection == "multi_sfu",
        ring=args.ring,
        ring_lifetime_ms=args.ring_lifetime_ms,
        leave_when_ring_unanswered=args.leave_when_unanswered,
        delayed_leave_ms=args.delayed_leave_ms,
        restart_interval_ms=args.restart_interval_ms,
        restart_timeout_ms=args.restart_timeout_ms,
        expires_ms=args.expires_ms,
        network_retry_ms=args.network_retry_ms,
        network_retries=args.network_retries,
        sticky_duration_ms=args.sticky_duration_ms,
        rejoin_backoff_ms=args.rejoin_backoff_ms,
        rejoin_max_backoff_ms=args.rejoin_max_backoff_ms,
    )


def _key_json(ev: KeyEvent) -> dict[str, Any]:
    return {
        "event": "key",
        "kind": ev.kind.value,
        "index": ev.index,
        "identity": ev.identity,
        "user_id": ev.user_id,
        "device_id": ev.device_id,
        "devices": len(ev.devices),
        "reason": ev.reason,
        "to": [f"{d.user_id}|{d.device_id}" for d in ev.devices],
    }


def _report(args: argparse.Namespace, item: object) -> None:
    """Print one thing that happened (participants, a key event, a transport change)."""
    if isinstance(item, ParticipantsChanged):
        _print(args.output, item)
    elif isinstance(item, KeyEvent):
        obj = _key_json(item)
        if args.output == "json":
            _print(args.output, None, **obj)
        elif item.kind in (KeyEventKind.USED, KeyEventKind.DROPPED):
            _print(args.output, None, **{k: v for k, v in obj.items() if v not in (None, 0)})
    elif isinstance(item, SwitchRecord):
        _print(args.output, None, event="transport", **item.to_json())


async def _until_stopped(
    args: argparse.Namespace,
    streams: list[Subscription[Any]],
    stop: asyncio.Event,
    done: Callable[[], bool],
) -> None:
    """Report what the streams yield until ``stop`` is set or ``done()`` holds."""
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def pump(sub: Subscription[Any]) -> None:
        async for item in sub:
            queue.put_nowait(item)

    # A stream that fails ends the command with its error (logged when it happened).
    pumps = OwnedTasks("join", log, event_prefix="join", on_failure=lambda _n, _e: stop.set())
    for i, sub in enumerate(streams):
        pumps.spawn(pump(sub), f"stream-{i}")
    try:
        while not stop.is_set():
            which, ended = await first_of(item=queue.get(), stop=stop.wait())
            if which == "item":
                _report(args, ended.result())
                if done():
                    break
    finally:
        await pumps.aclose()


def _wants_keys(args: argparse.Namespace, hs: Homeserver, room_id: str) -> bool:
    if args.e2ee != "auto":
        return bool(args.e2ee == "on")
    return hs.is_encrypted(room_id) or ("m.room.encryption", "") in hs.room_state(room_id)


async def _main(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir or default_state_dir(args.user)
    login = _login(args.user, state_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Homeserver(args.homeserver, login, state_dir=state_dir) as hs:
        room_id = await hs.join_room(args.room)
        transports = await _transports(
            hs, room_id, args.livekit_service_url, dialect_choice(args.dialect)[0]
        )
        config = _agent_config(args, transports)
        if args.media != "none":
            reason = await _with_media(args, hs, room_id, config, stop)
        else:
            reason = await _membership_only(args, hs, room_id, config, stop)
        if reason is not None:
            log.warning("join.left_by_itself", reason=reason)
            _print(args.output, None, event="left", reason=reason)
        else:
            _print(args.output, None, event="left")
    if getattr(args, "fast_exit", False):
        _exit_now(0)  # all closed: asyncio.run's own shutdown would only add latency
    return 0


async def _membership_only(
    args: argparse.Namespace,
    hs: Homeserver,
    room_id: str,
    config: AgentConfig,
    stop: asyncio.Event,
) -> str | None:
    """The membership (and with E2EE the media keys), no media. Returns why the agent left
    by itself (its slot was closed), if it did."""
    async with contextlib.AsyncExitStack() as stack:
        agent = await stack.enter_async_context(CallAgent(hs, room_id, config))
        streams: list[Subscription[Any]] = [stack.enter_context(agent.changes())]
        if _wants_keys(args, hs, room_id):
            keys_cfg = CallKeysConfig(allow_plaintext_keys=args.allow_plaintext_keys)
            keys = await stack.enter_async_context(CallKeys(agent, keys_cfg))
            streams.append(stack.enter_context(keys.events()))
        _print(
            args.output,
            None,
            event="ready",
            user_id=hs.user_id,
            device_id=hs.device_id,
            room_id=room_id,
        )
        await _until_stopped(args, streams, stop, lambda: not agent.in_call)
        # The leave goes out first; closing the rest cannot delay it.
        await agent.leave()
        return agent.left_reason


async def _with_media(
    args: argparse.Namespace,
    hs: Homeserver,
    room_id: str,
    config: AgentConfig,
    stop: asyncio.Event,
) -> str | None:
    """A full participant: :class:`matrixrtc.Call` with synthetic audio and video. Returns
    why the call left by itself (its slot was closed), if it did."""
    # media libraries only when asked for
    from matrixrtc.call import Call, CallOptions, RemoteFrame
    from matrixrtc.media.sources import SyntheticVideoTrack, ToneAudioTrack

    tracks = []
    if args.publish == "synthetic":
        tracks = [SyntheticVideoTrack(args.width, args.height, args.fps), ToneAudioTrack(440.0)]
    options = CallOptions(
        intent=args.intent,
        mesh_max=args.mesh_max,
        mesh_host_addresses=tuple(args.mesh_host_address) or None,
        allow_plaintext_keys=args.allow_plaintext_keys,
        delayed_leave_ms=args.delayed_leave_ms,
        agent=config,
    )
    e2ee = {"auto": None, "on": True, "off": False}[args.e2ee]
    call = Call(
        room_id,
        client=hs,
        transport=args.media,
        dialect=args.dialect,
        e2ee=e2ee,
        sfu_url=args.livekit_service_url,
        publish=tracks,
        options=options,
    )
    try:
        # Subscribed before the call opens: the first key and transport events count too.
        with call.events() as events:
            async with call:
                _print(
                    args.output,
                    None,
                    event="ready",
                    user_id=hs.user_id,
                    device_id=hs.device_id,
                    room_id=room_id,
                )
                tally = _FrameTally()
                call.on(RemoteFrame, tally.add)
                counter = OwnedTasks(
                    "join", log, event_prefix="join", on_failure=lambda _n, _e: stop.set()
                )
                counter.spawn(_report_media(args, call, tally), "media-report")
                try:
                    await _until_stopped(args, [events], stop, lambda: call.left_reason is not None)
                finally:
                    await counter.aclose()
                return call.left_reason
    finally:
        for track in tracks:
            track.stop()


TONE_HZ = 440.0  # what ToneAudioTrack sends


def tone_present(pcm: Any, sample_rate: int, hz: float = TONE_HZ) -> bool:
    """Whether ``hz`` carries most of this audio's energy (Goertzel-style single-bin DFT).
    Silence, concealment noise and frames encrypted with a key the receiver lacks fail."""
    import numpy as np

    x = np.asarray(pcm, dtype=np.float64).reshape(-1)
    n = x.size
    energy = float(np.dot(x, x))
    if n < 64 or energy < n * 100.0:  # below ~-50 dBFS: silence
        return False
    t = np.arange(n) * (2 * np.pi * hz / sample_rate)
    re_, im = float(np.dot(x, np.cos(t))), float(np.dot(x, np.sin(t)))
    # A pure tone over the frame puts (re^2 + im^2) * 2 / n of the energy in its bin.
    return (re_ * re_ + im * im) * 2.0 / n > 0.5 * energy


class _FrameTally:
    """Decoded frames per remote device and kind, and audio frames carrying the tone."""

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, int]] = {"video": {}, "audio": {}, "tone": {}}
        self.transport: str | None = None

    def add(self, f: Any) -> None:
        who = f"{f.participant.user_id}:{f.participant.device_id}"
        self.transport = f.transport.value
        counts = self.counts[f.kind]
        counts[who] = counts.get(who, 0) + 1
        if f.kind == "audio":
            frame = f.frame
            channels = len(frame.layout.channels) or 1
            pcm = frame.to_ndarray().reshape(-1)
            if frame.format.is_planar or channels == 1:
                pcm = pcm[: frame.samples]
            else:
                pcm = pcm[::channels]
            if tone_present(pcm, frame.sample_rate):
                tones = self.counts["tone"]
                tones[who] = tones.get(who, 0) + 1


def _task_kinds() -> dict[str, int]:
    """Live asyncio tasks per coroutine name (a leak shows which kind grows)."""
    kinds: dict[str, int] = {}
    for task in asyncio.all_tasks():
        coro = task.get_coro()
        name = getattr(coro, "__qualname__", None) or type(coro).__name__
        kinds[name] = kinds.get(name, 0) + 1
    return kinds


def _fd_count() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


async def _report_media(args: argparse.Namespace, call: Any, tally: _FrameTally) -> None:
    """Every ``--report-s``: decoded frames so far per remote device (and, with JSON output,
    this process's status)."""
    while True:
        await asyncio.sleep(args.report_s)
        if tally.counts["video"] or tally.counts["audio"]:
            _print(
                args.output,
                None,
                event="media",
                transport=tally.transport,
                **{k: dict(v) for k, v in tally.counts.items()},
            )
        if args.output == "json":
            _print(
                args.output,
                None,
                event="status",
                tasks=len(asyncio.all_tasks()),
                task_kinds=_task_kinds(),
                fds=_fd_count(),
                in_call=call.left_reason is None,
                transport=call.transport.value if call.transport is not None else None,
                participants=[f"{p.user_id}|{p.device_id}" for p in call.participants],
            )


def main(argv: list[str] | None = None) -> int:
    """Run ``join`` alone (``python -m matrixrtc.commands.join``)."""
    from matrixrtc.logging import configure_logging

    parser = argparse.ArgumentParser(prog="python -m matrixrtc.commands.join")
    add_arguments(parser)
    parser.add_argument("--log-level", default="info")
    parser.set_defaults(fast_exit=True)
    args = parser.parse_args(argv)
    configure_logging("console", args.log_level)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
