"""Setting a run up and running it: ``train(cfg)`` = :func:`prepare`, :func:`build`, :func:`run_parts`.

To change one part, build the parts and call :func:`mlx_dsvl.train.loop.train_loop` with a loss or
callbacks of your own. With several processes every one sets the same run up and checks that all
did so alike before anything is written; rank 0 alone writes.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.optimizers as optim

from ..adapters import adapter_config, model_fingerprint
from ..loading import load
from ..outputs import write_text_atomic
from ..utils import file_digest
from . import checkpoint as ckpt
from .batches import BatchProducer, BatchStream, VisionFeatureCache, vision_model_key
from .callbacks import (
    METRICS,
    Console,
    EvalSet,
    Evaluation,
    MetricsLog,
    Plot,
    TrainingCallback,
    Validation,
    read_eval_sets,
    validation_losses,
)
from .checkpoint import Checkpointer
from .config import STRUCTURAL, THIS_COMMAND, ConfigError, TrainConfig, mixer_of, resolve, validate_config
from .data import Dataset, load_jsonl
from .distributed import SOLO, ProcessLost, World, global_batch_check
from .guard import GuardTripped, LanguageGuard, read_guard
from .loop import LoopArgs, NonFiniteLoss, TrainingStopped, enable_grad_checkpoint, make_loss, train_loop
from .report import Progress, Window, as_process, fmt_time, note, start_line, warn, who
from .rundir import RUN_CONFIG, RunDir, recover
from .schedule import ModalityMixer, lr_schedule
from .stages import StageError, TrainSpec, count_parameters, parse_components, setup_trainable, vision_trainable

if TYPE_CHECKING:
    from ..models.deepseek_vl import DeepseekVL
    from ..processing.chat import ChatProcessor

VISION_CACHE = "vision_cache"  # in the run folder unless `vision_cache_dir`
DATA_FILES = ("data", "val_data", "text_data", "val_text_data")


@dataclass
class Resume:
    path: Path  # the checkpoint folder
    state: dict[str, Any]  # its state.json


@dataclass(kw_only=True)
class TrainParts:
    """A run, set up: what :func:`~mlx_dsvl.train.loop.train_loop` and its callbacks receive."""

    cfg: TrainConfig  # resolved: every derived default filled in
    run: RunDir
    model: DeepseekVL
    processor: ChatProcessor
    spec: TrainSpec
    frozen_vision: bool
    data: dict[str, Dataset | None]
    mixer: ModalityMixer | None
    batches: BatchProducer
    optimizer: optim.Optimizer
    schedule: Callable
    cache: VisionFeatureCache | None
    start_step: int
    history: list[dict]  # the records so far (a resumed run's included)
    adapter_cfg: dict
    meta: dict  # what every checkpoint records: config, base-model fingerprint, data digests
    resume: Resume | None
    n_params: tuple[int, int]  # (trained, total)
    eval_sets: list[EvalSet]  # eval_data, read
    guard: EvalSet | None = None  # guard_data, read
    world: World = SOLO  # the processes of the run

    @property
    def writer(self) -> bool:
        """This process writes the run's files."""
        return self.world.writer


# -- options --------------------------------------------------------------------------------------


def prepare(cfg: TrainConfig, explicit: Sequence[str] = (), world: World = SOLO
            ) -> tuple[TrainConfig, Resume | None]:
    """Check the options and merge a resumed run's into a new config."""
    validate_config(cfg)
    resume = None
    if cfg.resume:
        if world.writer:
            recover(Path(cfg.resume))  # a run folder that a killed `force` run left mid-swap
        cfg, resume = merge_resume(cfg, explicit, world.size)
    for req in ("stage", "model", "data", "out"):
        if getattr(cfg, req) in (None, ""):
            raise ValueError(f"`{req}` is required")
    if cfg.iters is not None and cfg.epochs is not None:
        raise ValueError("give `iters` or `epochs`, not both")
    if cfg.eval_target != "letter" and cfg.eval_method != "likelihood":
        raise ConfigError("eval_target", f"{cfg.eval_target} applies to `eval_method` likelihood only "
                                         f"(`eval_method` {cfg.eval_method} reads the option out of the reply)")
    if cfg.guard_stop and not cfg.guard_data:
        raise ConfigError("guard_stop", "needs `guard_data`")
    return cfg, resume


def merge_resume(cfg: TrainConfig, explicit: Sequence[str], processes: int = 1) -> tuple[TrainConfig, Resume]:
    """The checkpoint's config with the options given now; structural changes are refused (the
    batch size may change with the number of processes if the global batch stays)."""
    path = ckpt.find_checkpoint(cfg.resume)
    state = ckpt.read_checkpoint(path)
    saved = state.get("config") or {}
    merged = TrainConfig(**{k: v for k, v in saved.items() if k in {f.name for f in fields(TrainConfig)}})
    batch = cfg.batch_size if "batch_size" in explicit else merged.batch_size
    why = global_batch_check(merged.batch_size, int(state.get("processes", 1)), batch, processes)
    if why:
        raise ckpt.ResumeError(f"`resume` {path}: {why}")
    for name in explicit:
        new, old = getattr(cfg, name), saved.get(name)
        if name in STRUCTURAL and new != old and name != "batch_size":
            raise ckpt.ResumeError(f"`resume` {path}: `{name}` {new} differs from the checkpoint's {old}; "
                                   f"a resumed run keeps the original set-up")
        setattr(merged, name, new)
    if "epochs" in explicit and "iters" not in explicit:
        merged.iters = None  # the run's length is recomputed from the new epochs
    elif "iters" in explicit:
        merged.epochs = None
    for name in THIS_COMMAND:
        setattr(merged, name, getattr(cfg, name))
    if cfg.out is not None:
        merged.out = cfg.out
    elif ckpt.run_of(path) is not None:
        merged.out = str(ckpt.run_of(path))
    else:
        raise ckpt.ResumeError(f"`resume` {path}: this checkpoint is not inside a run folder; give `out`")
    return merged, Resume(path, state)


# -- parts ----------------------------------------------------------------------------------------


def check_base_model(resume: Resume, fingerprint: dict, model_name: str) -> None:
    fp = resume.state.get("fingerprint") or {}
    base = (resume.state.get("config") or {}).get("model")
    if fp.get("arch") != fingerprint["arch"]:
        raise ckpt.ResumeError(f"`resume` {resume.path}: this checkpoint was trained from another model "
                               f"architecture ({base}); it cannot continue with `model` {model_name}")
    if fp.get("weights") != fingerprint["weights"]:
        raise ckpt.ResumeError(f"`resume` {resume.path}: this checkpoint was trained from other base "
                               f"weights ({base}), not from `model` {model_name}; refusing to mix them")


def training_spec(cfg: TrainConfig, model: DeepseekVL) -> TrainSpec:
    comps = parse_components(cfg.stage, cfg.train, model.config.vision.hybrid)
    targets = tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())
    spec = TrainSpec(stage=cfg.stage, components=comps, method=cfg.method, rank=cfg.lora_rank,
                     scale=cfg.lora_scale, dropout=cfg.lora_dropout, targets=targets, llm_layers=cfg.lora_layers)
    if cfg.cache_vision_features and vision_trainable(spec):
        raise StageError("`cache_vision_features` needs frozen vision towers (stages 1-2, or a `train` "
                         "set without siglip/sam/sam-neck)")
    return spec


def load_datasets(cfg: TrainConfig, processor: ChatProcessor) -> dict[str, Dataset | None]:
    kw = dict(max_seq_len=cfg.max_seq_len, long_policy=cfg.long_examples, skip_bad=cfg.skip_bad,
              verbose=not cfg.quiet)
    return {k: (load_jsonl(getattr(cfg, k), processor, **kw) if getattr(cfg, k) else None) for k in DATA_FILES}


def data_digests(cfg: TrainConfig) -> dict[str, str | None]:
    return {k: (file_digest(getattr(cfg, k)) if getattr(cfg, k) else None) for k in ("data", "text_data")}


def trainable_model(model: DeepseekVL, cfg: TrainConfig, spec: TrainSpec) -> None:
    """Adapters and trainable flags (their initialization follows ``seed``), grad checkpointing."""
    mx.random.seed(cfg.seed)
    setup_trainable(model, spec)
    if cfg.grad_checkpoint:
        if "llm" in spec.components:
            enable_grad_checkpoint(model.layers)
        if "siglip" in spec.components:
            enable_grad_checkpoint(model.towers()["siglip"].blocks)


def make_optimizer(model: DeepseekVL, cfg: TrainConfig, frozen_vision: bool
                   ) -> tuple[optim.Optimizer, Callable]:
    """AdamW, with a second schedule for the vision towers if they train at another rate."""
    schedule = lr_schedule(cfg.lr, cfg.iters, cfg.warmup, cfg.lr_schedule, cfg.min_lr_ratio)
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=cfg.weight_decay)
    if not frozen_vision and cfg.vision_lr != cfg.lr:
        vision_opt = optim.AdamW(
            learning_rate=lr_schedule(cfg.vision_lr, cfg.iters, cfg.warmup, cfg.lr_schedule, cfg.min_lr_ratio),
            weight_decay=cfg.weight_decay)
        optimizer = optim.MultiOptimizer([vision_opt, optimizer],
                                         [lambda path, _: path.startswith("vision_model.")])
    optimizer.init(model.trainable_parameters())
    return optimizer, schedule


def restore(resume: Resume, model: DeepseekVL, optimizer: optim.Optimizer, streams: dict[str, BatchStream | None],
            digests: dict) -> tuple[int, list[dict], mx.array | None]:
    """Restore the checkpoint; returns (step, history, every process's saved random state or None)."""
    rng_ranks = ckpt.restore(resume.path, model, optimizer)
    saved = resume.state.get("streams", {})
    streams["main"].load_state(saved["main"])
    if streams["text"] is not None and "text" in saved:
        streams["text"].load_state(saved["text"])
    if resume.state.get("data") != digests:
        warn("the data files changed since the checkpoint; the resumed run goes on over the new data "
             "(from the same position in the epoch, or the next epoch if the data is now shorter), "
             "not in the original order")
    return int(resume.state["step"]), list(resume.state.get("history", [])), rng_ranks


def rank_random_state(world: World, saved: mx.array | None) -> None:
    """Each process's own random stream (its shard's LoRA dropout masks), split from the run's;
    from a checkpoint of as many processes, each one's saved stream."""
    if world.size == 1:
        return
    if saved is not None and saved.shape[0] == world.size:
        key = saved[world.rank]
    else:
        key = mx.random.split(mx.random.state[0], world.size)[world.rank]
    ckpt.set_rng_state(key)


def build(cfg: TrainConfig, run: RunDir, resume: Resume | None = None, *,
          loaded: tuple[DeepseekVL, ChatProcessor] | None = None, world: World = SOLO) -> TrainParts:
    """Every part of a run. ``loaded``: a ``(model, processor)`` to train in place (e.g. quantized
    in memory for QLoRA). Nothing is written before the data is read and all processes agree."""
    model, processor = loaded if loaded is not None else load(cfg.model, dtype=cfg.dtype)
    fingerprint = model_fingerprint(model)
    if resume is not None:
        check_base_model(resume, fingerprint, cfg.model)
    spec = training_spec(cfg, model)
    frozen_vision = not vision_trainable(spec)
    data = load_datasets(cfg, processor)
    eval_sets = read_eval_sets(cfg.eval_data)
    guard = read_guard(cfg.guard_data)
    main, text = data["data"], data["text_data"]
    batch = cfg.batch_size * world.size  # the global batch: each process takes its share
    streams = {"main": BatchStream(main.lengths, batch, cfg.seed, stream=0),
               "text": BatchStream(text.lengths, batch, cfg.seed, stream=1) if text else None}
    cfg = resolve(cfg, spec.components, frozen_vision, streams["main"].batches_per_epoch, text is not None)
    mixer = mixer_of(cfg)

    trainable_model(model, cfg, spec)
    n_params = count_parameters(model)
    optimizer, schedule = make_optimizer(model, cfg, frozen_vision)
    digests = data_digests(cfg)
    start_step, history, rng_ranks = 0, [], None
    if resume is not None:
        start_step, history, rng_ranks = restore(resume, model, optimizer, streams, digests)
    rank_random_state(world, rng_ranks)
    config = asdict(cfg)
    world.agree({"options": config, "base model": fingerprint, "data files": digests,
                 "starting step and checkpoint files": [start_step, resume and resume.state.get("files")]})
    # Every process starts from rank 0's weights, however its own initialization came out.
    model.update(world.from_rank0(model.trainable_parameters()))
    if world.writer:
        run.create()
        write_text_atomic(run.path / RUN_CONFIG, json.dumps(config, indent=2))
        # rewritten from the history on resume
        write_text_atomic(run.path / METRICS, "".join(json.dumps(r) + "\n" for r in history))
    cache = None
    if cfg.cache_vision_features:
        # Rank 0 keeps the run's cache; another process shares a `vision_cache_dir` (written
        # entry by entry under unique temporary names) or keeps its features in memory.
        folder = cfg.vision_cache_dir or (run.path / VISION_CACHE if world.writer else None)
        cache = VisionFeatureCache(vision_model_key(model), folder)

    batches = BatchProducer(main=main, main_stream=streams["main"], text=text, text_stream=streams["text"],
                            mixer=mixer, processor=processor, grad_accum=cfg.grad_accum, pad_to=cfg.pad_to,
                            skip_bad=cfg.skip_bad, cache=cache, model=model, start_step=start_step,
                            shard=world.shard)
    return TrainParts(
        cfg=cfg, run=run, model=model, processor=processor, spec=spec, frozen_vision=frozen_vision, data=data,
        mixer=mixer, batches=batches, optimizer=optimizer, schedule=schedule, cache=cache, start_step=start_step,
        history=history, adapter_cfg=adapter_config(model, spec, str(cfg.model), fingerprint),
        meta={"config": config, "fingerprint": fingerprint, "data": digests}, resume=resume, n_params=n_params,
        eval_sets=eval_sets, guard=guard, world=world)


# -- stopping ------------------------------------------------------------------------------------


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP stop the run after the current step, which is saved; a second
    one stops at once, unsaved. Only the main thread may install handlers (Python's rule)."""

    def __init__(self):
        self.signum = 0
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for name in ("SIGINT", "SIGTERM", "SIGHUP"):
                sig = getattr(signal, name, None)  # no SIGHUP on Windows
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handle)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum, frame):
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"{who()}{self.name}: stopping after this step to save a checkpoint (once more: stop at "
              f"once, without saving)", file=sys.stderr, flush=True)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


# -- running -------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class TrainResult:
    out: Path
    steps: int
    history: list[dict[str, Any]]
    adapter_dir: Path
    checkpoint: Path | None
    seconds: float
    data_stats: dict[str, dict[str, int]] = field(default_factory=dict)
    stopped_by: int = 0  # the signal (SIGINT, SIGTERM, SIGHUP) that stopped the run early, if any
    rank: int = 0  # this process among the run's processes (rank 0 wrote the outputs)


def train(cfg: TrainConfig, explicit: Sequence[str] = (), *, loaded: tuple[DeepseekVL, ChatProcessor] | None = None,
          callbacks: Sequence[TrainingCallback] = ()) -> TrainResult:
    """Run training as configured. ``explicit``: the options given on the command line (a resume may
    override only non-structural ones); ``loaded``: see :func:`build`."""
    t_start = time.perf_counter()
    world = World.init(cfg.dist_timeout)
    try:
        with as_process(world.rank, world.size):
            cfg, resume = prepare(cfg, explicit, world)
            # Rank 0 alone decides where the run writes (and cleans up after killed runs).
            run = (RunDir.open(Path(cfg.out), cfg.force, resume.path if resume else None) if world.writer
                   else RunDir(Path(cfg.out)))
            try:
                return run_parts(build(cfg, run, resume, loaded=loaded, world=world), t_start, callbacks)
            finally:
                run.abandon()  # a replacement that saved no checkpoint leaves the earlier run as it was
    finally:
        world.close()


def standard_callbacks(parts: TrainParts, log: Progress, t_start: float, loss_fn,
                       extra: Sequence[TrainingCallback] = ()) -> list[TrainingCallback]:
    """In an order that puts a step's records in the history before its checkpoint is saved."""
    cfg, run, data = parts.cfg, parts.run, parts.data
    cbs: list[TrainingCallback] = [MetricsLog(run, parts.history, parts.writer),
                                   Console(log, parts.start_step, t_start)]
    val_sets = [(d, text_only) for d, text_only in ((data["val_data"], False), (data["val_text_data"], True)) if d]
    if val_sets:
        cbs.append(Validation(lambda: validation_losses(
            parts.model, loss_fn, val_sets, processor=parts.processor, batch_size=cfg.batch_size,
            max_batches=cfg.val_batches, pad_to=cfg.pad_to, cache=parts.cache), cfg.val_every, log.line))
    if parts.eval_sets:
        cbs.append(Evaluation(parts.model, parts.processor, parts.eval_sets, every=cfg.eval_every,
                              method=cfg.eval_method, target=cfg.eval_target, batch_size=cfg.eval_batch_size,
                              limit=cfg.eval_limit, say=log.line))
    if parts.guard is not None:  # before the checkpointer: a step is scored before it is saved
        cbs.append(LanguageGuard(parts.model, parts.processor, parts.guard, history=parts.history,
                                 max_drop=cfg.guard_max_drop, stop=cfg.guard_stop, eval_every=cfg.eval_every,
                                 save_every=cfg.save_every, method=cfg.eval_method, target=cfg.eval_target,
                                 batch_size=cfg.eval_batch_size, say=log.line))
    cbs += list(extra)

    def moved(folder: Path) -> None:  # the cache moves with a run that replaced an earlier one
        if parts.cache is not None and cfg.vision_cache_dir is None:
            parts.cache.folder = folder / VISION_CACHE / parts.cache.model_key

    resumed = parts.resume.path if parts.resume else None
    cbs.append(Checkpointer(run, model=parts.model, optimizer=parts.optimizer, adapter_cfg=parts.adapter_cfg,
                            meta=parts.meta, history=parts.history, every=cfg.save_every,
                            keep=cfg.keep_checkpoints, start_step=parts.start_step, last=resumed, say=log.line,
                            on_publish=moved, world=parts.world))
    if cfg.plot:
        cbs.append(Plot(run, parts.history, f"stage {cfg.stage} -- {run.path.name}", parts.writer))
    return cbs


def run_parts(parts: TrainParts, t_start: float, extra: Sequence[TrainingCallback] = ()) -> TrainResult:
    """The loop over built parts with the standard callbacks; the end of the run reported."""
    cfg, run, world = parts.cfg, parts.run, parts.world
    log = Progress(cfg.iters, cfg.quiet or not world.writer)
    main, text = parts.data["data"], parts.data["text_data"]
    n_train, n_total = parts.n_params
    log.line(start_line(cfg, components=parts.spec.components, frozen_vision=parts.frozen_vision,
                        n_train=n_train, n_total=n_total, n_main=len(main), n_text=len(text) if text else None,
                        resume=parts.resume.path if parts.resume else None, start_step=parts.start_step))
    loss_fn = make_loss(parts.frozen_vision)
    callbacks = standard_callbacks(parts, log, t_start, loss_fn, extra)
    saver = next(cb for cb in callbacks if isinstance(cb, Checkpointer))
    args = LoopArgs(cfg.iters, cfg.grad_accum, cfg.max_grad_norm, cfg.steps_per_report, cfg.compile)
    stop, agreed = StopSignals(), [0]
    resume_hint = f"; resume with `resume` {run.out}"
    if world.watchdog is not None:
        world.watchdog.explain = lambda: f"; {saver.where()}" + (resume_hint if saver.last else "")

    def should_stop() -> bool:  # a signal that reached any process stops all of them at this step
        agreed[0] = int(world.max(stop.signum, "the agreement on stopping"))
        return agreed[0] > 0

    try:
        state = train_loop(parts.model, parts.optimizer, loss_fn, parts.batches, args, callbacks,
                           start_step=parts.start_step, schedule=parts.schedule, window=Window(parts.mixer),
                           should_stop=should_stop, world=world)
        world.barrier("rank 0 writing the run's outputs")
    except NonFiniteLoss as e:
        raise TrainingStopped(f"{e}; {saver.where()}", saver.last) from None
    except GuardTripped as e:
        raise TrainingStopped(f"{e}; {saver.where(staged=True)}", saver.last) from None
    except ProcessLost as e:
        raise ProcessLost(f"{e}; {saver.where()}" + (resume_hint if saver.last else "")) from None
    finally:
        stop.restore()
    signum = agreed[0] if state.stopped else 0
    if signum:
        name = signal.Signals(signum).name + ("" if stop.signum else " (sent to another process of the run)")
        note(f"{name}: " + (f"stopped at step {state.step}; resume with `resume` {run.out}"
                            if state.step > parts.start_step else
                            "stopped before the first step; nothing was saved"
                            + (f", {run.out} is unchanged" if run.staged else "")))
    if parts.cache is not None:
        log.line(f"vision feature cache: {parts.cache.hits} hits, {parts.cache.misses} images encoded")
    seconds = time.perf_counter() - t_start
    if not signum:
        log.line(f"done: {state.step} steps in {fmt_time(seconds)}; adapters in {run.path}; "
                 f"metrics in {run.path / METRICS}")
    stats = {k: (v.stats.as_dict() if v is not None else None) for k, v in parts.data.items()}
    return TrainResult(out=run.out, steps=state.step, history=parts.history, adapter_dir=run.out,
                       checkpoint=saver.last, seconds=seconds, data_stats=stats, stopped_by=signum, rank=world.rank)
