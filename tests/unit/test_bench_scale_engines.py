"""bench/scale.py's SFU engine choice (issue 19): parsed engines, and ``sfu_max_n`` per engine
from cells of several engines."""

from __future__ import annotations

import argparse

import pytest

from bench.scale import _cell, _engines, sfu_max_n
from matrixrtc.calltest.runner import CallTestConfig
from matrixrtc.commands.call_test import add_arguments, config_from


def test_engines_parse_in_order_and_reject_unknown_or_repeated() -> None:
    assert _engines("aiortc") == ["aiortc"]
    assert _engines("sdk,aiortc") == ["sdk", "aiortc"]
    for bad in ("", "go", "aiortc,aiortc"):
        with pytest.raises(argparse.ArgumentTypeError):
            _engines(bad)


def test_sfu_max_n_of_one_engines_cells() -> None:
    cells = [
        {"n": 3, "engine": "aiortc", "min_fps_ratio": 0.99},
        {"n": 3, "engine": "sdk", "min_fps_ratio": 0.97},
        {"n": 6, "engine": "aiortc", "min_fps_ratio": 0.95},
        {"n": 6, "engine": "sdk", "min_fps_ratio": 0.5},
    ]
    assert sfu_max_n([c for c in cells if c["engine"] == "aiortc"]) == 6
    assert sfu_max_n([c for c in cells if c["engine"] == "sdk"]) == 3


def test_call_test_sfu_engine_option_reaches_the_config() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from(parser.parse_args([])).sfu_engine == "sdk"
    cfg = config_from(parser.parse_args(["--transport", "sfu", "--sfu-engine", "aiortc"]))
    assert isinstance(cfg, CallTestConfig)
    assert cfg.sfu_engine == "aiortc"
    with pytest.raises(SystemExit):
        parser.parse_args(["--sfu-engine", "go"])


def test_decoded_pairs_are_the_rendered_ones_on_the_aiortc_engine() -> None:
    """The aiortc engine decodes only the videos it renders; the SDK decodes every one."""
    pairs = [
        {"receiver": "p1", "sender": s, "fps_ratio": 1.0, "transport": "sfu", "decoded": True,
         "rendered": s == "p2", "layer": "default"}
        for s in ("p2", "p3", "p4")
    ]  # fmt: skip
    report = {"window": {"pairs": pairs, "min_fps_ratio": 1.0}, "sfu_engine": "aiortc"}
    assert _cell(4, report, None)["decoded_pairs"] == 1
    assert _cell(4, {**report, "sfu_engine": "sdk"}, None)["decoded_pairs"] == 3
