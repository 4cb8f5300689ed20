"""The real local stack: each service comes up, does its job, and leaves nothing behind."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from asyncio.subprocess import Process
from pathlib import Path
from typing import IO

import aiohttp
import pytest
from aiohttp import web
from livekit import api, rtc

from matrixrtc.cli import COMMANDS
from matrixrtc.devstack import (
    HomeserverRequestError,
    LiveKit,
    Redis,
    Synapse,
    leftover_processes,
)
from matrixrtc.devstack._process import ManagedProcess
from matrixrtc.devstack.coturn import Coturn
from matrixrtc.errors import ServiceStartError
from tests.conftest import UserFactory

CALL_MEMBER = "org.matrix.msc3401.call.member"


def _member_key(user_id: str, device_id: str) -> str:
    return f"_{user_id}_{device_id}_m.call"


async def test_synapse_call_room_and_delayed_leave_fires(
    synapse: Synapse, user_factory: UserFactory
) -> None:
    alice = await user_factory("alice")
    bob = await user_factory("bob")
    room = await synapse.create_call_room(alice, invite=[bob], name="call")

    joined = await synapse.request("GET", "/_matrix/client/v3/joined_rooms", user=bob)
    assert room in joined["joined_rooms"]
    # Bob has the default power level 0 and may still publish his call membership.
    bob_key = _member_key(bob.user_id, bob.device_id)
    await synapse.put_state(bob, room, CALL_MEMBER, bob_key, {"application": "m.call"})

    key = _member_key(alice.user_id, alice.device_id)
    await synapse.put_state(alice, room, CALL_MEMBER, key, {"application": "m.call"})
    t0 = time.monotonic()
    scheduled = await synapse.put_state(
        alice, room, CALL_MEMBER, key, {}, params={"org.matrix.msc4140.delay": "3000"}
    )
    assert scheduled.get("delay_id")
    assert await synapse.get_state(bob, room, CALL_MEMBER, key) == {"application": "m.call"}
    while (await synapse.get_state(bob, room, CALL_MEMBER, key)) != {}:
        assert time.monotonic() - t0 < 15, "delayed leave did not fire within 15 s"
        await asyncio.sleep(0.1)
    fired_after = time.monotonic() - t0
    # Not before its delay; the upper bound leaves room for a loaded CI machine.
    assert 2.9 < fired_after < 8, fired_after


async def test_synapse_versions_and_restart_keep_data(
    synapse: Synapse, user_factory: UserFactory
) -> None:
    versions = await synapse.request("GET", "/_matrix/client/versions")
    for feature in ("org.matrix.msc4140", "org.matrix.msc4143", "org.matrix.msc4354"):
        assert versions["unstable_features"].get(feature) is True, feature
    carol = await user_factory("carol")
    room = await synapse.create_call_room(carol, room_version="org.matrix.msc3757.11")
    port = synapse.port

    await synapse.restart()

    assert synapse.port == port
    again = await synapse.login(carol.user_id, carol.password)
    assert again.user_id == carol.user_id
    create = await synapse.get_state(again, room, "m.room.create", "")
    assert create is not None
    assert create["room_version"] == "org.matrix.msc3757.11"
    with pytest.raises(HomeserverRequestError) as err:
        await synapse.login(carol.user_id, "wrong password")
    assert err.value.status == 403


async def test_synapse_rate_limits_are_raised(synapse: Synapse, user_factory: UserFactory) -> None:
    erin = await user_factory("erin")
    room = await synapse.create_call_room(erin)
    # Synapse's default rc_message (burst 10, 0.2/s) would answer 429 long before 30.
    for n in range(30):
        await synapse.request(
            "PUT",
            f"/_matrix/client/v3/rooms/{room}/send/m.room.message/burst-{n}",
            user=erin,
            json_body={"msgtype": "m.text", "body": str(n)},
        )


async def test_synapse_transport_and_extra_config_deep_merged(run_dir: Path) -> None:
    focus_url = "http://127.0.0.1:9/livekit/jwt"
    extra = {"experimental_features": {"msc4140_max_delayed_events_per_user": 1}}
    async with Synapse(
        run_dir, livekit_service_url=focus_url, extra_config=extra, name="synapse-rtc"
    ) as hs:
        user = await hs.register("dana")
        # The merge kept the other experimental flags: MSC4143 still answers.
        transports = await hs.request(
            "GET", "/_matrix/client/unstable/org.matrix.msc4143/rtc/transports", user=user
        )
        assert {"type": "livekit", "livekit_service_url": focus_url} in transports["rtc_transports"]
        # ...and the override took effect: a second pending delayed event is refused.
        room = await hs.create_call_room(user)
        delay = {"org.matrix.msc4140.delay": "60000"}
        await hs.put_state(user, room, CALL_MEMBER, "_a", {}, params=delay)
        with pytest.raises(HomeserverRequestError) as err:
            await hs.put_state(user, room, CALL_MEMBER, "_b", {}, params=delay)
        assert err.value.status in (400, 429), err.value
        assert hs.startup_seconds is not None
        print(f"synapse start-up: {hs.startup_seconds:.2f} s")


async def test_livekit_room_participant_and_no_auto_create(livekit: LiveKit) -> None:
    assert len(livekit.api_secret) >= 32
    async with api.LiveKitAPI(livekit.http_url, livekit.api_key, livekit.api_secret) as lkapi:
        created = await lkapi.room.create_room(api.CreateRoomRequest(name="devstack-room"))
        assert created.name == "devstack-room"

        token = (
            api.AccessToken(livekit.api_key, livekit.api_secret)
            .with_identity("py-participant")
            .with_grants(api.VideoGrants(room_join=True, room="devstack-room"))
            .to_jwt()
        )
        room = rtc.Room()
        await room.connect(livekit.url, token, rtc.RoomOptions(connect_timeout=5))
        try:
            listed = await lkapi.room.list_participants(
                api.ListParticipantsRequest(room="devstack-room")
            )
            assert [p.identity for p in listed.participants] == ["py-participant"]
        finally:
            await room.disconnect()

        # auto_create is off: a join token alone cannot bring a room into existence.
        stray = (
            api.AccessToken(livekit.api_key, livekit.api_secret)
            .with_identity("stray")
            .with_grants(api.VideoGrants(room_join=True, room="no-such-room"))
            .to_jwt()
        )
        other = rtc.Room()
        with pytest.raises(rtc.ConnectError, match="room does not exist"):
            await other.connect(livekit.url, stray, rtc.RoomOptions(connect_timeout=5))
        rooms = await lkapi.room.list_rooms(api.ListRoomsRequest())
        assert "no-such-room" not in [r.name for r in rooms.rooms]
    assert livekit.startup_seconds is not None
    print(f"livekit start-up: {livekit.startup_seconds:.2f} s")


async def test_livekit_stopped_right_after_start_exits_on_sigterm(run_dir: Path) -> None:
    # livekit-server ignores a SIGTERM in its first 100 ms of serving; readiness waits that out,
    # otherwise this stop would run into the 5 s grace period and end in SIGKILL.
    async with LiveKit(run_dir, name="lk-quick-stop"):
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 2


async def test_livekit_posts_signed_webhooks(run_dir: Path) -> None:
    received: asyncio.Queue[api.WebhookEvent] = asyncio.Queue()
    receiver: api.WebhookReceiver | None = None

    async def hook(request: web.Request) -> web.Response:
        assert receiver is not None
        body = await request.text()
        received.put_nowait(receiver.receive(body, request.headers["Authorization"]))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/sfu_webhook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/sfu_webhook"
        async with LiveKit(run_dir, webhook_urls=[url], name="lk-webhooks") as lk:
            receiver = api.WebhookReceiver(api.TokenVerifier(lk.api_key, lk.api_secret))
            async with api.LiveKitAPI(lk.http_url, lk.api_key, lk.api_secret) as lkapi:
                await lkapi.room.create_room(api.CreateRoomRequest(name="hooked"))
            event = await asyncio.wait_for(received.get(), 10)
            assert event.event == "room_started"
            assert event.room.name == "hooked"
    finally:
        await runner.cleanup()


async def test_redis_restart_keeps_data(redis: Redis) -> None:
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis.url)
    try:
        await client.set("devstack-key", "kept")
        await redis.restart()
        # The old connection died with the server; a new one sees the data.
        await client.connection_pool.disconnect()
        assert await client.get("devstack-key") == b"kept"
    finally:
        await client.aclose()


async def test_coturn_allocates_a_relay_with_its_credentials(coturn: Coturn) -> None:
    from aioice import stun, turn

    assert coturn.uris[0] == f"turn:127.0.0.1:{coturn.port}?transport=udp"
    server = ("127.0.0.1", coturn.port)
    transport, _ = await turn.create_turn_endpoint(
        asyncio.DatagramProtocol, server, coturn.username, coturn.password
    )
    try:
        relayed = transport.get_extra_info("sockname")
        assert relayed[0] == "127.0.0.1"
    finally:
        transport.close()

    with pytest.raises(stun.TransactionFailed):
        await turn.create_turn_endpoint(
            asyncio.DatagramProtocol, server, coturn.username, "wrong password"
        )


async def test_start_failure_raises_with_log_tail(run_dir: Path) -> None:
    before = leftover_processes()
    broken = LiveKit(run_dir, extra_config={"rtc": {"udp_port": "not-a-port"}}, name="lk-broken")
    with pytest.raises(ServiceStartError) as err:
        async with broken:
            pass
    message = str(err.value)
    assert message.startswith("lk-broken exited with code")
    # The tail of the service's own log explains why.
    assert "not-a-port" in message
    assert broken.pid is None
    assert leftover_processes() == before


async def test_stop_kills_the_whole_group_even_if_sigterm_is_ignored(run_dir: Path) -> None:
    marker = run_dir / "stubborn-ready"
    script = (
        "import os, signal, time, pathlib\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "if os.fork() == 0:\n"
        "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "    time.sleep(60)\n"
        f"pathlib.Path({str(marker)!r}).touch()\n"
        "time.sleep(60)\n"
    )
    proc = ManagedProcess(
        name="stubborn",
        argv=[sys.executable, "-c", script],
        log_path=run_dir / "stubborn.log",
        cwd=run_dir,
        stop_grace=0.3,
    )

    async def ready() -> bool:
        return marker.exists()

    await proc.start(ready, 10)
    pgid = proc.pid
    assert pgid is not None
    assert pgid in leftover_processes()
    await proc.stop()
    assert pgid not in leftover_processes()


async def _start_cli(*args: str, stderr: int | IO[bytes] = asyncio.subprocess.PIPE) -> Process:
    # Its own session: signals sent here reach only the CLI, as a Ctrl-C would.
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "matrixrtc",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr,
        start_new_session=True,
    )


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_stack_up_serves_ready_logins_and_stops_on_signal(
    run_dir: Path, sig: signal.Signals
) -> None:
    cli_dir = run_dir / f"cli-{sig.name}"
    cli_dir.mkdir()
    with (cli_dir / "cli.log").open("wb") as cli_log:
        proc = await _start_cli("stack", "up", "--json", "--run-dir", str(cli_dir), stderr=cli_log)
    pids: list[int] = []
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        info = json.loads(line)
        pids = [info["synapse"]["pid"], info["livekit"]["pid"]]
        assert [u["user_id"] for u in info["users"]] == ["@alice:localhost", "@bob:localhost"]
        base = info["synapse"]["base_url"]
        async with aiohttp.ClientSession() as http:
            for u in info["users"]:
                headers = {"Authorization": f"Bearer {u['access_token']}"}
                async with http.get(
                    f"{base}/_matrix/client/v3/account/whoami", headers=headers
                ) as r:
                    assert (await r.json())["user_id"] == u["user_id"]
        lk = info["livekit"]
        async with api.LiveKitAPI(lk["http_url"], lk["api_key"], lk["api_secret"]) as lkapi:
            rooms = await lkapi.room.list_rooms(api.ListRoomsRequest())
            assert list(rooms.rooms) == []

        proc.send_signal(sig)
        await asyncio.wait_for(proc.wait(), 15)
        assert proc.returncode == 0
        assert all(_gone(pid) for pid in pids)
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        for pid in pids:
            if not _gone(pid):
                os.killpg(pid, signal.SIGKILL)


async def test_every_command_has_help() -> None:
    async def usage(*args: str) -> tuple[int | None, str]:
        proc = await _start_cli(*args, "--help")
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        return proc.returncode, out.decode()

    commands = [(), *((name,) for name in COMMANDS), ("stack", "up")]
    results = await asyncio.gather(*(usage(*c) for c in commands))
    for command, (code, out) in zip(commands, results, strict=True):
        assert code == 0, command
        assert out.startswith("usage: python -m matrixrtc " + " ".join(command)), command


async def test_demo_prints_its_summary(run_dir: Path) -> None:
    # A 6 s call instead of the demo's 20 s: the report's shape and non-zero frames with no
    # decrypt failure are what is checked, not how many frames (saves ~14 s of CI).
    proc = await _start_cli("demo", "--duration", "6", "--run-dir", str(run_dir / "demo"))
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    text = out.decode()
    assert proc.returncode == 0, text + err.decode()[-2000:]
    # The demo is the mesh call test (matrixrtc/commands/demo.py): three participants, E2EE.
    report = text.split("\nreport\n", 1)[1]
    assert "3 participants" in report
    assert "E2EE on" in report
    rows = [line.split() for line in report.splitlines() if re.match(r"p\d ", line)]
    assert [r[0] for r in rows] == ["p1", "p2", "p3"]
    assert all(int(r[-2]) > 0 and r[-1] == "0" for r in rows), report  # frames, decrypt fails
    assert "total" in report


WEB_INDEX = Path(__file__).resolve().parents[2] / "web" / "dist" / "index.html"


async def test_web_serves_the_client_prints_url_and_logins_and_stops_by_itself(
    run_dir: Path,
) -> None:
    """``make demo``'s second half (``matrixrtc web --for``): the URL serves the client, the
    logins work on the printed homeserver, and it stops by itself."""
    if not WEB_INDEX.is_file():
        pytest.fail("web/dist is missing: run `make bootstrap`")
    proc = await _start_cli(
        "web",
        "--port",
        "0",
        "--participant",
        "none",
        "--for",
        "4",
        "--run-dir",
        str(run_dir / "web"),
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(60):
            while not lines or not lines[-1].startswith("Ctrl-C"):
                line = (await proc.stdout.readline()).decode()
                assert line, "".join(lines)
                lines.append(line.strip())
            text = "\n".join(lines)
            (url,) = re.findall(r"^open +(http://127\.0\.0\.1:\d+/\?hs=(\S+))$", text, re.M)
            logins = re.findall(r"^login +(\S+) +password (\S+)$", text, re.M)
            assert [u for u, _ in logins] == ["alice", "bob"], text
            async with aiohttp.ClientSession() as http:
                async with http.get(url[0]) as resp:
                    assert resp.status == 200
                    assert '<script type="module"' in await resp.text()
                async with http.post(
                    url[1] + "/_matrix/client/v3/login",
                    json={
                        "type": "m.login.password",
                        "identifier": {"type": "m.id.user", "user": logins[0][0]},
                        "password": logins[0][1],
                    },
                ) as resp:
                    assert resp.status == 200, await resp.text()
            started = time.monotonic()
            assert await proc.wait() == 0
            assert time.monotonic() - started < 15
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


async def test_start_timeout_and_cancellation_leave_nothing_running(run_dir: Path) -> None:
    def sleeper(name: str) -> ManagedProcess:
        return ManagedProcess(
            name=name,
            argv=[
                sys.executable,
                "-c",
                "import time; print('sleeping', flush=True); time.sleep(60)",
            ],
            log_path=run_dir / f"{name}.log",
            cwd=run_dir,
        )

    async def never_ready() -> bool:
        raise aiohttp.ServerDisconnectedError()  # not an OSError: still just "not ready"

    before = leftover_processes()
    slow = sleeper("never-ready")
    with pytest.raises(ServiceStartError, match="not ready after") as err:
        await slow.start(never_ready, 0.5)
    assert "ServerDisconnectedError" in str(err.value)
    assert "sleeping" in str(err.value)  # the log tail
    assert leftover_processes() == before

    probing = asyncio.Event()

    async def probed() -> bool:
        probing.set()
        return False

    cancelled = sleeper("cancelled")
    task = asyncio.create_task(cancelled.start(probed, 30))
    await asyncio.wait_for(probing.wait(), 10)
    assert cancelled.pid is not None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled.pid is None
    assert leftover_processes() == before
