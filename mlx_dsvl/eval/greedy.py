"""Answers by greedy generation, then read out of the reply (:mod:`.answers`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..generation import generate_batch
from ..sampling import GREEDY
from .answers import extract_choice, short_answer_scores
from .items import Item, conversation

if TYPE_CHECKING:
    from ..models.deepseek_vl import DeepseekVL
    from ..processing.chat import ChatProcessor

DEFAULT_MAX_TOKENS = 32


def score(model: DeepseekVL, processor: ChatProcessor, items: Sequence[Item], pictures: dict[str, object],
          system_prompt: str | None = None, max_tokens: int = DEFAULT_MAX_TOKENS) -> list[dict]:
    """One record per item: the reply, the option it names (or the short-answer scores)."""
    convs = [conversation(it, system_prompt, processor.image_tag) for it in items]
    images = [[pictures[k] for k in it.image_keys] for it in items]
    replies = generate_batch(model, processor, convs, images, GREEDY, max_tokens=max_tokens)
    records = []
    for it, reply in zip(items, replies):
        reply = reply.strip()
        if it.is_mc:
            pick = extract_choice(reply, it.choices)
            records.append({"prediction": reply, "choice": None if pick is None else it.letters[pick],
                            "matched": pick is not None, "correct": pick == it.answer})
        else:
            s = short_answer_scores(reply, it.answers)
            records.append({"prediction": reply, "correct": s["exact_match"], **s})
    return records
