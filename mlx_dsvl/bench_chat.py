"""The conversation rows of ``python -m mlx_dsvl.bench``: turns 1-6, what a follow-up turn
spends its time on, first-use costs, and KV-cache quantization over a long conversation.

First use: with ``replay`` the conversation runs again in a new session, where every shape is
known to the process, so a turn's time minus its replay's is its first-use work (kernels, graphs).
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import TYPE_CHECKING

import mlx.core as mx
from mlx.utils import tree_flatten

from .caches import ImageFeatureCache
from .session import ChatSession

if TYPE_CHECKING:
    from .models.deepseek_vl import DeepseekVL
    from .processing.chat import ChatProcessor

FIRST = "<image_placeholder>Describe this image in detail."
QUESTIONS = (  # turns 2..6: 13 to 53 tokens each with the template (the test tokenizer's counts)
    "And which colour dominates?",
    "Is there any text in the picture? If there is, read it out exactly as it is written there.",
    "What else?",
    "Is it a photograph or a painting, and how can you tell?",
    "Why do you think so? Give two reasons.",
)
BREAKDOWN = "Which part would you crop first?"
FILLER = ("the picture shows a quiet street with small houses, a red door, two bicycles and a tree "
          "whose leaves are turning yellow while a cat sleeps on the warm stones near the wall ")


def run_turn(chat, text: str, images: Sequence, opts: dict):
    *_, last = chat.send(text, list(images), **opts)
    return last


def turn_rows(model: DeepseekVL, processor: ChatProcessor, image, opts: dict, *, kv: dict | None = None,
              replay: bool = False, n_turns: int = 1 + len(QUESTIONS),
              draft_model: tuple[DeepseekVL, ChatProcessor] | None = None) -> dict:
    """Turns 1-6, the follow-up breakdown and (``replay``) each turn's first-use time;
    ``draft_model``: decoded with it drafting (turn 1's drafted and accepted tokens)."""
    def conversation():
        chat = ChatSession(model, processor, on_truncate=None, draft_model=draft_model, **(kv or {}))
        turns = [run_turn(chat, FIRST, [image], opts)]
        turns += [run_turn(chat, q, [], opts) for q in QUESTIONS[: n_turns - 1]]
        return chat, turns

    chat, turns = conversation()
    first = turns[0]
    res: dict = dict(prompt_tokens=first.prompt_tokens, prefill_tps=first.prompt_tps,
                     ttft_s=first.time_to_first_token, decode_tps=first.generation_tps,
                     decode_tokens=first.generation_tokens, drafted=first.drafted_tokens,
                     accepted=first.accepted_tokens,
                     kv_cache_gb=sum(c.nbytes for c in chat.cache) / 1e9, context_tokens=chat.cache[0].offset)
    if n_turns < 2:
        return res
    res["turns"] = [dict(turn=i + 2, new_tokens=t.prompt_tokens, ttft_s=t.time_to_first_token,
                         over_turn1=t.time_to_first_token / first.time_to_first_token)
                    for i, t in enumerate(turns[1:])]
    res.update(turn2_prompt_tokens=turns[1].prompt_tokens, turn2_ttft_s=turns[1].time_to_first_token,
               turn2_over_turn1=res["turns"][0]["over_turn1"],
               followup_max_over_turn1=max(t["over_turn1"] for t in res["turns"]))
    chat.profile = True
    last = run_turn(chat, BREAKDOWN, [], opts)
    res["followup_breakdown_ms"] = {**{k: round(v, 3) for k, v in chat.timings.items()},
                                    "ttft_ms": round(last.time_to_first_token * 1e3, 3)}
    res["kv_cache_gb"] = sum(c.nbytes for c in chat.cache) / 1e9
    if replay:
        del chat
        _, again = conversation()
        res["first_use_ms"] = [round((a.time_to_first_token - b.time_to_first_token) * 1e3, 3)
                               for a, b in zip(turns, again)]
    return res


def long_conversation(processor: ChatProcessor, image_key: str, context: int) -> list[dict]:
    """ChatSession messages: an image question, then filler exchanges up to ``context`` - 64 tokens."""
    messages = [{"role": "user", "content": FIRST, "images": [image_key]}]
    words = FILLER.split()
    i = 0
    while True:
        reply = " ".join(words[(i + k) % len(words)] for k in range(40))
        trial = messages + [{"role": "assistant", "content": reply, "images": []},
                            {"role": "user", "content": f"Go on ({i}).", "images": []}]
        n = len(processor.tokenize(processor.format([{"role": m["role"], "content": m["content"]} for m in trial])))
        if n > context - 64:
            return messages
        messages, i = trial, i + 1


def kv_rows(model: DeepseekVL, processor: ChatProcessor, image, context: int, bits: Sequence[int] = (8, 4),
            group_size: int = 64) -> dict:
    """Peak memory, cache size and first-token logit difference, plain against quantized KV caches."""
    res: dict = {"kv_context_tokens": None}
    features = ImageFeatureCache()  # one vision pass for all the runs
    reference = None
    for b in (None, *bits):
        gc.collect()
        mx.clear_cache()
        mx.reset_peak_memory()
        chat = ChatSession(model, processor, on_truncate=None, max_context=max(4096, context + 64),
                           kv_bits=b, kv_group_size=group_size, image_cache=features)
        key = chat.add_images([image])[0]
        chat.messages = long_conversation(processor, key, context)
        logits = chat.next_logits("Summarize our conversation in one sentence.").astype(mx.float32)
        name = f"kv{b or 16}"
        res["kv_context_tokens"] = chat.cache[0].offset
        res[f"{name}_peak_gb"] = mx.get_peak_memory() / 1e9
        res[f"{name}_cache_gb"] = sum(c.nbytes for c in chat.cache) / 1e9
        if reference is None:
            reference = logits
        else:
            res[f"{name}_max_logit_diff"] = float(mx.abs(logits - reference).max())
            res[f"{name}_same_top1"] = bool(mx.argmax(logits).item() == mx.argmax(reference).item())
        del chat
    res["kv_logit_scale"] = float(mx.abs(reference).max())  # what the differences compare with
    return res


def context_rows(model: DeepseekVL, processor: ChatProcessor, image, context: int, opts: dict, *,
                 kv: dict | None = None) -> dict:
    """One conversation of about ``context`` tokens (an image, then filler exchanges) with the
    loaded options and ``kv``: its peak memory, cache, first-token time and decode rate."""
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    chat = ChatSession(model, processor, on_truncate=None, max_context=max(4096, context + 64), **(kv or {}))
    key = chat.add_images([image])[0]
    chat.messages = long_conversation(processor, key, context)
    last = run_turn(chat, "Summarize our conversation in one sentence.", [], opts)
    return dict(long_tokens=chat.cache[0].offset, long_peak_gb=mx.get_peak_memory() / 1e9,
                long_kv_cache_gb=sum(c.nbytes for c in chat.cache) / 1e9,
                long_ttft_s=last.time_to_first_token, long_decode_tps=last.generation_tps,
                long_decode_tokens=last.generation_tokens)


def weights_by_part(model: DeepseekVL) -> dict:
    """GB of resident parameters: vision towers + aligner, LLM without / with its embeddings."""
    parts = {"vision": 0, "llm": 0, "llm_embeddings": 0}
    for k, v in tree_flatten(model.parameters()):
        part = ("llm_embeddings" if "embed_tokens" in k else "llm") if k.startswith("language_model.") else "vision"
        parts[part] += v.nbytes
    return {f"weights_{k}_gb": v / 1e9 for k, v in parts.items()}
