"""Our frame cryptor against livekit-client 2.23's own E2EE worker (tests/e2ee_vectors/).

The committed vectors were produced by livekit-client's code (generate.py + the Node harness);
the second test regenerates a fresh set with new keys, SSRC and timestamps and cross-checks
both directions live. tests/browser/test_e2ee_vectors.py does the same in Chromium.
"""

from __future__ import annotations

import json

import pytest

from tests.e2ee_vectors.checks import check_document
from tests.e2ee_vectors.generate import VECTORS, build_vectors, node_available


def test_committed_livekit_vectors() -> None:
    doc = json.loads(VECTORS.read_text())
    assert doc["livekit_client"] == "2.23.0"
    check_document(doc)


@pytest.mark.skipif(not node_available(), reason="node or node_modules/livekit-client missing")
def test_fresh_vectors_both_directions() -> None:
    check_document(build_vectors(seed=None))
