"""LiveKit room aliases and participant identities, as lk-jwt-service v0.4.3+ derives them.

lk-jwt-service hashes ``json.Marshal([]string{...})`` (Go) with SHA-256 and encodes the digest
as unpadded standard base64. matrix-js-sdk computes the same identity with ``JSON.stringify``.
The two serialisers differ: Go escapes ``<``, ``>``, ``&``, U+2028 and U+2029; JS does not
(both write ``\\b``/``\\f`` in short form since Go 1.22; lk-jwt-service builds with Go 1.26).
For ordinary Matrix ids they agree. The service side must match Go byte for byte;
``js=True`` gives what matrix-js-sdk computes.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence

__all__ = [
    "DEFAULT_SLOT_ID",
    "go_json_string_array",
    "js_json_string_array",
    "legacy_identity",
    "livekit_identity",
    "livekit_room_alias",
]

DEFAULT_SLOT_ID = "m.call#ROOM"

# Escapes shared by Go's encoding/json and JSON.stringify.
_COMMON = {
    '"': '\\"',
    "\\": "\\\\",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\b": "\\b",
    "\f": "\\f",
}
# Go (encoding/json with HTML escaping, the json.Marshal default) additionally escapes these.
_GO_ONLY = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
_JS_ONLY: dict[str, str] = {}


def _encode(s: str, extra: dict[str, str]) -> str:
    out = ['"']
    for ch in s:
        esc = _COMMON.get(ch) or extra.get(ch)
        if esc is not None:
            out.append(esc)
        elif ord(ch) < 0x20:
            out.append(f"\\u{ord(ch):04x}")
        elif 0xD800 <= ord(ch) <= 0xDFFF:
            # A lone surrogate cannot come from valid UTF-8: Go replaces invalid UTF-8 by U+FFFD,
            # JS escapes it (well-formed JSON.stringify).
            out.append("\ufffd" if extra is _GO_ONLY else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def go_json_string_array(parts: Sequence[str]) -> bytes:
    """Bytes of Go's ``json.Marshal([]string(parts))``."""
    return ("[" + ",".join(_encode(p, _GO_ONLY) for p in parts) + "]").encode("utf-8")


def js_json_string_array(parts: Sequence[str]) -> bytes:
    """Bytes of JavaScript's ``JSON.stringify(parts)`` encoded as UTF-8."""
    return ("[" + ",".join(_encode(p, _JS_ONLY) for p in parts) + "]").encode(
        "utf-8", errors="surrogatepass"
    )


def _hash(raw: bytes) -> str:
    return base64.b64encode(hashlib.sha256(raw).digest()).decode("ascii").rstrip("=")


def livekit_room_alias(room_id: str, slot_id: str = DEFAULT_SLOT_ID) -> str:
    """LiveKit room name for a Matrix room and slot (both token endpoints)."""
    return _hash(go_json_string_array([room_id, slot_id]))


def livekit_identity(user_id: str, device_id: str, member_id: str, *, js: bool = False) -> str:
    """LiveKit identity for ``/get_token`` and for sticky-form (``m.rtc.member``) members."""
    parts = [user_id, device_id, member_id]
    return _hash(js_json_string_array(parts) if js else go_json_string_array(parts))


def legacy_identity(user_id: str, device_id: str) -> str:
    """LiveKit identity for ``/sfu/get`` and for state-form (``call.member``) members."""
    return f"{user_id}:{device_id}"
