"""Multiple choice by likelihood, as lm-evaluation-harness scores it: the option whose reply
(``" " + letter`` or ``" " + text``, tokenized with the prompt and split after it, the harness's
``_encode_pair``) has the highest summed log-probability.

A batch costs two passes: the prompts (one KV cache), then every option at once on copies of its
item's cache rows, so prompt and image are never recomputed per option; single-token options need
no second pass (the prompt's last logits hold every score).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

from ..models.deepseek_vl import lm_head
from .items import Item, conversation

if TYPE_CHECKING:
    from ..models.deepseek_vl import DeepseekVL
    from ..processing.chat import ChatProcessor

TARGETS = ("letter", "text")


@dataclass
class Encoded:
    """One item's prompt ids and the token ids of each option's reply."""

    prompt: str
    ids: np.ndarray  # [T] int32
    options: list[np.ndarray]  # per option: [L_j] int32
    option_bytes: list[int]


def encode(processor: ChatProcessor, item: Item, target: str = "letter",
           system_prompt: str | None = None) -> Encoded:
    """Tokenize the prompt and each option's reply (``" A"`` or ``" red"``)."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    prompt = processor.format(conversation(item, system_prompt, processor.image_tag))
    ids = processor.tokenize(prompt)
    replies = item.letters if target == "letter" else item.choices
    options = []
    for reply in replies:
        cont = " " + reply
        full = processor.tokenize(prompt + cont)
        if len(full) > len(ids) and np.array_equal(full[: len(ids)], ids):
            options.append(full[len(ids):])
        else:  # the reply merged with the prompt's last token: tokenize it on its own
            options.append(np.asarray(processor.tokenizer.encode(cont, add_special_tokens=False),
                                      dtype=np.int32))
    return Encoded(prompt, ids, options, [len(r.encode("utf-8")) for r in replies])


def image_embeddings(model: DeepseekVL, processor: ChatProcessor, items: Sequence[Item],
                     pictures: dict[str, object]):
    """``[B, Nmax, I, D]`` aligned embeddings (each distinct image key encoded once), or None."""
    keys = list(dict.fromkeys(k for it in items for k in it.image_keys))
    if not keys:
        return None
    pixels = mx.array(processor.image_processor([pictures[k] for k in keys]))  # [U, 3, S, S]
    emb = model.encode_images(pixels)  # [U, I, D]
    where = {k: i for i, k in enumerate(keys)}
    n_max = max(len(it.image_keys) for it in items)
    zero = mx.zeros(emb.shape[1:], emb.dtype)
    rows = [mx.stack([emb[where[k]] for k in it.image_keys] + [zero] * (n_max - len(it.image_keys)))
            for it in items]
    return mx.stack(rows)


def left_pad(seqs: Sequence[np.ndarray], pad_id: int):
    """Left-padded ``[B, T]`` ids and each row's padding."""
    T = max(len(s) for s in seqs)
    out = np.full((len(seqs), T), pad_id, dtype=np.int32)
    for b, s in enumerate(seqs):
        out[b, T - len(s):] = s
    return mx.array(out), [T - len(s) for s in seqs]


def log_softmax(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def option_logprobs(model: DeepseekVL, processor: ChatProcessor, encoded: Sequence[Encoded],
                    image_embeds) -> list[list[float]]:
    """Sum of log-probabilities of each option's tokens after its item's prompt."""
    lm = model.language_model
    ids, pad = left_pad([e.ids for e in encoded], processor.pad_id)
    cache = model.make_cache(pad)
    embeds = model.get_input_embeddings(ids, image_embeds=image_embeds)
    first = log_softmax(lm_head(lm, lm.model(ids, cache=cache, input_embeddings=embeds)[:, -1, :]))

    rows = [(b, j) for b, e in enumerate(encoded) for j in range(len(e.options))]
    conts = [encoded[b].options[j] for b, j in rows]
    row_item = mx.array([b for b, _ in rows])
    scores = first[row_item, mx.array([int(c[0]) for c in conts])]  # [R] first tokens
    L = max(len(c) for c in conts)
    if L > 1:
        for c in cache:  # one cache row per option: its item's prompt, computed once
            c.filter(row_item)
        tokens = np.full((len(conts), L), processor.pad_id, dtype=np.int32)  # right-padded
        for r, c in enumerate(conts):
            tokens[r, : len(c)] = c
        h = lm.model(mx.array(tokens), cache=cache)[:, :-1, :]  # predicts tokens 1..L-1
        rest = log_softmax(lm_head(lm, h))  # [R, L-1, V]
        picked = mx.take_along_axis(rest, mx.array(tokens[:, 1:, None]), axis=-1)[..., 0]
        mask = np.zeros((len(conts), L - 1), dtype=np.float32)
        for r, c in enumerate(conts):
            mask[r, : len(c) - 1] = 1.0
        scores = scores + (picked * mx.array(mask)).sum(axis=1)
    flat = np.array(scores).tolist()
    out, k = [], 0
    for e in encoded:
        out.append(flat[k: k + len(e.options)])
        k += len(e.options)
    return out


def score(model: DeepseekVL, processor: ChatProcessor, items: Sequence[Item], pictures: dict[str, object],
          target: str = "letter", system_prompt: str | None = None) -> list[dict]:
    """One record per item: option scores, the chosen letter, whether it is right."""
    encoded = [encode(processor, it, target, system_prompt) for it in items]
    all_scores = option_logprobs(model, processor, encoded,
                                 image_embeddings(model, processor, items, pictures))
    records = []
    for it, e, s in zip(items, encoded, all_scores):
        pick = int(np.argmax(s))
        rec = {"prediction": it.letters[pick], "choice": it.letters[pick],
               "correct": pick == it.answer, "scores": [round(x, 6) for x in s],
               "option_tokens": [len(o) for o in e.options]}
        if target == "text":
            norm = int(np.argmax([x / max(1, n) for x, n in zip(s, e.option_bytes)]))
            rec["choice_norm"] = it.letters[norm]
            rec["correct_norm"] = norm == it.answer
        records.append(rec)
    return records
