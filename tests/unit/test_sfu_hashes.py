"""Room aliases and identities equal lk-jwt-service's (Go json.Marshal + SHA-256 + base64).

The golden values were produced by :data:`GO_PROGRAM` (Go 1.26) — the algorithm of
spec/livekit.md §A.1 as lk-jwt-service's helper.go runs it. When ``go`` is installed the test
also re-runs the program, so the table cannot drift from Go.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from matrixrtc.model.livekit_ids import legacy_identity, livekit_identity, livekit_room_alias

GO_PROGRAM = """\
package main

import (
\t"crypto/sha256"
\t"encoding/base64"
\t"encoding/json"
\t"fmt"
\t"os"
)

func main() {
\tvar cases [][]string
\tif err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
\t\tpanic(err)
\t}
\tout := []string{}
\tfor _, c := range cases {
\t\tb, _ := json.Marshal(c)
\t\th := sha256.Sum256(b)
\t\tout = append(out, base64.StdEncoding.WithPadding(base64.NoPadding).EncodeToString(h[:]))
\t}
\tenc, _ := json.Marshal(out)
\tfmt.Println(string(enc))
}
"""

ROOMS: list[tuple[tuple[str, str], str]] = [
    (("!abc:example.org", "m.call#ROOM"), "9YzbCxM8P0fwObUtiQ9m/ujMP9ruNMxS7SOsugBEaxA"),
    (("!abc:example.org", "m.call#"), "dlwQqGoOCrBA6QXNGVuTRFt8BkIy/FOQmBuQ8e8ANWM"),
    (("!Ünïcödé:例え.jp", "m.call#ROOM"), "NQVQISVpJQjRmLuj9I0e7NjPpD51D3R5pN8Ab8Dsgp4"),
    (("!a<b>&c:x", "m.call#ROOM"), "cDgj1jylvCeyef74HWx13+FSLF10XfvuYRpmcnfWSoo"),
]
IDENTITIES: list[tuple[tuple[str, str, str], str]] = [
    (("@alice:example.org", "DEVICEID", "member-1"), "EKqPjhkY4Z79PW3wKu7wEGyd1WVt8oMAIh4Bk1JDMHQ"),
    (("@zoë:example.org", "DÉVICE", "🙂"), "gjQ9kKsIylVOBejHVpPw7OJNO8uNCgPe+iRIoo5dW5I"),
    (("@a<script>:x&y", "D&D", "<m>"), "rQFIQMAZLVkgwloScg56KtTyy4ROp+PXEB17Z9lhGO8"),
    (
        ('@q"u\\o:x', "tab\there", "nl\nx\u2028\u2029\u0001"),
        "q67aGgt1fZ9dmrvZFM7wn2pgYLXcg2AjCnUolOXzTY4",
    ),
]
# Go >= 1.22 writes \b and \f in their short forms; livekit_ids writes \u0008 / \u000c.
BACKSPACE_FORMFEED = (("@b:x", "\b", "\f"), "4Zf3IuQArlxiwKcPbIer88e+LctCyzcBquh9xPhWSTU")


@pytest.mark.parametrize(("parts", "expected"), ROOMS)
def test_room_alias_golden(parts: tuple[str, str], expected: str) -> None:
    assert livekit_room_alias(*parts) == expected


@pytest.mark.parametrize(("parts", "expected"), IDENTITIES)
def test_identity_golden(parts: tuple[str, str, str], expected: str) -> None:
    assert livekit_identity(*parts) == expected


def test_backspace_formfeed_like_go_1_26() -> None:
    parts, expected = BACKSPACE_FORMFEED
    assert livekit_identity(*parts) == expected


def test_legacy_identity_and_default_slot() -> None:
    assert legacy_identity("@a:hs", "DEV") == "@a:hs:DEV"
    assert livekit_room_alias("!abc:example.org") == ROOMS[0][1]


def test_html_characters_differ_from_javascript() -> None:
    # JSON.stringify does not escape <>&, so matrix-js-sdk's hash differs for such ids.
    parts = IDENTITIES[2][0]
    assert livekit_identity(*parts, js=True) != livekit_identity(*parts)


@pytest.mark.skipif(shutil.which("go") is None, reason="go is not installed")
def test_golden_table_matches_go(tmp_path: Path) -> None:
    src = tmp_path / "main.go"
    src.write_text(GO_PROGRAM)
    cases = [list(p) for p, _ in ROOMS] + [list(p) for p, _ in IDENTITIES]
    cases.append(list(BACKSPACE_FORMFEED[0]))
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=mod", "GO111MODULE": "off"}
    out = subprocess.run(
        ["go", "run", str(src)],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    golden = [h for _, h in ROOMS] + [h for _, h in IDENTITIES] + [BACKSPACE_FORMFEED[1]]
    assert json.loads(out.stdout) == golden
