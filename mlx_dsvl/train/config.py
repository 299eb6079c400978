"""Every training option, with its default, help text and range in one place (the CLI is built
from :class:`TrainConfig`'s fields, as mlx-lm's ``TrainingArgs`` carries help by each default).

A derived default is ``None`` here and filled in by :func:`resolve`, the one place those rules
live. Messages name options in backticks (`` `text_ratio` ``); the CLI shows them as flags.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..eval.likelihood import TARGETS as EVAL_TARGETS
from ..eval.runner import DEFAULT_BATCH_SIZE as EVAL_BATCH_SIZE
from ..eval.runner import METHODS as EVAL_METHODS
from ..loading import DTYPES
from .schedule import ModalityMixer, plan_iters
from .stages import ALIGNER_ONLY_LR, METHOD_LR, METHODS, STAGES, default_lr, get_stage

WARMUP_MAX, WARMUP_DIVISOR = 100, 20  # default lr warm-up: min(100, iters / 20) steps
VISION_LR_DIVISOR = 10  # default vision lr: the LLM's / 10 (the towers move more gently)

Check = tuple[Callable[[Any], bool], str]


def _at_least(lo) -> Check:
    return (lambda v: v >= lo), f"must be >= {lo}"


POSITIVE: Check = ((lambda v: 0 < v < math.inf), "must be > 0")
FRACTION: Check = ((lambda v: 0 <= v <= 1), "must be within [0, 1]")
NON_NEGATIVE: Check = ((lambda v: 0 <= v < math.inf), "must be >= 0")


def option(default: Any = None, help: str = "", *, group: str, check: Check | None = None,
           choices: Sequence | None = None, default_text: str | None = None,
           structural: bool = False, flag: str | None = None, metavar: str | None = None):
    """A :class:`TrainConfig` field.  ``check``: (predicate, what it requires); ``choices``: the
    allowed values; ``default_text``: the default as --help states it (when it is derived);
    ``structural``: a resumed run must keep it; ``flag``: the CLI flag when not ``--field-name``."""
    meta = dict(help=help, group=group, check=check, choices=tuple(choices) if choices else None,
                default_text=default_text, structural=structural, flag=flag, metavar=metavar)
    return field(default=default, metadata=meta)


def _stage_components() -> str:
    return "; ".join(f"stage {s.number} {','.join(s.components)}" for s in STAGES)


def _by_value(pairs) -> str:
    """``[(value, what)]`` -> "v1 for a/b, v2 for c" (equal values stated once)."""
    groups = {}
    for value, what in pairs:
        groups.setdefault(value, []).append(str(what))
    return ", ".join(f"{v} for {'/'.join(w)}" for v, w in groups.items())


def _sci(x: float) -> str:
    return re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{x:.0e}") if x < 0.01 else f"{x:g}"


def _stage_ratios() -> str:
    return _by_value((f"{s.text_ratio:g}", f"stage {s.number}") for s in STAGES).replace("/stage ", "/")


def _stage_warmups() -> str:
    rules = [f"{s.modality_warmup} of the run in stage {s.number}" for s in STAGES if s.modality_warmup]
    return ", ".join(rules + ["0 otherwise"])


def _lr_rule() -> str:
    by_method = _by_value((_sci(lr), m) for m, lr in METHOD_LR.items())
    return f"{_sci(ALIGNER_ONLY_LR)} when only the aligner trains, {by_method}"


REQUIRED = "required unless `resume`"
TRAIN, DATA, OPTIM, OUTPUT, EVAL = "what to train", "data", "optimization", "output", "evaluation"
GUARD = "language guard"
DIST = "several processes (mlx.launch)"


@dataclass
class TrainConfig:
    """Every option of ``python -m mlx_dsvl.train`` (``None``: see the field's default_text)."""

    stage: int | None = option(
        help="training stage", group=TRAIN, choices=[s.number for s in STAGES], default_text=REQUIRED,
        structural=True)
    model: str | None = option(help="base model: folder or hub id", group=TRAIN, default_text=REQUIRED)
    data: str | None = option(help="training JSONL", group=DATA, default_text=REQUIRED)
    out: str | None = option(
        help="output folder: new or empty", group=OUTPUT,
        default_text="required unless `resume`, which continues in the checkpoint's run folder")
    val_data: str | None = option(help="validation JSONL (multimodal and/or text)", group=DATA)
    text_data: str | None = option(help="text-only JSONL mixed in by `text_ratio`", group=DATA)
    val_text_data: str | None = option(help="text-only validation JSONL", group=DATA)
    text_ratio: float | None = option(
        help="share of text-only batches once warmed up; needs `text_data`", group=DATA, check=FRACTION,
        default_text=_stage_ratios(), structural=True)
    modality_warmup: int | None = option(
        help="steps over which the text share moves from 1.0 to `text_ratio`", group=DATA,
        check=_at_least(0), default_text=_stage_warmups(), structural=True)
    iters: int | None = option(help="optimizer steps", group=OPTIM, check=_at_least(1),
                                  default_text="one epoch")
    epochs: float | None = option(help="epochs over `data` instead of `iters`", group=OPTIM,
                                     check=POSITIVE)
    batch_size: int = option(4, "examples per batch", group=OPTIM, check=_at_least(1), structural=True)
    grad_accum: int = option(1, "micro-batches per optimizer step", group=OPTIM, check=_at_least(1),
                             structural=True)
    lr: float | None = option(help="peak learning rate", group=OPTIM, check=POSITIVE,
                                 default_text=_lr_rule(), structural=True)
    vision_lr: float | None = option(
        help="peak learning rate of trained vision-tower weights", group=OPTIM, check=POSITIVE,
        default_text=f"`lr` / {VISION_LR_DIVISOR}: the towers move more gently than the LLM",
        structural=True)
    min_lr_ratio: float = option(0.1, "cosine decays to lr x this at the last step", group=OPTIM,
                                 check=FRACTION, structural=True)
    warmup: int | None = option(help="linear warm-up steps", group=OPTIM, check=_at_least(0),
                                   default_text=f"min({WARMUP_MAX}, iters/{WARMUP_DIVISOR})",
                                   structural=True)
    lr_schedule: str = option("cosine", "after warm-up", group=OPTIM, choices=["cosine", "constant"],
                              structural=True)
    weight_decay: float = option(0.0, "AdamW weight decay", group=OPTIM, check=NON_NEGATIVE, structural=True)
    max_grad_norm: float = option(
        1.0, "global gradient-norm clipping, 0 disables", group=OPTIM,
        check=((lambda v: 0 <= v < math.inf), "must be >= 0 (0 disables clipping)"), structural=True)
    max_seq_len: int = option(2048, "longest sequence in tokens, 576 per image", group=DATA,
                              check=_at_least(2), structural=True)
    long_examples: str = option(
        "truncate", "longer examples are truncated at a token boundary outside any image, or skipped; "
        "a warning either way", group=DATA, choices=["truncate", "skip"], structural=True)
    skip_bad: bool = option(False, "skip (and count) malformed lines and missing or unreadable images "
                            "instead of stopping", group=DATA, structural=True)
    train: str | None = option(
        help="override the stage's trainable set: comma list of aligner, llm, siglip, sam, sam-neck",
        group=TRAIN, default_text=_stage_components(), structural=True, metavar="LIST")
    method: str = option(
        "lora", "how the LLM and trained vision transformers train (QLoRA when the loaded model is "
        "quantized); the aligner always trains in full", group=TRAIN, choices=METHODS, structural=True)
    lora_rank: int = option(8, "LoRA/DoRA rank", group=TRAIN, check=_at_least(1), structural=True)
    lora_scale: float = option(20.0, "LoRA/DoRA scale, mlx-lm convention: update = scale * B A x",
                               group=TRAIN, check=POSITIVE, structural=True)
    lora_dropout: float = option(0.0, "LoRA dropout", group=TRAIN,
                                 check=((lambda v: 0 <= v < 1), "must be within [0, 1)"), structural=True)
    lora_layers: int | None = option(help="adapt only the last N LLM blocks", group=TRAIN,
                                        check=_at_least(1), default_text="all", structural=True)
    lora_targets: str = option(
        "attn,mlp", "Linear layers that get adapters: comma list of attn, mlp, lm_head and/or single "
        "layers (q_proj, v_proj, ..., qkv, fc1, ...)", group=TRAIN, structural=True, metavar="LIST")
    grad_checkpoint: bool = option(
        False, "recompute transformer-block activations in the backward pass (less memory)", group=OPTIM)
    cache_vision_features: bool = option(
        False, "frozen towers (stages 1-2): encode each image once, keyed by content hash and model, "
        "and reuse the features", group=OPTIM, structural=True)
    vision_cache_dir: str | None = option(
        help="where cached features live; share it across runs", group=OPTIM,
        default_text="OUT/vision_cache")
    seed: int = option(0, "random seed: data order, mixing, init", group=OPTIM, check=_at_least(0),
                       structural=True)
    save_every: int = option(100, "checkpoint every N steps, and always at the end (0 = end only)",
                             group=OUTPUT, check=_at_least(0))
    keep_checkpoints: int = option(0, "keep only the newest N checkpoints (0 = all)", group=OUTPUT,
                                   check=_at_least(0))
    resume: str | None = option(
        help="continue exactly from a checkpoint folder or a run's `out` folder (its latest "
        "checkpoint), in that run's folder unless `out` is given (the run's options are reused; "
        "`iters`/`epochs`, `out`, `save_every`, validation, evaluation and output options may "
        "change, the training set-up may not)", group=OUTPUT, metavar="DIR")
    force: bool = option(
        False, "replace the earlier run in `out` (kept until this run saves its first checkpoint), "
        "or with `resume` from an earlier step, drop the later ones", group=OUTPUT)
    val_every: int = option(200, "validate every N steps and at the end", group=OUTPUT, check=_at_least(0))
    val_batches: int = option(-1, "validation batches per evaluation, -1 = all", group=OUTPUT,
                              check=((lambda v: v == -1 or v >= 1), "must be -1 (all) or >= 1"))
    steps_per_report: int = option(10, "steps between progress lines / metrics.jsonl records",
                                   group=OUTPUT, check=_at_least(1))
    dtype: str | None = option(help="model dtype", group=TRAIN, choices=list(DTYPES),
                                  default_text="float32 on CPU, bfloat16 on a GPU")
    compile: bool = option(True, "do not compile the training step (debugging)", group=OPTIM,
                           flag="--no-compile")
    pad_to: int = option(32, "pad batch lengths to a multiple of N (fewer recompilations)", group=DATA,
                         check=_at_least(1), structural=True)
    plot: bool = option(True, "do not draw loss.png", group=OUTPUT, flag="--no-plot")
    quiet: bool = option(False, "no progress output", group=OUTPUT)
    eval_data: list[str] | None = option(
        help="a benchmark to score the model on while it trains: MMBench TSV, JSONL or CSV (as "
        "python -m mlx_dsvl.eval reads), e.g. a multimodal set and a text-only one to watch language "
        "retention; NAME=FILE names it in metrics.jsonl (default: the file name); repeat for several; "
        "an empty value scores none (a resumed run's sets are kept otherwise)",
        group=EVAL, metavar="[NAME=]FILE")
    eval_every: int = option(200, "score `eval_data` before the first step, every N steps and at the "
                             "end (0: first and last only)", group=EVAL, check=_at_least(0))
    eval_method: str = option("likelihood", "multiple choice answered by the options' likelihood or by "
                              "greedy generation", group=EVAL, choices=EVAL_METHODS)
    eval_target: str = option(
        "letter", "`eval_method` likelihood: score an option by the likelihood of its letter (' A') or of "
        "its text (' red': for a model that answers with words), as python -m mlx_dsvl.eval --target",
        group=EVAL, choices=EVAL_TARGETS)
    eval_limit: int | None = option(help="score only the first N questions of each set", group=EVAL,
                                       check=_at_least(1), default_text="all")
    eval_batch_size: int = option(EVAL_BATCH_SIZE, "questions per batch", group=EVAL, check=_at_least(1))
    guard_data: str | None = option(
        help="a text-only multiple-choice benchmark the base model answers well (any file python -m "
        "mlx_dsvl.eval reads), scored as `eval_method`/`eval_target` say before the first step, at each "
        "evaluation (`eval_every`) and at each checkpoint; a drop of more than `guard_max_drop` points "
        "from its first score is said once, recorded in metrics.jsonl and drawn in loss.png",
        group=GUARD, metavar="FILE")
    guard_max_drop: float = option(
        5.0, "accuracy points the `guard_data` set may lose from its first score; several hundred "
        "questions keep its noise within a few points", group=GUARD,
        check=((lambda v: 0 <= v <= 100), "must be within [0, 100] (accuracy points)"), metavar="POINTS")
    guard_stop: bool = option(
        False, "stop when the guard's drop exceeds the limit, without saving that step: the last "
        "checkpoint (checkpoints/latest, scored by the guard when it was saved) is the last good one", group=GUARD)
    dist_timeout: float = option(
        300.0, "stop when one process waits this many seconds for the others (one hung, or its machine "
        "is unreachable; a process that dies stops the run at once); 0 waits forever", group=DIST,
        check=NON_NEGATIVE)


# Options that define what is trained and on which data: a resumed run must keep them.
STRUCTURAL = tuple(f.name for f in fields(TrainConfig) if f.metadata["structural"])
# What one command asks: never inherited from a resumed run.
THIS_COMMAND = ("resume", "force")
OPTION_NAMES = frozenset(f.name for f in fields(TrainConfig))


class ConfigError(ValueError):
    """An option outside its range: ``option`` names the TrainConfig field, ``problem`` says why."""

    def __init__(self, option: str, problem: str):
        super().__init__(f"`{option}` {problem}")
        self.option, self.problem = option, problem


def one_of(choices: Sequence) -> str:
    names = [str(c) for c in choices]
    return "must be " + (" or ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} or {names[-1]}")


def option_checks():
    """``(field name, predicate, problem)`` for every option with a range or a set of choices."""
    for f in fields(TrainConfig):
        m = f.metadata
        if m["check"] is not None:
            yield f.name, m["check"][0], m["check"][1]
        elif m["choices"] is not None:
            yield f.name, (lambda v, c=m["choices"]: v in c), one_of(m["choices"])


def validate_config(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` for the first option outside its range."""
    for name, ok, problem in option_checks():
        v = getattr(cfg, name)
        if v is not None and not ok(v):  # NaN fails every comparison
            raise ConfigError(name, f"{problem}, got {v}")


def flag_of(name: str) -> str:
    f = next(f for f in fields(TrainConfig) if f.name == name)
    return f.metadata["flag"] or "--" + name.replace("_", "-")


def as_flags(text: str) -> str:
    """Option names in backticks -> command-line flags (`` `text_ratio` `` -> ``--text-ratio``)."""
    return re.sub(r"`([a-z_]+)`", lambda m: flag_of(m.group(1)) if m.group(1) in OPTION_NAMES
                  else m.group(0), text)


# -- derived defaults ----------------------------------------------------------------------------


def resolve(cfg: TrainConfig, components: Sequence[str], frozen_vision: bool, main_batches: int,
            has_text: bool) -> TrainConfig:
    """A new config with every derived default filled in."""
    stage = get_stage(cfg.stage)
    mixer, text_ratio, modality_warmup = None, cfg.text_ratio, cfg.modality_warmup
    if has_text:
        if text_ratio is None:
            text_ratio = stage.text_ratio
        if modality_warmup is None:  # a share of the run, whose length depends on the ratio
            guess = cfg.iters or math.ceil((cfg.epochs or 1.0) * main_batches / max(1e-6, 1 - text_ratio))
            modality_warmup = stage.warmup_steps(guess)
        mixer = ModalityMixer(text_ratio, modality_warmup, cfg.seed)
    elif text_ratio is not None:
        raise ValueError("`text_ratio` needs `text_data`")
    iters = plan_iters(cfg.iters, cfg.epochs, cfg.grad_accum, main_batches, mixer)
    lr = cfg.lr if cfg.lr is not None else default_lr(components, cfg.method)
    warmup = cfg.warmup if cfg.warmup is not None else min(WARMUP_MAX, iters // WARMUP_DIVISOR)
    vision_lr = cfg.vision_lr
    if not frozen_vision and vision_lr is None:
        vision_lr = lr / VISION_LR_DIVISOR
    return replace(cfg, text_ratio=text_ratio, modality_warmup=modality_warmup, iters=iters, lr=lr,
                   warmup=warmup, vision_lr=vision_lr)


def mixer_of(cfg: TrainConfig) -> ModalityMixer | None:
    """The modality mixer of a resolved config with text-only data (else None)."""
    if cfg.text_data is None:
        return None
    return ModalityMixer(cfg.text_ratio, cfg.modality_warmup, cfg.seed)
