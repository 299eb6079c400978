"""A loss-curve PNG drawn with Pillow (no matplotlib dependency)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont

SERIES = (
    ("loss", "train", (31, 119, 180)),
    ("loss_mm", "train multimodal", (44, 160, 44)),
    ("loss_text", "train text", (214, 39, 40)),
    ("val_loss", "val", (0, 0, 0)),
    ("val_loss_mm", "val multimodal", (23, 190, 207)),
    ("val_loss_text", "val text", (148, 103, 189)),
)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> List[float]:
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


def plot_losses(records: Sequence[Dict], path: str | Path, title: str = "training loss",
                size: Tuple[int, int] = (900, 540)) -> Optional[Path]:
    """Draw train/val loss curves from ``metrics.jsonl``-style records; returns the path."""
    series: Dict[str, List[Tuple[float, float]]] = {k: [] for k, _, _ in SERIES}
    for r in records:
        for k in series:
            v = r.get(k)
            if v is not None and isinstance(v, (int, float)) and math.isfinite(v):
                series[k].append((float(r["step"]), float(v)))
    points = [p for s in series.values() for p in s]
    if not points:
        return None
    W, H = size
    left, right, top, bottom = 70, 20, 40, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    y0, y1 = min(ys), max(ys)
    pad = 0.05 * (y1 - y0 or 1.0)
    y0, y1 = y0 - pad, y1 + pad

    def px(x: float, y: float) -> Tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (W - left - right),
                top + (y1 - y) / (y1 - y0) * (H - top - bottom))

    d.rectangle([left, top, W - right, H - bottom], outline=(120, 120, 120))
    for t in _nice_ticks(y0, y1):
        _, y = px(x0, t)
        d.line([left, y, W - right, y], fill=(230, 230, 230))
        d.text((5, y - 6), f"{t:.3g}", fill=(60, 60, 60), font=font)
    for t in _nice_ticks(x0, x1):
        x, _ = px(t, y0)
        d.line([x, top, x, H - bottom], fill=(230, 230, 230))
        d.text((x - 10, H - bottom + 6), f"{t:g}", fill=(60, 60, 60), font=font)
    d.text((W // 2 - 15, H - 25), "step", fill=(0, 0, 0), font=font)
    d.text((left, 12), title, fill=(0, 0, 0), font=font)
    legend_x = W - right - 150
    ly = top + 8
    for key, label, color in SERIES:
        pts = series[key]
        if not pts:
            continue
        coords = [px(x, y) for x, y in pts]
        if len(coords) > 1:
            d.line(coords, fill=color, width=2)
        if key.startswith("val") or len(coords) == 1:
            for cx, cy in coords:
                d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=color)
        d.line([legend_x, ly + 6, legend_x + 20, ly + 6], fill=color, width=3)
        d.text((legend_x + 26, ly), label, fill=(0, 0, 0), font=font)
        ly += 16
    path = Path(path)
    img.save(path)
    return path
