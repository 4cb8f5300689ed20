"""livekit-client's E2EE worker in real Chromium (BoringSSL WebCrypto) against our cryptor.

A fresh vector set (new keys, SSRC, timestamps; real PyAV frames) is encrypted and decrypted
by livekit-client 2.23's own worker bundle running in a Chromium module worker; the same checks
as for the committed vectors apply: byte-identical encryption, both directions decrypt.
"""

from __future__ import annotations

import json
from pathlib import Path

from matrixrtc.devstack import Chromium
from tests.browser.helpers import run_node, serve_dir
from tests.e2ee_vectors.checks import check_document
from tests.e2ee_vectors.generate import HERE, assemble, plan_vectors

REPO = HERE.parents[1]


async def test_livekit_worker_in_chromium_matches_our_cryptor(
    chromium: Chromium, tmp_path: Path
) -> None:
    plan = plan_vectors(seed=None)
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps({"jobs": plan.jobs}))
    async with serve_dir(REPO) as base:
        out = await run_node(
            str(HERE / "chromium_run.mjs"),
            chromium.devtools_url,
            f"{base}/tests/e2ee_vectors/chromium.html",
            str(jobs),
            limit=60,
        )
    result = json.loads(out.strip().splitlines()[-1])
    print(f"browser: {result['browser']}, console: {result['console'][:5]}")
    assert "Chrome/" in result["browser"]
    check_document(assemble(plan, result))
