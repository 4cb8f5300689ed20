"""Environment parsing shared by the service and the controller (numbers, key/secret, lists)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

from matrixrtc.errors import ConfigError

__all__ = ["num", "parse_overrides", "read_key_secret"]

_T = TypeVar("_T", int, float)


def num(
    env: Mapping[str, str], name: str, default: _T, kind: type[_T], *, positive: bool = False
) -> _T:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from exc
    if value < 0 or (positive and value == 0) or value != value:
        raise ConfigError(
            f"{name} must be {'positive' if positive else 'non-negative'}, got {raw!r}"
        )
    return value


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ConfigError(str(exc)) from exc


def read_key_secret(env: Mapping[str, str]) -> tuple[str, str]:
    key = env.get("LIVEKIT_KEY", "")
    secret = env.get("LIVEKIT_SECRET", "")
    if path := env.get("LIVEKIT_KEY_FILE", ""):
        parts = _read(path).split(":")
        if len(parts) != 2:
            raise ConfigError("invalid key secret file format!")
        key, secret = parts
    else:
        if path := env.get("LIVEKIT_KEY_FROM_FILE", ""):
            key = _read(path)
        if path := env.get("LIVEKIT_SECRET_FROM_FILE", ""):
            secret = _read(path)
    return key.strip(" \r\n"), secret.strip(" \r\n")


def parse_overrides(raw: str) -> dict[str, str]:
    """``server=url,server2=url2`` (lk-jwt-service's format; blanks trimmed)."""
    out: dict[str, str] = {}
    if not raw:
        return out
    for entry in raw.split(","):
        server, sep, url = entry.partition("=")
        server, url = server.strip(), url.strip()
        if not sep or not server or not url:
            raise ConfigError(f"invalid entry {entry!r}, expected server_name=url")
        out[server] = url
    return out
