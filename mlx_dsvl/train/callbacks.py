"""Callbacks of the training loop (mlx-lm's ``TrainingCallback`` shape) and the standard ones
that keep ``metrics.jsonl``, print progress and draw ``loss.png``.

A callback sees every record the run reports (``on_train_loss_report`` for ``"train"`` records,
``on_val_loss_report`` for ``"val"`` and ``"eval"`` ones), runs before the first step
(``on_train_begin``), after each optimizer step (``on_step_end``; both may report records of
their own through ``state.report``) and at the end (``on_train_end``, also when the run failed).  Callbacks that write files take ``writer``: with
several processes only one writes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from .plot import plot_losses
from .report import Progress, train_line, warn

METRICS = "metrics.jsonl"


class TrainingCallback:
    def on_train_loss_report(self, info: dict) -> None:
        """A ``"train"`` record: the losses and speed of the steps since the last report."""

    def on_val_loss_report(self, info: dict) -> None:
        """A ``"val"`` (validation losses) or ``"eval"`` (benchmark accuracies) record."""

    def on_train_begin(self, state) -> None:
        """Before the first step of this session (``state.step``: the step it starts from)."""

    def on_step_end(self, state) -> None:
        """After optimizer step ``state.step`` (:class:`~mlx_dsvl.train.loop.LoopState`)."""

    def on_train_end(self, state, error: BaseException | None) -> None:
        """The loop ended: finished, stopped (``state.stopped``) or failed with ``error``."""


class CallbackList(TrainingCallback):
    """Calls each callback in order; ``report`` hands a record to all of them."""

    def __init__(self, callbacks: Sequence[TrainingCallback]):
        self.callbacks = list(callbacks)

    def report(self, rec: dict) -> None:
        for cb in self.callbacks:
            (cb.on_train_loss_report if rec.get("type") == "train" else cb.on_val_loss_report)(rec)

    def on_train_begin(self, state) -> None:
        for cb in self.callbacks:
            cb.on_train_begin(state)

    def on_step_end(self, state) -> None:
        for cb in self.callbacks:
            cb.on_step_end(state)

    def on_train_end(self, state, error) -> None:
        """Every callback runs even when one fails (a plot must not be lost to a failed save);
        the first failure is raised afterwards."""
        first = None
        for cb in self.callbacks:
            try:
                cb.on_train_end(state, error or first)
            except BaseException as e:
                first = first or e
        if first is not None:
            raise first


class MetricsLog(TrainingCallback):
    """Keeps every record in ``history`` (saved in checkpoints) and appends it to the run's
    ``metrics.jsonl`` (``run.path`` moves when a staged run takes its place)."""

    def __init__(self, run, history: list[dict], writer: bool = True):
        self.run, self.history, self.writer = run, history, writer

    def _add(self, rec: dict) -> None:
        self.history.append(rec)
        if self.writer:
            with open(self.run.path / METRICS, "a") as f:
                f.write(json.dumps(rec) + "\n")

    on_train_loss_report = on_val_loss_report = _add


class Console(TrainingCallback):
    """A progress bar and a line per ``"train"`` record (time left from this session's pace)."""

    def __init__(self, progress: Progress, start_step: int, t_start: float):
        self.progress, self.start_step, self.t_start = progress, start_step, t_start
        self.t_loop = time.perf_counter()

    def on_step_end(self, state) -> None:
        self.progress.bar(state.step, f"loss {state.loss:.3f} lr {state.lr:.2e}")

    def on_train_loss_report(self, info: dict) -> None:
        now = time.perf_counter()
        pace = (now - self.t_loop) / max(1, info["step"] - self.start_step)
        eta = (self.progress.total - info["step"]) * pace
        self.progress.line(train_line(info, self.progress.total, now - self.t_start, eta))


class Plot(TrainingCallback):
    """Draws ``loss.png`` from the history at the end (a failed plot never loses a run)."""

    def __init__(self, run, history: list[dict], title: str, writer: bool = True):
        self.run, self.history, self.title, self.writer = run, history, title, writer

    def on_train_end(self, state, error) -> None:
        if not (self.writer and self.history) or self.run.staged:
            return
        try:
            plot_losses(self.history, self.run.path / "loss.png", title=self.title)
        except Exception as e:
            warn(f"could not draw loss.png ({e})")
