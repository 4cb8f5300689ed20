"""Demo profile: write Synapse's config from the environment, then run Synapse.

Runs inside the ``matrixdotorg/synapse`` image (compose.yaml's ``entrypoint``). The config
has what MatrixRTC needs: MSC4140 delayed events (``max_event_delay_duration``), the MSC4143
``/rtc/transports`` endpoint pointing at this stack's token service, MSC4354 sticky events,
and Element Call's recommended rate limits for key bursts and the delayed-leave heartbeat.
Registration is closed; users are created with the shared secret. Demo only: Synapse runs
as the container's root user with its state in the ``synapse-data`` volume.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

DATA = "/data"
CONFIG = f"{DATA}/homeserver.yaml"
LOG_CONFIG = f"{DATA}/log.config"


def need(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        sys.exit(f"synapse (demo profile): {name} must be set in .env")
    return value


def main() -> None:
    server_name = need("MATRIX_SERVER_NAME")
    base_url = need("MATRIX_HOMESERVER_URL").rstrip("/") + "/"
    rtc_host = need("RTC_HOST")
    db_password = need("POSTGRES_PASSWORD")
    shared_secret = need("SYNAPSE_REGISTRATION_SHARED_SECRET")
    config: dict[str, object] = {
        "server_name": server_name,
        "public_baseurl": base_url,
        "pid_file": f"{DATA}/homeserver.pid",
        "signing_key_path": f"{DATA}/signing.key",
        "media_store_path": f"{DATA}/media_store",
        "log_config": LOG_CONFIG,
        "report_stats": False,
        "listeners": [
            {
                "port": 8008,
                "type": "http",
                "tls": False,
                "bind_addresses": ["0.0.0.0"],
                "x_forwarded": True,
                # federation: the token service validates OpenID tokens over it.
                "resources": [{"names": ["client", "federation"], "compress": False}],
            }
        ],
        "database": {
            "name": "psycopg2",
            "args": {
                "user": "synapse",
                "password": db_password,
                "dbname": "synapse",
                "host": "postgres",
                "cp_min": 1,
                "cp_max": 5,
            },
        },
        "enable_registration": False,
        "registration_shared_secret": shared_secret,
        "trusted_key_servers": [],
        "suppress_key_server_warning": True,
        "presence": {"enabled": False},
        "url_preview_enabled": False,
        # MSC4140 delayed events: the delayed leave that removes a crashed member.
        "max_event_delay_duration": "24h",
        "experimental_features": {
            "msc4143_enabled": True,
            "msc4354_enabled": True,
            "msc4222_enabled": True,
        },
        "matrix_rtc": {
            "transports": [
                {"type": "livekit", "livekit_service_url": f"https://{rtc_host}/livekit/jwt"}
            ]
        },
        "rc_message": {"per_second": 0.5, "burst_count": 30},
        "rc_delayed_event_mgmt": {"per_second": 1, "burst_count": 20},
        # A demo's users and bots log in from one address (e.g. the proxy's): Synapse's
        # default allows 5 logins per address before throttling to one every ~5 minutes.
        "rc_login": {
            "address": {"per_second": 0.2, "burst_count": 20},
            "account": {"per_second": 0.2, "burst_count": 10},
        },
    }
    turn_secret = os.environ.get("TURN_SECRET", "").strip()
    turn_uris = [u.strip() for u in os.environ.get("TURN_URIS", "").split(",") if u.strip()]
    if turn_secret and turn_uris:
        config |= {"turn_uris": turn_uris, "turn_shared_secret": turn_secret}
    log_config = {
        "version": 1,
        "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
        "root": {"level": "INFO", "handlers": ["console"]},
        "disable_existing_loggers": False,
    }
    os.makedirs(f"{DATA}/media_store", exist_ok=True)
    # JSON is YAML: no YAML library needed to write it.
    with open(CONFIG, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)
    with open(LOG_CONFIG, "w", encoding="utf-8") as f:
        json.dump(log_config, f, indent=1)
    app = [sys.executable, "-m", "synapse.app.homeserver", "-c", CONFIG]
    subprocess.run([*app, "--generate-keys"], check=True)
    os.execv(sys.executable, app)


if __name__ == "__main__":
    main()
