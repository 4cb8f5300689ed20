"""Typed access to untrusted JSON (private helpers for the parsers).

Every getter returns ``None`` (or raises nothing) on a type mismatch so that parsers can say
*why* they reject an event and return ``None`` themselves.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias, TypeVar

import structlog

__all__ = [
    "JsonDict",
    "JsonValue",
    "Reject",
    "Suspicious",
    "as_int",
    "as_str",
    "canonical_json",
    "get_dict",
    "is_mxid",
]

JsonValue: TypeAlias = "bool | int | float | str | list[JsonValue] | dict[str, JsonValue] | None"
JsonDict: TypeAlias = "dict[str, JsonValue]"

_log = structlog.get_logger("matrixrtc.model")

# Largest integer JSON/JS can carry exactly; Matrix uses the same bound for its integers.
_MAX_SAFE_INT = 2**53 - 1


class Reject(Exception):
    """Raised inside a parser to abort with a reason; caught by the parser's entry point."""

    def __init__(self, reason: str, *, field: str | None = None, **fields: object) -> None:
        super().__init__(reason)
        self.reason = reason
        # The offending JSON field (dotted path, e.g. "transports.published"), when one is.
        self.field = field
        self.fields = fields


class Suspicious(Reject):
    """A rejection of input that looks like an attempt to impersonate someone."""


def log_reject(kind: str, err: Reject, **context: object) -> None:
    """Log one rejection: debug for junk (expected, must not flood logs), info for input that
    looks like an attempt to impersonate someone (:class:`Suspicious`)."""
    log = _log.info if isinstance(err, Suspicious) else _log.debug
    if err.field is not None:
        context = {"field": err.field, **context}
    log("rejected", kind=kind, reason=err.reason, **err.fields, **context)


def log_parser_bug(kind: str, exc: BaseException, **context: object) -> None:
    """A parser hit an exception it did not anticipate: log loudly, still drop the input."""
    _log.warning("parser_error", kind=kind, error=repr(exc), **context)


_T = TypeVar("_T")


def parse_or_none(kind: str, parse: Callable[[], _T]) -> _T | None:
    """Run a strict parser that raises :class:`Reject`; never raise: log and return None.

    Every public parser of the model goes through here (design principle 6).
    """
    try:
        return parse()
    except Reject as err:
        log_reject(kind, err)
    except Exception as exc:
        log_parser_bug(kind, exc)
    return None


def as_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def as_int(value: object) -> int | None:
    """A JSON number that is an exact integer within the safe range, else None.

    Floats with an integral value are accepted (JS has only doubles; ``1.7e12`` is fine).
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if -_MAX_SAFE_INT <= value <= _MAX_SAFE_INT else None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return as_int(int(value))
    return None


def get_dict(value: object) -> dict[str, JsonValue] | None:
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return value
    return None


def is_mxid(value: str) -> bool:
    """Loose Matrix user id check, as js-sdk does: ``@localpart:server``, non-empty parts."""
    if not value.startswith("@") or ":" not in value:
        return False
    local, _, server = value[1:].partition(":")
    return bool(local) and bool(server) and len(value) <= 255


def canonical_json(value: Mapping[str, object]) -> str:
    """Deterministic compact JSON, used to keep opaque objects hashable and comparable."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class TolerantStrEnum(enum.StrEnum):
    """A string enum that keeps values it does not know instead of failing."""

    @classmethod
    def _missing_(cls, value: object) -> Any:
        if not isinstance(value, str):
            return None
        member = str.__new__(cls, value)
        member._name_ = f"UNKNOWN_{value}"
        member._value_ = value
        return member

    @property
    def known(self) -> bool:
        return self._name_ in type(self).__members__
