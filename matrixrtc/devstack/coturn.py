"""A private coturn TURN server on loopback, long-term credentials, relaying to loopback."""

from __future__ import annotations

import asyncio
import random
import secrets
import shutil
from pathlib import Path

from matrixrtc.devstack._process import ManagedProcess, free_tcp_port
from matrixrtc.devstack._service import Service
from matrixrtc.errors import ConfigError

__all__ = ["Coturn"]

START_TIMEOUT = 15.0
REALM = "matrixrtc.localhost"
RELAY_PORTS = 200


class Coturn(Service):
    """turnserver on 127.0.0.1 (UDP and TCP on one port); ``uris`` for ICE configuration."""

    def __init__(self, run_dir: Path, *, name: str = "coturn") -> None:
        binary = shutil.which("turnserver")
        if binary is None:
            raise ConfigError("turnserver (coturn) not found: run scripts/bootstrap.sh")
        self.dir = run_dir / name
        self.port = free_tcp_port()
        self.uris = [
            f"turn:127.0.0.1:{self.port}?transport=udp",
            f"turn:127.0.0.1:{self.port}?transport=tcp",
        ]
        self.username = "turn-" + secrets.token_hex(4)
        self.password = secrets.token_urlsafe(18)
        self.realm = REALM
        self.log_path = self.dir / "turnserver.log"
        # Relay ports: a random slice below the ephemeral range and the devstack's own ports.
        relay_min = random.randrange(10000, 20000 - RELAY_PORTS)
        self._proc = ManagedProcess(
            name=name,
            argv=[
                binary,
                "-n",  # no config file: everything is on the command line
                "--listening-ip=127.0.0.1",
                "--relay-ip=127.0.0.1",
                f"--listening-port={self.port}",
                f"--min-port={relay_min}",
                f"--max-port={relay_min + RELAY_PORTS}",
                "--lt-cred-mech",
                f"--user={self.username}:{self.password}",
                f"--realm={self.realm}",
                # Peers are on loopback here; coturn refuses to relay to them otherwise.
                "--allow-loopback-peers",
                "--no-tls",
                "--no-dtls",
                "--no-cli",
                "--no-multicast-peers",
                "--fingerprint",
                f"--userdb={self.dir / 'turndb'}",
                f"--pidfile={self.dir / 'turnserver.pid'}",
                "--log-file=stdout",
                "--simple-log",
            ],
            log_path=self.log_path,
            cwd=self.dir,
        )

    async def _ready(self) -> bool:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 2)
        writer.close()
        await writer.wait_closed()
        return True

    def _prepare(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)

    def synapse_config(self) -> dict[str, object]:
        """Synapse settings that make ``/voip/turnServer`` hand out this server's credentials.

        Without them Synapse answers ``{}``, and Hydrogen then refuses to call at all
        ("Malformed RTCIceServer"). Static long-term credentials, as coturn is started with.
        """
        return {
            "turn_uris": list(self.uris),
            "turn_username": self.username,
            "turn_password": self.password,
            "turn_user_lifetime": "1h",
            "turn_allow_guests": True,
        }

    def _ready_fields(self) -> dict[str, object]:
        return {"uris": self.uris}
