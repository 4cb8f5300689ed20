"""docs/api.md matches the package: its list of supported names is ``matrixrtc.__all__``, each
name resolves, and the documented ``Call(...)`` signature names every keyword ``Call`` takes."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

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


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sfu_engine": "go"}, "sfu_engine must be sdk or aiortc"),
        ({"render_max": -1}, "render_max must be None or >= 0"),
        ({"low_layer_above": -1}, "low_layer_above must be None or >= 0"),
    ],
)
def test_call_refuses_unknown_sfu_engine_and_negative_render_max(
    options: dict[str, object], message: str
) -> None:
    """Bad call options are refused when the call is made, before any login."""
    from matrixrtc import Call, CallOptions, ConfigError

    with pytest.raises(ConfigError, match=message):
        Call("!r:localhost", homeserver="http://127.0.0.1:9", user="@u:localhost",
             options=CallOptions(**options))  # type: ignore[arg-type]  # fmt: skip


def test_what_carries_the_media_is_none_before_the_call_opens() -> None:
    from matrixrtc import Call

    call = Call("!r:localhost", homeserver="http://127.0.0.1:9", user="@u:localhost")
    assert call.transport is None
    assert call.media_engine is None
