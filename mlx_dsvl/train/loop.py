"""The training loop: it receives built parts (model, optimizer, loss, batches) and callbacks.

The shape of mlx-lm's ``tuner/trainer.py``: the step is compiled with ``mx.compile(step,
inputs=state, outputs=state)`` over the model, optimizer and random state; micro-batches are
accumulated token-weighted; every ``steps_per_report`` steps a ``"train"`` record goes to the
callbacks, which also validate, evaluate and save (see :mod:`mlx_dsvl.train.callbacks`).

Seams for several processes: ``batches`` yields this process's share, ``average_gradients``
combines the accumulated gradient before clipping, ``should_stop`` is where a stop is agreed,
and the callbacks that write take a ``writer`` flag.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from ..faults import fault_point
from .callbacks import CallbackList, TrainingCallback
from .report import Window, warn


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
    report: Callable[[Dict], None]  # hands a record to every callback
    streams: Optional[Dict] = None  # data position after the last micro-batch taken
    loss: float = math.nan  # the last step's loss
    lr: float = math.nan  # the last step's learning rate
    stopped: bool = False  # ended early because should_stop() said so


def make_step(model, optimizer, loss_fn, grad_accum: int, max_grad_norm: float, compile: bool,
              average_gradients: Optional[Callable] = None):
    """``step(*inputs, prev_grad, prev_tokens) -> (loss, ntoks, mm, grad_norm, grad)`` and the
    state it updates.  ``prev_tokens`` is given on a step's last micro-batch: then the summed
    gradient is divided by the step's tokens, clipped and applied, and ``grad`` comes back None."""
    loss_value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]

    def step_fn(*args):
        *inputs, prev_grad, prev_tokens = args
        (loss, ntoks, mm), grad = loss_value_and_grad(model, *inputs)
        if grad_accum > 1:
            # Token-weighted accumulation: sum (mean loss x tokens) gradients, divide at the end.
            grad = tree_map(lambda g: g * ntoks, grad)
            if prev_grad is not None:
                grad = tree_map(lambda a, b: a + b, grad, prev_grad)
        norm = mx.array(0.0)
        if prev_tokens is not None:  # last micro-batch of the step: update
            if grad_accum > 1:
                grad = tree_map(lambda g: g / (prev_tokens + ntoks), grad)
            if average_gradients is not None:
                grad = average_gradients(grad)
            if max_grad_norm > 0:
                grad, norm = optim.clip_grad_norm(grad, max_grad_norm)
            optimizer.update(model, grad)
            grad = None
        return loss, ntoks, mm, norm, grad

    return (mx.compile(step_fn, inputs=state, outputs=state) if compile else step_fn), state


def train_loop(model, optimizer, loss_fn, batches, args: LoopArgs,
               callbacks: Sequence[TrainingCallback] = (), start_step: int = 0, schedule=None,
               window: Optional[Window] = None, should_stop: Optional[Callable[[], bool]] = None,
               average_gradients: Optional[Callable] = None) -> LoopState:
    """Train from ``start_step`` to ``args.iters`` optimizer steps; returns where it ended.

    ``batches.next()`` gives micro-batches with ``inputs`` (``loss_fn``'s arguments after the
    model), ``streams_after``, ``is_text_stream``, ``skipped`` and ``batch``; ``schedule(step)``:
    the learning rate reported; ``window``: the sums behind each ``"train"`` record.
    """
    cbs = CallbackList(callbacks)
    step, compiled_state = make_step(model, optimizer, loss_fn, args.grad_accum, args.max_grad_norm,
                                     args.compile, average_gradients)
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
            grad, loss_sum, ntoks, text_batches = None, 0.0, 0.0, 0
            for k in range(args.grad_accum):
                prep = batches.next()
                state.streams = prep.streams_after
                prev_tokens = mx.array(ntoks, dtype=mx.float32) if k == args.grad_accum - 1 else None
                loss, n, mm, norm, grad = step(*prep.inputs, grad, prev_tokens)
                mx.eval(compiled_state, loss, n, mm, norm, grad)
                fault_point("step")
                lv, nv = float(loss.item()), float(n.item())
                if not math.isfinite(lv):
                    raise NonFiniteLoss(f"loss became {lv} at step {state.step + 1} (batch "
                                        f"{', '.join(prep.batch.sources[:3])}); training stopped without saving")
                loss_sum, ntoks = loss_sum + lv * nv, ntoks + nv
                window.add_batch(prep, mm)
                text_batches += int(prep.is_text_stream)
                for s in prep.skipped:
                    warn(f"skipped an example with a bad image (`skip_bad`): {s}")
            state.step += 1
            window.add_step(loss_sum, ntoks, text_batches, time.perf_counter() - tic)
            state.loss = loss_sum / max(ntoks, 1)
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
