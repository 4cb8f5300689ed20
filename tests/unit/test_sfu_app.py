"""The service's HTTP surface in-process: CORS, methods, error table, limits, SSRF, webhooks.

OpenID lookups here never reach a homeserver: names resolve through an empty
:class:`StaticResolver` (so nothing resolves) or are refused by the SSRF guard, which is what
these tests are about. Real OpenID validation is in tests/integration/test_sfu_service.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings
from hypothesis import strategies as st
from livekit import api as lkapi

from sfu.auth.app import create_app, create_metrics_app
from sfu.auth.config import Config
from sfu.common import metrics
from sfu.common.netguard import AddressPolicy, StaticResolver

KEY, SECRET = "testkey", "testsecret-testsecret-testsecret-0123"


def make_config(**env: str) -> Config:
    base = {
        "LIVEKIT_URL": "ws://127.0.0.1:9",  # never contacted: no full-access user here
        "LIVEKIT_KEY": KEY,
        "LIVEKIT_SECRET": SECRET,
        "LIVEKIT_FULL_ACCESS_HOMESERVERS": "full.invalid",
        "LIVEKIT_JWT_BIND": "127.0.0.1:0",
        "MATRIXRTC_SFU_RATE_LIMIT": "0",
    }
    base.update(env)
    return Config.from_env(base)


async def client_for(
    config: Config, resolver: StaticResolver | None = None, allow: tuple[str, ...] = ()
) -> TestClient[Any, Any]:
    # Unit tests run outside the private namespace: no global address may ever be contacted,
    # whatever server name a test (or hypothesis) makes up.
    policy = AddressPolicy.from_entries(allow)
    policy = AddressPolicy(policy.allowed_hosts, policy.allowed_networks, allow_global=False)
    app = create_app(config, resolver=resolver or StaticResolver(), address_policy=policy)
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    return client


@pytest_asyncio.fixture
async def client() -> AsyncIterator[TestClient[Any, Any]]:
    c = await client_for(make_config())
    yield c
    await c.close()


def body(server: str = "example.org", **extra: object) -> dict[str, object]:
    return {
        "room_id": "!r:example.org",
        "slot_id": "m.call#ROOM",
        "openid_token": {
            "access_token": "secret-token",
            "token_type": "Bearer",
            "matrix_server_name": server,
            "expires_in": 3600,
        },
        "member": {"id": "m", "claimed_user_id": f"@a:{server}", "claimed_device_id": "D"},
        **extra,
    }


CORS = {
    "Content-Type": "application/json",
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "POST",
    "Access-Control-Allow-Headers": "Accept, Content-Type, Content-Length, Accept-Encoding, "
    "X-CSRF-Token",
}


@pytest.mark.parametrize("path", ["/sfu/get", "/get_token", "/delegate_delayed_leave"])
async def test_cors_options_and_wrong_methods(client: TestClient[Any, Any], path: str) -> None:
    resp = await client.options(path)
    assert resp.status == 200
    assert await resp.read() == b""
    for k, v in CORS.items():
        assert resp.headers[k] == v
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        resp = await client.request(method, path)
        assert resp.status == 405, method
        assert await resp.read() == b""
        assert resp.headers["Access-Control-Allow-Origin"] == "*"


async def test_healthz_metrics_and_webhook_methods(client: TestClient[Any, Any]) -> None:
    assert (await client.get("/healthz")).status == 200
    assert (await client.head("/healthz")).status == 200
    assert (await client.post("/healthz")).status == 405
    assert (await client.get("/sfu_webhook")).status == 405
    # no MATRIXRTC_SFU_METRICS_TOKEN: the public listener has no /metrics
    assert (await client.get("/metrics")).status == 404


async def test_metrics_need_the_bearer_token_or_the_metrics_listener() -> None:
    c = await client_for(make_config(MATRIXRTC_SFU_METRICS_TOKEN="s3cret"))
    try:
        assert (await c.get("/metrics")).status == 401
        resp = await c.get("/metrics", headers={"Authorization": "Bearer wrong"})
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == "Bearer"
        resp = await c.get("/metrics", headers={"Authorization": "Bearer s3cret"})
        assert resp.status == 200
        assert "matrixrtc_sfu_requests_total" in await resp.text()
    finally:
        await c.close()
    side: TestClient[Any, Any] = TestClient(TestServer(create_metrics_app()))
    await side.start_server()
    try:
        resp = await side.get("/metrics")
        assert resp.status == 200
        assert "matrixrtc_sfu_requests_total" in await resp.text()
        assert (await side.get("/get_token")).status == 404  # nothing else there
    finally:
        await side.close()


def test_metrics_bind_config() -> None:
    assert make_config().metrics_bind == ("127.0.0.1", 9464)
    assert make_config(MATRIXRTC_SFU_METRICS_BIND="off").metrics_bind is None
    assert make_config(MATRIXRTC_SFU_METRICS_BIND=":9100").metrics_bind == (None, 9100)


async def expect(
    client: TestClient[Any, Any], path: str, data: bytes, status: int, errcode: str
) -> dict[str, Any]:
    resp = await client.post(path, data=data)
    text = await resp.text()
    assert resp.status == status, text
    assert text.endswith("\n")
    obj = json.loads(text)
    assert obj["errcode"] == errcode, obj
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    return dict(obj)


async def test_error_table_before_openid(client: TestClient[Any, Any]) -> None:
    for path in ("/get_token", "/sfu/get", "/delegate_delayed_leave"):
        for raw in (
            b"",
            b"{",
            b"[1]",
            b'{"nope": 1}',
            b'{"room_id": 1}',
            # strict as lk-jwt-service's Rust port: each of these was a 200/401 before
            b"null",
            b'{"ROOM_ID": "!r:x"}',
            b'{"room_id": "!a:x", "room_id": "!b:x"}',
            b"{} {}",
            b'{"room_id": "\\ud800"}',
            b'{"room_id": "\xff"}',
        ):
            obj = await expect(client, path, raw, 400, "M_NOT_JSON")
            assert obj["error"] == "Error reading request"
    good = body()
    for field in ("room_id", "slot_id"):
        await expect(
            client, "/get_token", json.dumps({**good, field: ""}).encode(), 400, "M_BAD_JSON"
        )
    for field in ("id", "claimed_user_id", "claimed_device_id"):
        b = body()
        b["member"] = {**b["member"], field: ""}  # type: ignore[dict-item]
        await expect(client, "/get_token", json.dumps(b).encode(), 400, "M_BAD_JSON")
    for field in ("access_token", "matrix_server_name"):
        b = body()
        b["openid_token"] = {**b["openid_token"], field: ""}  # type: ignore[dict-item]
        await expect(client, "/get_token", json.dumps(b).encode(), 400, "M_BAD_JSON")
    await expect(client, "/get_token", json.dumps(body(delay_id="x")).encode(), 400, "M_BAD_JSON")
    await expect(client, "/delegate_delayed_leave", json.dumps(body()).encode(), 400, "M_BAD_JSON")
    legacy = {"room": "", "openid_token": good["openid_token"], "device_id": "D"}
    await expect(client, "/sfu/get", json.dumps(legacy).encode(), 400, "M_BAD_JSON")


async def test_unresolvable_homeserver_is_unauthorised(client: TestClient[Any, Any]) -> None:
    obj = await expect(client, "/get_token", json.dumps(body()).encode(), 401, "M_UNAUTHORIZED")
    assert obj["error"] == "The request could not be authorised."
    # a name outside the server-name grammar is refused without any lookup
    await expect(client, "/get_token", json.dumps(body("a/b@c")).encode(), 401, "M_UNAUTHORIZED")


async def test_body_limit_and_rate_limit() -> None:
    c = await client_for(
        make_config(
            MATRIXRTC_SFU_MAX_BODY="1024",
            MATRIXRTC_SFU_RATE_LIMIT="1",
            MATRIXRTC_SFU_RATE_BURST="3",
        )
    )
    try:
        await expect(c, "/get_token", b" " * 2048, 413, "M_TOO_LARGE")
        statuses = [(await c.post("/get_token", data=b"{")).status for _ in range(5)]
        assert statuses[:2] == [400, 400]  # the 413 above took one token of the burst
        assert statuses[-1] == 429
        resp = await c.post("/get_token", data=b"{")
        assert resp.status == 429
        assert int(resp.headers["Retry-After"]) >= 1
        assert (await resp.json())["errcode"] == "M_LIMIT_EXCEEDED"
    finally:
        await c.close()


class ListeningSocket:
    """A TCP listener that records whether anyone connected."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]

    def connections(self) -> int:
        n = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return n
            conn.close()
            n += 1

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[ListeningSocket]:
    s = ListeningSocket()
    yield s
    s.close()


def _self_signed(tmp: Path, names: list[str]) -> tuple[Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_ssrf_refused_without_connecting(listener: ListeningSocket, tmp_path: Path) -> None:
    # A well-known server for "wk.test" (allow-listed, so it may live on loopback) that
    # delegates to the listening socket, and a name that resolves straight to it.
    cert, key = _self_signed(tmp_path, ["wk.test", "redir.test"])
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    hits: list[str] = []

    async def well_known(request: web.Request) -> web.Response:
        hits.append(request.host)
        if request.host == "redir.test":  # a redirect towards the listener is refused too
            raise web.HTTPFound(f"https://127.0.0.1:{listener.port}/.well-known/matrix/server")
        return web.json_response({"m.server": f"127.0.0.1:{listener.port}"})

    wk_app = web.Application()
    wk_app.router.add_get("/.well-known/matrix/server", well_known)
    runner = web.AppRunner(wk_app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    wk_port = runner.addresses[0][1]
    resolver = StaticResolver(
        hosts={
            "wk.test": [("127.0.0.1", wk_port)],
            "redir.test": [("127.0.0.1", wk_port)],
            "evil.test": [("127.0.0.1", listener.port)],
        },
        srv={"_matrix-fed._tcp.srv.test": [("evil.test", listener.port)]},
    )
    c = await client_for(
        make_config(MATRIXRTC_SFU_CA_BUNDLE=str(cert)),
        resolver,
        allow=("wk.test", "redir.test"),
    )
    try:
        names = [
            f"127.0.0.1:{listener.port}",
            "10.0.0.1",
            "169.254.169.254",
            "[::1]:8448",
            "wk.test",  # well-known → 127.0.0.1:<listener>
            "redir.test",  # well-known redirects to https://127.0.0.1:<listener>/
            f"evil.test:{listener.port}",  # resolves to loopback
            "srv.test",  # SRV → evil.test
        ]
        for name in names:
            await expect(c, "/get_token", json.dumps(body(name)).encode(), 401, "M_UNAUTHORIZED")
        # the well-knowns were fetched (over TLS verified with the CA bundle)...
        assert sorted(hits) == ["redir.test", "wk.test"]
        assert listener.connections() == 0  # ...but nothing ever connected to the target
        text = metrics.render().decode()
        assert 'matrixrtc_sfu_openid_lookup_seconds_count{outcome="blocked"}' in text
    finally:
        await c.close()
        await runner.cleanup()


def _webhook(event: lkapi.WebhookEvent, secret: str = SECRET) -> tuple[str, str]:
    import base64
    import hashlib

    from google.protobuf.json_format import MessageToJson

    payload = MessageToJson(event)
    digest = base64.b64encode(hashlib.sha256(payload.encode()).digest()).decode()
    token = lkapi.AccessToken(KEY, secret).with_sha256(digest).to_jwt()
    return payload, token


async def test_webhook_signature(client: TestClient[Any, Any]) -> None:
    event = lkapi.WebhookEvent(
        event="participant_joined",
        room=lkapi.Room(name="r"),
        participant=lkapi.ParticipantInfo(identity="i"),
    )
    payload, token = _webhook(event)
    resp = await client.post("/sfu_webhook", data=payload, headers={"Authorization": token})
    assert resp.status == 200
    _, forged = _webhook(event, secret="wrong-secret-wrong-secret-wrong-secret")
    resp = await client.post("/sfu_webhook", data=payload, headers={"Authorization": forged})
    assert resp.status == 401
    assert (await resp.json())["errcode"] == "M_UNAUTHORIZED"
    tampered = payload.replace('"i"', '"j"')
    resp = await client.post("/sfu_webhook", data=tampered, headers={"Authorization": token})
    assert resp.status == 401
    resp = await client.post("/sfu_webhook", data=payload)
    assert resp.status == 401


_keys = st.sampled_from(
    ["room_id", "slot_id", "openid_token", "member", "room", "device_id", "delay_id",
     "delay_timeout", "access_token", "matrix_server_name", "expires_in", "id",
     "claimed_user_id", "claimed_device_id", "x"]
)  # fmt: skip
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.text(max_size=12)
    | st.sampled_from(["10.0.0.1", "127.0.0.1:1", "169.254.169.254", "localhost", "a.test"]),
    lambda ch: st.lists(ch, max_size=3) | st.dictionaries(_keys, ch, max_size=6),
    max_leaves=16,
)  # fmt: skip


_text = st.text(min_size=0, max_size=10)
_server = st.sampled_from(
    ["10.0.0.1", "127.0.0.1:1", "169.254.169.254", "localhost", "a.test", "[::1]", "x:99999"]
) | st.text(max_size=12)
# Bodies of the right shape, so they get past validation to OpenID and the SSRF guard.
_shaped = st.fixed_dictionaries(
    {
        "room_id": _text,
        "slot_id": _text,
        "openid_token": st.fixed_dictionaries(
            {
                "access_token": _text,
                "matrix_server_name": _server,
                "expires_in": st.integers(-10, 10**9),
            }
        ),
        "member": st.fixed_dictionaries(
            {"id": _text, "claimed_user_id": _text, "claimed_device_id": _text}
        ),
    },
    optional={"delay_id": _text, "delay_timeout": st.integers(-5, 10**6)},
)


@pytest.fixture(scope="module")
def private_loop_client() -> Iterator[tuple[asyncio.AbstractEventLoop, TestClient[Any, Any]]]:
    # One service for every example, on a loop of its own (the test itself is synchronous).
    loop = asyncio.new_event_loop()
    c = loop.run_until_complete(client_for(make_config()))
    yield loop, c
    loop.run_until_complete(c.close())
    loop.close()


@settings(max_examples=300, deadline=None)
@given(
    path=st.sampled_from(["/get_token", "/sfu/get", "/delegate_delayed_leave"]),
    payload=_json.map(lambda v: json.dumps(v).encode())
    | _shaped.map(lambda v: json.dumps(v).encode())
    | st.binary(max_size=80),
)
def test_random_bodies_never_5xx_or_token(
    private_loop_client: tuple[asyncio.AbstractEventLoop, TestClient[Any, Any]],
    path: str,
    payload: bytes,
) -> None:
    loop, c = private_loop_client

    async def run() -> None:
        resp = await c.post(path, data=payload)
        text = await resp.text()
        assert resp.status < 500, text
        assert resp.status != 200
        assert "jwt" not in text

    loop.run_until_complete(run())
