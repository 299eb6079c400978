"""The training loop's callbacks (mlx-lm's ``TrainingCallback`` shape) and the standard ones:
``metrics.jsonl``, progress, validation losses, benchmark accuracies, ``loss.png``.
Callbacks that write files take ``writer``: with several processes only one writes.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..eval import Item, evaluate, read
from .batches import Prepared, VisionFeatureCache, collate, loss_inputs, vision_input
from .config import ConfigError
from .data import DataError, Dataset
from .report import Progress, train_line, val_line, warn

if TYPE_CHECKING:
    from ..models.deepseek_vl import DeepseekVL
    from ..processing.chat import ChatProcessor

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
    """Keeps every record in ``history`` (saved in checkpoints) and appends it to ``metrics.jsonl``."""

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


# -- validation and benchmarks -------------------------------------------------------------------


def validation_losses(model: DeepseekVL, loss_fn: Callable, datasets: Sequence[tuple[Dataset, bool]], *,
                      processor: ChatProcessor, batch_size: int, max_batches: int, pad_to: int,
                      cache: VisionFeatureCache | None) -> dict[str, float]:
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
            prep = Prepared(batch=b, is_text_stream=force_text)
            if b.images:
                if cache is not None:
                    prep.digests = [cache.digest(p) for p in b.images]
                else:
                    prep.pixels = processor.image_processor(b.images)
            loss, ntoks, mm = loss_fn(model, *loss_inputs(b, vision_input(prep, model, cache, processor)))
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
    """Read each ``[NAME=]FILE`` once, before anything is written (an undecodable image is a bad row)."""
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
    """Benchmark accuracies before the first step, every ``every`` steps and at the end. Scoring
    draws no random numbers and restores training mode, so resume stays exact."""

    def __init__(self, model: DeepseekVL, processor: ChatProcessor, sets: Sequence[EvalSet], *, every: int,
                 method: str, batch_size: int, limit: int | None, say: Callable[[str], None],
                 target: str = "letter"):
        self.model, self.processor, self.sets, self.every = model, processor, list(sets), every
        self.options = dict(method=method, target=target, batch_size=batch_size, limit=limit)
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


# -- loss.png (drawn with Pillow: no matplotlib dependency) ----------------------------------------


SERIES = (
    ("loss", "train", (31, 119, 180)),
    ("loss_mm", "train multimodal", (44, 160, 44)),
    ("loss_text", "train text", (214, 39, 40)),
    ("val_loss", "val", (0, 0, 0)),
    ("val_loss_mm", "val multimodal", (23, 190, 207)),
    ("val_loss_text", "val text", (148, 103, 189)),
)
EVAL_COLORS = ((255, 127, 14), (31, 119, 180), (44, 160, 44), (214, 39, 40), (148, 103, 189),
               (140, 86, 75), (227, 119, 194), (127, 127, 127))
EVAL_KEY = re.compile(r"eval_(.+)_acc")
Points = list[tuple[float, float]]


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    ticks = []
    t = start
    while t <= hi + 1e-12:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _points(records: Sequence[dict], key: str) -> Points:
    out = []
    for r in records:
        v = r.get(key)
        if v is not None and isinstance(v, (int, float)) and math.isfinite(v):
            out.append((float(r["step"]), float(v)))
    return out


def _panel(img: Image.Image, box: tuple[int, int, int, int], title: str,
           curves: Sequence[tuple[str, tuple[int, int, int], Points, bool]],
           y_range: tuple[float, float] | None = None,
           marks: Sequence[tuple[float, str, tuple[int, int, int]]] = (), x_label: str = "step") -> None:
    """Curves ``(label, colour, points, dots)`` in ``box`` (left, top, right, bottom) of ``img``;
    ``marks``: vertical lines ``(x, label, colour)``."""
    d, font = ImageDraw.Draw(img), ImageFont.load_default()
    x_left, y_top, x_right, y_bottom = box
    left, right, top, bottom = x_left + 70, x_right - 20, y_top + 40, y_bottom - 60
    points = [p for _, _, pts, _ in curves for p in pts]
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y_range is None:
        y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
        pad = 0.05 * (y1 - y0 or 1.0)
        y0, y1 = y0 - pad, y1 + pad
    else:
        y0, y1 = y_range

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (right - left), top + (y1 - y) / (y1 - y0) * (bottom - top))

    d.rectangle([left, top, right, bottom], outline=(120, 120, 120))
    for t in _nice_ticks(y0, y1):
        _, y = px(x0, t)
        d.line([left, y, right, y], fill=(230, 230, 230))
        d.text((x_left + 5, y - 6), f"{t:.3g}", fill=(60, 60, 60), font=font)
    for t in _nice_ticks(x0, x1):
        x, _ = px(t, y0)
        d.line([x, top, x, bottom], fill=(230, 230, 230))
        d.text((x - 10, bottom + 6), f"{t:g}", fill=(60, 60, 60), font=font)
    for x, label, color in marks:
        mx_, _ = px(x, y0)
        d.line([mx_, top, mx_, bottom], fill=color, width=2)
        d.text((mx_ + 4, bottom - 16), label, fill=color, font=font)
    d.text(((left + right) // 2 - 3 * len(x_label), y_bottom - 25), x_label, fill=(0, 0, 0), font=font)
    d.text((left, y_top + 12), title, fill=(0, 0, 0), font=font)
    legend_x, ly = right - 200, top + 8
    for label, color, pts, dots in curves:
        coords = [px(x, y) for x, y in pts]
        if len(coords) > 1:
            d.line(coords, fill=color, width=2)
        if dots or len(coords) == 1:
            for cx, cy in coords:
                d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=color)
        d.line([legend_x, ly + 6, legend_x + 20, ly + 6], fill=color, width=3)
        d.text((legend_x + 26, ly), label, fill=(0, 0, 0), font=font)
        ly += 16


def eval_curves(records: Sequence[dict]):
    """One accuracy curve per benchmark set of the ``"eval"`` records, labelled with its kind."""
    evals = [r for r in records if r.get("type") == "eval"]
    names = list(dict.fromkeys(m.group(1) for r in evals for k in r if (m := EVAL_KEY.fullmatch(k))))
    curves = []
    for i, name in enumerate(names):
        kind = next((r[f"eval_{name}_kind"] for r in evals if f"eval_{name}_kind" in r), None)
        label = f"{name} ({kind})" if kind else name
        curves.append((label, EVAL_COLORS[i % len(EVAL_COLORS)], _points(evals, f"eval_{name}_acc"), True))
    return [c for c in curves if c[2]]


GUARD_COLOR, TRIP_COLOR = (0, 0, 0), (200, 0, 0)


def guard_curves(records: Sequence[dict]):
    """The language guard's accuracy, its limit (the first score less the allowed drop) and a
    mark where it tripped, from the ``"guard"`` records."""
    recs = [r for r in records if r.get("type") == "guard"]
    pts = _points(recs, "guard_acc")
    if not pts:
        return [], []
    limit = recs[0]["guard_baseline"] - recs[0]["guard_max_drop"] / 100
    curves = [("guard (text-only)", GUARD_COLOR, pts, True),
              ("guard limit", TRIP_COLOR, [(pts[0][0], limit), (pts[-1][0], limit)], False)]
    marks = [(float(r["step"]), f"guard tripped (step {r['step']})", TRIP_COLOR)
             for r in recs if r.get("guard_tripped")]
    return curves, marks


def plot_losses(records: Sequence[dict], path: str | Path, title: str = "training loss",
                size: tuple[int, int] = (900, 540)) -> Path | None:
    """Losses, and accuracies beside them if any were scored; None: nothing to draw."""
    losses = [(label, color, _points(records, key), key.startswith("val")) for key, label, color in SERIES]
    losses = [c for c in losses if c[2]]
    guard, marks = guard_curves(records)
    accuracies = eval_curves(records) + guard
    if not losses and not accuracies:
        return None
    panels = [p for p in ((title, losses, None, (), "step"),
                          ("benchmark accuracy (eval_data, guard_data)", accuracies, (0.0, 1.0), marks, "step"))
              if p[1]]
    return plot_panels(path, panels, size)


def plot_panels(path: str | Path, panels: Sequence[tuple], size: tuple[int, int] = (900, 540)) -> Path:
    """Panels side by side, each ``(title, curves, y_range or None, marks, x_label)`` (:func:`_panel`)."""
    W, H = size
    img = Image.new("RGB", (W * len(panels), H), "white")
    for i, (name, curves, y_range, marks, x_label) in enumerate(panels):
        _panel(img, (i * W, 0, (i + 1) * W, H), name, curves, y_range, marks, x_label)
    path = Path(path)
    img.save(path)
    return path


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
