"""A synthetic captioning task for tests and benchmarks: coloured shapes on coloured backgrounds.

The default task keeps shape and background colours apart and gives each shape its own size:
learnable by a tiny random model in a CI budget. ``shape_colors``, ``bg_colors``, ``sizes`` and
``jitter`` make it harder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "grey": (128, 128, 128),
}
SHAPE_COLORS = ("red", "green", "blue", "yellow")
BG_COLORS = ("white", "black", "grey")
SHAPES = ("circle", "square", "triangle")
# Half-size of each shape as a fraction of the image side.
SIZES: Mapping[str, float] = {"square": 0.34, "circle": 0.28, "triangle": 0.22}
QUESTION = "<image_placeholder>Describe the image."
TEMPLATE = "a {fg} {shape} on a {bg} background"


def caption(fg: str, shape: str, bg: str, template: str = TEMPLATE) -> str:
    return template.format(fg=fg, shape=shape, bg=bg)


def combos(shape_colors: Sequence[str] = SHAPE_COLORS, shapes: Sequence[str] = SHAPES,
           bg_colors: Sequence[str] = BG_COLORS) -> list[tuple[str, str, str]]:
    return [(f, s, b) for f in shape_colors for s in shapes for b in bg_colors if f != b]


def draw(fg: str, shape: str, bg: str, rng: np.random.Generator, size: int = 384,
         sizes: Mapping[str, float] = SIZES, jitter: float = 0.1, color_jitter: int = 12) -> Image.Image:
    """One image: the shape (its own size, jittered centre and colours) on a plain background."""

    def col(name):
        c = np.array(COLORS[name]) + rng.integers(-color_jitter, color_jitter + 1, size=3)
        return tuple(int(v) for v in np.clip(c, 0, 255))

    im = Image.new("RGB", (size, size), col(bg))
    d = ImageDraw.Draw(im)
    r = sizes[shape] * size
    cx, cy = size / 2 + rng.uniform(-jitter, jitter, size=2) * size
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        d.ellipse(box, fill=col(fg))
    elif shape == "square":
        d.rectangle(box, fill=col(fg))
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=col(fg))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return im


def make_images(n: int, seed: int, size: int = 384, balanced: bool = True,
                template: str = TEMPLATE, **task):
    """``n`` (PIL image, caption) pairs; ``balanced`` cycles through every combination."""
    task = dict(task)
    rng = np.random.default_rng(seed)
    cs = combos(task.pop("shape_colors", SHAPE_COLORS), task.pop("shapes", SHAPES),
                task.pop("bg_colors", BG_COLORS))
    out = []
    for i in range(n):
        f, s, b = cs[i % len(cs)] if balanced else cs[rng.integers(len(cs))]
        out.append((draw(f, s, b, rng, size, **task), caption(f, s, b, template)))
    return out


def write_shapes_dataset(folder: str | Path, n: int, seed: int = 0, size: int = 384,
                         balanced: bool = True, system: str | None = "", template: str = TEMPLATE,
                         **task) -> dict[str, Path]:
    """Write images + ``pairs.jsonl`` + ``chat.jsonl`` into ``folder``; returns their paths.
    ``system``: "" = none, None = the default one."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    pairs, chats = [], []
    for i, (im, cap) in enumerate(make_images(n, seed, size, balanced, template, **task)):
        rel = f"images/{seed}-{i:05d}.png"
        im.save(folder / rel, compress_level=1)
        pairs.append({"image": rel, "text": cap})
        msgs = [] if system is None else [{"role": "system", "content": system}]
        msgs += [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": cap}]
        chats.append({"messages": msgs, "images": [rel]})
    paths = {"pairs": folder / "pairs.jsonl", "chat": folder / "chat.jsonl"}
    paths["pairs"].write_text("".join(json.dumps(r) + "\n" for r in pairs))
    paths["chat"].write_text("".join(json.dumps(r) + "\n" for r in chats))
    return paths
