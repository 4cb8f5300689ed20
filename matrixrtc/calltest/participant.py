"""One call-test participant, in its own process: homeserver login, call agent, keys, mesh.

``python -m matrixrtc.calltest.participant`` reads one line of JSON (:class:`ParticipantConfig`,
which holds a password) from stdin.
It writes one JSON object per line to stdout: ``ready`` (its user and device), ``stats`` once
a second, ``final`` when it has left. Logs go to stderr. SIGTERM/SIGINT or the end of
``duration_s`` make it leave cleanly. Times in the output are wall-clock milliseconds
(``time.time``), so a coordinator can compare participants on one machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from matrixrtc import event_loop
from matrixrtc.agent import AgentConfig, CallAgent, ParticipantsChanged
from matrixrtc.call_keys import CallKeys, CallKeysConfig, KeyEvent, KeyEventKind
from matrixrtc.e2ee.cryptor import KeyRings
from matrixrtc.e2ee.messages import ELEMENT_CALL_KEYS_TYPE, ElementCallKeys
from matrixrtc.errors import LocalError, MatrixRTCError
from matrixrtc.livekit.connection import MediaOptions
from matrixrtc.matrix import DeviceRef, Homeserver, Login, Subscription
from matrixrtc.media.sources import SyntheticVideoTrack, ToneAudioTrack
from matrixrtc.media_transport import LiveKitMedia, MeshMedia
from matrixrtc.media_transport.aiortc_engine import AiortcConnection
from matrixrtc.mesh.engine import MeshConfig
from matrixrtc.mesh.fanout import SharedEncoder
from matrixrtc.mesh.ice import IceServerConfig
from matrixrtc.mesh.matrix_link import MatrixMesh, MeshLinkConfig
from matrixrtc.model import FullMeshTransport, LivekitTransport, Transport
from matrixrtc.session.media_policy import MediaKind
from matrixrtc.switching import SWITCH_MESH, MediaSwitcher, SwitchConfig
from matrixrtc.tasks import OwnedTasks

__all__ = ["ParticipantConfig", "main", "run_participant"]

log = structlog.get_logger(__name__)

_STATS_INTERVAL_S = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ParticipantConfig:
    name: str
    homeserver: str
    user: str
    password: str
    room_id: str
    duration_s: float = 20.0  # 0: until SIGTERM
    width: int = 320
    height: int = 240
    fps: float = 15.0
    audio: bool = True
    # Publishes nothing and receives (and decrypts) every remote stream: a viewer/recorder.
    receive_only: bool = False
    e2ee: bool = True
    plaintext_keys: bool = False  # E2EE keys in an unencrypted room (test pages only)
    withhold_keys: bool = False  # test hook: discard every remote key (decrypt with none)
    delayed_leave_ms: int = 8_000
    host_addresses: tuple[str, ...] | None = ("127.0.0.1",)
    remote_networks: tuple[str, ...] | None = None
    turn_uris: tuple[str, ...] = ()
    turn_username: str | None = None
    turn_password: str | None = None
    turn_from_homeserver: bool = False
    relay_only: bool = False
    state_dir: str | None = None
    # "mesh": the mesh alone; "sfu": LiveKit through the service at sfu_url; "auto": both
    # advertised, the mesh/SFU policy decides and switches live (matrixrtc.switching).
    transport: str = "mesh"
    sfu_url: str | None = None
    mesh_max: int = 4
    simulcast: bool = False  # on the SFU: publish layers
    low_layer_above: int | None = None  # on the SFU: the low layer past this many videos
    decode_video: int | None = None  # mesh: decode the video of this many peers (None: all)
    render_max: int | None = None  # on the SFU: frames of at most this many videos taken
    preencoded: bool = False  # on the SFU: a looped clip encoded once, not every frame
    sfu_engine: str = "sdk"  # on the SFU: MediaOptions.engine ("sdk" or "aiortc")
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ParticipantConfig:
        data = dict(obj)
        for key in ("host_addresses", "remote_networks", "turn_uris"):
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
        return cls(**data)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _emit(obj: Mapping[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _wall_ms(mono: float | None) -> int | None:
    """A ``time.monotonic`` reading as wall-clock milliseconds."""
    if mono is None:
        return None
    return round((time.time() - (time.monotonic() - mono)) * 1000)


def _rss_mb() -> float | None:
    """This process's resident memory now, in MiB (Linux ``/proc``; None elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def _selected_pair(pc: Any) -> list[str] | None:
    """Candidate types (local, remote) of the nominated ICE pair, from aioice's state."""
    try:
        connection = pc.getTransceivers()[0].receiver.transport.transport.iceGatherer._connection
        pair = connection._nominated.get(1)
    except (AttributeError, IndexError):
        return None
    if pair is None:
        return None
    return [str(pair.local_candidate.type), str(pair.remote_candidate.type)]


class _Probe:
    """Collects what the report needs from the mesh, the keys and the process."""

    def __init__(self, cfg: ParticipantConfig, joined_ms: int) -> None:
        self.cfg = cfg
        self.joined_ms = joined_ms
        self.cpu0 = time.process_time()
        self.wall0 = time.monotonic()
        self.last_cpu = (self.cpu0, self.wall0)
        self.cpu_percent = 0.0
        self.rotations_ms: list[float] = []
        self.key_delivery_ms: list[int] = []
        self.keys_used: list[int] = []
        self._left_at: float | None = None
        self._prev_bytes: dict[str, tuple[float, int, int]] = {}
        self.loop_lag_ms = 0.0  # the worst event-loop lag since the last report

    async def watch_loop(self) -> None:
        """Measures how late a 50 ms sleep wakes up: the event loop's backlog."""
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(0.05)
            self.loop_lag_ms = max(self.loop_lag_ms, (loop.time() - t - 0.05) * 1000)

    def on_change(self, change: ParticipantsChanged) -> None:
        if change.left and self._left_at is None:
            self._left_at = time.monotonic()

    def on_key(self, ev: KeyEvent) -> None:
        if ev.kind is KeyEventKind.USED:
            self.keys_used.append(ev.index or 0)
            if self._left_at is not None:
                self.rotations_ms.append(round((ev.monotonic - self._left_at) * 1000, 1))
                self._left_at = None
        elif ev.kind is KeyEventKind.INSTALLED and ev.sent_ts is not None:
            self.key_delivery_ms.append(ev.at_ms - ev.sent_ts)

    async def snapshot(
        self, media: MatrixMesh | MediaSwitcher, keys: CallKeys | None
    ) -> dict[str, Any]:
        mesh = media if isinstance(media, MatrixMesh) else _mesh_of(media)
        now = time.monotonic()
        cpu = time.process_time()
        lag, self.loop_lag_ms = self.loop_lag_ms, 0.0
        c0, w0 = self.last_cpu
        if now > w0:
            self.cpu_percent = round((cpu - c0) / (now - w0) * 100, 1)
        self.last_cpu = (cpu, now)
        engine = mesh.engine if mesh is not None else None
        peers: list[dict[str, Any]] = []
        if engine is not None:
            for link in list(engine.links.values()):
                pid = f"{link.peer.user_id}|{link.peer.device_id}"
                video = link.stats.get("video")
                audio = link.stats.get("audio")
                bytes_in = sum(s.encoded_bytes for s in link.stats.values())
                bytes_out = packets_in = 0
                try:
                    report = await link.pc.getStats()
                except Exception as exc:  # a closing connection; the figures stay at 0
                    log.debug("calltest.stats_failed", error=repr(exc))
                else:
                    for st in report.values():
                        if st.type == "outbound-rtp":
                            bytes_out += int(getattr(st, "bytesSent", 0) or 0)
                        elif st.type == "inbound-rtp":
                            packets_in += int(getattr(st, "packetsReceived", 0) or 0)
                prev = self._prev_bytes.get(pid)
                kbps_in = kbps_out = 0.0
                if prev is not None and now > prev[0] and prev[1] <= bytes_in:
                    kbps_in = (bytes_in - prev[1]) * 8 / 1000 / (now - prev[0])
                    kbps_out = max(0, bytes_out - prev[2]) * 8 / 1000 / (now - prev[0])
                self._prev_bytes[pid] = (now, bytes_in, bytes_out)
                peers.append(
                    {
                        "id": pid,
                        "user_id": link.peer.user_id,
                        "device_id": link.peer.device_id,
                        "call_id": link.call_id,
                        "connected_at_ms": _wall_ms(link.connected_at),
                        "created_at_ms": _wall_ms(link.created_at),
                        "fps_in": (
                            0.0
                            if video is None
                            else video.fps(now)
                            if video.decoding
                            else video.received_fps(now)
                        ),
                        "video_decoded": video.decoding if video is not None else True,
                        "kbps_in": round(kbps_in, 1),
                        "kbps_out": round(kbps_out, 1),
                        "frames_decoded": video.frames_decoded if video is not None else 0,
                        # received and decrypted (decoded or not)
                        "frames_received": video.encoded_frames if video is not None else 0,
                        # received and decrypted: decoded only for a frames tap (as on
                        # the SFU's aiortc engine)
                        "audio_frames_decoded": audio.encoded_frames if audio is not None else 0,
                        "first_frame_at_ms": _wall_ms(video.first_frame_at) if video else None,
                        "decrypt_failures": sum(s.decrypt_failures for s in link.stats.values()),
                        "packets_in": packets_in,
                        "bytes_in": bytes_in,
                        "bytes_out": bytes_out,
                        "ice_pair": _selected_pair(link.pc),
                    }
                )
        extra: dict[str, Any] = {}
        if isinstance(media, MediaSwitcher):
            peers, extra = _switcher_view(media, peers, now)
        return {
            **extra,
            "id": self.cfg.name,
            "t_ms": round(time.time() * 1000),
            "joined_at_ms": self.joined_ms,
            "members": len(mesh.members) if mesh is not None else len(peers),
            "session_id": engine.local.session_id if engine is not None else None,
            "conf_id": engine.local.conf_id if engine is not None else None,
            "cpu_percent": self.cpu_percent,
            "cpu_percent_avg": round((cpu - self.cpu0) / max(1e-6, now - self.wall0) * 100, 1),
            "cpu_s": round(cpu - self.cpu0, 3),  # process CPU (all threads) since the join
            "rss_mb": _rss_mb(),
            # The loop this process runs on (matrixrtc.event_loop): "uvloop" or "asyncio".
            "event_loop": type(asyncio.get_running_loop()).__module__.partition(".")[0],
            "receive_only": self.cfg.receive_only,
            "key_index": keys.current_index if keys is not None else None,
            "keys_used": list(self.keys_used),
            "key_rotation_ms": list(self.rotations_ms),
            "key_delivery_ms": list(self.key_delivery_ms[-20:]),
            "signalling_dropped": mesh.dropped_signalling if mesh is not None else 0,
            "loop_lag_ms": round(lag, 1),
            # transport -> kind -> counters, for each transport we publish on
            "encoders": _encoder_report(
                _shared_encoders(media),
                mesh=engine.encoders if engine is not None else {},
                sfu=_sfu_encoders(media),
            ),
            "peers": peers,
        }


def _encoder_report(
    shared: Mapping[str, SharedEncoder],
    *,
    mesh: Mapping[str, SharedEncoder],
    sfu: Mapping[str, SharedEncoder],
) -> dict[str, dict[str, dict[str, int]]]:
    """Counters by transport, each encoder once: those the switcher's transports share are
    under ``"shared"`` for the whole call (listed under both transports during a switch's
    overlap, they were counted twice; and moving from one to the other, counted from 0
    again by the runner's deltas); ``"mesh"`` and ``"sfu"`` hold only a transport's own."""
    ours = {id(e) for e in shared.values()}
    report: dict[str, dict[str, dict[str, int]]] = {}
    for transport, encoders in (("shared", shared), ("mesh", mesh), ("sfu", sfu)):
        own = encoders if transport == "shared" else {
            kind: e for kind, e in encoders.items() if id(e) not in ours
        }  # fmt: skip
        if counters := _encoder_counters(own):
            report[transport] = counters
    return report


def _shared_encoders(media: MatrixMesh | MediaSwitcher) -> Mapping[str, SharedEncoder]:
    """The switcher's shared encoders, once a transport made them."""
    local = media.local_encoders if isinstance(media, MediaSwitcher) else None
    return local.get() if local is not None and local.started else {}


def _encoder_counters(encoders: Mapping[str, SharedEncoder]) -> dict[str, dict[str, int]]:
    """Send-side counters of shared encoders by kind: what a starved or flooded publisher
    shows in (its source delivering fewer frames, key-frame storms, a peer's queue overflowing
    while its RTP sender is late)."""
    return {
        kind: {
            "frames_in": enc.frames_in,
            "frames_encoded": enc.frames_encoded,
            "keyframes": enc.keyframes,
            "keyframe_requests": enc.keyframe_requests_from_peers,
            "reopens": enc.reopens,
            "target_bitrate": enc.target_bitrate,
            "overflows": sum(t.overflows for t in enc.subscribers),
            "held": sum(t.held for t in enc.subscribers),
        }
        for kind, enc in encoders.items()
    }


def _sfu_encoders(media: MatrixMesh | MediaSwitcher) -> Mapping[str, SharedEncoder]:
    """The encoders our aiortc LiveKit client publishes from (none on the SDK engine)."""
    running = media.running(MediaKind.SFU) if isinstance(media, MediaSwitcher) else None
    if isinstance(running, LiveKitMedia) and running.lk is not None:
        for conn in running.lk.connections.values():
            if isinstance(conn, AiortcConnection) and conn.publish:
                return conn.encoders
    return {}


def _mesh_of(switcher: MediaSwitcher) -> MatrixMesh | None:
    running = switcher.running(MediaKind.MESH)
    return running.link if isinstance(running, MeshMedia) else None


def _switcher_view(
    switcher: MediaSwitcher, mesh_peers: list[dict[str, Any]], now: float
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Peers over whichever transport carries them (frame totals span switches), and the
    switch history with wall-clock times."""
    by_id = {p["id"]: p for p in mesh_peers}
    running = switcher.running(MediaKind.SFU)
    lk = running.lk if isinstance(running, LiveKitMedia) else None
    out: list[dict[str, Any]] = []
    for part in switcher.agent.participants:
        if part.is_self:
            continue
        pid = f"{part.user_id}|{part.device_id}"
        seen = switcher.peers.get(DeviceRef(part.user_id, part.device_id))
        peer = by_id.get(pid)
        lk_stats = None
        if lk is not None:
            lk_conn = next(
                (c for c in lk.connections.values() if part.rtc_backend_identity in c.stats), None
            )
            lk_stats = lk_conn.stats[part.rtc_backend_identity] if lk_conn else None
            if lk_stats is not None and (peer is None or switcher.kind is MediaKind.SFU):
                recent = [t for t in lk_stats.video_times if t > now - 2.0]
                peer = {
                    "id": pid,
                    "user_id": part.user_id,
                    "device_id": part.device_id,
                    "call_id": None,
                    "connected_at_ms": _wall_ms(lk_conn.connected_at if lk_conn else None),
                    "created_at_ms": None,
                    "fps_in": len(recent) / 2.0,
                    "kbps_in": None,  # the livekit SDK exposes no byte counts here
                    "kbps_out": None,
                    "audio_frames_decoded": lk_stats.audio_frames,
                    "layer": lk_stats.layer,
                    "rendered": lk_stats.rendered,
                    "video_size": (
                        "x".join(map(str, lk_stats.video_size)) if lk_stats.video_size else None
                    ),
                    "decrypt_failures": lk_stats.decrypt_failures,
                    "packets_in": None,
                    "bytes_in": None,
                    "bytes_out": None,
                    "ice_pair": None,
                }
        if peer is None:
            continue
        carrier = "sfu" if lk_stats is not None and peer.get("call_id") is None else "mesh"
        peer = {**peer, "transport": carrier}
        if seen is not None:
            peer["frames_decoded"] = sum(seen.frames.values())
            peer["first_frame_at_ms"] = _wall_ms(seen.first_frame_at)
            peer["frames_by_transport"] = {k.value: n for k, n in seen.frames.items()}
            peer["max_gap_ms"] = round(seen.max_gap_s * 1000)
        else:
            peer.setdefault("frames_decoded", 0)
            peer.setdefault("first_frame_at_ms", None)
        out.append(peer)
    switches = [{**r.to_json(), "at_ms": _wall_ms(r.started_at)} for r in switcher.history]
    kind = switcher.kind.value if switcher.kind is not None else None
    return out, {"transport": kind, "switches": switches}


async def _pump_changes(sub: Subscription[ParticipantsChanged], probe: _Probe) -> None:
    async for change in sub:
        probe.on_change(change)


async def _pump_keys(sub: Subscription[KeyEvent], probe: _Probe) -> None:
    async for ev in sub:
        probe.on_key(ev)


async def _share_keys_in_clear(agent: CallAgent, keys: CallKeys) -> None:
    """Test pages have no Olm: with plaintext keys enabled (unencrypted rooms only), also hand
    our current key in clear to every other member device, once per key index."""
    hs = agent.hs
    done: set[tuple[str, str, int]] = set()
    while True:
        own = keys.own_key
        if own is not None:
            index, key = own
            to = [
                DeviceRef(p.user_id, p.device_id)
                for p in agent.participants
                if not p.is_self and (p.user_id, p.device_id, index) not in done
            ]
            if to:
                content = ElementCallKeys(
                    room_id=agent.room_id,
                    index=index,
                    key=key,
                    claimed_device_id=hs.device_id,
                    member_id=keys.manager.own.member_id,
                    sent_ts=round(time.time() * 1000),
                ).to_json()
                try:
                    await hs.send_to_device(
                        ELEMENT_CALL_KEYS_TYPE, dict.fromkeys(to, content), encrypted=False
                    )
                except MatrixRTCError as e:
                    log.warning("calltest.clear_key_send_failed", error=str(e))
                else:
                    done.update((r.user_id, r.device_id, index) for r in to)
                    keys.record_delivery(to, index)
        await asyncio.sleep(0.25)


async def run_participant(cfg: ParticipantConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    sources: list[Any] = []
    if not cfg.receive_only:
        sources.append(SyntheticVideoTrack(cfg.width, cfg.height, cfg.fps))
        if cfg.audio:
            sources.append(ToneAudioTrack())
    ice: tuple[IceServerConfig, ...] = ()
    if cfg.turn_uris:
        ice = (
            IceServerConfig(
                urls=cfg.turn_uris, username=cfg.turn_username, credential=cfg.turn_password
            ),
        )
    link_cfg = MeshLinkConfig(
        mesh=MeshConfig(
            ice_servers=ice,
            host_addresses=cfg.host_addresses,
            remote_networks=cfg.remote_networks,
            relay_only=cfg.relay_only,
            decode_video=cfg.decode_video,
        ),
        turn_from_homeserver=cfg.turn_from_homeserver,
    )
    state_dir = Path(cfg.state_dir) if cfg.state_dir else None
    async with Homeserver(cfg.homeserver, Login(cfg.user, cfg.password), state_dir=state_dir) as hs:
        room_id = await hs.join_room(cfg.room_id)
        advertised: tuple[Transport, ...] = (FullMeshTransport(),)
        if cfg.transport != "mesh":
            if cfg.sfu_url is None:
                raise LocalError(f"transport {cfg.transport!r} needs sfu_url")
            sfu = LivekitTransport(livekit_service_url=cfg.sfu_url)
            # The mesh transport goes after the LiveKit one (design.md principle 5).
            advertised = (sfu,) if cfg.transport == "sfu" else (sfu, FullMeshTransport())
        agent_cfg = AgentConfig(transports=advertised, delayed_leave_ms=cfg.delayed_leave_ms)
        joined_ms = round(time.time() * 1000)
        async with CallAgent(hs, room_id, agent_cfg) as agent:
            probe = _Probe(cfg, joined_ms)
            async with contextlib.AsyncExitStack() as stack:
                # Keys and mesh listen from the start: peers react to our membership as soon
                # as they see it, possibly before we do.
                keys: CallKeys | None = None
                if cfg.e2ee:
                    keys = await stack.enter_async_context(
                        CallKeys(agent, CallKeysConfig(allow_plaintext_keys=cfg.plaintext_keys))
                    )
                mesh: MatrixMesh | MediaSwitcher
                if cfg.transport == "mesh":
                    mesh = await stack.enter_async_context(
                        MatrixMesh(
                            agent,
                            keys=keys,
                            sources=sources,
                            config=link_cfg,
                            decrypt_rings=KeyRings() if cfg.withhold_keys else None,
                        )
                    )
                else:
                    for track in sources:  # each mesh the switcher starts gets its own
                        track.stop()
                    switch_cfg = SwitchConfig(
                        mesh_max=cfg.mesh_max,
                        media=MediaOptions(
                            width=cfg.width,
                            height=cfg.height,
                            fps=cfg.fps,
                            video=not cfg.receive_only,
                            audio=cfg.audio and not cfg.receive_only,
                            simulcast=cfg.simulcast,
                            low_layer_above=cfg.low_layer_above,
                            render_max=cfg.render_max,
                            preencoded=cfg.preencoded,
                            engine="aiortc" if cfg.sfu_engine == "aiortc" else "sdk",
                        ),
                        mesh=replace(
                            link_cfg,
                            mesh=replace(link_cfg.mesh, signalling=SWITCH_MESH.mesh.signalling),
                        ),
                    )
                    mesh = await stack.enter_async_context(MediaSwitcher(agent, keys, switch_cfg))
                _emit({"event": "ready", "id": cfg.name, "user_id": hs.user_id,
                       "device_id": hs.device_id, "joined_at_ms": joined_ms})  # fmt: skip
                # A failing pump means missed reports: it is logged at once and ends the
                # participant with that error instead of a final report (never swallowed).
                pumps = OwnedTasks(f"calltest {cfg.name}", log, event_prefix="calltest")
                pumps.spawn(_pump_changes(stack.enter_context(agent.changes()), probe), "changes")
                pumps.spawn(probe.watch_loop(), "loop-lag")
                if keys is not None:
                    pumps.spawn(_pump_keys(stack.enter_context(keys.events()), probe), "keys")
                    if cfg.plaintext_keys:
                        pumps.spawn(_share_keys_in_clear(agent, keys), "clear-keys")
                try:
                    deadline = loop.time() + cfg.duration_s if cfg.duration_s > 0 else None
                    while not stop.is_set():
                        timeout = _STATS_INTERVAL_S
                        if deadline is not None:
                            timeout = min(timeout, deadline - loop.time())
                            if timeout <= 0:
                                break
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), timeout)
                        _emit({"event": "stats", **await probe.snapshot(mesh, keys)})
                    final = await probe.snapshot(mesh, keys)
                finally:
                    await pumps.aclose()
            await agent.leave()
    _emit({"event": "final", **final})
    return 0


def main(argv: list[str] | None = None) -> int:
    from matrixrtc.logging import configure_logging

    args = sys.argv[1:] if argv is None else argv
    if args:
        print("usage: python -m matrixrtc.calltest.participant < CONFIG_JSON", file=sys.stderr)
        return 2
    cfg = ParticipantConfig.from_json(json.loads(sys.stdin.readline()))
    configure_logging("console", str(cfg.extra.get("log_level", "warning")))
    return event_loop.run(run_participant(cfg))


if __name__ == "__main__":
    raise SystemExit(main())
