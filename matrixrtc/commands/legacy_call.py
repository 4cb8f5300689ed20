"""``python -m matrixrtc legacy-call``: join a room's 2022 MSC3401 full-mesh call (the call
Hydrogen and matrix-js-sdk's legacy ``GroupCall`` make) with synthetic media.

Credentials as for ``join``: ``MATRIXRTC_PASSWORD`` or ``MATRIXRTC_ACCESS_TOKEN`` (never on the
command line), else a prompt on a terminal. Joins the room if needed, joins its
``org.matrix.msc3401.call`` (or creates one), prints each peer's decoded frames every few
seconds, and leaves (hangups, our ``m.calls`` entry removed) on Ctrl-C/SIGTERM or after
``--duration``. Media goes over host candidates on ``--mesh-host`` addresses (default: every
address aioice finds) and the homeserver's TURN servers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aiortc.mediastreams import MediaStreamTrack

from matrixrtc import event_loop
from matrixrtc.agent import AgentConfig, CallAgent
from matrixrtc.commands._call_cli import Console, run_until
from matrixrtc.commands.join import _login, default_state_dir
from matrixrtc.errors import MatrixRTCError
from matrixrtc.matrix import Homeserver
from matrixrtc.media.sources import SyntheticVideoTrack, ToneAudioTrack
from matrixrtc.mesh.engine import MeshConfig
from matrixrtc.mesh.matrix_link import MatrixMesh, MeshLinkConfig
from matrixrtc.model import Dialect, FullMeshTransport

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "legacy-call",
        help="join a room's 2022 MSC3401 mesh call (Hydrogen, legacy js-sdk GroupCall)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--homeserver", required=True, help="homeserver base URL")
    p.add_argument("--user", required=True, help="user id (@u:hs) or localpart")
    p.add_argument("--room", required=True, help="room id or alias (joined if needed)")
    p.add_argument("--state-dir", type=Path, default=None, help="device state directory")
    p.add_argument("--no-audio", action="store_true", help="send no audio (a tone otherwise)")
    p.add_argument("--no-video", action="store_true", help="send no video (a pattern otherwise)")
    p.add_argument(
        "--mesh-host", action="append", default=None, help="host candidate address (repeatable)"
    )
    p.add_argument("--duration", type=float, default=None, help="leave after this many seconds")
    p.add_argument("--output", choices=("console", "json"), default="console")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        return event_loop.run(_main(args))
    except MatrixRTCError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


async def _main(args: argparse.Namespace) -> int:
    console = Console(args.output)
    state_dir: Path = args.state_dir or default_state_dir(args.user)
    sources: list[MediaStreamTrack] = []
    if not args.no_video:
        sources.append(SyntheticVideoTrack(320, 240, 15))
    if not args.no_audio:
        sources.append(ToneAudioTrack())
    config = MeshConfig(host_addresses=tuple(args.mesh_host) if args.mesh_host else None)
    async with Homeserver(args.homeserver, _login(args.user, state_dir), state_dir=state_dir) as hs:
        room_id = await hs.join_room(args.room)
        agent_cfg = AgentConfig(
            dialect=Dialect.MSC3401_2022,
            transports=(FullMeshTransport(),),
            intent="audio" if args.no_video else "video",
        )
        link_cfg = MeshLinkConfig(mesh=config, turn_from_homeserver=True)
        async with (
            CallAgent(hs, room_id, agent_cfg) as agent,
            MatrixMesh(agent, sources=sources, config=link_cfg) as call,
        ):
            console.event(
                "joined",
                f"in call {call.conf_id} of {room_id} as {hs.device_id} "
                f"(session {call.session_id})",
                conf_id=call.conf_id,
                room_id=room_id,
                device_id=hs.device_id,
                session_id=call.session_id,
            )

            def tick() -> None:
                engine = call.engine
                if engine is None:
                    return
                peers = {}
                for link in engine.links.values():
                    # video decoded; audio received and decrypted (decoded only for a tap)
                    frames = {
                        k: s.frames_decoded if k == "video" else s.encoded_frames
                        for k, s in link.stats.items()
                    }
                    peers[f"{link.peer.user_id}/{link.peer.device_id}"] = frames
                text = ", ".join(f"{p}: {f}" for p, f in peers.items()) or "no peer yet"
                console.event("peers", text, peers=peers)

            why = await run_until(duration=args.duration, done=None, tick=tick)
        console.event("left", f"left ({why})", reason=why)
    return 0
