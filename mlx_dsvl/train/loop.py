"""The training loop over built parts (model, optimizer, loss, batches) and callbacks.

The shape of mlx-lm's ``tuner/trainer.py``: a compiled step in two parts, each micro-batch's
gradient accumulated token-weighted, then averaged over the processes, clipped and applied. With
several processes every decision (a non-finite loss, a step without examples) is taken on the
summed losses and token counts, so every process takes it. The standard loss runs the LM head
only where a loss is taken: the vocabulary-wide softmax is a small model's costliest op.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from ..faults import fault_point
from ..models.attention import exp_from_max
from .callbacks import CallbackList, TrainingCallback
from .distributed import SOLO, World
from .report import StepSums, Window, warn

if TYPE_CHECKING:
    from ..models.deepseek_vl import DeepseekVL
    from .batches import BatchProducer


class TrainingStopped(RuntimeError):
    """Training stopped on a non-finite loss or weights; ``checkpoint`` is the last good one."""

    def __init__(self, msg: str, checkpoint=None):
        super().__init__(msg)
        self.checkpoint = checkpoint


class NonFiniteLoss(TrainingStopped):
    """The loss of a batch was NaN or infinite (nothing was saved after it)."""


@dataclass
class LoopArgs:
    iters: int
    grad_accum: int = 1
    max_grad_norm: float = 1.0  # 0: no clipping
    steps_per_report: int = 10
    compile: bool = True


@dataclass
class LoopState:
    """Where the loop is, as callbacks see it."""

    step: int  # optimizer steps done
    iters: int
    report: Callable[[dict], None]  # hands a record to every callback
    streams: dict | None = None  # data position after the last micro-batch taken
    loss: float = math.nan  # the last step's loss
    lr: float = math.nan  # the last step's learning rate
    stopped: bool = False  # ended early because should_stop() said so


# -- the standard loss ---------------------------------------------------------------------------


def image_embeddings(model: DeepseekVL, vis, frozen_vision: bool):
    """``vis``: pixels ``[M, 3, S, S]`` or cached tower features (tuple) -> ``[M, 576, D]``."""
    if isinstance(vis, (tuple, list)):
        feats = tuple(vis) if len(vis) > 1 else vis[0]
    else:
        feats = model.vision_features(vis)
        if frozen_vision:
            feats = tree_map(mx.stop_gradient, feats)
    return model.aligner(feats)


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-row ``logsumexp(logits) - logits[target]``. On MLX's CPU backend ``exp`` is much slower
    than ``2 ** x`` and dominates a small model's step; ``exp(x) = 2 ** (x log2 e)`` gives the same
    values and gradient (docs/PERFORMANCE.md)."""
    if mx.default_device() != mx.cpu:
        return nn.losses.cross_entropy(logits, targets)
    p, m = exp_from_max(logits)
    s = p.sum(axis=-1)
    picked = mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return m[:, 0] + mx.log(s) - picked


def make_loss(frozen_vision: bool):
    """``loss_fn(model, ids, vis, label_pos, label_ids, label_w, label_mm)`` ->
    ``(mean loss, target tokens, [multimodal loss sum, multimodal tokens])``."""

    def loss_fn(model: DeepseekVL, input_ids, vis, label_pos, label_ids, label_w, label_mm):
        img = None if vis is None else image_embeddings(model, vis, frozen_vision)
        h = model.hidden_states(input_ids, img)
        B, T, D = h.shape
        hs = mx.take(h.reshape(B * T, D), label_pos, axis=0)  # [N, D]: only where a loss is taken
        logits = model.lm_head(hs).astype(mx.float32)
        ce = cross_entropy(logits, label_ids) * label_w
        ntoks = label_w.sum()
        loss = ce.sum() / mx.maximum(ntoks, 1)  # a batch without targets (an empty share) learns nothing
        mm = mx.stack([(ce * label_mm).sum(), (label_w * label_mm).sum()])
        return loss, ntoks, mm

    return loss_fn


_CKPT_CLASSES: dict[type, type] = {}


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


# -- the step and the loop ------------------------------------------------------------------------


def make_step(model: DeepseekVL, optimizer: optim.Optimizer, loss_fn: Callable, *, weighted: bool,
              max_grad_norm: float, compile: bool, average_gradients: Callable | None = None):
    """``(accumulate, update, state)``. ``weighted`` (several micro-batches or processes): gradients
    are summed token-weighted and ``update`` divides by the step's tokens, so the step's gradient is
    that of its tokens' mean loss."""
    loss_value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]

    def accumulate(*args):
        *inputs, prev_grad = args
        (loss, ntoks, mm), grad = loss_value_and_grad(model, *inputs)
        if weighted:  # sum (mean loss x tokens) gradients; the update divides by the tokens
            grad = tree_map(lambda g: g * ntoks, grad)
            if prev_grad is not None:
                grad = tree_map(lambda a, b: a + b, grad, prev_grad)
        return loss, ntoks, mm, grad

    def update(grad, tokens):
        if average_gradients is not None:
            grad = average_gradients(grad)
        if weighted:
            grad = tree_map(lambda g: g / tokens, grad)
        norm = mx.array(0.0)
        if max_grad_norm > 0:
            grad, norm = optim.clip_grad_norm(grad, max_grad_norm)
        optimizer.update(model, grad)
        return norm

    if compile:
        accumulate = mx.compile(accumulate, inputs=state, outputs=state)
        update = mx.compile(update, inputs=state, outputs=state)
    return accumulate, update, state


def skip_update(optimizer: optim.Optimizer) -> None:
    """Count a step that had nothing to learn from (the schedule stays in step with the loop)."""
    for opt in getattr(optimizer, "optimizers", [optimizer]):
        opt.state["step"] = opt.step + 1


def train_loop(model: DeepseekVL, optimizer: optim.Optimizer, loss_fn: Callable, batches: BatchProducer,
               args: LoopArgs, callbacks: Sequence[TrainingCallback] = (), *, start_step: int = 0,
               schedule: Callable | None = None, window: Window | None = None,
               should_stop: Callable[[], bool] | None = None, world: World = SOLO) -> LoopState:
    """Train from ``start_step`` to ``args.iters`` optimizer steps; returns where it ended.
    ``should_stop()`` is checked before each step and must answer alike on every process."""
    cbs = CallbackList(callbacks)
    weighted = args.grad_accum > 1 or world.size > 1
    accumulate, update, compiled_state = make_step(
        model, optimizer, loss_fn, weighted=weighted, max_grad_norm=args.max_grad_norm, compile=args.compile,
        average_gradients=world.average_gradients if world.size > 1 else None)
    window = window if window is not None else Window()
    state = LoopState(start_step, args.iters, cbs.report)
    stop = should_stop or (lambda: False)
    model.train()
    mx.reset_peak_memory()
    error = None
    try:
        cbs.on_train_begin(state)
        while state.step < args.iters and not stop():
            tic = time.perf_counter()
            grad, local, text_batches, bad = None, StepSums(), 0, []
            for _ in range(args.grad_accum):
                prep = batches.next()
                state.streams = prep.streams_after
                loss, n, mm, grad = accumulate(*prep.inputs, grad)
                mx.eval(compiled_state, loss, n, mm, grad)
                fault_point("step")
                lv, nv = float(loss.item()), float(n.item())
                if not math.isfinite(lv):
                    bad += prep.batch.sources[:3]
                local += StepSums(lv * nv, nv, float(mm[0].item()), float(mm[1].item()), prep.batch.n_tokens,
                                  len(prep.skipped))
                text_batches += int(prep.is_text_stream)
                for s in prep.skipped:
                    warn(f"skipped an example with a bad image (`skip_bad`): {s}", local=True)
            sums = StepSums(*world.sum(local.as_list(), f"the losses of step {state.step + 1}"))
            if not math.isfinite(sums.loss):
                where = f" (batch {', '.join(bad)})" if bad else " (on another process)" if world.size > 1 else ""
                raise NonFiniteLoss(f"loss became {sums.loss} at step {state.step + 1}{where}; training "
                                    f"stopped without saving")
            if sums.ntoks > 0:
                with world.collective(f"the gradients of step {state.step + 1}"):
                    norm = update(grad, mx.array(sums.ntoks / world.size, dtype=mx.float32))
                    mx.eval(compiled_state, norm)
            else:  # every example of the step was dropped (`skip_bad`)
                skip_update(optimizer)
                norm = mx.array(0.0)
                warn(f"step {state.step + 1} had no example left (`skip_bad`); nothing was learnt from it")
            state.step += 1
            window.add_step(sums, text_batches, args.grad_accum, time.perf_counter() - tic)
            state.loss = sums.loss / max(sums.ntoks, 1)
            state.lr = float(schedule(mx.array(state.step - 1)).item()) if schedule else math.nan
            if state.step % args.steps_per_report == 0 or state.step == args.iters:
                cbs.report(window.record(state.step, state.lr, float(norm.item())))
                window.reset()
            cbs.on_step_end(state)
        state.stopped = stop()
    except BaseException as e:
        error = e
        raise
    finally:
        batches.close()
        cbs.on_train_end(state, error)
    return state
