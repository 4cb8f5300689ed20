"""The read-only view of one call participant that layers below the agent work with.

The agent's :class:`~matrixrtc.agent.Participant` (exported as ``matrixrtc.Participant``)
satisfies it; the mesh link and the call recording sit below the agent in the layers, so they
name this protocol instead of importing the agent. One protocol for both: add a field here
only if the agent's ``Participant`` has it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from matrixrtc.model.transports import Transport

__all__ = ["ParticipantView"]


class ParticipantView(Protocol):
    """One active member of the call: one device of one user, in one membership."""

    @property
    def user_id(self) -> str: ...
    @property
    def device_id(self) -> str: ...
    @property
    def member_id(self) -> str: ...
    @property
    def created_ts(self) -> int: ...
    @property
    def rtc_backend_identity(self) -> str: ...
    @property
    def is_self(self) -> bool: ...
    @property
    def advertised(self) -> Sequence[Transport]: ...
    @property
    def mesh_session_id(self) -> str:
        """The MSC2746 session id every member addresses this one with."""
        ...

    @property
    def frame_e2ee(self) -> bool:
        """Whether this member takes part in MatrixRTC frame E2EE (its dialect has the key
        distribution; Hydrogen and legacy js-sdk do not)."""
        ...

    @property
    def legacy_conf_id(self) -> str | None:
        """The conf_id of the room's 2022 call if this device is listed in it."""
        ...
