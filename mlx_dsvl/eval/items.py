"""Evaluation items, their prompts and MMBench's circular rotations.

Prompts follow the MMBench convention (VLMEvalKit's and LLaVA's for chat models of this size),
images first: ``Hint:``, ``Question:``, ``Options:`` with lettered choices, then "Answer with the
option's letter from the given choices directly." (short answers: "Answer the question using a
single word or phrase.").
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

LETTERS = string.ascii_uppercase
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
SHORT_INSTRUCTION = "Answer the question using a single word or phrase."
IMAGE_TAG = "<image_placeholder>"


class EvalDataError(ValueError):
    """A problem with an evaluation file; the message names the file and line."""


@dataclass
class Item:
    """One question. ``images``: callables returning each image (lazy: a TSV's base64 stays
    encoded until used); items sharing an ``image_keys`` key share its encoding in a batch."""

    id: str
    question: str
    choices: list[str] | None = None  # multiple choice: option texts in letter order
    answer: int | None = None  # multiple choice: index of the right option
    answers: list[str] | None = None  # short answer: every accepted answer
    hint: str | None = None
    category: str | None = None
    l2_category: str | None = None
    images: list[Callable[[], Any]] = field(default_factory=list)
    image_keys: list[str] = field(default_factory=list)
    source: str = ""  # "file:line", for error messages
    group: str | None = None  # the question this item is a rotation of
    rotation: int = 0  # 0: the original

    @property
    def is_mc(self) -> bool:
        return self.choices is not None

    @property
    def letters(self) -> str:
        return LETTERS[: len(self.choices or ())]

    @property
    def answer_letter(self) -> str | None:
        return LETTERS[self.answer] if self.is_mc and self.answer is not None else None


def prompt_text(item: Item, image_tag: str = IMAGE_TAG) -> str:
    """The user message of ``item`` (images first unless the question places them itself)."""
    lines = []
    if item.hint:
        lines.append(f"Hint: {item.hint}")
    if item.is_mc:
        lines.append(f"Question: {item.question}")
        lines.append("Options:")
        lines += [f"{letter}. {text}" for letter, text in zip(item.letters, item.choices)]
        lines.append(MC_INSTRUCTION)
    else:
        lines.append(item.question)
        lines.append(SHORT_INSTRUCTION)
    text = "\n".join(lines)
    if item.images and image_tag not in text:
        text = image_tag * len(item.images) + text
    return text


def conversation(item: Item, system_prompt: str | None = None,
                 image_tag: str = IMAGE_TAG) -> list[dict]:
    """The conversation to send: an optional system message, then the user's question."""
    conv = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    return conv + [{"role": "user", "content": prompt_text(item, image_tag)}]


def rotate(item: Item, k: int) -> Item:
    """Rotation ``k`` of a multiple-choice item: option ``i`` becomes option ``(i + k) % n``."""
    n = len(item.choices)
    choices = item.choices[k:] + item.choices[:k]
    return replace(item, id=item.id if k == 0 else f"{item.id}@{k}", choices=choices,
                   answer=(item.answer - k) % n, group=item.group or item.id, rotation=k)


def circular(items: Sequence[Item]) -> list[Item]:
    """Every rotation of each multiple-choice item (items shipping theirs are kept as they are)."""
    have_groups = {it.group for it in items if it.rotation > 0}
    out: list[Item] = []
    for it in items:
        if not it.is_mc or (it.group or it.id) in have_groups:
            out.append(replace(it, group=it.group or it.id))
        else:
            out += [rotate(it, k) for k in range(len(it.choices))]
    # Rotations side by side (the published files list them far apart): one batch then shares
    # the image of a question.
    order = {g: i for i, g in reversed(list(enumerate(it.group for it in out)))}
    return sorted(out, key=lambda it: (order[it.group], it.rotation))


def select(items: Sequence[Item], use_circular: bool) -> tuple[list[Item], int]:
    """Items to score and how many shipped rotations were left out (with ``use_circular``: those
    whose original row was skipped)."""
    originals = [it for it in items if it.rotation == 0]
    if not use_circular:
        return originals, len(items) - len(originals)
    have = {it.group or it.id for it in originals}
    kept = [it for it in items if it.rotation == 0 or it.group in have]
    return circular(kept), len(items) - len(kept)


def first_groups(items: Sequence[Item], limit: int | None) -> list[Item]:
    """The items of the first ``limit`` questions (all rotations of each); ``None``: all."""
    if limit is None:
        return list(items)
    seen: dict = {}
    out = []
    for it in items:
        g = it.group or it.id
        if g not in seen:
            if len(seen) >= limit:
                continue
            seen[g] = True
        out.append(it)
    return out
