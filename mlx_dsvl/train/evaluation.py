"""Looking at the model during training: validation losses (``val_data``, ``val_text_data``) and
benchmark accuracies (``eval_data``, scored by :func:`mlx_dsvl.eval.evaluate`)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..eval import Item, evaluate, read
from .batches import Prepared, batch_arrays, collate, vision_input
from .callbacks import TrainingCallback
from .config import ConfigError
from .data import DataError, Dataset
from .report import val_line
from .vision_cache import VisionFeatureCache


def validation_losses(model, loss_fn, datasets: Sequence[tuple[Dataset, bool]], processor, batch_size: int,
                      max_batches: int, pad_to: int, cache: VisionFeatureCache | None) -> dict[str, float]:
    """Token-weighted validation losses: all, multimodal examples, text-only examples.

    ``datasets``: ``(dataset, text_only)`` pairs (a text-only set must hold no image).  The model
    is put in eval mode for the call and back in training mode after it.
    """
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


def due(step: int, every: int, iters: int) -> bool:
    """Every ``every`` steps (0: never) and at the last step."""
    return (every > 0 and step % every == 0) or step == iters


class Validation(TrainingCallback):
    """Validation losses every ``every`` steps and at the end, reported as ``"val"`` records."""

    def __init__(self, losses: Callable[[], dict[str, float]], every: int, say: Callable[[str], None]):
        self.losses, self.every, self.say = losses, every, say

    def on_step_end(self, state) -> None:
        if not due(state.step, self.every, state.iters):
            return
        t0 = time.perf_counter()
        rec = {"type": "val", "step": state.step, **self.losses()}
        state.report(rec)
        self.say(val_line(rec, state.iters, time.perf_counter() - t0))


# -- benchmarks ------------------------------------------------------------------------------------


@dataclass
class EvalSet:
    name: str  # the record keys' middle part: eval_<name>_acc
    path: str
    items: list[Item]
    kind: str  # "multimodal" or "text-only"


def read_eval_sets(specs: None | str | Sequence[str]) -> list[EvalSet]:
    """Read each ``[NAME=]FILE`` once (a bad row raises :class:`~mlx_dsvl.eval.EvalDataError`
    naming the file and line; an image that cannot be decoded is a bad row)."""
    specs = [s for s in ([specs] if isinstance(specs, str) else list(specs or [])) if s]  # "": none
    sets: list[EvalSet] = []
    for spec in specs:
        name, _, path = spec.partition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
        name = re.sub(r"[^a-z0-9]+", "_", (name or Path(path).stem).lower()).strip("_") or "set"
        clash = next((s for s in sets if s.name == name), None)
        if clash is not None:
            raise ConfigError("eval_data", f"names two sets {name!r} ({clash.path}, {path}); name them "
                                           f"with NAME=FILE")
        items = read(path).items
        kind = "multimodal" if any(it.images for it in items) else "text-only"
        sets.append(EvalSet(name, path, items, kind))
    return sets


def eval_record(step: int, summaries: dict[str, dict], sets: Sequence[EvalSet], seconds: float) -> dict:
    rec: dict = {"type": "eval", "step": step}
    for s in sets:
        summary = summaries[s.name]
        rec.update({f"eval_{s.name}_acc": summary["accuracy"], f"eval_{s.name}_ci95": summary["ci95"],
                    f"eval_{s.name}_items": summary["items"], f"eval_{s.name}_kind": s.kind})
    rec["seconds"] = round(seconds, 3)
    return rec


def eval_line(rec: dict, iters: int, sets: Sequence[EvalSet]) -> str:
    def one(s: EvalSet) -> str:
        acc, (lo, hi) = rec[f"eval_{s.name}_acc"], rec[f"eval_{s.name}_ci95"]
        return (f"{s.name} ({s.kind}) " + ("n/a" if acc is None else f"{acc:.3f} [{lo:.3f}, {hi:.3f}]")
                + f" of {rec[f'eval_{s.name}_items']}")

    return f"step {rec['step']}/{iters} | eval " + " | ".join(one(s) for s in sets) + f" ({rec['seconds']:.1f}s)"


class Evaluation(TrainingCallback):
    """Benchmark accuracies before the first step, every ``every`` steps and at the end, reported
    as ``"eval"`` records.  Scoring draws no random numbers and restores the model's training
    modes, so it leaves the run exactly as it was (resume stays exact)."""

    def __init__(self, model, processor, sets: Sequence[EvalSet], every: int, method: str, batch_size: int,
                 limit: int | None, say: Callable[[str], None]):
        self.model, self.processor, self.sets, self.every = model, processor, list(sets), every
        self.options = dict(method=method, batch_size=batch_size, limit=limit)
        self.say = say

    def run(self, state) -> None:
        t0 = time.perf_counter()
        summaries = {s.name: evaluate(self.model, self.processor, s.items, **self.options) for s in self.sets}
        rec = eval_record(state.step, summaries, self.sets, time.perf_counter() - t0)
        state.report(rec)
        self.say(eval_line(rec, state.iters, self.sets))

    def on_train_begin(self, state) -> None:
        if state.step == 0:  # the baseline (a resumed run has it in its history)
            self.run(state)

    def on_step_end(self, state) -> None:
        if due(state.step, self.every, state.iters):
            self.run(state)
