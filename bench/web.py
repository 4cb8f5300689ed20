"""Web client benchmark: join → first decoded remote frame in the browser, on SFU and mesh;
the media gap of a live switch; the client's size.

Run inside the private network namespace (everything binds 127.0.0.1)::

    ./scripts/in-netns .venv/bin/python bench/web.py [--json] [--joins 5]

A fresh stack: LiveKit, Synapse advertising our authorization service, the service, the built
client (web/dist) served on loopback, and Debian's Chromium with fake devices. Per transport,
one Python participant (``matrixrtc.calltest.participant``, 320×240 @ 15 fps, E2EE) stays in an
encrypted room's call; each join is a new browser context that logs in (a new device), opens the
room's lobby and clicks Join. The clock starts at ``Call.join`` (the click) and stops when the
browser has decoded the first video frame of the Python participant (polled every 100 ms from
the receivers' statistics), so it covers the membership event, the Olm key exchange, the token
request and LiveKit connect (SFU) or the MSC2746 signalling and ICE/DTLS (mesh).

Switch gaps: ``mesh_max`` 2; the browser and a Python participant on the mesh, a second Python
participant joins (→ SFU) and leaves (→ mesh). Each figure is the longest time the browser went
without a decoded frame from anyone around that switch (gaps under 150 ms count as 0).
SFU failure (``sfu_lost_to_mesh``, ``sfu_back_mesh_to_sfu``): a browser and a Python participant
on an SFU of their own (``mesh_max`` 1); LiveKit is SIGKILLed mid-call, both fall back to the
mesh (the gap includes the 1 s before a lost SFU counts as unreachable), then it is started
again and both return once a token request succeeds (probed every 2 s).

``bundle_kb_gzip``: every file of web/dist gzipped (level 9), in KiB; the Rust crypto WASM is
most of it. Prints figures only; never fails on time.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import secrets
import signal
import statistics
import sys
from pathlib import Path
from typing import Any

from matrixrtc.calltest.participant import ParticipantConfig
from matrixrtc.calltest.runner import ParticipantProcess, participants, provision
from matrixrtc.commands.web import DIST, serve_client
from matrixrtc.devstack import AuthService, Chromium, LiveKit, Synapse, new_run_dir
from matrixrtc.logging import configure_logging

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "browser" / "web_client.mjs"


def bundle_kb_gzip() -> float:
    total = sum(len(gzip.compress(p.read_bytes(), 9)) for p in DIST.rglob("*") if p.is_file())
    return round(total / 1024, 1)


async def browser(chromium: Chromium, options: dict[str, Any]) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(DRIVER),
        chromium.devtools_url,
        json.dumps(options),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=DRIVER.parent,
    )
    out, err = await asyncio.wait_for(proc.communicate(), options["timeoutMs"] / 1000 + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"web_client.mjs exited {proc.returncode}: {err.decode()[-1500:]}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    if not result.get("ok"):
        raise RuntimeError(f"browser failed: {json.dumps(result)[:1500]}")
    return result


def py_config(
    prov: Any, index: int, transport: str, sfu_url: str, mesh_max: int = 4
) -> ParticipantConfig:
    user, password = prov.users[index]
    return ParticipantConfig(
        name=f"py{index}",
        homeserver=prov.base_url,
        user=user,
        password=password,
        room_id=prov.room_id,
        duration_s=0,
        transport=transport,
        sfu_url=sfu_url if transport != "mesh" else None,
        mesh_max=mesh_max,
    )


def _peer_transport(p: ParticipantProcess, user_id: str) -> str | None:
    for peer in (p.latest or {}).get("peers", []):
        if peer.get("user_id") == user_id:
            return peer.get("transport") or "mesh"
    return None


async def run(args: argparse.Namespace) -> dict[str, Any]:
    run_dir = new_run_dir(prefix="bench-web")
    out: dict[str, Any] = {"joins": args.joins, "bundle_kb_gzip": bundle_kb_gzip()}
    extra: dict[str, Any] = {}
    async with LiveKit(run_dir) as livekit:
        hs = Synapse(run_dir, extra_config=extra)
        svc = AuthService(run_dir, livekit, hs)
        focus = {"type": "livekit", "livekit_service_url": svc.url}
        extra["matrix_rtc"] = {"transports": [focus]}
        extra["extra_well_known_client_content"] = {"org.matrix.msc4143.rtc_foci": [focus]}
        async with hs, svc, Chromium(run_dir) as chromium, serve_client(0) as url:
            base = {
                "base": url,
                "homeserver": hs.base_url,
                "dialect": "state",
                "peers": 1,
                "minFrames": 1,
                "holdMs": 0,
                "timeoutMs": 60000,
                "quick": True,
            }
            for kind in ("sfu", "mesh"):
                tag = secrets.token_hex(3)
                prov = await provision(hs.base_url, [f"py-{tag}", f"web-{tag}"], encrypted=True)
                firsts: list[float] = []
                parts: list[dict[str, Any]] = []
                async with participants(
                    [py_config(prov, 0, kind, svc.url)], run_dir / f"py-{kind}"
                ) as (py,):
                    await py.wait_ready()
                    for _ in range(args.joins):
                        user, password = prov.users[1]
                        r = await browser(
                            chromium,
                            {
                                **base,
                                "user": user,
                                "password": password,
                                "roomId": prov.room_id,
                                "transport": kind,
                            },
                        )
                        (remote,) = r["last"]["participants"]
                        firsts.append(float(remote["firstFrameMs"]))
                        parts.append(
                            {
                                "membership_ms": r["last"].get("ownMembershipMs"),
                                "key_ms": remote["firstKeyMs"],
                                "transport_ms": r["last"]["transportReadyMs"],
                            }
                        )
                        await asyncio.sleep(1.5)  # LiveKit throttles key-frame requests
                out[kind] = {
                    "first_frame_p50_ms": round(statistics.median(firsts)),
                    "first_frame_max_ms": round(max(firsts)),
                    "first_frame_ms": [round(x) for x in firsts],
                    # when our membership was stored, the remote key arrived and our transport
                    # was up, per join (ms after the click)
                    "breakdown": parts,
                }
            out["switch_gap_ms"], out["switch_ms"] = await _switches(chromium, hs, svc, base)
            gaps, took = await _sfu_failure(chromium, hs, base, run_dir)
            out["switch_gap_ms"].update(gaps)
            out["switch_ms"].update(took)
    return out


async def _sfu_failure(
    chromium: Chromium, hs: Synapse, base: dict[str, Any], run_dir: Path
) -> tuple[dict[str, int], dict[str, int]]:
    """A browser and a Python participant on an SFU of their own (mesh_max 1); LiveKit is
    SIGKILLed mid-call (→ mesh), then started again (→ SFU)."""
    tag = secrets.token_hex(3)
    prov = await provision(hs.base_url, [f"py-{tag}", f"web-{tag}"], encrypted=True)
    web_user, web_pw = prov.users[1]
    lk = LiveKit(run_dir, name=f"lk-lost-{tag}")
    svc = AuthService(run_dir, lk, hs, name=f"sfu-lost-{tag}")

    def on(kind: str, more_than: int) -> Any:
        def check(p: ParticipantProcess) -> bool:
            frames = _peer_frames(p, web_user, kind)
            return (p.latest or {}).get("transport") == kind and frames > more_than

        return check

    async with (
        lk,
        svc,
        participants([py_config(prov, 0, "auto", svc.url, 1)], hs.dir / f"bench-lost-{tag}") as (
            py,
        ),
    ):
        await py.wait_ready()
        task = asyncio.create_task(
            browser(
                chromium,
                {
                    **base,
                    "user": web_user,
                    "password": web_pw,
                    "roomId": prov.room_id,
                    "transport": "auto",
                    "minFrames": 10,
                    "query": "&mesh_max=1&video=320x240",
                    "expectKinds": ["mesh", "sfu"],
                },
            )
        )
        await py.wait_until(on("sfu", 10), 60)
        assert lk.pid is not None
        os.kill(lk.pid, signal.SIGKILL)
        await lk.stop()
        await py.wait_until(on("mesh", 10), 60)
        await asyncio.sleep(2)
        before = _peer_frames(py, web_user, "sfu")
        await lk.start()
        await py.wait_until(on("sfu", before + 10), 60)
        result = await task
    moves = result["last"]["switches"][1:]
    names = {("sfu", "mesh"): "sfu_lost_to_mesh", ("mesh", "sfu"): "sfu_back_mesh_to_sfu"}
    gaps = {
        names[(s["from"], s["to"])]: int(s["gapMs"]) for s in moves if (s["from"], s["to"]) in names
    }
    took = {
        names[(s["from"], s["to"])]: int(s["durationMs"])
        for s in moves
        if (s["from"], s["to"]) in names
    }
    return gaps, took


def _peer_frames(p: ParticipantProcess, user_id: str, kind: str) -> int:
    for peer in (p.latest or {}).get("peers", []):
        if peer.get("user_id") == user_id:
            return int(peer.get("frames_by_transport", {}).get(kind, 0))
    return 0


async def _switches(
    chromium: Chromium, hs: Synapse, svc: AuthService, base: dict[str, Any]
) -> tuple[dict[str, int], dict[str, int]]:
    tag = secrets.token_hex(3)
    prov = await provision(hs.base_url, [f"py-{tag}", f"pz-{tag}", f"web-{tag}"], encrypted=True)
    web_user, web_pw = prov.users[2]
    logs = hs.dir / f"bench-switch-{tag}"
    async with participants([py_config(prov, 0, "auto", svc.url, 2)], logs) as (py,):
        await py.wait_ready()
        task = asyncio.create_task(
            browser(
                chromium,
                {
                    **base,
                    "user": web_user,
                    "password": web_pw,
                    "roomId": prov.room_id,
                    "transport": "auto",
                    "minFrames": 10,
                    "query": "&mesh_max=2&video=320x240",
                    "expectKinds": ["sfu", "mesh"],
                },
            )
        )
        await py.wait_until(lambda p: _peer_transport(p, web_user) == "mesh", 60)
        await asyncio.sleep(2)
        async with participants([py_config(prov, 1, "auto", svc.url, 2)], logs) as (pz,):
            await pz.wait_ready()
            await py.wait_until(lambda p: _peer_transport(p, web_user) == "sfu", 60)
            await asyncio.sleep(3)
        result = await task
    switches = {f"{s['from']}_to_{s['to']}": s for s in result["last"]["switches"]}
    gaps: dict[str, int] = {
        k: int(switches[k]["gapMs"]) for k in ("mesh_to_sfu", "sfu_to_mesh") if k in switches
    }
    took: dict[str, int] = {
        k: int(switches[k]["durationMs"]) for k in ("mesh_to_sfu", "sfu_to_mesh") if k in switches
    }
    return gaps, took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--joins", type=int, default=5, help="joins per transport (default 5)")
    args = parser.parse_args(argv)
    configure_logging("console", "warning")
    if not (DIST / "index.html").is_file():
        print("web/dist is missing: run `make bootstrap`", file=sys.stderr)
        return 1
    out = asyncio.run(run(args))
    if args.json:
        print(json.dumps(out))
    else:
        for kind in ("sfu", "mesh"):
            f = out[kind]
            print(
                f"{kind:4}  join → first decoded remote frame p50 {f['first_frame_p50_ms']} ms, "
                f"max {f['first_frame_max_ms']} ms over {out['joins']} joins {f['first_frame_ms']}"
            )
            print(f"      membership / remote key / transport up at ms: {f['breakdown']}")
        print(f"switch gap ms {out['switch_gap_ms']}  (switch took ms {out['switch_ms']})")
        print(f"bundle {out['bundle_kb_gzip']} KiB gzipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
