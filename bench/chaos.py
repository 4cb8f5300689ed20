"""The chaos suite: network and process faults on one participant of a live call, each checked
against invariants (issue 18).

Run inside the private network namespace (it re-executes itself through ``scripts/in-netns``)::

    .venv/bin/python bench/chaos.py [--json] [--transport mesh|sfu|both] [--only a,b] [--fast]

The topology: Synapse, LiveKit, Redis and the token service (``python -m sfu serve``, jobs in
Redis) run in the test namespace and listen on the bridge ``chaosbr`` (10.77.0.1). Each
participant is ``python -m matrixrtc join --media mesh|sfu --output json`` (synthetic video and a
440 Hz tone, E2EE in an encrypted room) in a network namespace of its own, behind a veth pair
whose host end is a port of the bridge (10.77.0.11, .12, ...), so a fault hits one participant.

Faults: link down on the host end (partition), SIGKILL, SIGSTOP/SIGCONT, restarts of Synapse,
LiveKit and the token service, libfaketime (``FAKETIME=+30s``) for one participant's wall clock,
50 extra devices joining and leaving in 10 s, and 20 % loss plus 300 ms delay, each way, from a
user-space relay (:class:`Relay`: the participant's host end leaves the bridge, an AF_PACKET
relay forwards frames between it and a new bridge port, holding each 300 ms and dropping 20 %
with the scenario's seeded RNG; these kernels have no netem).

Invariants, from each participant's JSON lines (``status``, ``media``, ``key``) and from Synapse:

- ``converged``: every live participant lists exactly the expected members, and the room state
  holds exactly their memberships, within ``CONVERGE_S`` of the fault healing;
- ``no_ghost``: a participant that is gone (SIGKILL) leaves no membership in the room state or in
  anyone's list within ``delayed_leave + GHOST_SLACK_S`` of its death;
- ``delayed_leave_armed``: every live member has a delayed leave scheduled on Synapse (checked
  before the fault and after recovery);
- ``media_resumed``: within ``MEDIA_S`` of healing every live participant decodes video frames
  and the 440 Hz tone from every other;
- ``keys``: after a member left, every survivor encrypts with a new key; no key is ever sent to
  a device that is not in the sender's member list, and none reaches a departed device;
- ``baseline``: each survivor's asyncio task and open-fd counts come back to at most their
  pre-fault value (+ ``BASELINE_SLACK``);
- ``no_exception``: no exception escaped in any participant (no traceback, no log line carrying
  an exception: a dead task logs one), each stopped with status 0 (the SIGKILLed one aside),
  and the harness itself raised nothing (other error-level log events are listed in
  ``error_logs``);
- ``all_gone``: at the end no process of the scenario is alive and no veth is left;
- ``no_rejoin`` (skewed-clock scenarios): no member ever logged its own membership missing.

``recovery_s``: seconds from the fault healing until memberships converged and media resumed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matrixrtc.devstack import AuthService, LiveKit, Redis, Synapse, UserCreds, new_run_dir
from matrixrtc.devstack._process import free_tcp_port
from matrixrtc.devstack.synapse import CALL_MEMBER_EVENT
from matrixrtc.logging import configure_logging

ROOT = Path(__file__).resolve().parents[1]
BRIDGE = "chaosbr"
HOST_IP = "10.77.0.1"
# The bridge's own MAC, set once. Left to the kernel, a bridge takes the lowest MAC among its
# ports and changes it whenever that port goes or a lower one comes; no ARP announces the
# change, so every participant kept sending to the old MAC and lost Synapse, LiveKit and the
# token service for 20 s and more (a participant's veth deleted at its stop cut off the next
# one: its leave timed out; the relay's port came and went mid-scenario).
BRIDGE_MAC = "02:77:00:00:00:01"
MTU = "65535"  # large frames pass the relay whole (GSO/GRO keep them above 1500)
DELAYED_LEAVE_MS = 8_000
CONVERGE_S = 25.0  # after healing: lists and room state as expected
GHOST_SLACK_S = 6.0  # beyond the delayed leave: the homeserver fires, everyone syncs
MEDIA_S = 30.0  # after healing: video and the tone from everyone again
BASELINE_SLACK = 4  # tasks / fds above the pre-fault maximum still count as back
SETUP_S = 60.0  # the call up, everyone decoding everyone
MIN_FRAMES = 10  # fresh frames that count as "media resumed"
LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"
# Each participant's log level (its stderr.log in the run directory); info for a diagnosis.
MEMBER_LOG_LEVEL = os.environ.get("CHAOS_MEMBER_LOG_LEVEL", "warning")


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True)


def _ns(pid: int, *argv: str) -> None:
    _run("nsenter", "-t", str(pid), "-n", *argv)


def _ethtool_off(ifname: str, pid: int | None = None) -> None:
    """Checksums and segmentation in software: a relayed frame must be complete on the wire."""
    prefix = ["nsenter", "-t", str(pid), "-n"] if pid is not None else []
    _run(*prefix, "ethtool", "-K", ifname, "tx", "off", "tso", "off", "gso", "off", "gro", "off",
         check=False)  # fmt: skip


# --- the network ----------------------------------------------------------------------------


def net_up() -> None:
    _run("ip", "link", "del", BRIDGE, check=False)
    _run("ip", "link", "add", BRIDGE, "mtu", MTU, "address", BRIDGE_MAC, "type", "bridge")
    _run("ip", "addr", "add", f"{HOST_IP}/24", "dev", BRIDGE)
    _run("ip", "link", "set", BRIDGE, "up")
    _ethtool_off(BRIDGE)


def bridge_mac() -> str:
    out = _run("ip", "-o", "link", "show", BRIDGE, check=False).stdout
    return out.split("link/ether", 1)[1].split()[0] if "link/ether" in out else ""


def net_down() -> None:
    _run("ip", "link", "del", BRIDGE, check=False)


def leftover_links() -> list[str]:
    out = _run("ip", "-o", "link", "show").stdout
    return [ln.split(":")[1].strip().split("@")[0] for ln in out.splitlines() if ": ch" in ln]


class Relay:
    """Frames between a participant's host end and the bridge through this process: each held
    ``delay_s`` and dropped with probability ``loss`` (the scenario's RNG), both ways."""

    def __init__(self, host_if: str, tag: int, delay_s: float, loss: float, rng: random.Random):
        self.host_if = host_if
        self.a_if, self.b_if = f"chr{tag}", f"chq{tag}"
        self.delay_s, self.loss, self.rng = delay_s, loss, rng
        self.forwarded = self.dropped = self.failed = 0
        self._socks: list[socket.socket] = []
        self._queue: collections.deque[tuple[float, socket.socket, bytes]] = collections.deque()
        self._wake = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None

    def start(self) -> None:
        _run("ip", "link", "add", self.a_if, "mtu", MTU, "type", "veth", "peer", "name", self.b_if)
        _run("ip", "link", "set", self.b_if, "mtu", MTU)
        for ifname in (self.a_if, self.b_if):
            _ethtool_off(ifname)
        _run("ip", "link", "set", self.b_if, "master", BRIDGE)
        _run("ip", "link", "set", self.host_if, "nomaster")
        for ifname in (self.host_if, self.a_if, self.b_if):
            _run("ip", "link", "set", ifname, "promisc", "on", "up")
        loop = asyncio.get_running_loop()
        a = self._open(self.host_if)
        b = self._open(self.a_if)
        loop.add_reader(a.fileno(), self._pump, a, b)
        loop.add_reader(b.fileno(), self._pump, b, a)
        self._sender = loop.create_task(self._send_due())

    def _open(self, ifname: str) -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        s.bind((ifname, 0))
        s.setblocking(False)
        self._socks.append(s)
        return s

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        for _ in range(256):
            try:
                data, addr = src.recvfrom(70_000)
            except BlockingIOError:
                return
            if addr[2] == socket.PACKET_OUTGOING:
                continue  # what this relay itself sent
            if self.rng.random() < self.loss:
                self.dropped += 1
                continue
            # One delay for every frame: the queue stays in due order.
            self._queue.append((time.monotonic() + self.delay_s, dst, data))
            self._wake.set()

    async def _send_due(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            due, dst, data = self._queue[0]
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            self._queue.popleft()
            try:
                dst.send(data)
                self.forwarded += 1
            except OSError:
                self.failed += 1

    def stop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._sender is not None:
            self._sender.cancel()
        self._queue.clear()
        for s in self._socks:
            loop.remove_reader(s.fileno())
            s.close()
        self._socks.clear()
        _run("ip", "link", "del", self.a_if, check=False)
        _run("ip", "link", "set", self.host_if, "master", BRIDGE, check=False)


# --- the stack ------------------------------------------------------------------------------


@dataclass
class Stack:
    run_dir: Path
    synapse: Synapse
    livekit: LiveKit
    redis: Redis
    auth: AuthService

    @property
    def homeserver(self) -> str:
        return f"http://{HOST_IP}:{self.synapse.port}"

    @property
    def sfu_url(self) -> str:
        return f"http://{HOST_IP}:{self.auth.port}"


@contextlib.asynccontextmanager
async def start_stack(run_dir: Path) -> AsyncIterator[Stack]:
    """Every service on the bridge address too (participants reach it from their namespaces);
    LiveKit's media candidates on it only."""
    synapse = Synapse(run_dir)
    synapse._extra_config = {"listeners": [_listener(synapse.port)]}
    livekit = LiveKit(
        run_dir,
        extra_config={
            "bind_addresses": ["127.0.0.1", HOST_IP],
            "rtc": {
                "node_ip": HOST_IP,
                "enable_loopback_candidate": False,
                "ips": {"includes": [f"{HOST_IP}/32"]},
            },
        },
    )
    async with Redis(run_dir) as redis, synapse, livekit:
        port = free_tcp_port()
        auth = AuthService(
            run_dir,
            livekit,
            synapse,
            extra_env={
                "LIVEKIT_REDIS_URL": redis.url,
                "LIVEKIT_JWT_BIND": f"0.0.0.0:{port}",
                # What /get_token hands out: the participants' way to LiveKit.
                "LIVEKIT_URL": f"ws://{HOST_IP}:{livekit.http_port}",
            },
        )
        auth.port = port
        auth.url = f"http://127.0.0.1:{port}"
        auth.webhook_url = f"{auth.url}/sfu_webhook"
        async with auth:
            yield Stack(run_dir, synapse, livekit, redis, auth)


def _listener(port: int) -> dict[str, Any]:
    return {
        "port": port,
        "bind_addresses": ["127.0.0.1", HOST_IP],
        "type": "http",
        "tls": False,
        "x_forwarded": False,
        "resources": [{"names": ["client", "federation"], "compress": False}],
    }


# --- participants ---------------------------------------------------------------------------

_TAGS = iter(range(10, 10_000))


@dataclass
class Sample:
    t: float  # harness monotonic time the line was read
    obj: dict[str, Any]


class Member:
    """One ``python -m matrixrtc join`` in a network namespace of its own."""

    def __init__(
        self,
        stack: Stack,
        run_dir: Path,
        user: UserCreds,
        room_id: str,
        transport: str,
        slot: int,
        *,
        clock_offset_s: float = 0.0,
        expires_ms: int | None = None,
    ) -> None:
        self.stack, self.user, self.room_id, self.transport = stack, user, room_id, transport
        self.tag = next(_TAGS)
        self.host_if = f"chv{self.tag}"
        self.ip = f"10.77.0.{10 + slot}"
        self.dir = run_dir / f"member-{slot}-{self.tag}"
        self.clock_offset_s = clock_offset_s
        self.expires_ms = expires_ms
        self.proc: asyncio.subprocess.Process | None = None
        self.device_id: str | None = None
        self.samples: list[Sample] = []
        self.keys: list[Sample] = []
        self.ready = asyncio.Event()
        self.killed = False
        self._reader: asyncio.Task[None] | None = None
        self._stderr: Any = None

    @property
    def id(self) -> str:
        return f"{self.user.user_id}|{self.device_id}"

    @property
    def frame_id(self) -> str:
        return f"{self.user.user_id}:{self.device_id}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        self.dir.mkdir(parents=True)
        go = self.dir / "go"
        argv = [
            "unshare", "-n", "--", "sh", "-c",
            'while [ ! -e "$0" ]; do sleep 0.02; done; ip link set lo up; exec "$@"', str(go),
            sys.executable, "-m", "matrixrtc", "--log-format", "json",
            "--log-level", MEMBER_LOG_LEVEL,
            "join", "--homeserver", self.stack.homeserver, "--user", self.user.user_id,
            "--room", self.room_id, "--media", self.transport, "--e2ee", "on",
            "--output", "json", "--report-s", "1", "--state-dir", str(self.dir / "state"),
            "--delayed-leave-ms", str(DELAYED_LEAVE_MS), "--fps", "10", "--width", "160",
            "--height", "120",
        ]  # fmt: skip
        if self.expires_ms is not None:
            argv += ["--expires-ms", str(self.expires_ms)]
        if self.transport == "mesh":
            argv += ["--mesh-host-address", self.ip]
        else:
            argv += ["--livekit-service-url", self.stack.sfu_url]
        env = {**os.environ, "MATRIXRTC_PASSWORD": self.user.password}
        if self.clock_offset_s:
            # The wall clock only: asyncio's monotonic clock is not what a skewed device has.
            # FORCE_MONOTONIC_FIX=0: libfaketime 0.9.10 turns its "monotonic fix" on by itself
            # on this glibc, and then every pthread_cond_timedwait on a CLOCK_MONOTONIC condvar
            # returns at once. libwebrtc's SyntheticAudioDevice and AudioSourceCapture threads
            # (SCHED_FIFO, priority 49) wait that way every 10 ms, so they spun at ~90 % of a
            # core each and starved Synapse and the other members (chaos bug 4: a real device
            # with a skewed clock has working timed waits; this rig did not).
            env |= {
                "LD_PRELOAD": LIBFAKETIME,
                "FAKETIME": f"{self.clock_offset_s:+.0f}s",
                "FAKETIME_DONT_FAKE_MONOTONIC": "1",
                "FAKETIME_DONT_RESET": "1",
                "FAKETIME_FORCE_MONOTONIC_FIX": "0",
            }
        self._stderr = (self.dir / "stderr.log").open("wb")
        self.proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=self._stderr,
            stdin=asyncio.subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        pid = self.proc.pid
        own = os.readlink("/proc/self/ns/net")
        for _ in range(500):  # until unshare(2) has run in the child
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/ns/net") != own:
                    break
            await asyncio.sleep(0.01)
        else:
            raise RuntimeError("participant never got its own network namespace")
        _run("ip", "link", "add", self.host_if, "mtu", MTU, "type", "veth",
             "peer", "name", "eth0", "netns", str(pid))  # fmt: skip
        _run("ip", "link", "set", self.host_if, "master", BRIDGE, "up")
        _ethtool_off(self.host_if)
        _ns(pid, "ip", "addr", "add", f"{self.ip}/24", "dev", "eth0")
        _ns(pid, "ip", "link", "set", "eth0", "mtu", MTU, "up")
        _ethtool_off("eth0", pid)
        go.touch()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        with (self.dir / "stdout.jsonl").open("ab") as out:
            while line := await self.proc.stdout.readline():
                out.write(b"%.3f " % time.monotonic() + line)
                out.flush()
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                s = Sample(time.monotonic(), obj)
                ev = obj.get("event")
                if ev == "ready":
                    self.device_id = str(obj["device_id"])
                    self.ready.set()
                elif ev == "key":
                    self.keys.append(s)
                if ev in ("status", "media", "left", "participants"):
                    self.samples.append(s)

    # what the participant said last

    def last(self, event: str, since: float = 0.0) -> dict[str, Any] | None:
        for s in reversed(self.samples):
            if s.t < since:
                return None
            if s.obj.get("event") == event:
                return s.obj
        return None

    def participants(self, since: float = 0.0) -> set[str] | None:
        st = self.last("status", since)
        return None if st is None else set(st["participants"])

    def frames(self, kind: str, sender: Member) -> int:
        m = self.last("media")
        return 0 if m is None else int(m.get(kind, {}).get(sender.frame_id, 0))

    def counts(self, since: float) -> list[tuple[int, int]]:
        return [
            (int(s.obj["tasks"]), int(s.obj["fds"] or 0))
            for s in self.samples
            if s.t >= since and s.obj.get("event") == "status"
        ]

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def signal(self, sig: signal.Signals) -> None:
        if self.alive:
            os.kill(self.pid, sig)
        if sig is signal.SIGKILL:
            self.killed = True

    def link(self, up: bool) -> None:
        _run("ip", "link", "set", self.host_if, "up" if up else "down")

    async def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM (the participant leaves), SIGKILL of its group after ``timeout_s``."""
        if self.proc is None:
            return None
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)
                os.kill(self.pid, signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            await self.proc.wait()
            code = None
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)
        if self._stderr is not None:
            self._stderr.close()
        # The kernel takes the veth away with the namespace, but asynchronously: remove our
        # end ourselves so nothing is left even after a SIGKILL or a failed scenario.
        _run("ip", "link", "del", self.host_if, check=False)
        return code

    def errors(self) -> tuple[list[str], list[str]]:
        """Exceptions that escaped (tracebacks, tasks that died: a log line carrying an
        exception), and the other lines logged at error level (handled, e.g. a gave-up
        heartbeat the agent then recovers from: reported, not an invariant)."""
        escaped: list[str] = []
        logged: list[str] = []
        path = self.dir / "stderr.log"
        if not path.exists():
            return escaped, logged
        for line in path.read_text(errors="replace").splitlines():
            if "Traceback" in line or "never retrieved" in line:
                escaped.append(line)
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if not isinstance(obj, dict):
                continue
            if "exception" in obj or "exc_info" in obj:
                escaped.append(line[:600])
            elif obj.get("level") in ("error", "critical"):
                logged.append(str(obj.get("event")))
        return escaped, logged

    def logged(self, event: str) -> int:
        """How many log lines (any level) carry ``event``."""
        path = self.dir / "stderr.log"
        if not path.exists():
            return 0
        needle = f'"event": "{event}"'
        return sum(needle in line for line in path.read_text(errors="replace").splitlines())

    def group_alive(self) -> bool:
        if self.proc is None:
            return False
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def lists(self) -> list[tuple[float, set[str]]]:
        """Each participant-list change this member printed: (time read, member ids)."""
        return [
            (s.t, {f"{p['user_id']}|{p['device_id']}" for p in s.obj["participants"]})
            for s in self.samples
            if s.obj.get("event") == "participants"
        ]


# --- a scenario -----------------------------------------------------------------------------


@dataclass
class Fault:
    """What a fault did: when it healed, who is gone for good (and since when)."""

    healed_at: float
    gone: set[int] = field(default_factory=set)
    died_at: float | None = None
    note: str = ""


@dataclass
class Ctx:
    stack: Stack
    run_dir: Path
    rng: random.Random
    transport: str
    room_id: str
    observer: UserCreds
    members: list[Member]

    async def room_members(self) -> set[str] | None:
        """``user|device`` of every non-empty call membership in the room state (None: the
        homeserver did not answer)."""
        path = f"/_matrix/client/v3/rooms/{quote(self.room_id, safe='')}/state"
        try:
            body = await self.stack.synapse.request("GET", path, user=self.observer)
        except Exception:
            return None
        out = set()
        for ev in body.get("body", []):
            if ev.get("type") == CALL_MEMBER_EVENT and ev.get("content"):
                out.add(f"{ev['sender']}|{ev['content'].get('device_id')}")
        return out

    async def armed(self, m: Member) -> bool:
        """Whether ``m`` has a delayed leave of its membership scheduled on the homeserver."""
        path = "/_matrix/client/unstable/org.matrix.msc4140/delayed_events"
        try:
            body = await self.stack.synapse.request("GET", path, user=m.user)
        except Exception:
            return False
        return any(
            e.get("type") == CALL_MEMBER_EVENT
            and e.get("room_id") == self.room_id
            and str(m.device_id) in str(e.get("state_key", ""))
            for e in body.get("delayed_events", [])
        )


FaultFn = Callable[[Ctx], Awaitable[Fault]]


@dataclass(frozen=True)
class Scenario:
    name: str
    fault: FaultFn
    seed: int
    fault_s: float  # how long the fault lasts (the time bound adds setup and checks)
    members: int = 3
    skew_s: float = 0.0  # member 0's wall clock ahead by this much (libfaketime)
    # membership expiry for every member (--expires-ms); short, so that refresh boundaries
    # fall inside the scenario
    expires_ms: int | None = None

    @property
    def bound_s(self) -> float:
        return SETUP_S + self.fault_s + CONVERGE_S + MEDIA_S + 90.0


async def _wait_setup(ctx: Ctx) -> bool:
    """Everyone lists everyone and decodes video and the tone from everyone."""
    ids = {m.id for m in ctx.members}
    deadline = time.monotonic() + SETUP_S
    while time.monotonic() < deadline:
        if all(
            m.participants() == ids
            and all(
                m.frames(k, o) >= MIN_FRAMES
                for o in ctx.members
                if o is not m
                for k in ("video", "tone")
            )
            for m in ctx.members
        ):
            return True
        await asyncio.sleep(0.5)
    return False


async def run_scenario(stack: Stack, sc: Scenario, transport: str) -> dict[str, Any]:
    rng = random.Random(sc.seed)
    run_dir = stack.run_dir / f"{sc.name}-{transport}"
    run_dir.mkdir()
    tag = secrets.token_hex(3)
    observer = await stack.synapse.register(f"obs-{tag}")
    users = [await stack.synapse.register(f"m{i}-{tag}") for i in range(sc.members)]
    room_id = await stack.synapse.create_call_room(observer, users, encrypted=True)
    members = [
        Member(
            stack,
            run_dir,
            u,
            room_id,
            transport,
            i,
            clock_offset_s=sc.skew_s if i == 0 else 0,
            expires_ms=sc.expires_ms,
        )
        for i, u in enumerate(users)
    ]
    ctx = Ctx(stack, run_dir, rng, transport, room_id, observer, members)
    inv: dict[str, bool] = {}
    result: dict[str, Any] = {"name": sc.name, "transport": transport, "seed": sc.seed}
    t0 = time.monotonic()
    try:
        await asyncio.wait_for(_scenario_body(ctx, sc, inv, result), sc.bound_s)
        inv["time_bound"] = True
    except TimeoutError:
        inv["time_bound"] = False
    except Exception as exc:
        inv["no_exception"] = False
        result["harness_error"] = repr(exc)
    finally:
        codes = [await m.stop() for m in members]
        found = {m.id: m.errors() for m in members}
        escaped = {k: v[0][:3] for k, v in found.items() if v[0]}
        logged = {k: sorted(set(v[1])) for k, v in found.items() if v[1]}
        bad_exit = [m.id for m, c in zip(members, codes, strict=True) if not m.killed and c != 0]
        inv["no_exception"] = inv.get("no_exception", True) and not escaped and not bad_exit
        if escaped or bad_exit:
            result["errors"] = {"escaped": escaped, "bad_exit": bad_exit}
        if logged:
            result["error_logs"] = logged
        if sc.skew_s:
            # A skewed clock is no fault of the network: nobody's membership should look
            # missing to itself (before the fix the skewed member re-joined each period).
            rejoins = {m.id: n for m in members if (n := m.logged("own_membership_missing"))}
            inv["no_rejoin"] = not rejoins
            if rejoins:
                result["rejoins"] = rejoins
        # The namespaces go with their last process (the kernel cleans up asynchronously).
        for _ in range(50):
            left = [m.id for m in members if m.group_alive()]
            links = [ln for ln in leftover_links() if ln != BRIDGE]
            if not left and not links:
                break
            await asyncio.sleep(0.1)
        inv["all_gone"] = not left and not links
        if left or links:
            result["leftovers"] = {"processes": left, "links": links}
        if (mac := bridge_mac()) != BRIDGE_MAC:  # the rig itself failed: nothing above holds
            inv["no_exception"] = False
            result["harness_error"] = f"the bridge's MAC changed to {mac}"
    result["invariants"] = inv
    result["elapsed_s"] = round(time.monotonic() - t0, 1)
    return result


async def _scenario_body(
    ctx: Ctx, sc: Scenario, inv: dict[str, bool], result: dict[str, Any]
) -> None:
    for m in ctx.members:
        await m.start()
    await asyncio.gather(*(asyncio.wait_for(m.ready.wait(), SETUP_S) for m in ctx.members))
    inv["setup"] = await _wait_setup(ctx)
    if not inv["setup"]:
        result["setup_views"] = {m.id: sorted(m.participants() or ()) for m in ctx.members}
        return
    await asyncio.sleep(3.0)
    base_t = time.monotonic() - 3.0
    baseline = {m.id: tuple(max(c) for c in zip(*m.counts(base_t), strict=True))
                for m in ctx.members}  # fmt: skip
    armed_before = [await ctx.armed(m) for m in ctx.members]
    base_kinds = {m.id: dict((m.last("status") or {}).get("task_kinds", {})) for m in ctx.members}

    fault = await sc.fault(ctx)
    healed = fault.healed_at
    if fault.note:
        result["fault"] = fault.note
    survivors = [m for i, m in enumerate(ctx.members) if i not in fault.gone]
    expected = {m.id for m in survivors}
    base_frames = {
        (a.id, b.id, k): a.frames(k, b)
        for a in survivors
        for b in survivors
        if a is not b
        for k in ("video", "tone")
    }
    converged_at = media_at = ghost_gone_at = None
    gone_ids = {ctx.members[i].id for i in fault.gone}
    deadline = healed + max(CONVERGE_S, MEDIA_S)
    if fault.died_at is not None:
        deadline = max(deadline, fault.died_at + DELAYED_LEAVE_MS / 1000 + GHOST_SLACK_S)
    while time.monotonic() < deadline and (
        converged_at is None or media_at is None or (gone_ids and ghost_gone_at is None)
    ):
        now = time.monotonic()
        state = await ctx.room_members()
        views = [m.participants(since=now - 1.5) for m in survivors]
        if converged_at is None and state == expected and all(v == expected for v in views):
            converged_at = time.monotonic()
        if (
            gone_ids
            and ghost_gone_at is None
            and state is not None
            and not (state & gone_ids)
            and all(v is not None and not (v & gone_ids) for v in views)
        ):
            ghost_gone_at = time.monotonic()
        if media_at is None and all(
            a.frames(k, b) >= base_frames[(a.id, b.id, k)] + MIN_FRAMES
            for a in survivors
            for b in survivors
            if a is not b
            for k in ("video", "tone")
        ):
            media_at = time.monotonic()
        await asyncio.sleep(0.5)
    inv["converged"] = converged_at is not None and converged_at - healed <= CONVERGE_S
    inv["media_resumed"] = media_at is not None and media_at - healed <= MEDIA_S
    if media_at is None:
        result["media_views"] = {
            a.id: {b.id: [a.frames(k, b) - base_frames[(a.id, b.id, k)] for k in ("video", "tone")]
                   for b in survivors if b is not a}
            for a in survivors
        }  # fmt: skip
    if converged_at is None:
        result["views"] = {m.id: sorted(m.participants() or ()) for m in survivors}
        result["state"] = sorted(await ctx.room_members() or ())
    ghost_ok = True
    if gone_ids:
        assert fault.died_at is not None
        bound = fault.died_at + DELAYED_LEAVE_MS / 1000 + GHOST_SLACK_S
        ghost_ok = ghost_gone_at is not None and ghost_gone_at <= bound
        if ghost_gone_at is not None:
            result["ghost_removed_s"] = round(ghost_gone_at - fault.died_at, 1)
    # No membership beyond the expected ones once the delayed leave could have fired.
    wait_until = healed + DELAYED_LEAVE_MS / 1000 + GHOST_SLACK_S
    if time.monotonic() < wait_until:
        await asyncio.sleep(wait_until - time.monotonic())
    final_state = await ctx.room_members()
    inv["no_ghost"] = ghost_ok and final_state == expected
    if final_state != expected:
        result["final_state"] = sorted(final_state or ())
    times = [t for t in (converged_at, media_at) if t is not None]
    result["recovery_s"] = round(max(times) - healed, 1) if converged_at and media_at else None
    armed_after = [await ctx.armed(m) for m in survivors]
    inv["delayed_leave_armed"] = all(armed_before) and all(armed_after)
    if not inv["delayed_leave_armed"]:
        result["armed"] = {"before": armed_before, "after": armed_after}
    # Task and fd counts back at their baseline (within 20 s).
    back: dict[str, bool] = {}
    until = time.monotonic() + 20.0
    since = time.monotonic()
    while time.monotonic() < until:
        await asyncio.sleep(1.0)
        for m in survivors:
            tasks_b, fds_b = baseline[m.id]
            if any(t <= tasks_b + BASELINE_SLACK and f <= fds_b + BASELINE_SLACK
                   for t, f in m.counts(since)):  # fmt: skip
                back[m.id] = True
        if len(back) == len(survivors):
            break
    inv["baseline"] = len(back) == len(survivors)
    if not inv["baseline"]:
        result["counts"] = {
            m.id: {
                "baseline": baseline[m.id],
                "now": m.counts(since)[-1:],
                "tasks_grown": _grown(base_kinds[m.id], (m.last("status") or {}).get("task_kinds")),
            }
            for m in survivors
        }
    inv["keys"], key_notes = _check_keys(survivors, ctx.members, healed)
    if key_notes:
        result["keys"] = key_notes


def _grown(before: dict[str, int], after: dict[str, int] | None) -> dict[str, int]:
    """Task kinds whose count changed: name -> difference."""
    after = after or {}
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted({*before, *after})
            if after.get(k, 0) != before.get(k, 0)}  # fmt: skip


def _check_keys(
    survivors: Sequence[Member], everyone: Sequence[Member], healed: float
) -> tuple[bool, list[str]]:
    """After every departure a survivor saw, it used a new key; no key it sent went to a
    device outside its list, nor to a departed device before that device came back."""
    notes: list[str] = []
    for s in survivors:
        lists = s.lists()
        sent = [k for k in s.keys if k.obj.get("kind") == "sent"]
        used = [k for k in s.keys if k.obj.get("kind") == "used"]
        for k in sent:
            current: set[str] = set()
            for t, ids in lists:
                if t <= k.t:
                    current = ids
            # A send that started before a departure was seen may finish after it; the first
            # list may be printed just after the first send.
            recent = set().union(*(ids for t, ids in lists if k.t - 1.0 <= t <= k.t + 1.0))
            for r in k.obj.get("to", []):
                if r not in current and r not in recent:
                    notes.append(f"{s.id} sent key {k.obj['index']} to non-member {r}")
        prev: set[str] | None = None
        for t, ids in lists:
            if prev is not None:
                for d in prev - ids:
                    back = next((t2 for t2, ids2 in lists if t2 > t and d in ids2), None)
                    for k in sent:
                        if t + 1.0 < k.t < (back or float("inf")) and d in k.obj.get("to", []):
                            notes.append(f"{s.id} sent key {k.obj['index']} to departed {d}")
                    before = [u.obj["index"] for u in used if u.t <= t]
                    after = [u for u in used if t < u.t <= t + 15.0]
                    if before and not any(u.obj["index"] != before[-1] for u in after):
                        notes.append(f"{s.id} did not rotate after {d} left")
            prev = ids
    return not notes, notes[:10]


# --- the faults -----------------------------------------------------------------------------


def _target(ctx: Ctx) -> tuple[int, Member]:
    i = ctx.rng.randrange(len(ctx.members))
    return i, ctx.members[i]


async def fault_sigkill(ctx: Ctx) -> Fault:
    i, m = _target(ctx)
    m.signal(signal.SIGKILL)
    now = time.monotonic()
    return Fault(healed_at=now, gone={i}, died_at=now, note=f"member {i} SIGKILLed")


def fault_partition(seconds: float) -> FaultFn:
    async def fault(ctx: Ctx) -> Fault:
        i, m = _target(ctx)
        m.link(False)
        try:
            await asyncio.sleep(seconds)
        finally:
            m.link(True)
        return Fault(healed_at=time.monotonic(), note=f"member {i} cut off {seconds:g} s")

    return fault


def fault_sigstop(seconds: float) -> FaultFn:
    async def fault(ctx: Ctx) -> Fault:
        i, m = _target(ctx)
        m.signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(seconds)
        finally:
            m.signal(signal.SIGCONT)
        return Fault(healed_at=time.monotonic(), note=f"member {i} stopped {seconds:g} s")

    return fault


def fault_restart(which: str) -> FaultFn:
    async def fault(ctx: Ctx) -> Fault:
        service = {"synapse": ctx.stack.synapse, "livekit": ctx.stack.livekit,
                   "token": ctx.stack.auth}[which]  # fmt: skip
        t = time.monotonic()
        await service.restart()
        return Fault(
            healed_at=time.monotonic(),
            note=f"{which} restarted ({time.monotonic() - t:.1f} s down)",
        )

    return fault


async def fault_skew(ctx: Ctx) -> Fault:
    # Member 0 runs 30 s ahead from its start: 30 s more of the call, then the same checks.
    await asyncio.sleep(30.0)
    return Fault(healed_at=time.monotonic(), note="member 0's clock 30 s ahead")


def fault_lossy(seconds: float, delay_s: float = 0.3, loss: float = 0.2) -> FaultFn:
    async def fault(ctx: Ctx) -> Fault:
        i, m = _target(ctx)
        relay = Relay(m.host_if, m.tag, delay_s, loss, ctx.rng)
        relay.start()
        try:
            await asyncio.sleep(seconds)
        finally:
            relay.stop()
        note = (
            f"member {i}: {loss:.0%} loss and {delay_s * 1000:.0f} ms each way for {seconds:g} s "
            f"(relayed {relay.forwarded}, dropped {relay.dropped}, failed {relay.failed})"
        )
        return Fault(healed_at=time.monotonic(), note=note)

    return fault


async def fault_burst(ctx: Ctx) -> Fault:
    """50 more devices join the call and leave again within 10 s (memberships written as a
    client would, each with a random lifetime of 0.5-3 s)."""
    syn = ctx.stack.synapse
    template = None
    for ev in (await syn.request(
        "GET", f"/_matrix/client/v3/rooms/{quote(ctx.room_id, safe='')}/state", user=ctx.observer
    )).get("body", []):  # fmt: skip
        if ev.get("type") == CALL_MEMBER_EVENT and ev.get("content"):
            template = ev["content"]
            break
    assert template is not None
    extra = [await syn.register(f"burst{i}-{secrets.token_hex(3)}") for i in range(50)]
    room = quote(ctx.room_id, safe="")
    for u in extra:  # the call room is private: invited first
        await syn.request("POST", f"/_matrix/client/v3/rooms/{room}/invite", user=ctx.observer,
                          json_body={"user_id": u.user_id})  # fmt: skip
        await syn.join_room(u, ctx.room_id)
    plan = sorted((ctx.rng.uniform(0, 7.0), ctx.rng.uniform(0.5, 3.0), u) for u in extra)
    t0 = time.monotonic()

    async def one(at: float, life: float, u: UserCreds) -> None:
        await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
        key = f"_{u.user_id}_{u.device_id}_m.call"
        content = {**template, "device_id": u.device_id, "created_ts": int(time.time() * 1000),
                   "membershipID": str(uuid.uuid4())}  # fmt: skip
        content.pop("m.call.intent", None)
        await syn.put_state(u, ctx.room_id, CALL_MEMBER_EVENT, key, content)
        await asyncio.sleep(life)
        await syn.put_state(u, ctx.room_id, CALL_MEMBER_EVENT, key, {})

    await asyncio.gather(*(one(a, life, u) for a, life, u in plan))
    return Fault(
        healed_at=time.monotonic(), note=f"50 joins and leaves in {time.monotonic() - t0:.1f} s"
    )


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("sigkill", fault_sigkill, seed=1801, fault_s=0),
    Scenario("partition-5s", fault_partition(5), seed=1802, fault_s=5),
    Scenario("sigstop-20s", fault_sigstop(20), seed=1803, fault_s=20),
    Scenario("partition-30s", fault_partition(30), seed=1804, fault_s=30),
    Scenario("synapse-restart", fault_restart("synapse"), seed=1805, fault_s=10),
    Scenario("livekit-restart", fault_restart("livekit"), seed=1806, fault_s=10),
    Scenario("token-restart", fault_restart("token"), seed=1807, fault_s=10),
    Scenario("clock-ahead-30s", fault_skew, seed=1808, fault_s=30, skew_s=30, expires_ms=40_000),
    Scenario("loss20-delay300-60s", fault_lossy(60), seed=1809, fault_s=60),
    Scenario("burst-50", fault_burst, seed=1810, fault_s=15),
)
# make test's subset: one process fault, one short partition, one long stop (which outlasts the
# delayed leave: leave fired, rejoin, key rotation), spread over both transports.
FAST = (("sigkill", "sfu"), ("partition-5s", "mesh"), ("sigstop-20s", "mesh"))


# --- main -----------------------------------------------------------------------------------


def format_table(results: Sequence[dict[str, Any]]) -> str:
    rows = [("scenario", "transport", "recovery_s", "failed invariants")]
    for r in results:
        bad = [k for k, v in r["invariants"].items() if not v]
        rec = r.get("recovery_s")
        rows.append((r["name"], r["transport"], "-" if rec is None else f"{rec:.1f}",
                     ", ".join(bad) or "none"))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )


async def amain(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.fast:
        plan = [(s, t) for s in SCENARIOS for n, t in FAST if s.name == n]
    else:
        only = set(args.only.split(",")) if args.only else None
        transports = ("mesh", "sfu") if args.transport == "both" else (args.transport,)
        plan = [(s, t) for s in SCENARIOS for t in transports if only is None or s.name in only]
    results: list[dict[str, Any]] = []
    net_up()
    run_dir = new_run_dir("chaos")
    try:
        async with start_stack(run_dir) as stack:
            for sc, transport in plan:
                r = await run_scenario(stack, sc, transport)
                results.append(r)
                if args.json:
                    print(json.dumps(r), flush=True)
                else:
                    print(format_table([r]).splitlines()[1], file=sys.stderr, flush=True)
    finally:
        for link in leftover_links():  # whatever a failed scenario left behind
            _run("ip", "link", "del", link, check=False)
        net_down()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per scenario")
    parser.add_argument("--transport", choices=("mesh", "sfu", "both"), default="both")
    parser.add_argument("--only", default=None, help="comma-separated scenario names")
    parser.add_argument("--fast", action="store_true", help=f"make test's subset: {FAST}")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()
    if os.environ.get("MATRIXRTC_IN_NETNS") != "1":
        os.execv(str(ROOT / "scripts" / "in-netns"), [str(ROOT / "scripts" / "in-netns"),
                 sys.executable, *sys.argv])  # fmt: skip
    if shutil.which("ethtool") is None or not Path(LIBFAKETIME).exists():
        print("chaos: ethtool and faketime are missing: run scripts/bootstrap.sh", file=sys.stderr)
        return 2
    configure_logging("console", args.log_level)
    results = asyncio.run(amain(args))
    if not args.json:
        print(format_table(results))
    failed = [r for r in results if not all(r["invariants"].values())]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
