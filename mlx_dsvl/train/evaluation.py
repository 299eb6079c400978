"""Looking at the model during training: validation losses (``val_data``, ``val_text_data``)."""

from __future__ import annotations

import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .batches import Prepared, batch_arrays, collate, vision_input
from .callbacks import TrainingCallback
from .data import DataError, Dataset
from .report import val_line
from .vision_cache import VisionFeatureCache


def validation_losses(model, loss_fn, datasets: Sequence[Tuple[Dataset, bool]], processor, batch_size: int,
                      max_batches: int, pad_to: int, cache: Optional[VisionFeatureCache]) -> Dict[str, float]:
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

    def __init__(self, losses: Callable[[], Dict[str, float]], every: int, say: Callable[[str], None]):
        self.losses, self.every, self.say = losses, every, say

    def on_step_end(self, state) -> None:
        if not due(state.step, self.every, state.iters):
            return
        t0 = time.perf_counter()
        rec = {"type": "val", "step": state.step, **self.losses()}
        state.report(rec)
        self.say(val_line(rec, state.iters, time.perf_counter() - t0))
