"""``loss.png`` drawn with Pillow (no matplotlib dependency): the loss curves, and beside them,
when the run scores benchmarks (``eval_data``), one accuracy curve per set."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

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
           y_range: tuple[float, float] | None = None) -> None:
    """Curves ``(label, colour, points, dots)`` in ``box`` (left, top, right, bottom) of ``img``."""
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
    d.text(((left + right) // 2 - 15, y_bottom - 25), "step", fill=(0, 0, 0), font=font)
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


def plot_losses(records: Sequence[dict], path: str | Path, title: str = "training loss",
                size: tuple[int, int] = (900, 540)) -> Path | None:
    """Draw ``metrics.jsonl``-style records: losses, and accuracies beside them if any were
    scored (the image is then twice as wide); returns the path (None: nothing to draw)."""
    losses = [(label, color, _points(records, key), key.startswith("val")) for key, label, color in SERIES]
    losses = [c for c in losses if c[2]]
    accuracies = eval_curves(records)
    if not losses and not accuracies:
        return None
    W, H = size
    panels = [p for p in ((title, losses, None), ("benchmark accuracy (eval_data)", accuracies, (0.0, 1.0)))
              if p[1]]
    img = Image.new("RGB", (W * len(panels), H), "white")
    for i, (name, curves, y_range) in enumerate(panels):
        _panel(img, (i * W, 0, (i + 1) * W, H), name, curves, y_range)
    path = Path(path)
    img.save(path)
    return path
