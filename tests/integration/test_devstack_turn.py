"""The devstack's Synapse hands out its coturn's TURN credentials on ``/voip/turnServer``
(without them it answers ``{}`` and Hydrogen refuses to call: "Malformed RTCIceServer")."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from matrixrtc.devstack.stack import local_stack
from matrixrtc.mesh.ice import ice_servers_from_turn_response

pytestmark = pytest.mark.integration


async def test_local_stack_synapse_hands_out_working_turn_credentials(run_dir: Path) -> None:
    from aioice import turn

    async with local_stack(run_dir / "turnstack", usernames=("alice",)) as stack:
        alice = stack.users[0]
        body = await stack.synapse.request("GET", "/_matrix/client/v3/voip/turnServer", user=alice)
        assert body["uris"] == stack.coturn.uris
        assert body["ttl"] == 3600
        servers = ice_servers_from_turn_response(body)
        assert servers
        assert servers[0].username is not None
        assert servers[0].credential is not None
        # The credentials really allocate a relay on that coturn.
        transport, _ = await turn.create_turn_endpoint(
            asyncio.DatagramProtocol,
            ("127.0.0.1", stack.coturn.port),
            servers[0].username,
            servers[0].credential,
        )
        try:
            assert transport.get_extra_info("sockname")[0] == "127.0.0.1"
        finally:
            transport.close()
