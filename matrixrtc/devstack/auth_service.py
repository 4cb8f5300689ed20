"""Our authorization service (``python -m sfu serve``) as a devstack service.

It fronts one devstack LiveKit and checks OpenID tokens against one devstack Synapse. The
Synapse's server name ("localhost") resolves nowhere, so the service is pointed at its
listener for OpenID (``MATRIXRTC_SFU_HOMESERVER_OVERRIDES``) and for the client-server API
(``LIVEKIT_CS_API_URL_OVERRIDES``: delayed-event restart/send), and the LiveKit server posts its
webhooks to the service's ``/sfu_webhook`` (added to the server's config at start; a running
server is restarted for it). So delegated delayed leave (``/get_token`` with ``delay_id``,
``/delegate_delayed_leave``) works with no further set-up: the leave is sent as soon as LiveKit
reports the participant gone. Rate limiting is off (tests and benches make many requests from
one address). Jobs are kept in memory (no Redis) unless ``LIVEKIT_REDIS_URL`` is passed in
``extra_env``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

import aiohttp

from matrixrtc.devstack._process import ManagedProcess, free_tcp_port
from matrixrtc.devstack._service import Service
from matrixrtc.devstack.livekit import LiveKit
from matrixrtc.devstack.synapse import Synapse

__all__ = ["AuthService"]


class AuthService(Service):
    """``python -m sfu serve`` on 127.0.0.1 in front of ``livekit``; ``url`` is what members
    advertise as ``livekit_service_url``."""

    start_timeout = 30.0

    def __init__(
        self,
        run_dir: Path,
        livekit: LiveKit,
        synapse: Synapse,
        *,
        name: str = "sfu",
        full_access: str | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.dir = run_dir / name
        self.livekit = livekit
        self.port = free_tcp_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.webhook_url = f"{self.url}/sfu_webhook"
        self.log_path = self.dir / "service.log"
        env = {
            **os.environ,
            "LIVEKIT_URL": livekit.url,
            "LIVEKIT_KEY": livekit.api_key,
            "LIVEKIT_SECRET": livekit.api_secret,
            "LIVEKIT_JWT_BIND": f"127.0.0.1:{self.port}",
            "LIVEKIT_FULL_ACCESS_HOMESERVERS": (
                synapse.server_name if full_access is None else full_access
            ),
            "MATRIXRTC_SFU_HOMESERVER_OVERRIDES": f"{synapse.server_name}={synapse.base_url}",
            "LIVEKIT_CS_API_URL_OVERRIDES": f"{synapse.server_name}={synapse.base_url}",
            "MATRIXRTC_SFU_RATE_LIMIT": "0",
            "MATRIXRTC_SFU_METRICS_BIND": "off",  # several stacks share loopback
            **(extra_env or {}),
        }
        self._proc = ManagedProcess(
            name=name,
            argv=[sys.executable, "-m", "sfu", "serve"],
            log_path=self.log_path,
            cwd=self.dir,
            env=env,
        )

    def _prepare(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)

    async def start(self) -> None:
        await self.livekit.add_webhook_url(self.webhook_url)
        await super().start()

    async def _ready(self) -> bool:
        timeout = aiohttp.ClientTimeout(total=1)
        async with (
            aiohttp.ClientSession(timeout=timeout) as s,
            s.get(self.url + "/healthz") as r,
        ):
            return r.status == 200

    def _ready_fields(self) -> dict[str, object]:
        return {"url": self.url}
