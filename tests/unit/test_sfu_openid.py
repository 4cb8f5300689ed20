"""Server-name grammar, federation destination order, the OpenID cache, stored-job format.

The cache tests talk to a tiny in-process *fake* userinfo endpoint that counts calls, so the
clock can be injected; the real exchange with Synapse is in tests/integration/.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import pytest_asyncio
from aiohttp import web

from sfu.auth.openid import Destination, OpenIDValidator, federation_destinations
from sfu.common.netguard import AddressPolicy, GuardedHttp, StaticResolver
from sfu.common.servername import ServerName, parse_server_name
from sfu.controller.store import JobParams, StoredJob


def test_server_name_grammar() -> None:
    assert parse_server_name("example.org") == ServerName("example.org", "example.org", None, False)
    assert parse_server_name("example.org:8448") == ServerName(
        "example.org:8448", "example.org", 8448, False
    )
    assert parse_server_name("1.2.3.4") == ServerName("1.2.3.4", "1.2.3.4", None, True)
    v6 = parse_server_name("[2001:db8::1]:443")
    assert v6 is not None
    assert v6.host == "2001:db8::1"
    assert v6.port == 443
    assert v6.is_ip
    assert v6.url_host == "[2001:db8::1]"
    for bad in (
        "",
        "exa mple.org",
        "a/b",
        "user@host",
        "host:0",
        "host:65536",
        "[::1",
        "[fe80::1%eth0]",
        "[nothex]:1",
        ":8448",
        "ex\u00e4mple.org",
        "a" * 300,
    ):
        assert parse_server_name(bad) is None, bad


async def _dests(raw: str, resolver: StaticResolver, wk: str | None = None) -> list[Destination]:
    name = parse_server_name(raw)
    assert name is not None

    async def well_known(_n: ServerName) -> str | None:
        return wk

    return await federation_destinations(
        name,
        overrides={"private.org": "http://10.1.1.1:8008/"},
        resolver=resolver,
        well_known=well_known,
    )


async def test_destination_order() -> None:
    r = StaticResolver(
        srv={
            "_matrix-fed._tcp.fed.org": [("a.fed.org", 443), ("b.fed.org", 8443)],
            "_matrix._tcp.old.org": [("m.old.org", 8448)],
            "_matrix._tcp.both.org": [("legacy.both.org", 1)],
            "_matrix-fed._tcp.both.org": [("new.both.org", 2)],
            "_matrix-fed._tcp.deleg.net": [("srv.deleg.net", 9000)],
        }
    )
    assert await _dests("private.org", r) == [Destination("http://10.1.1.1:8008")]
    assert await _dests("1.2.3.4", r) == [Destination("https://1.2.3.4:8448", "1.2.3.4")]
    assert await _dests("[::1]:99", r) == [Destination("https://[::1]:99", "[::1]:99")]
    assert await _dests("x.org:1234", r) == [
        Destination("https://x.org:1234", "x.org:1234", "x.org")
    ]
    # well-known wins over SRV and is re-resolved without well-known
    assert await _dests("fed.org", r, "deleg.net:444") == [
        Destination("https://deleg.net:444", "deleg.net:444", "deleg.net")
    ]
    assert await _dests("fed.org", r, "deleg.net") == [
        Destination("https://srv.deleg.net:9000", "deleg.net", "deleg.net")
    ]
    assert await _dests("fed.org", r) == [
        Destination("https://a.fed.org:443", "fed.org", "fed.org"),
        Destination("https://b.fed.org:8443", "fed.org", "fed.org"),
    ]
    assert await _dests("old.org", r) == [
        Destination("https://m.old.org:8448", "old.org", "old.org")
    ]
    assert await _dests("both.org", r) == [
        Destination("https://new.both.org:2", "both.org", "both.org")
    ]
    assert await _dests("none.org", r) == [
        Destination("https://none.org:8448", "none.org", "none.org")
    ]


@dataclass
class FakeUserinfo:
    """Counts calls; answers ``sub`` for known tokens, 401 otherwise."""

    subs: dict[str, str] = field(default_factory=dict)
    calls: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        sub = self.subs.get(request.query.get("access_token", ""))
        if sub is None:
            return web.json_response({"errcode": "M_UNKNOWN_TOKEN"}, status=401)
        return web.json_response({"sub": sub})


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest_asyncio.fixture
async def userinfo() -> AsyncIterator[tuple[FakeUserinfo, str]]:
    fake = FakeUserinfo({"good": "@a:hs.test", "foreign": "@a:elsewhere"})
    app = web.Application()
    app.router.add_get("/_matrix/federation/v1/openid/userinfo", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield fake, f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


@pytest.mark.parametrize("cache_size", [0, 2])
async def test_cache_lifetime_failures_and_bound(
    userinfo: tuple[FakeUserinfo, str], cache_size: int
) -> None:
    fake, base = userinfo
    resolver = StaticResolver()
    http = GuardedHttp(
        resolver, AddressPolicy().with_hosts(["127.0.0.1"]), ssl.create_default_context()
    )
    await http.start()
    clock = Clock()
    v = OpenIDValidator(
        http,
        resolver,
        overrides={"hs.test": base},
        cache_size=cache_size,
        max_ttl=3600,
        failure_ttl=5,
        clock=clock,
    )
    try:
        assert await v.user_id("good", "hs.test", 60) == "@a:hs.test"
        assert await v.user_id("good", "hs.test", 60) == "@a:hs.test"
        assert fake.calls == (2 if cache_size == 0 else 1)
        if cache_size == 0:
            return
        clock.now += 59
        assert await v.user_id("good", "hs.test", 60) == "@a:hs.test"
        assert fake.calls == 1
        clock.now += 2  # beyond expires_in: asked again
        assert await v.user_id("good", "hs.test", 60) == "@a:hs.test"
        assert fake.calls == 2
        # a later request claiming a shorter life shortens the cached one
        await v.user_id("good", "hs.test", 10)
        clock.now += 11
        await v.user_id("good", "hs.test", 60)
        assert fake.calls == 3
        # failures: remembered briefly
        assert await v.user_id("bad", "hs.test", 3600) is None
        assert await v.user_id("bad", "hs.test", 3600) is None
        assert fake.calls == 4
        clock.now += 6
        assert await v.user_id("bad", "hs.test", 3600) is None
        assert fake.calls == 5
        # sub from another server is refused (and not cached as valid)
        assert await v.user_id("foreign", "hs.test", 3600) is None
        # bounded: with room for 2 entries, the oldest is evicted
        fake.subs.update(t1="@1:hs.test", t2="@2:hs.test")
        calls = fake.calls
        for tok in ("t1", "t2", "good"):
            await v.user_id(tok, "hs.test", 3600)
        await v.user_id("t1", "hs.test", 3600)
        assert fake.calls == calls + 4
    finally:
        await v.close()
        await http.close()


def test_stored_job_reads_lk_jwt_service_format() -> None:
    raw = (
        '{"Params":{"DelayId":"syd_abc","DelayTimeout":8000000000,"ServerName":"example.org",'
        '"LiveKitRoom":"room","LiveKitIdentity":"ident"},"RestartedAt":"2026-11-26T15:00:00.123456789Z"}'
    )
    job = StoredJob.from_json(raw)
    assert job is not None
    assert job.params == JobParams("example.org", "syd_abc", 8000, "room", "ident")
    assert job.restarted_at == pytest.approx(1795705200.123456)
    assert not job.seen_connected
    again = StoredJob.from_json(job.to_json())
    assert again == job
    assert StoredJob.from_json("{}") is None
    assert StoredJob.from_json(raw.replace("8000000000", "0")) is None
