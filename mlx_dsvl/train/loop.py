"""The training loop: loss, compiled step, schedule, modality mixing, validation, logging.

The step is compiled with ``mx.compile(step, inputs=state, outputs=state)`` (mlx-lm's pattern)
over the model, optimizer and random state.  Batches are right-padded and length-bucketed, the
LM head runs only on the positions that carry a loss (the 102400-way softmax is the costliest
op of a small model), frozen vision towers run under ``stop_gradient``, and with
``--cache-vision-features`` they do not run at all once an image has been seen.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
import queue
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from ..faults import fault_point
from ..models.attention import exp_from_max
from ..utils import file_digest
from . import checkpoint as ckpt
from .adapters import adapter_config, model_fingerprint, save_adapters
from .data import Batch, BatchStream, DataError, Dataset, collate, load_jsonl
from .files import write_text_atomic
from .plot import plot_losses
from .rundir import RUN_CONFIG, RunDir, recover
from .stages import (
    StageError, TrainSpec, count_parameters, parse_components, setup_trainable,
    vision_trainable,
)
from .vision_cache import VisionFeatureCache, vision_model_key


# -- configuration ----------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Every option of ``python -m mlx_dsvl.train`` (``None`` = the documented default)."""

    stage: Optional[int] = None
    model: Optional[str] = None
    data: Optional[str] = None
    out: Optional[str] = None
    val_data: Optional[str] = None
    text_data: Optional[str] = None
    val_text_data: Optional[str] = None
    text_ratio: Optional[float] = None
    modality_warmup: Optional[int] = None
    iters: Optional[int] = None
    epochs: Optional[float] = None
    batch_size: int = 4
    grad_accum: int = 1
    lr: Optional[float] = None
    vision_lr: Optional[float] = None
    min_lr_ratio: float = 0.1
    warmup: Optional[int] = None
    lr_schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_seq_len: int = 2048
    long_examples: str = "truncate"
    skip_bad: bool = False
    train: Optional[str] = None
    method: str = "lora"
    lora_rank: int = 8
    lora_scale: float = 20.0
    lora_dropout: float = 0.0
    lora_layers: Optional[int] = None
    lora_targets: str = "attn,mlp"
    grad_checkpoint: bool = False
    cache_vision_features: bool = False
    vision_cache_dir: Optional[str] = None
    seed: int = 0
    save_every: int = 100
    keep_checkpoints: int = 0
    resume: Optional[str] = None
    force: bool = False
    val_every: int = 200
    val_batches: int = -1
    steps_per_report: int = 10
    dtype: Optional[str] = None
    compile: bool = True
    pad_to: int = 32
    plot: bool = True
    quiet: bool = False


# Options that define what is trained and on which data: a resumed run must keep them.
STRUCTURAL = ("stage", "train", "method", "lora_rank", "lora_scale", "lora_dropout", "lora_layers",
              "lora_targets", "batch_size", "grad_accum", "seed", "max_seq_len", "long_examples",
              "text_ratio", "modality_warmup", "lr", "vision_lr", "min_lr_ratio", "warmup", "lr_schedule",
              "weight_decay", "max_grad_norm", "pad_to", "cache_vision_features", "skip_bad")
METRICS = "metrics.jsonl"
VISION_CACHE = "vision_cache"  # in the run folder unless --vision-cache-dir
DEFAULT_LR = {"aligner": 1e-3, "lora": 1e-4, "dora": 1e-4, "full": 2e-5}


class ConfigError(ValueError):
    """An option outside its range: ``option`` names the TrainConfig field, ``problem`` says why."""

    def __init__(self, option: str, problem: str):
        super().__init__(f"{option} {problem}")
        self.option, self.problem = option, problem


def _at_least(lo):
    return (lambda v: v >= lo), f"must be >= {lo}"


_POSITIVE = ((lambda v: 0 < v < math.inf), "must be > 0")
_FRACTION = ((lambda v: 0 <= v <= 1), "must be within [0, 1]")
# What each numeric or named option may be (None always means "the documented default").
OPTION_RANGES = {
    "stage": (lambda v: v in (1, 2, 3), "must be 1, 2 or 3"),
    "iters": _at_least(1), "epochs": _POSITIVE, "batch_size": _at_least(1), "grad_accum": _at_least(1),
    "lr": _POSITIVE, "vision_lr": _POSITIVE, "min_lr_ratio": _FRACTION, "warmup": _at_least(0),
    "lr_schedule": (lambda v: v in ("cosine", "constant"), "must be cosine or constant"),
    "weight_decay": (lambda v: 0 <= v < math.inf, "must be >= 0"),
    "max_grad_norm": (lambda v: 0 <= v < math.inf, "must be >= 0 (0 disables clipping)"),
    "max_seq_len": _at_least(2),
    "long_examples": (lambda v: v in ("truncate", "skip"), "must be truncate or skip"),
    "lora_rank": _at_least(1), "lora_scale": _POSITIVE, "lora_layers": _at_least(1),
    "lora_dropout": (lambda v: 0 <= v < 1, "must be within [0, 1)"),
    "text_ratio": _FRACTION, "modality_warmup": _at_least(0), "seed": _at_least(0),
    "save_every": _at_least(0), "keep_checkpoints": _at_least(0), "val_every": _at_least(0),
    "val_batches": (lambda v: v == -1 or v >= 1, "must be -1 (all) or >= 1"),
    "steps_per_report": _at_least(1), "pad_to": _at_least(1),
}


def validate_config(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` for the first option outside its range."""
    for name, (ok, problem) in OPTION_RANGES.items():
        v = getattr(cfg, name)
        if v is not None and not ok(v):  # NaN fails every comparison
            raise ConfigError(name, f"{problem}, got {v}")


class TrainingStopped(RuntimeError):
    """Training stopped on a non-finite loss; ``checkpoint`` is the last good one (or None)."""

    def __init__(self, msg: str, checkpoint: Optional[Path]):
        super().__init__(msg)
        self.checkpoint = checkpoint


@dataclass
class TrainResult:
    out: Path
    steps: int
    history: List[Dict[str, Any]]
    adapter_dir: Path
    checkpoint: Optional[Path]
    seconds: float
    data_stats: Dict[str, Dict[str, int]] = field(default_factory=dict)
    stopped_by: int = 0  # the signal (SIGINT, SIGTERM, SIGHUP) that stopped the run early, if any


# -- schedules --------------------------------------------------------------------------------


def lr_schedule(lr: float, iters: int, warmup: int, kind: str, min_ratio: float):
    """Linear warm-up from ``lr / warmup`` to ``lr`` over ``warmup`` steps, then cosine decay to
    ``lr * min_ratio`` at the last step (or constant).  ``step`` = updates already done."""
    lr_min = lr * min_ratio
    decay = max(1, iters - warmup - 1)

    def schedule(step):
        s = step.astype(mx.float32) if isinstance(step, mx.array) else mx.array(float(step))
        warm = lr * (s + 1) / max(1, warmup)
        if kind == "constant":
            after = mx.array(lr, dtype=mx.float32)
        else:
            prog = mx.clip((s - warmup) / decay, 0.0, 1.0)
            after = lr_min + (lr - lr_min) * 0.5 * (1.0 + mx.cos(math.pi * prog))
        return mx.where(s < warmup, warm, after)

    return schedule


class ModalityMixer:
    """Stage-2 modality balance: the chance that a batch is text-only.

    ``share(step)`` starts at 1.0 and moves linearly to ``ratio`` over ``warmup`` steps (the
    paper's "modality warm-up"), then stays at ``ratio``.  ``is_text(step, micro)`` draws the
    batch's modality from a generator seeded by ``(seed, step, micro)``: a pure function of the
    position, so a resumed run draws exactly what the uninterrupted run drew.
    """

    def __init__(self, ratio: float, warmup: int, seed: int):
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"--text-ratio must be within [0, 1], got {ratio}")
        self.ratio, self.warmup, self.seed = float(ratio), int(warmup), int(seed)

    def share(self, step: int) -> float:
        if step >= self.warmup:
            return self.ratio
        return 1.0 + (self.ratio - 1.0) * (step / self.warmup)

    def is_text(self, step: int, micro: int = 0) -> bool:
        u = np.random.default_rng([self.seed, 0x6D6978, step, micro]).random()
        return bool(u < self.share(step))


# -- loss -------------------------------------------------------------------------------------


def image_embeddings(model, vis, frozen_vision: bool):
    """``vis``: pixels ``[M, 3, S, S]`` or cached tower features (tuple) -> ``[M, 576, D]``."""
    if isinstance(vis, (tuple, list)):
        feats = tuple(vis) if len(vis) > 1 else vis[0]
    else:
        feats = model.vision_features(vis)
        if frozen_vision:
            feats = tree_map(mx.stop_gradient, feats)
    return model.aligner(feats)


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-row ``logsumexp(logits) - logits[target]`` ([N, V] float32, [N] -> [N]).

    On MLX's CPU backend ``exp`` is several times slower than ``2 ** x``, and over a 102400-token
    vocabulary it dominates a small model's step; ``exp(x) = 2 ** (x log2 e)`` gives the same
    values (and gradient: the softmax) about twice as fast end to end.  GPUs use
    ``nn.losses.cross_entropy``.
    """
    if mx.default_device() != mx.cpu:
        return nn.losses.cross_entropy(logits, targets)
    p, m = exp_from_max(logits)
    s = p.sum(axis=-1)
    picked = mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return m[:, 0] + mx.log(s) - picked


def make_loss(frozen_vision: bool):
    def loss_fn(model, input_ids, vis, label_pos, label_ids, label_w, label_mm):
        img = None if vis is None else image_embeddings(model, vis, frozen_vision)
        h = model.hidden_states(input_ids, img)
        B, T, D = h.shape
        hs = mx.take(h.reshape(B * T, D), label_pos, axis=0)  # [N, D]: only where a loss is taken
        logits = model.lm_head(hs).astype(mx.float32)
        ce = cross_entropy(logits, label_ids) * label_w
        ntoks = label_w.sum()
        loss = ce.sum() / ntoks
        mm = mx.stack([(ce * label_mm).sum(), (label_w * label_mm).sum()])
        return loss, ntoks, mm

    return loss_fn


# -- gradient checkpointing --------------------------------------------------------------------

_CKPT_CLASSES: Dict[type, type] = {}


def enable_grad_checkpoint(layers: Sequence[nn.Module]) -> None:
    """Recompute each block's activations in the backward pass (per instance, not per class)."""
    for layer in layers:
        base = type(layer)
        if base in _CKPT_CLASSES.values():
            continue
        sub = _CKPT_CLASSES.get(base)
        if sub is None:
            def __call__(self, *args, __base=base, **kwargs):
                def inner(params, *a, **k):
                    self.update(params)
                    return __base.__call__(self, *a, **k)

                return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

            sub = type(f"Checkpointed{base.__name__}", (base,), {"__call__": __call__})
            _CKPT_CLASSES[base] = sub
        layer.__class__ = sub


# -- batches with images ----------------------------------------------------------------------


@dataclass
class Prepared:
    batch: Batch
    is_text_stream: bool
    pixels: Optional[np.ndarray]  # [M, 3, S, S] (None when cached or no image)
    digests: Optional[List[str]]  # cache keys when caching
    skipped: List[str]
    streams_after: Dict[str, Dict[str, int]]
    micro: int  # global micro-batch index


class BatchProducer:
    """Deterministic sequence of prepared micro-batches, optionally prefetched by a thread.

    The images of a batch are decoded and preprocessed off the main thread.  An image that
    fails to decode raises a :class:`DataError` naming it, or with ``skip_bad`` drops its example
    from the batch (counted).
    """

    def __init__(self, main: Dataset, main_stream: BatchStream, text: Optional[Dataset],
                 text_stream: Optional[BatchStream], mixer: Optional[ModalityMixer], processor,
                 grad_accum: int, pad_to: int, skip_bad: bool, cache: Optional[VisionFeatureCache],
                 prefetch: int = 2):
        self.main, self.main_stream = main, main_stream
        self.text, self.text_stream = text, text_stream
        self.mixer, self.processor = mixer, processor
        self.grad_accum, self.pad_to, self.skip_bad, self.cache = grad_accum, pad_to, skip_bad, cache
        self.micro = 0
        self.prefetch = prefetch
        self._q: Optional[queue.Queue] = None
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()

    def streams_state(self) -> Dict[str, Dict[str, int]]:
        s = {"main": self.main_stream.state()}
        if self.text_stream is not None:
            s["text"] = self.text_stream.state()
        return s

    def _make(self) -> Prepared:
        step, k = divmod(self.micro, self.grad_accum)
        use_text = self.mixer is not None and self.text_stream is not None and self.mixer.is_text(step, k)
        ds, stream = (self.text, self.text_stream) if use_text else (self.main, self.main_stream)
        examples = [ds[i] for i in stream.next()]
        skipped: List[str] = []
        pixels, digests = None, None
        while True:
            paths = [p for e in examples for p in e.images]
            try:
                if paths and self.cache is not None:
                    digests = [self.cache.digest(p) for p in paths]
                elif paths:
                    pixels = self.processor.image_processor(paths)
                break
            except (ValueError, OSError) as e:  # ImageLoadError is a ValueError
                bad = next((x for x in paths if str(x) in str(e)), None)
                if not self.skip_bad or bad is None:
                    src = next((ex.source for ex in examples if bad in ex.images), "")
                    raise DataError(f"{src}: {e}" if src else str(e)) from None
                skipped.append(f"{bad}: {e}")
                examples = [ex for ex in examples if bad not in ex.images]
                if not examples:
                    examples = [ds[i] for i in stream.next()]
        batch = collate(examples, self.processor.pad_id, self.pad_to)
        prep = Prepared(batch, use_text, pixels, digests, skipped, self.streams_state(), self.micro)
        self.micro += 1
        return prep

    def _worker(self):
        try:
            while not self._stop.is_set():
                item = self._make()
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # hand the error to the consumer
            self._q.put(e)

    def next(self) -> Prepared:
        if self.prefetch <= 0:
            return self._make()
        if self._thread is None:
            self._q = queue.Queue(maxsize=self.prefetch)
            self._thread = threading.Thread(target=self._worker, daemon=True)
            self._thread.start()
        item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def vision_input(prep: Prepared, model, cache: Optional[VisionFeatureCache], processor):
    """The ``vis`` argument of the loss: pixels, cached features or None."""
    b = prep.batch
    if not b.images:
        return None
    if cache is not None:
        return cache.features(model, b.images, prep.digests,
                              lambda idx: processor.image_processor([b.images[i] for i in idx]))
    return mx.array(prep.pixels)


def batch_arrays(b: Batch):
    return (mx.array(b.input_ids), mx.array(b.label_pos), mx.array(b.label_ids), mx.array(b.label_w),
            mx.array(b.label_mm))


# -- validation -------------------------------------------------------------------------------


def evaluate(model, loss_fn, datasets: Sequence[Tuple[Dataset, bool]], processor, batch_size: int,
             max_batches: int, pad_to: int, cache: Optional[VisionFeatureCache]) -> Dict[str, float]:
    """Token-weighted validation losses: all, multimodal examples, text-only examples."""
    model.eval()
    tot = np.zeros(4)  # ce_sum, ntoks, mm_ce_sum, mm_ntoks
    for ds, force_text in datasets:
        order = np.argsort(ds.lengths, kind="stable")
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if max_batches > 0:
            batches = batches[:max_batches]
        for idx in batches:
            exs = [ds[i] for i in idx]
            b = collate(exs, processor.pad_id, pad_to)
            if force_text and b.images:
                raise DataError(f"{ds.path}: text-only validation data must not have images")
            prep = Prepared(b, force_text, None, None, [], {}, 0)
            if b.images:
                if cache is not None:
                    prep.digests = [cache.digest(p) for p in b.images]
                else:
                    prep.pixels = processor.image_processor(b.images)
            vis = vision_input(prep, model, cache, processor)
            ids, pos, tgt, w, mmw = batch_arrays(b)
            loss, ntoks, mm = loss_fn(model, ids, vis, pos, tgt, w, mmw)
            mx.eval(loss, ntoks, mm)
            n = float(ntoks.item())
            tot += [float(loss.item()) * n, n, float(mm[0].item()), float(mm[1].item())]
    model.train()
    out = {"val_loss": tot[0] / tot[1] if tot[1] else float("nan")}
    if tot[3] > 0:
        out["val_loss_mm"] = tot[2] / tot[3]
    if tot[1] - tot[3] > 0:
        out["val_loss_text"] = (tot[0] - tot[2]) / (tot[1] - tot[3])
    return out


# -- reporting --------------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on a terminal, plain report lines otherwise."""

    def __init__(self, total: int, quiet: bool, stream=None):
        self.total, self.quiet = total, quiet
        self.stream = stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()
        self._last = ""

    def bar(self, step: int, text: str) -> None:
        if self.quiet or not self.tty:
            return
        frac = step / max(1, self.total)
        n = 24
        fill = int(frac * n)
        line = f"\r[{'#' * fill}{'.' * (n - fill)}] {step}/{self.total} {text}"
        self.stream.write(line.ljust(len(self._last)))
        self.stream.flush()
        self._last = line

    def line(self, text: str) -> None:
        if self.quiet:
            return
        if self.tty and self._last:
            self.stream.write("\r" + " " * len(self._last) + "\r")
            self._last = ""
        print(text, file=self.stream, flush=True)


class StopSignals:
    """SIGINT (Ctrl-C), SIGTERM and SIGHUP stop the run at the end of the current step, which
    is then saved; a second signal stops at once (``KeyboardInterrupt``), without saving."""

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
        print(f"{self.name}: stopping after this step to save a checkpoint (once more: stop at "
              f"once, without saving)", file=sys.stderr, flush=True)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


# -- the run ----------------------------------------------------------------------------------


def _load_datasets(cfg: TrainConfig, processor) -> Dict[str, Optional[Dataset]]:
    kw = dict(max_seq_len=cfg.max_seq_len, long_policy=cfg.long_examples, skip_bad=cfg.skip_bad,
              verbose=not cfg.quiet)
    out: Dict[str, Optional[Dataset]] = {}
    for key in ("data", "val_data", "text_data", "val_text_data"):
        path = getattr(cfg, key)
        out[key] = load_jsonl(path, processor, **kw) if path else None
    return out


def _data_fingerprint(cfg: TrainConfig) -> Dict[str, Optional[str]]:
    return {k: (file_digest(getattr(cfg, k)) if getattr(cfg, k) else None)
            for k in ("data", "text_data")}


def plan_iters(cfg: TrainConfig, main_batches: int, mixer: Optional[ModalityMixer]) -> int:
    if cfg.iters is not None:
        return int(cfg.iters)
    epochs = 1.0 if cfg.epochs is None else float(cfg.epochs)
    need = max(1, math.ceil(epochs * main_batches))  # main-stream micro-batches
    if mixer is None:
        return max(1, math.ceil(need / cfg.grad_accum))
    micro = main = 0
    while main < need:
        step, k = divmod(micro, cfg.grad_accum)
        main += not mixer.is_text(step, k)
        micro += 1
        if micro > 1000 * need + 10000:
            raise ValueError("--text-ratio leaves (almost) no multimodal batches; use --iters")
    return max(1, math.ceil(micro / cfg.grad_accum))


def resolve_resume(cfg: TrainConfig, explicit: Sequence[str]) -> Tuple[TrainConfig, Path, Dict]:
    """Merge the checkpoint's run config with the command line; refuse structural changes.

    Without an output folder the run continues in the run folder that holds the checkpoint.
    """
    path = ckpt.find_checkpoint(cfg.resume)
    state = ckpt.read_checkpoint(path)
    saved = state.get("config") or {}
    merged = TrainConfig(**{k: v for k, v in saved.items() if k in {f.name for f in fields(TrainConfig)}})
    for name in explicit:
        new, old = getattr(cfg, name), saved.get(name)
        if name in STRUCTURAL and new != old:
            raise ckpt.ResumeError(
                f"--resume {path}: --{name.replace('_', '-')} {new} differs from the checkpoint's "
                f"{old}; a resumed run keeps the original set-up"
            )
        setattr(merged, name, new)
    if "epochs" in explicit and "iters" not in explicit:
        merged.iters = None  # the run's length is recomputed from the new --epochs
    elif "iters" in explicit:
        merged.epochs = None
    merged.resume, merged.force = cfg.resume, cfg.force  # what this command asks, never inherited
    if cfg.out is not None:
        merged.out = cfg.out
    elif ckpt.run_of(path) is not None:
        merged.out = str(ckpt.run_of(path))
    else:
        raise ckpt.ResumeError(f"--resume {path}: this checkpoint is not inside a run folder; give --out")
    return merged, path, state


def train(cfg: TrainConfig, explicit: Sequence[str] = (), loaded=None) -> TrainResult:
    """Run training as configured; see ``python -m mlx_dsvl.train --help``.

    ``explicit``: the option names given on the command line (a resumed run may override only
    non-structural ones).  ``loaded``: an already loaded ``(model, processor)`` of ``cfg.model``
    to train in place instead of loading it (e.g. a model quantized in memory for QLoRA).
    """
    t_start = time.perf_counter()
    validate_config(cfg)
    resume_path, resume_state = None, None
    if cfg.resume:
        recover(Path(cfg.resume))  # a run folder that a killed --force run left mid-swap
        cfg, resume_path, resume_state = resolve_resume(cfg, explicit)
    for req in ("stage", "model", "data", "out"):
        if getattr(cfg, req) in (None, ""):
            raise ValueError(f"--{req} is required")
    if cfg.iters is not None and cfg.epochs is not None:
        raise ValueError("give --iters or --epochs, not both")
    run = RunDir.open(Path(cfg.out), cfg.force, resume_path)
    try:
        return _train_into(run, cfg, resume_path, resume_state, loaded, t_start)
    finally:
        run.abandon()  # a replacement that saved no checkpoint leaves the earlier run as it was


def _train_into(run: RunDir, cfg: TrainConfig, resume_path: Optional[Path], resume_state: Optional[Dict],
                loaded, t_start: float) -> TrainResult:
    import mlx_dsvl

    model, processor = loaded if loaded is not None else mlx_dsvl.load(cfg.model, dtype=cfg.dtype)
    fingerprint = model_fingerprint(model)
    if resume_state is not None:
        fp = resume_state.get("fingerprint") or {}
        base = (resume_state.get("config") or {}).get("model")
        if fp.get("arch") != fingerprint["arch"]:
            raise ckpt.ResumeError(
                f"--resume {resume_path}: this checkpoint was trained from another model "
                f"architecture ({base}); it cannot continue with --model {cfg.model}"
            )
        if fp.get("weights") != fingerprint["weights"]:
            raise ckpt.ResumeError(
                f"--resume {resume_path}: this checkpoint was trained from other base weights "
                f"({base}), not from --model {cfg.model}; refusing to mix them"
            )

    hybrid = model.config.vision.hybrid
    comps = parse_components(cfg.stage, cfg.train, hybrid)
    targets = tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())
    spec = TrainSpec(cfg.stage, comps, cfg.method, cfg.lora_rank, cfg.lora_scale, cfg.lora_dropout,
                     targets, cfg.lora_layers)
    frozen_vision = not vision_trainable(spec)
    if cfg.cache_vision_features and not frozen_vision:
        raise StageError("--cache-vision-features needs frozen vision towers (stages 1-2, or a "
                         "--train set without siglip/sam/sam-neck)")

    data = _load_datasets(cfg, processor)
    main, text = data["data"], data["text_data"]
    mixer = None
    if text is not None:
        ratio = cfg.text_ratio if cfg.text_ratio is not None else (0.7 if cfg.stage <= 2 else 0.48)
        cfg.text_ratio = ratio
        main_stream_tmp = BatchStream(main.lengths, cfg.batch_size, cfg.seed)
        iters_guess = cfg.iters or math.ceil((cfg.epochs or 1.0) * main_stream_tmp.batches_per_epoch / max(1e-6, 1 - ratio))
        if cfg.modality_warmup is None:
            cfg.modality_warmup = max(0, iters_guess // 5) if cfg.stage == 2 else 0
        mixer = ModalityMixer(ratio, cfg.modality_warmup, cfg.seed)
    elif cfg.text_ratio is not None:
        raise ValueError("--text-ratio needs --text-data")

    main_stream = BatchStream(main.lengths, cfg.batch_size, cfg.seed, stream=0)
    text_stream = BatchStream(text.lengths, cfg.batch_size, cfg.seed, stream=1) if text else None
    iters = plan_iters(cfg, main_stream.batches_per_epoch, mixer)
    if cfg.iters is None:
        cfg.iters = iters
    if cfg.lr is None:
        cfg.lr = DEFAULT_LR["aligner"] if comps == ("aligner",) else DEFAULT_LR[cfg.method]
    if cfg.warmup is None:
        cfg.warmup = min(100, iters // 20)

    mx.random.seed(cfg.seed)  # adapter initialization and dropout follow --seed
    setup_trainable(model, spec)
    if cfg.grad_checkpoint:
        if "llm" in comps:
            enable_grad_checkpoint(model.layers)
        if "siglip" in comps:
            enable_grad_checkpoint(model.towers()["siglip"].blocks)
    n_train, n_total = count_parameters(model)

    schedule = lr_schedule(cfg.lr, iters, cfg.warmup, cfg.lr_schedule, cfg.min_lr_ratio)
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=cfg.weight_decay)
    if not frozen_vision:
        if cfg.vision_lr is None:
            cfg.vision_lr = cfg.lr / 10
        if cfg.vision_lr != cfg.lr:  # the vision towers get their own learning rate
            vision_opt = optim.AdamW(
                learning_rate=lr_schedule(cfg.vision_lr, iters, cfg.warmup, cfg.lr_schedule, cfg.min_lr_ratio),
                weight_decay=cfg.weight_decay)
            optimizer = optim.MultiOptimizer([vision_opt, optimizer],
                                             [lambda path, _: path.startswith("vision_model.")])
    optimizer.init(model.trainable_parameters())

    run.create()
    cache = None
    if cfg.cache_vision_features:
        cache = VisionFeatureCache(vision_model_key(model), cfg.vision_cache_dir or run.path / VISION_CACHE)

    start_step, history = 0, []
    config_dict = asdict(cfg)
    if resume_state is not None:
        ckpt.restore(resume_path, model, optimizer)
        start_step = int(resume_state["step"])
        history = list(resume_state.get("history", []))
        streams = resume_state.get("streams", {})
        main_stream.load_state(streams["main"])
        if text_stream is not None and "text" in streams:
            text_stream.load_state(streams["text"])
        if resume_state.get("data") != _data_fingerprint(cfg):
            print("warning: the data files changed since the checkpoint; the resumed run will not "
                  "replay the original order exactly", file=sys.stderr)
    micro_start = start_step * cfg.grad_accum

    write_text_atomic(run.path / RUN_CONFIG, json.dumps(config_dict, indent=2))
    # rewritten from the history on resume
    write_text_atomic(run.path / METRICS, "".join(json.dumps(r) + "\n" for r in history))

    acfg = adapter_config(model, spec, str(cfg.model), fingerprint)
    producer = BatchProducer(main, main_stream, text, text_stream, mixer, processor, cfg.grad_accum,
                             cfg.pad_to, cfg.skip_bad, cache, prefetch=2)
    producer.micro = micro_start
    loss_fn = make_loss(frozen_vision)
    loss_value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]
    max_norm, accum = cfg.max_grad_norm, cfg.grad_accum

    def step_fn(ids, vis, pos, tgt, w, mmw, prev_grad, prev_tokens):
        (loss, ntoks, mm), grad = loss_value_and_grad(model, ids, vis, pos, tgt, w, mmw)
        if accum > 1:
            # Token-weighted accumulation: sum (mean loss x tokens) gradients, divide at the end.
            grad = tree_map(lambda g: g * ntoks, grad)
            if prev_grad is not None:
                grad = tree_map(lambda a, b: a + b, grad, prev_grad)
        norm = mx.array(0.0)
        if prev_tokens is not None:  # last micro-batch of the step: update
            if accum > 1:
                grad = tree_map(lambda g: g / (prev_tokens + ntoks), grad)
            if max_norm > 0:
                grad, norm = optim.clip_grad_norm(grad, max_norm)
            optimizer.update(model, grad)
            grad = None
        return loss, ntoks, mm, norm, grad

    step = mx.compile(step_fn, inputs=state, outputs=state) if cfg.compile else step_fn

    def checkpoint_state(step_no: int, streams: Dict) -> Dict:
        return {"config": config_dict, "fingerprint": fingerprint, "streams": streams,
                "history": history, "data": _data_fingerprint(cfg), "version": 1}

    stats = {k: (v.stats.as_dict() if v is not None else None) for k, v in data.items()}
    val_sets = [(d, force) for d, force in ((data["val_data"], False), (data["val_text_data"], True)) if d]
    log = Progress(iters, cfg.quiet)
    if not cfg.quiet:
        where = f" (resuming {resume_path} at step {start_step})" if resume_path else ""
        log.line(
            f"stage {cfg.stage}: training {', '.join(comps)} ({cfg.method if 'llm' in comps or not frozen_vision else 'full'}) "
            f"-- {n_train / 1e6:.3f}M of {n_total / 1e6:.1f}M parameters; {len(main)} examples"
            + (f" + {len(text)} text-only (ratio {mixer.ratio}, warm-up {mixer.warmup} steps)" if text else "")
            + f"; {iters} steps of {cfg.batch_size} x {cfg.grad_accum}; lr {cfg.lr:g}"
            + (f" (vision {cfg.vision_lr:g})" if not frozen_vision else "") + where
        )

    last_ckpt: Optional[Path] = resume_path
    saved_step = start_step
    window = {"loss": 0.0, "ntoks": 0.0, "mm": 0.0, "mm_n": 0.0, "tokens": 0, "time": 0.0,
              "text_batches": 0, "batches": 0, "steps": 0, "skipped": 0}
    model.train()
    mx.reset_peak_memory()
    step_no = start_step
    stop_err: Optional[TrainingStopped] = None

    def save(step_no: int, streams: Dict) -> None:
        nonlocal last_ckpt, saved_step
        last_ckpt = _save(run, step_no, model, optimizer, acfg, checkpoint_state(step_no, streams),
                          cfg.keep_checkpoints, last_ckpt)
        saved_step = step_no
        if run.publish():  # a --force run's first checkpoint: it now replaces the earlier run
            last_ckpt = run.path / last_ckpt.relative_to(last_ckpt.parents[1])
            if cache is not None and cfg.vision_cache_dir is None:
                cache.folder = run.path / VISION_CACHE / cache.model_key
            log.line(f"replaced the earlier run in {run.out}")
        log.line(f"saved checkpoint {last_ckpt}")

    stop = StopSignals()
    try:
        while step_no < iters and not stop.signum:
            tic = time.perf_counter()
            grad = None
            step_loss = step_n = 0.0
            streams_after = None
            text_b = 0
            for k in range(accum):
                prep = producer.next()
                streams_after = prep.streams_after
                vis = vision_input(prep, model, cache, processor)
                ids, pos, tgt, w, mmw = batch_arrays(prep.batch)
                last = k == accum - 1
                prev_tokens = mx.array(step_n, dtype=mx.float32) if last else None
                loss, ntoks, mm, norm, grad = step(ids, vis, pos, tgt, w, mmw, grad, prev_tokens)
                mx.eval(state, loss, ntoks, mm, norm, grad)
                fault_point("step")
                lv, nv = float(loss.item()), float(ntoks.item())
                if not math.isfinite(lv):
                    where = (f"the last good checkpoint is kept: {last_ckpt}" if last_ckpt
                             else "no checkpoint had been saved yet")
                    raise TrainingStopped(
                        f"loss became {lv} at step {step_no + 1} (batch {', '.join(prep.batch.sources[:3])}); "
                        f"training stopped without saving; {where}", last_ckpt)
                step_loss += lv * nv
                step_n += nv
                window["mm"] += float(mm[0].item())
                window["mm_n"] += float(mm[1].item())
                window["tokens"] += prep.batch.n_tokens
                window["batches"] += 1
                text_b += int(prep.is_text_stream)
                window["skipped"] += len(prep.skipped)
                for s in prep.skipped:
                    print(f"warning: skipped an example with a bad image (--skip-bad): {s}", file=sys.stderr)
            step_no += 1
            window["loss"] += step_loss
            window["ntoks"] += step_n
            window["text_batches"] += text_b
            window["steps"] += 1
            window["time"] += time.perf_counter() - tic
            gnorm = float(norm.item())
            lr_now = float(schedule(mx.array(step_no - 1)).item())
            log.bar(step_no, f"loss {step_loss / max(step_n, 1):.3f} lr {lr_now:.2e}")

            if step_no % cfg.steps_per_report == 0 or step_no == iters:
                rec = _report(window, step_no, lr_now, gnorm, mixer)
                history.append(rec)
                _append(run.path / METRICS, rec)
                elapsed = time.perf_counter() - t_start
                eta = (iters - step_no) * window["time"] / max(1, window["steps"])
                log.line(
                    f"step {step_no}/{iters} | loss {rec['loss']:.4f}"
                    + (f" (mm {rec['loss_mm']:.3f}" if "loss_mm" in rec else "")
                    + (f"{', ' if 'loss_mm' in rec else ' ('}text {rec['loss_text']:.3f}" if "loss_text" in rec else "")
                    + (")" if ("loss_mm" in rec or "loss_text" in rec) else "")
                    + f" | {rec['tokens_per_s']:.0f} tok/s | lr {lr_now:.2e} | peak {rec['peak_memory_gb']:.2f} GB"
                    + (f" | text share {rec['text_share']:.2f}" if mixer else "")
                    + f" | {fmt_time(elapsed)} elapsed, eta {fmt_time(eta)}"
                )
                window = {k: 0 if isinstance(v, int) else 0.0 for k, v in window.items()}

            if val_sets and ((cfg.val_every > 0 and step_no % cfg.val_every == 0) or step_no == iters):
                tv = time.perf_counter()
                vrec = {"type": "val", "step": step_no,
                        **evaluate(model, loss_fn, val_sets, processor, cfg.batch_size,
                                   cfg.val_batches, cfg.pad_to, cache)}
                history.append(vrec)
                _append(run.path / METRICS, vrec)
                log.line(f"step {step_no}/{iters} | val loss {vrec['val_loss']:.4f}"
                         + (f" | val multimodal {vrec['val_loss_mm']:.4f}" if "val_loss_mm" in vrec else "")
                         + (f" | val text-only {vrec['val_loss_text']:.4f}" if "val_loss_text" in vrec else "")
                         + f" ({time.perf_counter() - tv:.1f}s)")

            if (cfg.save_every > 0 and step_no % cfg.save_every == 0) or step_no == iters:
                save(step_no, streams_after)
        if stop.signum and step_no > saved_step:
            save(step_no, streams_after)
    except TrainingStopped as e:
        stop_err = e
    finally:
        producer.close()
        stop.restore()
        if cfg.plot and history and not run.staged:
            try:
                plot_losses(history, run.path / "loss.png", title=f"stage {cfg.stage} -- {run.path.name}")
            except Exception as e:  # a plot must never lose a run
                print(f"warning: could not draw loss.png ({e})", file=sys.stderr)
    if stop_err is not None:
        raise stop_err
    if stop.signum:
        print(f"{stop.name}: " + (f"stopped at step {step_no}; resume with --resume {run.out}"
                                  if step_no > start_step else
                                  "stopped before the first step; nothing was saved"
                                  + (f", {run.out} is unchanged" if run.staged else "")),
              file=sys.stderr)
    if last_ckpt is not None and step_no > start_step:
        try:
            save_adapters(run.path, model, acfg)
        except OSError as e:
            raise OSError(f"cannot write the adapters into {run.path} ({e.strerror or e}); the last "
                          f"checkpoint, {last_ckpt}, holds them too (an --adapter folder)") from None
    if cache is not None and not cfg.quiet:
        log.line(f"vision feature cache: {cache.hits} hits, {cache.misses} images encoded")
    seconds = time.perf_counter() - t_start
    if not cfg.quiet and not stop.signum:
        log.line(f"done: {step_no} steps in {fmt_time(seconds)}; adapters in {run.path}; "
                 f"metrics in {run.path / METRICS}")
    return TrainResult(run.out, step_no, history, run.out, last_ckpt, seconds, stats, stop.signum)


def _report(window: Dict, step_no: int, lr: float, gnorm: float, mixer) -> Dict[str, Any]:
    t = max(window["time"], 1e-9)
    rec: Dict[str, Any] = {
        "type": "train", "step": step_no,
        "loss": window["loss"] / max(window["ntoks"], 1e-9),
        "tokens": int(window["tokens"]), "target_tokens": int(window["ntoks"]),
        "tokens_per_s": window["tokens"] / t, "steps_per_s": window["steps"] / t,
        "lr": lr, "grad_norm": gnorm, "peak_memory_gb": mx.get_peak_memory() / 1e9,
        "text_batches": int(window["text_batches"]), "batches": int(window["batches"]),
        "time": time.time(),
    }
    if window["mm_n"] > 0:
        rec["loss_mm"] = window["mm"] / window["mm_n"]
    if window["ntoks"] - window["mm_n"] > 0:
        rec["loss_text"] = (window["loss"] - window["mm"]) / (window["ntoks"] - window["mm_n"])
    if mixer is not None:
        rec["text_share"] = window["text_batches"] / max(1, window["batches"])
        rec["text_share_scheduled"] = mixer.share(step_no - 1)
    if window["skipped"]:
        rec["skipped_examples"] = int(window["skipped"])
    return rec


def _append(path: Path, rec: Dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def _save(run: RunDir, step_no, model, optimizer, acfg, state, keep, last_good: Optional[Path]) -> Path:
    where = (f"the last good checkpoint is kept: {last_good}" if last_good
             else "no checkpoint had been saved yet") + (f"; {run.out} is unchanged" if run.staged else "")
    bad = [k for k, v in tree_flatten(model.trainable_parameters())
           if not bool(mx.all(mx.isfinite(v)).item())]
    if bad:
        raise TrainingStopped(
            f"trained weights became non-finite at step {step_no} ({bad[0]}); training stopped "
            f"without saving; {where}", last_good)
    try:
        return ckpt.save_checkpoint(run.path, step_no, model, optimizer, acfg, state, keep)
    except OSError as e:
        raise ckpt.CheckpointWriteError(
            f"cannot write the checkpoint of step {step_no} into {run.out / 'checkpoints'} "
            f"({e.strerror or e}); nothing of it remains; {where}") from None
