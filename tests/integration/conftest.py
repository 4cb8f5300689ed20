"""Fixtures shared by the integration tests of this folder."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.integration.mesh_rig import Router


@pytest.fixture
async def mesh_router() -> AsyncIterator[Router]:
    """In-process to-device delivery between mesh engines; closes every engine made on it."""
    router = Router()
    yield router
    await router.aclose()
