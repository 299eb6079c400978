"""Training as parts: the config (defaults, ranges, derived defaults without mutation), the
stages' declarations behind the CLI, and the loop run over built parts with callbacks."""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import fields
from pathlib import Path

import pytest

from mlx_dsvl.train import TrainConfig, train
from mlx_dsvl.train.__main__ import build_parser
from mlx_dsvl.train.callbacks import TrainingCallback
from mlx_dsvl.train.config import ConfigError, as_flags, resolve, validate_config
from mlx_dsvl.train.loop import LoopArgs, make_loss, train_loop
from mlx_dsvl.train.run import build, prepare
from mlx_dsvl.train.rundir import RunDir
from mlx_dsvl.train.stages import STAGES


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    p = tmp_path_factory.mktemp("parts") / "text.jsonl"
    p.write_text("".join(json.dumps({"text": f"Line {i} says {i * i}."}) + "\n" for i in range(6)))
    return p


def test_every_field_is_an_option_with_its_help_and_default():
    parser = build_parser()
    by_dest = {a.dest: a for a in parser._actions if a.help != argparse.SUPPRESS}  # not the undo flags
    for f in fields(TrainConfig):
        action = by_dest[f.name]  # every field has a flag
        assert f.metadata["help"] and action.help.startswith(as_flags(f.metadata["help"]))
        if f.metadata["default_text"]:
            assert as_flags(f.metadata["default_text"]) in action.help
        elif f.default is not None and not isinstance(f.default, bool):
            assert f"(default: {f.default})" in action.help
    assert list(by_dest["stage"].choices) == [s.number for s in STAGES]
    assert all(s.name in parser.epilog for s in STAGES)
    assert "REFERENCE" not in parser.format_help()


def test_ranges_and_messages_name_fields_and_the_cli_prints_flags():
    with pytest.raises(ConfigError) as e:
        validate_config(TrainConfig(stage=9))
    assert str(e.value) == "`stage` must be 1, 2 or 3, got 9"
    assert as_flags(str(e.value)) == "--stage must be 1, 2 or 3, got 9"
    with pytest.raises(ConfigError, match="`method` must be lora, dora or full"):
        validate_config(TrainConfig(method="qlora"))
    assert as_flags("`compile` and `plot`, not `other`") == "--no-compile and --no-plot, not `other`"


@pytest.mark.parametrize("stage,has_text,want_ratio,want_warmup", [
    (1, True, 0.7, 0), (2, True, 0.7, 50), (3, True, 0.48, 0), (2, False, None, None)])
def test_resolve_applies_the_stage_rules_and_returns_a_new_config(stage, has_text, want_ratio, want_warmup):
    cfg = TrainConfig(stage=stage, iters=250, seed=1)
    before = copy.deepcopy(cfg)
    comps = STAGES[stage - 1].components
    got = resolve(cfg, comps, frozen_vision=stage < 3, main_batches=40, has_text=has_text)
    assert cfg == before and got is not cfg  # the caller's config is untouched
    assert (got.text_ratio, got.modality_warmup) == (want_ratio, want_warmup)  # warm-up: a fifth in stage 2
    assert got.iters == 250 and got.warmup == 12  # min(100, 250 // 20)
    assert got.lr == {1: 1e-3, 2: 1e-4, 3: 1e-4}[stage]
    assert got.vision_lr == (1e-5 if stage == 3 else None)  # lr / 10, only when vision trains
    full = resolve(TrainConfig(stage=2, method="full", epochs=2), ("aligner", "llm"), True, 40, False)
    assert full.lr == 2e-5 and full.iters == 80 and full.warmup == 4
    with pytest.raises(ValueError, match="`text_ratio` needs `text_data`"):
        resolve(TrainConfig(stage=1, text_ratio=0.5), ("aligner",), True, 40, False)


class Recorder(TrainingCallback):
    def __init__(self):
        self.events = []

    def on_train_begin(self, state):
        self.events.append(("begin", state.step))

    def on_train_loss_report(self, info):
        self.events.append(("train", info["step"]))

    def on_val_loss_report(self, info):
        self.events.append((info["type"], info["step"]))

    def on_step_end(self, state):
        self.events.append(("step", state.step))

    def on_train_end(self, state, error):
        self.events.append(("end", state.step, error))


def test_train_leaves_the_config_alone_and_calls_extra_callbacks(tiny_dir, text_data, tmp_path):
    cfg = TrainConfig(stage=3, model=str(tiny_dir), data=str(text_data), out=str(tmp_path / "a"), iters=3,
                      batch_size=2, steps_per_report=2, val_data=str(text_data), val_every=2, quiet=True)
    before = copy.deepcopy(cfg)
    rec = Recorder()
    res = train(cfg, callbacks=[rec])
    assert cfg == before  # defaults were resolved into a copy
    # validation runs before the extra callbacks' on_step_end, so its record comes first
    assert rec.events == [("begin", 0), ("step", 1), ("train", 2), ("val", 2), ("step", 2),
                          ("train", 3), ("val", 3), ("step", 3), ("end", 3, None)]
    saved = json.loads((Path(res.out) / "run_config.json").read_text())
    assert saved["lr"] == 1e-4 and saved["warmup"] == 0 and saved["vision_lr"] == 1e-5


def test_the_loop_runs_over_built_parts_with_a_loss_of_ones_own(tiny_dir, text_data, tmp_path):
    """setup.build -> train_loop with another loss (twice the standard one) and no callbacks."""
    cfg, resume = prepare(TrainConfig(stage=3, model=str(tiny_dir), data=str(text_data), out=str(tmp_path / "p"),
                                      iters=2, batch_size=2, quiet=True))
    run = RunDir.open(Path(cfg.out), cfg.force)
    parts = build(cfg, run, resume)
    standard = make_loss(parts.frozen_vision)
    seen = []

    def doubled(model, *inputs):
        loss, ntoks, mm = standard(model, *inputs)
        return 2 * loss, ntoks, mm

    class Losses(TrainingCallback):
        def on_step_end(self, state):
            seen.append(state.loss)

    state = train_loop(parts.model, parts.optimizer, doubled, parts.batches, LoopArgs(iters=2), [Losses()],
                       schedule=parts.schedule)
    assert state.step == 2 and not state.stopped and len(seen) == 2
    first = standard(parts.model, *parts.batches.next().inputs)[0].item()  # one more batch, by the loss
    assert 0 < first < seen[0]  # the loop reported the doubled loss
