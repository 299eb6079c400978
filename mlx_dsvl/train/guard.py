"""The language guard (``guard_data``): a text-only benchmark scored before the first step, at each
evaluation and at each checkpoint; a drop of more than ``guard_max_drop`` points from its first
score is said once and recorded, and with ``guard_stop`` it ends the run before that step is saved.

Every checkpoint's step was scored just before it was saved (the guard runs before the
checkpointer), so the run's last checkpoint is always the last good one: rotation keeps the
newest, and a tripped step is never saved.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..eval import evaluate
from .callbacks import EvalSet, TrainingCallback, due, read_eval_sets
from .config import ConfigError
from .loop import TrainingStopped
from .report import warn

if TYPE_CHECKING:
    from ..models.deepseek_vl import DeepseekVL
    from ..processing.chat import ChatProcessor

GUARD = "guard"  # the records' type and the set's name


class GuardTripped(TrainingStopped):
    """The guard set's accuracy fell by more than the limit (with ``guard_stop``)."""


def read_guard(path: str | None) -> EvalSet | None:
    """The guard set, read once before anything is written: text-only multiple choice."""
    if not path:
        return None
    (guard,) = read_eval_sets(f"{GUARD}={path}")
    bad = next((it for it in guard.items if it.images or not it.is_mc), None)
    if bad is not None:
        raise ConfigError("guard_data", f"{path}: the guard scores text-only multiple-choice questions; "
                                        f"{bad.source} " + ("has images" if bad.images else "has no choices"))
    if not guard.items:
        raise ConfigError("guard_data", f"{path}: no questions")
    return guard


def chance(guard: EvalSet) -> float:
    return sum(1 / len(it.choices) for it in guard.items) / len(guard.items)


def guard_line(rec: dict, iters: int) -> str:
    lo, hi = rec["guard_ci95"]
    return (f"step {rec['step']}/{iters} | guard (text-only) {rec['guard_acc']:.3f} [{lo:.3f}, {hi:.3f}] of "
            f"{rec['guard_items']}, {rec['guard_drop']:+.1f} points from step {rec['guard_baseline_step']} "
            f"(limit {rec['guard_max_drop']:g}) ({rec['seconds']:.1f}s)")


class LanguageGuard(TrainingCallback):
    """Scores the guard set when an evaluation or a checkpoint is due; reports ``"guard"`` records
    (``guard_acc``, ``guard_drop`` in points, ``guard_over_limit``, ``guard_tripped`` once)."""

    def __init__(self, model: DeepseekVL, processor: ChatProcessor, guard: EvalSet, *, history: list[dict],
                 max_drop: float, stop: bool, eval_every: int, save_every: int, method: str, target: str,
                 batch_size: int, say: Callable[[str], None]):
        self.model, self.processor, self.guard, self.history = model, processor, guard, history
        self.max_drop, self.stop, self.every = max_drop, stop, (eval_every, save_every)
        self.options = dict(method=method, target=target, batch_size=batch_size)
        self.say = say

    def _earlier(self) -> Sequence[dict]:
        return [r for r in self.history if r.get("type") == GUARD]

    def run(self, state) -> None:
        t0 = time.perf_counter()
        summary = evaluate(self.model, self.processor, self.guard.items, **self.options)
        earlier = self._earlier()
        base = earlier[0] if earlier else {"step": state.step, "guard_acc": summary["accuracy"]}
        drop = round(100 * (base["guard_acc"] - summary["accuracy"]), 6)
        over = drop > self.max_drop
        tripped = over and not any(r.get("guard_tripped") for r in earlier)
        rec = {"type": GUARD, "step": state.step, "guard_acc": summary["accuracy"],
               "guard_ci95": summary["ci95"], "guard_items": summary["items"],
               "guard_baseline": base["guard_acc"], "guard_baseline_step": base["step"],
               "guard_drop": drop, "guard_max_drop": self.max_drop, "guard_over_limit": over,
               **({"guard_tripped": True} if tripped else {}), "seconds": round(time.perf_counter() - t0, 3)}
        state.report(rec)
        self.say(guard_line(rec, state.iters))
        if not earlier:
            self._check_baseline(summary)
        if tripped:
            what = (f"language guard: {self.guard.path} fell from {base['guard_acc']:.1%} (step {base['step']}) "
                    f"to {summary['accuracy']:.1%} at step {state.step}, {drop:.1f} points (limit "
                    f"{self.max_drop:g}, `guard_max_drop`)")
            if self.stop:
                raise GuardTripped(f"{what}; training stopped without saving step {state.step}")
            warn(f"{what}; training goes on (`guard_stop` would stop it)")

    def _check_baseline(self, summary: dict) -> None:
        lo, base = summary["ci95"][0], chance(self.guard)
        if lo <= base:
            warn(f"language guard: the model scores {summary['accuracy']:.1%} on {self.guard.path}, not above "
                 f"chance ({base:.1%}): it cannot show forgetting; choose text questions the base model answers")

    def on_train_begin(self, state) -> None:
        if not self._earlier():  # the baseline (a resumed run has it in its history)
            self.run(state)

    def on_step_end(self, state) -> None:
        if any(due(state.step, every, state.iters) for every in self.every):
            self.run(state)

    def on_train_end(self, state, error) -> None:
        """A stop signal saves the step it stopped at: the guard scores it first."""
        if error is None and state.stopped and self._earlier()[-1]["step"] != state.step:
            self.run(state)
