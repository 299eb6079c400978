"""What changes with the step: the learning rate, the modality mix, and the run's length."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np


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
    """The chance that a batch is text-only: 1.0 moving linearly to ``ratio`` over ``warmup`` steps
    (the paper's "modality warm-up"). Each draw is seeded by ``(seed, step, micro)``, so a resumed
    run draws exactly what the uninterrupted run drew.
    """

    def __init__(self, ratio: float, warmup: int, seed: int):
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"`text_ratio` must be within [0, 1], got {ratio}")
        self.ratio, self.warmup, self.seed = float(ratio), int(warmup), int(seed)

    def share(self, step: int) -> float:
        if step >= self.warmup:
            return self.ratio
        return 1.0 + (self.ratio - 1.0) * (step / self.warmup)

    def is_text(self, step: int, micro: int = 0) -> bool:
        u = np.random.default_rng([self.seed, 0x6D6978, step, micro]).random()
        return bool(u < self.share(step))


def plan_iters(iters: int | None, epochs: float | None, grad_accum: int, main_batches: int,
               mixer: ModalityMixer | None) -> int:
    """Optimizer steps of the run: ``iters``, or enough for ``epochs`` (default 1) over the main
    data, where text-only batches drawn by ``mixer`` do not count."""
    if iters is not None:
        return int(iters)
    epochs = 1.0 if epochs is None else float(epochs)
    need = max(1, math.ceil(epochs * main_batches))  # main-stream micro-batches
    if mixer is None:
        return max(1, math.ceil(need / grad_accum))
    micro = main = 0
    while main < need:
        step, k = divmod(micro, grad_accum)
        main += not mixer.is_text(step, k)
        micro += 1
        if micro > 1000 * need + 10000:
            raise ValueError("`text_ratio` leaves (almost) no multimodal batches; give `iters`")
    return max(1, math.ceil(micro / grad_accum))
