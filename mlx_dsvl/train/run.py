"""``train(cfg)``: set a run up, run the loop with the standard callbacks, say how it ended.

The convenience entry of the CLI and the Python API (as mlx-lm's ``lora.train_model`` wraps
``tuner.trainer.train``).  To change one part, build the parts with
:func:`mlx_dsvl.train.setup.build` and call :func:`mlx_dsvl.train.loop.train_loop` with a loss
or callbacks of your own.  Started by ``mlx.launch`` it trains data-parallel on the processes
launched (:mod:`mlx_dsvl.train.distributed`).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .callbacks import METRICS, Console, MetricsLog, Plot, TrainingCallback
from .config import TrainConfig
from .distributed import ProcessLost, World
from .evaluation import Evaluation, Validation, validation_losses
from .loop import LoopArgs, NonFiniteLoss, TrainingStopped, train_loop
from .loss import make_loss
from .report import Progress, Window, as_process, fmt_time, note, start_line
from .rundir import RunDir
from .saving import Checkpointer
from .setup import VISION_CACHE, TrainParts, build, prepare
from .signals import StopSignals


@dataclass
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


def train(cfg: TrainConfig, explicit: Sequence[str] = (), loaded=None,
          callbacks: Sequence[TrainingCallback] = ()) -> TrainResult:
    """Run training as configured; see ``python -m mlx_dsvl.train --help``.

    ``explicit``: the option names given on the command line (a resumed run may override only
    non-structural ones).  ``loaded``: an already loaded ``(model, processor)`` of ``cfg.model``
    to train in place instead of loading it (e.g. a model quantized in memory for QLoRA).
    ``callbacks``: more callbacks; they see every record and run before the checkpoint of a step.
    ``cfg`` itself is never changed.
    """
    t_start = time.perf_counter()
    world = World.init(cfg.dist_timeout)
    try:
        with as_process(world.rank, world.size):
            cfg, resume = prepare(cfg, explicit, world)
            # Rank 0 alone decides where the run writes (and cleans up after killed runs).
            run = (RunDir.open(Path(cfg.out), cfg.force, resume.path if resume else None) if world.writer
                   else RunDir(Path(cfg.out)))
            try:
                return run_parts(build(cfg, run, resume, loaded, world), t_start, callbacks)
            finally:
                run.abandon()  # a replacement that saved no checkpoint leaves the earlier run as it was
    finally:
        world.close()


def standard_callbacks(parts: TrainParts, log: Progress, t_start: float, loss_fn,
                       extra: Sequence[TrainingCallback] = ()) -> list[TrainingCallback]:
    """metrics.jsonl, progress, validation, benchmarks, ``extra``, checkpoints, loss.png -- in
    that order (a step's records are in the history before its checkpoint is saved)."""
    cfg, run, data = parts.cfg, parts.run, parts.data
    cbs: list[TrainingCallback] = [MetricsLog(run, parts.history, parts.writer),
                                   Console(log, parts.start_step, t_start)]
    val_sets = [(d, text_only) for d, text_only in ((data["val_data"], False), (data["val_text_data"], True)) if d]
    if val_sets:
        cbs.append(Validation(lambda: validation_losses(parts.model, loss_fn, val_sets, parts.processor,
                                                        cfg.batch_size, cfg.val_batches, cfg.pad_to, parts.cache),
                              cfg.val_every, log.line))
    if parts.eval_sets:
        cbs.append(Evaluation(parts.model, parts.processor, parts.eval_sets, cfg.eval_every, cfg.eval_method,
                              cfg.eval_batch_size, cfg.eval_limit, log.line))
    cbs += list(extra)

    def moved(folder: Path) -> None:  # the cache moves with a run that replaced an earlier one
        if parts.cache is not None and cfg.vision_cache_dir is None:
            parts.cache.folder = folder / VISION_CACHE / parts.cache.model_key

    resumed = parts.resume.path if parts.resume else None
    cbs.append(Checkpointer(run, parts.model, parts.optimizer, parts.adapter_cfg, parts.meta, parts.history,
                            cfg.save_every, cfg.keep_checkpoints, parts.start_step, resumed, log.line, moved,
                            parts.world))
    if cfg.plot:
        cbs.append(Plot(run, parts.history, f"stage {cfg.stage} -- {run.path.name}", parts.writer))
    return cbs


def run_parts(parts: TrainParts, t_start: float, extra: Sequence[TrainingCallback] = ()) -> TrainResult:
    """The loop over built parts with the standard callbacks; the end of the run reported."""
    cfg, run, world = parts.cfg, parts.run, parts.world
    log = Progress(cfg.iters, cfg.quiet or not world.writer)
    main, text = parts.data["data"], parts.data["text_data"]
    log.line(start_line(cfg, parts.spec.components, parts.frozen_vision, *parts.n_params, len(main),
                        len(text) if text else None, parts.resume.path if parts.resume else None,
                        parts.start_step))
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
                           parts.start_step, parts.schedule, Window(parts.mixer), should_stop, world)
        world.barrier("rank 0 writing the run's outputs")
    except NonFiniteLoss as e:
        raise TrainingStopped(f"{e}; {saver.where()}", saver.last) from None
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
    return TrainResult(run.out, state.step, parts.history, run.out, saver.last, seconds, stats, signum,
                       world.rank)
