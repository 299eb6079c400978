"""Training data: JSONL -> tokenized examples with loss masks (the format: README, "Fine-tune").

Chat lines are rendered with the inference template; the loss is on the assistant answers and the
EOS the template puts after each, never on the system prompt, user turns, the ``Assistant:``
prefix, BOS or image tokens. Pairs and text-only lines are BOS, text, EOS with loss on text and
EOS. ``labels[t]`` is the token predicted from ``ids[:t]``, or :data:`IGNORE` (-100). A
truncation never cuts inside an image (a split image is dropped whole); one that would leave no
loss token skips the example as too long.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..processing.chat import IMAGE_TAG, ChatProcessor, place_images
from ..processing.image_tokens import ImageTokens
from ..utils import common_prefix
from .report import warn

IGNORE = -100


class DataError(ValueError):
    """A training data problem; the message names the file and line (or the image path)."""


@dataclass
class Example:
    """One tokenized training sequence."""

    ids: np.ndarray  # [T] int32 token ids, BOS first, image ids expanded
    labels: np.ndarray  # [T] int32: target at t (predicted from ids[:t]) or IGNORE
    images: list[str]  # resolved image paths, one per run of image tokens, in order
    source: str  # "file:line"
    kind: str  # "chat" | "pair" | "text"

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])

    @property
    def has_images(self) -> bool:
        return bool(self.images)

    @property
    def n_targets(self) -> int:
        return int(np.sum(self.labels != IGNORE))


@dataclass
class DataStats:
    lines: int = 0
    examples: int = 0
    skipped_bad: list[str] = field(default_factory=list)  # reasons
    truncated: list[str] = field(default_factory=list)  # sources
    skipped_long: list[str] = field(default_factory=list)
    skipped_empty: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {
            "lines": self.lines,
            "examples": self.examples,
            "skipped_bad": len(self.skipped_bad),
            "truncated": len(self.truncated),
            "skipped_long": len(self.skipped_long),
            "skipped_empty": len(self.skipped_empty),
        }


@dataclass
class Dataset:
    path: str
    examples: list[Example]
    stats: DataStats

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]

    @property
    def lengths(self) -> list[int]:
        return [e.length for e in self.examples]


# -- tokenization with loss masks ------------------------------------------------------------


def _check_alternation(messages: Sequence[Mapping[str, Any]]) -> None:
    roles = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise ValueError(f"message {i} must be an object with a string 'role'")
        roles.append(m["role"].strip().lower())
    body = roles[1:] if roles and roles[0] == "system" else roles
    for i, r in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if r != want:
            raise ValueError(
                f"roles must alternate user/assistant (after an optional first system message); "
                f"message {i + len(roles) - len(body)} is {r!r}, expected {want!r}"
            )


def tokenize_chat(processor: ChatProcessor, messages: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Chat messages -> ``(ids, labels)`` with loss on assistant answers and their EOS."""
    _check_alternation(messages)
    full = processor.format(messages)
    ids = processor.tokenize(full)
    labels = np.full_like(ids, IGNORE)
    for j, m in enumerate(messages):
        if m["role"].strip().lower() != "assistant" or not str(m.get("content", "")).strip():
            continue
        before, after = processor.format(messages[:j]), processor.format(messages[: j + 1])
        if not (full.startswith(before) and full.startswith(after)):  # template invariant
            raise ValueError("internal error: the chat template is not prefix-stable")
        start = common_prefix(processor.tokenize(before), ids)
        end = common_prefix(processor.tokenize(after), ids)
        labels[start:end] = ids[start:end]
    labels[processor.image_tokens.is_image(ids)] = IGNORE
    return ids, labels


def tokenize_text(processor: ChatProcessor, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Plain (possibly interleaved) text -> ``(ids, labels)``: BOS, text, EOS; loss on text+EOS."""
    ids = processor.tokenize(text)
    eos = processor.tokenizer.eos_token_id
    ids = np.concatenate([ids, np.array([eos], dtype=np.int32)])
    labels = ids.copy()
    bos = processor.tokenizer.bos_token_id
    if bos is not None and ids.shape[0] and ids[0] == bos:
        labels[0] = IGNORE
    labels[processor.image_tokens.is_image(ids)] = IGNORE
    return ids.astype(np.int32), labels.astype(np.int32)


def truncate(ids, labels, images, max_len: int, layout: ImageTokens):
    """Cut to ``max_len`` tokens, never inside an image: a split image is dropped whole."""
    cut = max_len
    kept = 0
    for s, e in layout.runs(ids):
        if e <= cut:
            kept += 1
        elif s < cut:
            cut = s
            break
        else:
            break
    return ids[:cut], labels[:cut], images[:kept]


# -- JSONL parsing ----------------------------------------------------------------------------


def _resolve_images(value: Any, base: Path, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: 'images' must be a list of image paths (strings)")
    out = []
    for v in value:
        p = Path(v).expanduser()
        out.append(str(p if p.is_absolute() else base / p))
    return out


def check_image(path: str) -> None:
    """Raise :class:`DataError` naming ``path`` if it is missing or not a readable image."""
    if not os.path.exists(path):
        raise DataError(f"image not found: {path}")
    if os.path.isdir(path):
        raise DataError(f"image path is a directory: {path}")
    try:
        with Image.open(path):  # reads the header only; the pixels are decoded when batched
            pass
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"not a readable image: {path} ({type(e).__name__}: {e})") from None


def parse_line(obj: Any, base: Path, where: str, processor: ChatProcessor) -> Example:
    """One decoded JSON value -> :class:`Example` (not yet length-checked)."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        images = obj.get("images")
        if images is None:  # the original DeepSeek-VL style: "images" on the user messages
            images = [p for m in messages if isinstance(m, dict) for p in (m.get("images") or [])]
        images = _resolve_images(images, base, where)
        kind = "chat"
        try:
            ids, labels = tokenize_chat(processor, messages)
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
    elif "text" in obj:
        text = obj["text"]
        if not isinstance(text, str):
            raise DataError(f"{where}: 'text' must be a string")
        if "image" in obj and "images" in obj:
            raise DataError(f"{where}: give either 'image' or 'images', not both")
        images = _resolve_images(obj.get("image", obj.get("images")), base, where)
        text = place_images(text, len(images))
        kind = "pair" if images else "text"
        ids, labels = tokenize_text(processor, text)
    else:
        raise DataError(
            f"{where}: expected 'messages' (chat), 'image' + 'text' (image-text pair) or 'text' "
            f"(text-only); got keys {sorted(obj)}"
        )
    n_runs = processor.image_tokens.count(ids)
    if n_runs != len(images):
        raise DataError(
            f"{where}: the text has {n_runs} {IMAGE_TAG} placeholder(s) but {len(images)} image(s) "
            "are given"
        )
    for p in images:
        try:
            check_image(p)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
    return Example(ids.astype(np.int32), labels.astype(np.int32), images, where, kind)


def load_jsonl(
    path: str | os.PathLike,
    processor: ChatProcessor,
    max_seq_len: int,
    long_policy: str = "truncate",
    skip_bad: bool = False,
    verbose: bool = True,
) -> Dataset:
    """Read and tokenize a JSONL file; bad lines raise :class:`DataError` naming ``file:line``
    unless ``skip_bad`` (then counted)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    if long_policy not in ("truncate", "skip"):
        raise ValueError(f"long_policy must be 'truncate' or 'skip', got {long_policy!r}")
    base = path.resolve().parent
    stats = DataStats()
    examples: list[Example] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            stats.lines += 1
            where = f"{path}:{lineno}"
            try:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
                ex = parse_line(obj, base, where, processor)
            except DataError as e:
                if not skip_bad:
                    raise
                stats.skipped_bad.append(str(e))
                continue
            if ex.length > max_seq_len:
                ids, labels, imgs = truncate(ex.ids, ex.labels, ex.images, max_seq_len, processor.image_tokens)
                cut = Example(ids, labels, imgs, ex.source, ex.kind)
                if long_policy == "skip" or (ex.n_targets and not cut.n_targets):  # no answer fits
                    stats.skipped_long.append(_needs(ex, processor.num_image_tokens))
                    continue
                stats.truncated.append(f"{where} ({ex.length} -> {ids.shape[0]} tokens)")
                ex = cut
            if ex.n_targets == 0:
                stats.skipped_empty.append(where)
                continue
            examples.append(ex)
    stats.examples = len(examples)
    if verbose:
        report_stats(str(path), stats, max_seq_len, long_policy)
    if not examples:
        raise DataError(f"{path}: {_why_no_examples(stats, max_seq_len)}")
    return Dataset(str(path), examples, stats)


def _needs(ex: Example, image_tokens: int) -> str:
    """``file:line needs N tokens`` (with its images' share): what `max_seq_len` must hold."""
    n = len(ex.images)
    images = f", {n} image{'s' if n > 1 else ''} of {image_tokens} tokens" if n else ""
    return f"{ex.source} needs {ex.length} tokens{images}"


def _why_no_examples(s: DataStats, max_seq_len: int) -> str:
    if s.lines == 0:
        return "no examples (the file is empty or has only blank lines)"
    why = []
    if s.skipped_bad:
        why.append(f"{len(s.skipped_bad)} bad (skipped by `skip_bad`; first: {s.skipped_bad[0]})")
    if s.skipped_long:
        why.append(f"{len(s.skipped_long)} longer than `max_seq_len` {max_seq_len} (first: {s.skipped_long[0]})")
    if s.skipped_empty:
        why.append(f"{len(s.skipped_empty)} with nothing to learn: no assistant answer or text "
                   f"(first: {s.skipped_empty[0]})")
    return f"no usable example in its {s.lines} line(s): " + "; ".join(why)


def report_stats(name: str, s: DataStats, max_seq_len: int, long_policy: str) -> None:
    def first(items):
        return f" (first: {items[0]})" if items else ""

    if s.skipped_bad:
        warn(f"{name}: skipped {len(s.skipped_bad)} bad line(s) (`skip_bad`){first(s.skipped_bad)}")
    if s.truncated:
        warn(
            f"{name}: truncated {len(s.truncated)} example(s) longer than `max_seq_len` "
            f"{max_seq_len} (never inside an image){first(s.truncated)}"
        )
    if s.skipped_long:
        warn(
            f"{name}: skipped {len(s.skipped_long)} example(s) longer than `max_seq_len` "
            f"{max_seq_len}{first(s.skipped_long)}"
        )
    if s.skipped_empty:
        warn(f"{name}: skipped {len(s.skipped_empty)} example(s) with no loss token{first(s.skipped_empty)}")
