"""matrix-nio glue shared by the adapter's modules: the client subclass with the capturing
Olm machine, nio errors mapped to ours, and device-store lookups."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import aiohttp
from nio import AsyncClient
from nio.exceptions import (
    EncryptionError,
    GroupEncryptionError,
    LocalProtocolError,
    OlmTrustError,
)

from matrixrtc.matrix.errors import CryptoError, HomeserverTimeout, HomeserverUnreachable
from matrixrtc.matrix.olm_hook import CapturingOlm
from matrixrtc.matrix.types import DeviceRef

__all__ = ["NioClient", "device_of", "nio_errors"]


class NioClient(AsyncClient):  # type: ignore[misc]  # nio is untyped
    """nio's client with an Olm machine that keeps to-device payloads nio would drop."""

    def load_store(self) -> None:
        super().load_store()
        olm: Any = getattr(self, "olm", None)
        if olm is not None and not isinstance(olm, CapturingOlm):
            # nio builds a plain Olm; rebuild from the same (now saved) account and store.
            self.olm = CapturingOlm(self.user_id, self.device_id, self.store)


@contextlib.contextmanager
def nio_errors(what: str) -> Iterator[None]:
    """nio raises transport errors (after its own retries) and crypto errors as-is: give
    callers our types instead."""
    try:
        yield
    except TimeoutError as e:
        raise HomeserverTimeout(f"{what}: no answer in time") from e
    except (aiohttp.ClientError, OSError) as e:
        raise HomeserverUnreachable(f"{what}: {type(e).__name__}: {e}") from e
    except (LocalProtocolError, EncryptionError, GroupEncryptionError, OlmTrustError) as e:
        raise CryptoError(f"{what}: {type(e).__name__}: {e}") from e


def device_of(nio: NioClient, ref: DeviceRef) -> Any:
    """nio's device record for ``ref``, or None when its keys are unknown."""
    try:
        return nio.device_store[ref.user_id][ref.device_id]
    except KeyError:
        return None
