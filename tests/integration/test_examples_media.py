"""The media examples, each run as its own process in one encrypted call (mesh):
examples/recorder.py records everyone, sealed to a recording key; examples/echo_bot.py echoes;
examples/announce.py joins, plays a numbered clip and leaves. Nothing playable is on disk;
decrypted, the recording holds the clip as the announcer sent it and the same frames from the
echo bot, one second later."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from matrixrtc.calltest.runner import provision
from matrixrtc.devstack import Synapse
from matrixrtc.media.recorder import read_index
from matrixrtc.media.sealed_file import decrypt_file, generate_key_file, read_private_key
from tests.media_samples import read_barcode, read_media, write_media_file

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


async def _start(script: str, env: dict[str, str], *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / script),
        *args,
        cwd=REPO,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _wait_line(proc: asyncio.subprocess.Process, prefix: str, limit_s: float = 40) -> str:
    assert proc.stdout is not None
    async with asyncio.timeout(limit_s):
        while True:
            raw = await proc.stdout.readline()
            if not raw:
                _, err = await proc.communicate()
                raise AssertionError(f"exited before {prefix!r}: {err.decode()[-2000:]}")
            if raw.decode().startswith(prefix):
                return raw.decode()


async def _stop(proc: asyncio.subprocess.Process) -> str:
    if proc.returncode is None:
        proc.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()[-3000:]
    return out.decode()


def _times(path: Path) -> dict[int, float]:
    video, _, _ = read_media(path)
    out: dict[int, float] = {}
    for t, y in video:
        n = read_barcode(y)
        if n is not None and n not in out:
            out[n] = t
    return out


async def test_recorder_echo_bot_and_announce(synapse: Synapse, tmp_path: Path) -> None:
    clip = tmp_path / "clip.webm"
    write_media_file(clip, 4.0, fps=15, beeps=True)
    prov = await provision(synapse.base_url, ["rec", "echo", "ann"], encrypted=True)
    env = [
        {
            "MATRIXRTC_HOMESERVER": prov.base_url,
            "MATRIXRTC_USER": user,
            "MATRIXRTC_PASSWORD": password,
            "MATRIXRTC_ROOM": prov.room_id,
            "MATRIXRTC_TRANSPORT": "mesh",
        }
        for user, password in prov.users
    ]
    rec_env, echo_env, ann_env = env
    rec_env["MATRIXRTC_RECORDING_KEY"] = generate_key_file(tmp_path / "key")
    recorder = await _start("recorder.py", rec_env, str(tmp_path / "rec"), "60")
    echo = await _start("echo_bot.py", echo_env, "60")
    try:
        await _wait_line(recorder, "recording into")
        await _wait_line(echo, "echoing")
        announce = await _start("announce.py", ann_env, str(clip))
        out, err = await asyncio.wait_for(announce.communicate(), 60)
        assert announce.returncode == 0, err.decode()[-3000:]
        assert "done: " in out.decode()
        await asyncio.sleep(2.5)  # the echo's last second, and the leave
    finally:
        echo_out = await _stop(echo)
        rec_out = await _stop(recorder)
    assert f"echoing {ann_env['MATRIXRTC_USER']}" in echo_out
    assert not (tmp_path / "rec" / "index.json").exists()  # who was there is sealed too
    sealed_index = (tmp_path / "rec" / "index.json.sealed").read_bytes()
    assert ann_env["MATRIXRTC_USER"].encode() not in sealed_index
    index = read_index(tmp_path / "rec", read_private_key(tmp_path / "key"))
    by_user = {p["user_id"]: p for p in index["participants"]}
    print(rec_out, json.dumps(index, indent=1)[:3000])
    assert index["encrypted"] is True
    ann = by_user[ann_env["MATRIXRTC_USER"]]["segments"][0]
    bot = by_user[echo_env["MATRIXRTC_USER"]]["segments"][0]
    key = read_private_key(tmp_path / "key")
    plain = {}
    for seg in (ann, bot):
        sealed = tmp_path / "rec" / seg["file"]
        assert sealed.name.endswith(".webm.sealed")
        assert b"\x1a\x45\xdf\xa3" not in sealed.read_bytes()  # no WebM (EBML) on disk
        plain[seg["file"]] = tmp_path / sealed.name.removesuffix(".sealed")
        decrypt_file(sealed, plain[seg["file"]], key)
    sent = _times(plain[ann["file"]])
    echoed = _times(plain[bot["file"]])
    assert len(sent) >= 30, sorted(sent)  # at least half of the clip's 60 frames (loaded CI box)
    assert len(echoed) >= 25, sorted(echoed)

    def wall(seg: dict[str, str]) -> float:
        return datetime.datetime.fromisoformat(seg["joined_at"]).timestamp()

    delays = [
        (wall(bot) + echoed[n]) - (wall(ann) + sent[n]) for n in sorted(set(sent) & set(echoed))
    ]
    delay = float(np.median(delays))
    print("echo delay", delay)
    # 1 s of the bot plus two trips through the call; a loaded box adds a few hundred ms.
    assert 0.95 <= delay <= 2.5, delays
