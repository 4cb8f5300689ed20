"""What the controller's admin source costs per room and interval (Synapse admin room-state API).

Run inside the private network namespace (it starts its own Synapse)::

    ./scripts/in-netns .venv/bin/python bench/controller_admin.py [--json] [--members 100]

One room with ``--members`` joined users, ``--calls`` of them with a state-form call
membership, and ``--other-state`` further state events (widgets, bridges, space children:
what real rooms carry beside members). Read ``--reads`` times each way, as the admin source
does once per interval and room with a LiveKit call:

- ``full``: ``GET /_synapse/admin/v1/rooms/{room}/state`` (what the source read before);
- ``typed``: the same API with ``?type=`` for ``org.matrix.msc3401.call.member`` and
  ``m.room.member`` (what it reads now; ``m.room.create`` once per room, it never changes).

Printed: response bytes and milliseconds per interval for each (median of the reads).
Synapse's admin API has no filter by state key nor a "changes since" form, so the members'
events are the floor of this source's cost; the /sync source reads nothing per interval.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp

from matrixrtc.devstack import Synapse, new_run_dir
from tests.integration.test_sfu_controller import CALL_MEMBER, register_admin


async def run(members: int, calls: int, other_state: int, reads: int) -> dict[str, Any]:
    run_dir = new_run_dir(prefix="bench-controller-admin")
    async with Synapse(run_dir) as hs:
        admin = await register_admin(hs, "costadmin")
        owner = await hs.register("costowner")
        users = await asyncio.gather(*(hs.register(f"cost{i}") for i in range(members)))
        room = await hs.create_call_room(owner, invite=list(users))
        sem = asyncio.Semaphore(8)

        async def join(i: int) -> None:
            async with sem:
                u = users[i]
                await hs.join_room(u, room)
                if i < calls:
                    key = f"_{u.user_id}_{u.device_id}_m.call"
                    content = {
                        "application": "m.call",
                        "call_id": "",
                        "scope": "m.room",
                        "device_id": u.device_id,
                        "expires": 3_600_000,
                        "created_ts": int(time.time() * 1000),
                        "focus_active": {"type": "livekit", "focus_selection": "oldest_membership"},
                        "foci_preferred": [
                            {
                                "type": "livekit",
                                "livekit_service_url": "https://sfu.example",
                                "livekit_alias": room,
                            }
                        ],
                    }
                    await hs.put_state(u, room, CALL_MEMBER, key, content)

        await asyncio.gather(*(join(i) for i in range(members)))
        for i in range(other_state):
            await hs.put_state(
                owner,
                room,
                "im.vector.modular.widgets",
                f"widget{i}",
                {"type": "m.custom", "url": f"https://example.org/w/{i}", "name": f"w{i}"},
            )
        base = f"{hs.base_url}/_synapse/admin/v1/rooms/{quote(room, safe='')}/state"
        headers = {"Authorization": f"Bearer {admin.access_token}"}

        async def read(
            session: aiohttp.ClientSession, urls: Sequence[str]
        ) -> tuple[int, float, int]:
            t0 = time.perf_counter()
            bodies = await asyncio.gather(*(_get(session, u) for u in urls))
            ms = (time.perf_counter() - t0) * 1000
            return sum(len(b) for b in bodies), ms, sum(len(json.loads(b)["state"]) for b in bodies)

        full_urls = [base]
        typed_urls = [f"{base}?type={quote(t, safe='')}" for t in (CALL_MEMBER, "m.room.member")]
        out: dict[str, Any] = {
            "members": members,
            "call_members": calls,
            "other_state": other_state,
        }
        async with aiohttp.ClientSession(headers=headers) as session:
            for name, urls in (("full", full_urls), ("typed", typed_urls)):
                await read(session, urls)  # warm Synapse's caches
                got = [await read(session, urls) for _ in range(reads)]
                out[name] = {
                    "bytes": got[0][0],
                    "events": got[0][2],
                    "ms_median": round(statistics.median(g[1] for g in got), 2),
                }
    return out


async def _get(session: aiohttp.ClientSession, url: str) -> bytes:
    async with session.get(url) as r:
        r.raise_for_status()
        return await r.read()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--members", type=int, default=100, help="joined users (100)")
    parser.add_argument("--calls", type=int, default=8, help="of them in the call (8)")
    parser.add_argument("--other-state", type=int, default=30, help="other state events (30)")
    parser.add_argument("--reads", type=int, default=20, help="reads per way (20)")
    args = parser.parse_args(argv)
    report = asyncio.run(run(args.members, args.calls, args.other_state, args.reads))
    if args.json:
        print(json.dumps(report))
    else:
        for name in ("full", "typed"):
            r = report[name]
            print(
                f"{name:5} {r['events']:4} events {r['bytes']:7} bytes {r['ms_median']:7} ms "
                f"per room and interval ({report['members']} members, "
                f"{report['call_members']} in the call, {report['other_state']} other state)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
