"""The web call client (web/, built into web/dist by the bootstrap) in Chromium, driven like a
person (login, room list, lobby, join, controls, leave) against a real Synapse whose
``/rtc/transports`` advertises our authorization service in front of a real LiveKit, in one
end-to-end encrypted room with a Python participant (``matrixrtc.calltest.participant``):

* SFU: the browser (livekit-client + its E2EE worker, keys from matrix-js-sdk's
  MatrixRTCSession over Olm) and the Python participant on LiveKit decode each other's video;
* mesh: the browser places the call (MSC2746 over Olm to-device, as the project's mesh engine)
  and both decode each other's frames, encrypted in LiveKit's frame format.

"Decoded" is measured on both sides: the browser's decoder counts frames and the remote tile's
pixels are a real, changing picture; the Python participant counts frames it decrypted and
decoded from the browser's device.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from matrixrtc.calltest.participant import ParticipantConfig
from matrixrtc.calltest.runner import ParticipantProcess, Provisioned, participants, provision
from matrixrtc.devstack import AuthService, Chromium, LiveKit, Synapse
from tests.browser.helpers import BROWSER_DIR, run_node, serve_dir

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
DIST = REPO / "web" / "dist"


@dataclass(frozen=True)
class WebStack:
    synapse: Synapse
    sfu_url: str
    client_url: str


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def web_stack(
    run_dir: Path, livekit: LiveKit, request: pytest.FixtureRequest
) -> AsyncIterator[WebStack]:
    """Synapse advertising our authorization service (both discovery paths), the service,
    and the built client served on loopback. One stack per test module (other modules reuse
    this fixture), each in its own directory: a second Synapse in the first one's directory
    would keep that one's config, port included, and never answer on its own port."""
    if not (DIST / "index.html").is_file():
        pytest.fail("web/dist is missing: run `make bootstrap` (npm ci + vite build in web/)")
    extra: dict[str, Any] = {}
    tag = request.module.__name__.rsplit(".", 1)[-1]
    hs = Synapse(run_dir, extra_config=extra, name=f"web-synapse-{tag}")
    svc = AuthService(run_dir, livekit, hs, name=f"web-sfu-{tag}")
    focus = {"type": "livekit", "livekit_service_url": svc.url}
    # Filled in before Synapse writes its config (at start): the service's port is known now.
    extra["matrix_rtc"] = {"transports": [focus]}
    extra["extra_well_known_client_content"] = {"org.matrix.msc4143.rtc_foci": [focus]}
    async with hs, svc, serve_dir(DIST) as client_url:
        yield WebStack(hs, svc.url, client_url)


async def _browser(
    chromium: Chromium, stack: WebStack, user: str, password: str, room_id: str, **opts: Any
) -> dict[str, Any]:
    options = {
        "base": stack.client_url,
        "homeserver": stack.synapse.base_url,
        "user": user,
        "password": password,
        "roomId": room_id,
        "transport": "auto",
        "dialect": "state",
        "peers": 1,
        "minFrames": 30,
        "holdMs": 3000,
        "timeoutMs": 90000,
        **opts,
    }
    out = await run_node(
        str(BROWSER_DIR / "web_client.mjs"),
        chromium.devtools_url,
        json.dumps(options),
        limit=options["timeoutMs"] / 1000 + 60,
    )
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def _peer(p: ParticipantProcess, user_id: str) -> dict[str, Any]:
    """What the Python participant last reported about ``user_id``'s device ({} if nothing)."""
    for peer in (p.latest or {}).get("peers", []):
        if peer.get("user_id") == user_id:
            out: dict[str, Any] = peer
            return out
    return {}


def _frames_from(p: ParticipantProcess, user_id: str) -> tuple[int, str | None]:
    """Video frames the Python participant decoded from ``user_id``'s device, and the carrier."""
    peer = _peer(p, user_id)
    return int(peer.get("frames_decoded") or 0), peer.get("transport")


def _check_picture(remote: dict[str, Any], a: dict[str, Any], b: dict[str, Any]) -> None:
    """Two samples of a remote tile, 400 ms apart, show its sender's moving test pattern:
    Chromium's fake camera (a green field with a moving pie and a frame counter) from a browser,
    the synthetic moving pattern (``matrixrtc.media.sources``) from a Python participant."""
    assert a["mean"] != b["mean"], f"the picture of {remote['name']} does not change"
    for sample in (a, b):
        red, green, blue = sample["mean"]
        if "web" not in remote["name"]:  # the Python participants are py-…, pz-…
            assert sample["std"] > 8, sample
        else:
            assert green > 100, sample
            assert red < 40, sample
            assert blue < 40, sample


def _check_browser_side(result: dict[str, Any], kind: str, peers: int) -> list[dict[str, Any]]:
    assert result["ok"], {k: v for k, v in result.items() if k != "first"}
    last = result["last"]
    assert last["joined"] is True
    assert last["kind"] == kind, last
    remotes: list[dict[str, Any]] = last["participants"]
    assert len(remotes) == peers, remotes
    for remote in remotes:
        # The browser decrypted and decoded every other participant's video ...
        assert remote["transport"] == kind
        assert remote["e2ee"] == "decrypting", remote
        assert remote["stats"]["framesDecoded"] >= 30, remote
        assert remote["keyIndex"] is not None
        # ... and each remote tile shows its sender's moving test pattern.
        (a, b) = result["tiles"][remote["identity"]]
        assert a is not None, result["tiles"]
        assert b is not None, result["tiles"]
        _check_picture(remote, a, b)
    assert result["badges"].count("E2EE: decrypting") == peers, result["badges"]
    assert "Key index" in result["statsText"]
    assert result["unnamed"] == [], result["unnamed"]
    return remotes


def _py(
    prov: Provisioned, name: str, user: str, password: str, **options: Any
) -> ParticipantConfig:
    """A Python participant in ``prov``'s room, in the call until stopped."""
    return ParticipantConfig(
        name=name,
        homeserver=prov.base_url,
        user=user,
        password=password,
        room_id=prov.room_id,
        duration_s=0,
        **options,
    )


async def _run_call(
    chromium: Chromium,
    stack: WebStack,
    *,
    browsers: list[tuple[str, dict[str, Any]]],
    pythons: list[tuple[str, dict[str, Any]]],
) -> tuple[list[dict[str, Any]], dict[str, dict[str, dict[str, Any]]], dict[str, str]]:
    """One encrypted room; ``browsers`` and ``pythons`` are (name prefix, options) in the call.
    A browser's option ``after`` (another browser's prefix) opens its page only once that
    browser's own membership is back from the homeserver.

    Returns each browser's result, what each Python participant reported about each browser
    (by prefixes) while the browsers were still in the call, and user ids by prefix.
    """
    tag = secrets.token_hex(3)
    names = [f"{n}-{tag}" for n, _ in pythons + browsers]
    prov = await provision(stack.synapse.base_url, names, encrypted=True)
    creds = dict(zip([n for n, _ in pythons + browsers], prov.users, strict=True))
    ids = {n: c[0] for n, c in creds.items()}
    cfgs = [
        _py(
            prov,
            n,
            *creds[n],
            **{"sfu_url": stack.sfu_url, **o} if o.get("transport", "mesh") != "mesh" else o,
        )
        for n, o in pythons
    ]
    peers = len(browsers) + len(pythons) - 1
    async with participants(cfgs, stack.synapse.dir / f"py-{tag}") as procs:
        for p in procs:
            await p.wait_ready()
        barrier = stack.synapse.dir / f"barrier-{tag}"
        barrier.mkdir()
        joined = stack.synapse.dir / f"joined-{tag}"
        joined.mkdir()
        awaited = {o["after"] for _, o in browsers if "after" in o}

        def order(n: str, o: dict[str, Any]) -> dict[str, Any]:
            out = {k: v for k, v in o.items() if k != "after"}
            if n in awaited:
                out["signalJoined"] = str(joined / n)
            if "after" in o:
                out["startAfter"] = str(joined / o["after"])
            return out

        tasks = [
            asyncio.create_task(
                _browser(
                    chromium,
                    stack,
                    *creds[n],
                    prov.room_id,
                    peers=peers,
                    barrier={"dir": str(barrier), "name": n, "count": len(browsers)},
                    **order(n, o),
                )
            )
            for n, o in browsers
        ]

        def receiving(p: ParticipantProcess) -> bool:
            # One without the keys cannot decode: it has its share once packets flow from each.
            return all(int(_peer(p, ids[b]).get("packets_in") or 0) > 100 for b, _ in browsers)

        def decoding(p: ParticipantProcess) -> bool:
            return all(_frames_from(p, ids[b])[0] >= 30 for b, _ in browsers)

        async def pythons_decode_browsers() -> None:
            for (_, o), proc in zip(pythons, procs, strict=True):
                await proc.wait_until(receiving if o.get("withhold_keys") else decoding, 90)

        try:
            # While the browsers are in the call: every keyed Python participant decodes them and
            # every keyless one receives their packets (unless a browser gives up first: then
            # there is nothing left to wait for).
            waiting = asyncio.create_task(pythons_decode_browsers())
            pending: set[asyncio.Task[Any]] = {waiting, *tasks}
            while not waiting.done():
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                why = [
                    t.exception() or t.result().get("error")
                    for t in done
                    if t is not waiting and (t.exception() or not t.result()["ok"])
                ]
                if why:
                    # Nothing left to wait for: the others would only run into their timeouts.
                    for t in (waiting, *tasks):
                        t.cancel()
                    raise AssertionError(f"a browser gave up before Python decoded it: {why}")
            waiting.result()
            await asyncio.sleep(1.5)  # a fresh report from every Python participant
            seen = {
                n: {b: _peer(proc, ids[b]) for b, _ in browsers}
                for (n, _), proc in zip(pythons, procs, strict=True)
            }
            results = list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                try:
                    print(json.dumps(await t, indent=1)[:6000])
                except (Exception, asyncio.CancelledError) as e:  # cancelled above, or failed
                    print(f"browser: {e!r}")
            raise
    for r in results:
        print(json.dumps({k: r.get(k) for k in ("marks", "badges", "muteCheck")}))
        print("browser:", json.dumps(r.get("last"))[:3000])
    return results, seen, ids


async def test_sfu_call_browsers_and_python_both_dialects(
    chromium: Chromium, web_stack: WebStack
) -> None:
    """Two browsers (one state-form member through /sfu/get, one sticky m.rtc.member through
    /get_token) and a Python participant on LiveKit: everyone decodes everyone.

    The state-form browser logs in (a new device) only once the sticky one's membership is on
    the homeserver: that Megolm-encrypted event's room key never went to the new device, which
    sees the sticky member only because it sends its membership again for it (the order a
    loaded CI machine produced by chance, and the sticky member was never seen)."""
    results, py, ids = await _run_call(
        chromium,
        web_stack,
        browsers=[
            (
                "web",
                {
                    "transport": "sfu",
                    "dialect": "state",
                    "toggleMute": True,
                    "shareScreen": True,
                    "after": "webs",
                },
            ),
            ("webs", {"transport": "sfu", "dialect": "sticky", "expectScreen": True}),
        ],
        pythons=[("py", {"transport": "sfu"})],
    )
    state_br, sticky_br = results
    for r in results:
        remotes = _check_browser_side(r, "sfu", 2)
        # Remote audio is heard (Chromium's fake microphone beeps, Python sends a tone).
        assert all(x["audioLevelMax"] > 0.01 for x in remotes), remotes
    # The sticky member's LiveKit identity is js-sdk's hash, the state member's user:device.
    assert state_br["last"]["ownIdentity"].startswith(ids["web"] + ":")
    assert not sticky_br["last"]["ownIdentity"].startswith("@")
    for b in ("web", "webs"):
        assert py["py"][b]["frames_decoded"] >= 30, py
        assert py["py"][b]["transport"] == "sfu", py
    # The state-form browser shares its screen (Chromium's fake screen); the other one decodes it.
    assert state_br["screen"] == {"sharing": True}
    assert sticky_br["screen"]["from"].startswith("web-"), sticky_br["screen"]
    assert sticky_br["screen"]["hasScreen"] is True
    # Mute and unmute from the call controls.
    assert state_br["muteCheck"] == {"mutedLabel": "Unmute microphone", "pressedAfter": "false"}
    # The sticky member sent its membership again for the state-form browser's new device.
    resent = [d for r in sticky_br["last"]["membershipResends"] for d in r["devices"]]
    assert any(d.startswith(ids["web"] + "|") for d in resent), sticky_br["last"]


async def test_mesh_call_browsers_python_and_a_keyless_participant(
    chromium: Chromium, web_stack: WebStack
) -> None:
    """A four-member full mesh: "aweb" < "bweb" < "py…": the first browser places every call,
    the second answers one and places two; a Python participant decodes both browsers; one
    without the media keys receives their packets and decodes nothing."""
    small = {"query": "&video=320x240"}
    results, py, _ = await _run_call(
        chromium,
        web_stack,
        browsers=[
            ("aweb", {"transport": "auto", "keyboard": True, **small}),
            ("bweb", {"transport": "auto", **small}),
        ],
        pythons=[
            ("py", {"transport": "mesh"}),
            ("pz", {"transport": "mesh", "withhold_keys": True}),
        ],
    )
    for r in results:
        remotes = _check_browser_side(r, "mesh", 3)
        assert r["last"]["frameCryptoMode"] == "encoded-streams"  # Chromium
        # (MissingKey errors may precede a key's arrival over Olm; they are not checked.)
        assert all(x["state"] == "connected" for x in remotes), remotes
    for b in ("aweb", "bweb"):
        assert py["py"][b]["frames_decoded"] >= 30, py
        keyless = py["pz"][b]
        assert keyless["packets_in"] > 100, keyless
        assert keyless["frames_decoded"] == 0, keyless


async def test_mesh_call_with_a_sticky_browser_member(
    chromium: Chromium, web_stack: WebStack
) -> None:
    """A browser in the sticky form (m.rtc.member through js-sdk, which publishes only its
    LiveKit transport; the client adds the mesh one) and a Python participant that only
    meshes: the call runs as a mesh, both decode each other."""
    results, py, _ = await _run_call(
        chromium,
        web_stack,
        browsers=[("webs", {"transport": "auto", "dialect": "sticky", "query": "&video=320x240"})],
        pythons=[("py", {"transport": "mesh"})],
    )
    (r,) = results
    (remote,) = _check_browser_side(r, "mesh", 1)
    assert remote["state"] == "connected", remote
    assert not r["last"]["ownIdentity"].startswith("@")  # the sticky form's hashed identity
    assert py["py"]["webs"]["frames_decoded"] >= 30, py


async def test_sfu_call_a_browser_without_the_media_keys_decodes_nothing(
    chromium: Chromium, web_stack: WebStack
) -> None:
    """On the SFU, a browser with a LiveKit token and a place in the call but none of the
    others' Matrix media keys (the page drops them) receives the Python participant's
    encrypted video and decodes none of it, while the Python participant, which holds the
    browser's key, decodes the browser."""
    results, py, _ = await _run_call(
        chromium,
        web_stack,
        browsers=[("kweb", {"transport": "sfu", "keyless": True, "minPackets": 150})],
        pythons=[("py", {"transport": "sfu"})],
    )
    (r,) = results
    assert r["ok"], r
    (remote,) = r["last"]["participants"]
    assert remote["transport"] == "sfu"
    assert remote["stats"]["videoPackets"] >= 150, remote  # the SFU forwarded its video ...
    assert remote["stats"]["framesDecoded"] == 0, remote  # ... and nothing of it decoded
    assert remote["keyIndex"] is None, remote
    assert remote["e2ee"] == "waiting-for-key", remote
    assert "E2EE: waiting for this participant's key" in r["badges"], r["badges"]
    assert "E2EE: decrypting" not in r["badges"], r["badges"]
    assert r["last"]["ownKeyIndex"] is not None  # its own key it still has, and sends
    assert py["py"]["kweb"]["frames_decoded"] >= 30, py
    assert py["py"]["kweb"]["transport"] == "sfu", py


async def test_live_switch_mesh_to_sfu_and_back(chromium: Chromium, web_stack: WebStack) -> None:
    """mesh_max 2: a browser and a Python participant start on the mesh; a second Python
    participant joins (three members: everyone moves to the SFU, make-before-break) and
    leaves (back to the mesh), without anyone leaving the call. The longest time the browser
    went without a decoded frame from the first Python participant is measured."""
    tag = secrets.token_hex(3)
    prov = await provision(
        web_stack.synapse.base_url, [f"py-{tag}", f"pz-{tag}", f"web-{tag}"], encrypted=True
    )
    (py_user, py_pw), (pz_user, pz_pw), (web_user, web_pw) = prov.users

    def cfg(name: str, user: str, pw: str) -> ParticipantConfig:
        return _py(prov, name, user, pw, transport="auto", sfu_url=web_stack.sfu_url, mesh_max=2)

    logs = web_stack.synapse.dir / f"switch-{tag}"
    async with participants([cfg("py", py_user, py_pw)], logs) as (py,):
        await py.wait_ready()
        browser = asyncio.create_task(
            _browser(
                chromium,
                web_stack,
                web_user,
                web_pw,
                prov.room_id,
                query="&mesh_max=2&video=320x240",
                expectKinds=["sfu", "mesh"],
                timeoutMs=60000,
            )
        )
        try:

            def carried_by(kind: str) -> Callable[[ParticipantProcess], bool]:
                return lambda p: (
                    _peer(p, web_user).get("transport") == kind
                    and (_peer(p, web_user).get("frames_by_transport", {}).get(kind, 0) >= 10)
                )

            await py.wait_until(carried_by("mesh"), 90)
            async with participants([cfg("pz", pz_user, pz_pw)], logs) as (pz,):
                await pz.wait_ready()
                await py.wait_until(carried_by("sfu"), 90)
                await pz.wait_until(carried_by("sfu"), 90)
                await asyncio.sleep(3)  # the browser decodes both on the SFU too
            # pz has left: back to the mesh.
            await py.wait_until(lambda p: _peer(p, web_user).get("transport") == "mesh", 90)
            await asyncio.sleep(2)
            py_view = _peer(py, web_user)
            py_switches = (py.latest or {}).get("switches", [])
        finally:
            result = await browser
    print(json.dumps({k: result.get(k) for k in ("marks", "badges")}))
    print("browser:", json.dumps(result.get("last"))[:4000])
    print("python:", py_view)
    assert result["ok"], result
    last = result["last"]
    # The browser decoded everyone on the SFU (three members), then on the mesh again.
    assert [(p["kind"], p["reached"]) for p in result["phases"]] == [
        ("sfu", True),
        ("mesh", True),
    ], result["phases"]
    assert result["phases"][0]["participants"] == 2
    kinds = [(s["from"], s["to"]) for s in last["switches"]]
    assert kinds == [(None, "mesh"), ("mesh", "sfu"), ("sfu", "mesh")], last["switches"]
    assert last["kind"] == "mesh"
    (remote,) = last["participants"]
    assert remote["transport"] == "mesh"
    # The badge follows a periodic stats poll, so a snapshot taken just after the switch back
    # may still show the new link's first state; the decoded frames (and the phases above)
    # are the proof, the badge must only not claim a key or decryption problem.
    assert remote["stats"]["framesDecoded"] > 0, remote
    assert remote["e2ee"] in ("decrypting", "waiting-for-media"), remote
    print("switch durations ms:", [s["durationMs"] for s in last["switches"]])
    print("switch gaps ms:", [s["gapMs"] for s in last["switches"]])
    print("longest gap ms: browser", remote["maxGapMs"], "python", py_view.get("max_gap_ms"))
    # Around each live switch (from its start to 3 s after it was done) the browser's video
    # from everyone stood still for less than 2 s.
    for switch in last["switches"][1:]:
        assert switch["gapMs"] < 2000, last["switches"]
    # The Python participant saw the browser's video on both transports.
    assert py_view["frames_by_transport"]["mesh"] >= 10
    assert py_view["frames_by_transport"]["sfu"] >= 10
    # The browser told it, over Olm, that it received it on each new transport
    # (org.matrixrtc.media_received): its old path went on that, not on its ack timeout.
    print("python switches:", py_switches)
    live = [s for s in py_switches if s["from"] is not None]
    assert [(s["from"], s["to"]) for s in live] == [("mesh", "sfu"), ("sfu", "mesh")], live
    for switch in live:
        assert switch["complete"], live
        assert not switch["handover"].endswith(" 0 acknowledged"), live


async def test_sfu_lost_mid_call_the_call_goes_on_as_a_mesh_and_returns(
    chromium: Chromium, web_stack: WebStack, run_dir: Path
) -> None:
    """A browser and a Python participant on an SFU of their own (mesh_max 1: two members use
    the SFU while it works). LiveKit is killed mid-call: both lose it, count it unreachable
    and fall back to the mesh together; LiveKit starts again: a probe gets a token, and both
    move back to it, without anyone leaving the call. The longest time the browser went
    without a decoded frame around each switch is measured (printed, and < 2 s)."""
    tag = secrets.token_hex(3)
    prov = await provision(web_stack.synapse.base_url, [f"py-{tag}", f"web-{tag}"], encrypted=True)
    (py_user, py_pw), (web_user, web_pw) = prov.users
    logs = web_stack.synapse.dir / f"sfu-lost-{tag}"
    lk = LiveKit(run_dir, name=f"lk-lost-{tag}")
    svc = AuthService(run_dir, lk, web_stack.synapse, name=f"sfu-lost-{tag}")
    # The Python participant joins first: its membership is the oldest, so the browser uses
    # its SFU (oldest_membership) rather than the one the homeserver advertises.
    cfg = _py(prov, "py", py_user, py_pw, transport="auto", sfu_url=svc.url, mesh_max=1)

    def frames_on(p: ParticipantProcess, kind: str) -> int:
        return int(_peer(p, web_user).get("frames_by_transport", {}).get(kind, 0))

    def on(kind: str, more_than: int = 10) -> Callable[[ParticipantProcess], bool]:
        return lambda p: (
            (p.latest or {}).get("transport") == kind and frames_on(p, kind) > more_than
        )

    async with lk, svc, participants([cfg], logs) as (py,):
        await py.wait_ready()
        browser = asyncio.create_task(
            _browser(
                chromium,
                web_stack,
                web_user,
                web_pw,
                prov.room_id,
                query="&mesh_max=1&video=320x240",
                minFrames=10,
                expectKinds=["mesh", "sfu"],
                timeoutMs=90000,
            )
        )
        try:
            await py.wait_until(on("sfu"), 90)
            assert lk.pid is not None
            os.kill(lk.pid, signal.SIGKILL)  # the SFU dies: no goodbye to anyone
            await lk.stop()
            await py.wait_until(on("mesh"), 60)
            await asyncio.sleep(2)
            sfu_before = frames_on(py, "sfu")
            await lk.start()
            await py.wait_until(on("sfu", sfu_before + 10), 60)
            await asyncio.sleep(2)
        finally:
            py_view = _peer(py, web_user)
            py_switches = (py.latest or {}).get("switches", [])
            result = await browser
            print(json.dumps({k: result.get(k) for k in ("marks", "phases", "error", "console")}))
            print("browser:", json.dumps(result.get("last") or result.get("snap"))[:5000])
            print("python:", py_view, py_switches)
    assert result["ok"], result
    last = result["last"]
    # The browser decoded the Python participant on the mesh, then on the SFU again.
    assert [(p["kind"], p["reached"]) for p in result["phases"]] == [
        ("mesh", True),
        ("sfu", True),
    ], result["phases"]
    kinds = [(s["from"], s["to"]) for s in last["switches"]]
    assert kinds == [(None, "sfu"), ("sfu", "mesh"), ("mesh", "sfu")], last["switches"]
    assert last["kind"] == "sfu"
    assert last["sfuUnreachable"] is False
    (remote,) = last["participants"]
    assert remote["transport"] == "sfu"
    assert remote["stats"]["framesDecoded"] > 0, remote
    # The Python participant made the same moves for the same reasons.
    # (It started alone, on the mesh, and moved to the SFU when the browser joined.)
    py_moves = [(s["from"], s["to"]) for s in py_switches]
    assert py_moves[-3:] == [("mesh", "sfu"), ("sfu", "mesh"), ("mesh", "sfu")], py_switches
    assert "unreachable" in py_switches[-2]["reason"], py_switches
    assert last["switches"][1]["reason"] == "the SFU is unreachable", last["switches"]
    print("switch gaps ms:", [s["gapMs"] for s in last["switches"]])
    print("longest gap ms: browser", remote["maxGapMs"], "python", py_view.get("max_gap_ms"))
    # Losing the SFU costs the time to notice it (1 s) plus bringing up the mesh; coming back
    # is make-before-break.
    assert last["switches"][1]["gapMs"] < 4000, last["switches"]
    assert last["switches"][2]["gapMs"] < 2000, last["switches"]
    assert py_view["frames_by_transport"]["mesh"] >= 10


async def test_clear_messages_for_login_and_device_failures(
    chromium: Chromium, web_stack: WebStack
) -> None:
    """Never a blank page: an unreachable homeserver, a wrong password and a refused camera
    each get a message that says what to do."""
    tag = secrets.token_hex(3)
    prov = await provision(web_stack.synapse.base_url, [f"web-{tag}"], encrypted=True)
    ((user, pw),) = prov.users
    options = {
        "base": web_stack.client_url,
        "homeserver": web_stack.synapse.base_url,
        "user": user,
        "password": pw,
        "roomId": prov.room_id,
    }
    out = await run_node(
        str(BROWSER_DIR / "web_errors.mjs"), chromium.devtools_url, json.dumps(options), limit=90
    )
    result = json.loads(out.strip().splitlines()[-1])
    print(result)
    assert result["ok"], result
    assert "cannot be reached" in result["unreachable"]
    assert result["blank"] is False
    assert result["wrongPassword"] == "Wrong user name or password."
    assert "permission was denied" in result["permission"]
    assert result["joinDisabled"] is True


async def test_ring_from_python_declined_in_the_browser(
    chromium: Chromium, web_stack: WebStack, run_dir: Path
) -> None:
    """A Python caller (``python -m matrixrtc join --ring --leave-when-unanswered``) rings the
    room (MSC4075); the browser shows who is calling with Answer/Decline, and its Decline
    (MSC4310) is understood: the caller, whom everyone rung declined, leaves and exits 0.

    In an unencrypted room: in an encrypted one the browser shows the ring just as well, but
    the Python caller never reacts to the browser's (Megolm-encrypted) decline - open, see the
    issue's closing note."""
    tag = secrets.token_hex(3)
    names = [f"zed-{tag}", f"web-{tag}"]
    prov = await provision(web_stack.synapse.base_url, names, encrypted=False)
    (caller_user, caller_pw), (web_user, web_pw) = prov.users
    options = {
        "base": web_stack.client_url,
        "homeserver": web_stack.synapse.base_url,
        "user": web_user,
        "password": web_pw,
    }
    page = await asyncio.create_subprocess_exec(
        "node",
        str(BROWSER_DIR / "web_ring.mjs"),
        chromium.devtools_url,
        json.dumps(options),
        stdout=asyncio.subprocess.PIPE,
        cwd=BROWSER_DIR,
    )
    assert page.stdout is not None
    caller: asyncio.subprocess.Process | None = None
    log = run_dir / f"ring-{tag}.log"
    try:
        ready = json.loads(await asyncio.wait_for(page.stdout.readline(), 60))
        assert ready == {"ready": True}
        caller = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "matrixrtc",
            "join",
            "--homeserver",
            prov.base_url,
            "--user",
            caller_user,
            "--room",
            prov.room_id,
            "--state-dir",
            str(run_dir / f"ring-{tag}"),
            "--ring",
            "--leave-when-unanswered",
            "--ring-lifetime-ms",
            "60000",
            "--output",
            "json",
            env={**os.environ, "MATRIXRTC_PASSWORD": caller_pw},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log.open("wb"),
        )
        result = json.loads(await asyncio.wait_for(page.stdout.readline(), 90))
        print(result)
        assert result["ok"], result
        assert result["text"] == f"{caller_user.split(':')[0][1:]} is calling in call-test"
        assert result["buttons"] == ["Answer", "Decline"]
        # Declined by everyone rung: the caller leaves by itself and exits 0.
        assert await asyncio.wait_for(caller.wait(), 30) == 0
    finally:
        for proc in (page, caller):
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
