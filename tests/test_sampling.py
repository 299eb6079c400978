"""SamplingOptions: the one place the sampling defaults and ranges live, and what derives from it."""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_dsvl.sampling import DEFAULTS, GREEDY, SamplingError, SamplingOptions, controls

# The original DeepSeek-VL command line's defaults, written out here (not read from the code).
ORIGINAL = dict(temperature=0.2, top_p=0.95, repetition_penalty=1.1)


def test_defaults_are_the_original_clis():
    assert {k: getattr(DEFAULTS, k) for k in ORIGINAL} == ORIGINAL and DEFAULTS.max_tokens == 512


def test_every_command_line_and_the_server_start_from_the_same_defaults():
    from mlx_dsvl.generate import build_parser as generate_parser
    from mlx_dsvl.server.__main__ import build_parser as server_parser
    from mlx_dsvl.server.schema import SamplingParams

    gen, srv = generate_parser().parse_args(["--prompt", "x"]), server_parser().parse_args([])
    for f in fields(SamplingOptions):
        assert getattr(gen, f.name) == getattr(DEFAULTS, f.name), f.name
        if f.name != "seed":
            assert getattr(srv, f.name) == getattr(DEFAULTS, f.name), f.name
            assert getattr(SamplingParams(), f.name) == getattr(DEFAULTS, f.name), f.name


def test_the_apps_controls_hold_the_defaults_and_lie_inside_the_valid_ranges():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "apps"))
    try:
        import chat_logic
    finally:
        sys.path.pop(0)
    assert set(chat_logic.SLIDERS) == {"temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens"}
    app_args = chat_logic.parse_args([])
    for name, c in controls().items():
        assert getattr(app_args, name) is None  # unset: the app starts from DEFAULTS
        assert c.low <= getattr(DEFAULTS, name) <= c.high, name
        SamplingOptions(**{name: c.low}), SamplingOptions(**{name: c.high})  # both valid


@pytest.mark.parametrize("bad,option", [
    (dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=2.5), "max_tokens"), (dict(max_tokens=True), "max_tokens"),
    (dict(temperature=float("inf")), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"), (dict(top_p=float("nan")), "top_p"),
])
def test_a_value_out_of_range_names_its_option(bad, option):
    with pytest.raises(SamplingError) as e:
        DEFAULTS.with_(**bad)
    assert e.value.option == option and str(e.value).startswith(f"{option} must be ")
    with pytest.raises(TypeError):
        DEFAULTS.with_(typical_p=0.5)  # not an option


def test_greedy_sampler_is_argmax_and_the_penalty_follows_its_definition():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((1, 50)).astype(np.float32)
    assert GREEDY.make_logits_processors() == []
    assert GREEDY.make_sampler()(mx.array(logits)).item() == int(logits.argmax())
    # CTRL's repetition penalty over the last 20 tokens: positive logits divided, negative multiplied
    history = rng.integers(0, 50, 30)
    want = logits.copy()
    for t in set(history[-20:].tolist()):
        want[0, t] = want[0, t] / 1.3 if want[0, t] > 0 else want[0, t] * 1.3
    (penalty,) = GREEDY.with_(repetition_penalty=1.3).make_logits_processors()
    got = np.array(penalty(mx.array(history), mx.array(logits)))
    np.testing.assert_allclose(got, want, rtol=1e-6)
