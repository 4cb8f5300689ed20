"""A Matrix device, the unit calls address (to-device messages, mesh peers, key recipients)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DeviceRef"]


@dataclass(frozen=True, slots=True, order=True)
class DeviceRef:
    """One device of one user. Ordered by user id, then device id (the mesh's who-calls rule
    compares them so)."""

    user_id: str
    device_id: str
