"""docs/api.md matches the package: its list of supported names is ``matrixrtc.__all__``, each
name resolves, and the documented ``Call(...)`` signature names every keyword ``Call`` takes."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import matrixrtc

DOC = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()


def test_the_supported_names_section_is_all_of_dunder_all() -> None:
    section = DOC.split("## The supported names", 1)[1]
    listed = set(re.findall(r"`(\w+)`", section.split("tests/unit/", 1)[0]))
    assert listed == set(matrixrtc.__all__)
    for name in matrixrtc.__all__:
        assert getattr(matrixrtc, name) is not None


def test_the_documented_call_signature_names_every_keyword() -> None:
    joining = DOC.split("## Joining", 1)[1]
    block = re.search(r"```python\n(Call\(.*?)```", joining, re.S)
    assert block is not None
    documented = re.findall(r"(\w+)=", block.group(1))
    params = list(inspect.signature(matrixrtc.Call).parameters)
    assert documented == params[1:]  # after the positional room
    assert params[0] == "room"
