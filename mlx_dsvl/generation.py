"""Generation API (the command line is ``python -m mlx_dsvl.generate``, in generate.py).

Built on mlx-lm's ``generate_step``, samplers, logits processors and KV cache):

- ``stream_generate(model, processor, conversation, images=None, **sampling)`` yields
  :class:`~mlx_dsvl.streaming.GenerationChunk` (text piece, token counts, speeds, peak memory);
- ``generate(...) -> str``;
- ``generate_batch(model, processor, conversations, images=None, **sampling) -> list[str]``:
  several conversations at once (left padding + mask), the same greedy outputs as one by one.

Sampling options: the fields of :class:`~mlx_dsvl.sampling.SamplingOptions` as keywords
(``max_tokens``, ``temperature`` (0 = greedy), ``top_p``, ``repetition_penalty``, ``seed``), or a
whole one as ``sampling=``.  KV-cache quantization (one-by-one generation): ``kv_bits`` (None, 4 or 8), ``kv_group_size`` (64),
``quantized_kv_start`` (0).
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Sequence

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache

from .processing.chat import place_images  # noqa: F401 -- public here too
from .sampling import GREEDY, SamplingOptions
from .session import ChatSession
from .streaming import STOP_STRINGS, GenerationChunk, StopStringFilter, last_logits, make_detokenizer

def stream_generate(model, processor, conversation: Sequence[dict], images: Optional[Sequence] = None,
                    max_context: int = 4096, kv_bits: Optional[int] = None, kv_group_size: int = 64,
                    quantized_kv_start: int = 0, **sampling) -> Iterator[GenerationChunk]:
    """Stream the assistant's reply to ``conversation`` (its last message is the user's).

    ``kv_bits`` (4 or 8): keep the KV cache quantized in groups of ``kv_group_size`` from
    ``quantized_kv_start`` cached tokens on (mlx-lm's quantized KV cache).
    """
    session = ChatSession(model, processor, max_context=max_context, on_truncate=None, kv_bits=kv_bits,
                          kv_group_size=kv_group_size, quantized_kv_start=quantized_kv_start)
    conv = list(conversation)
    if conv and conv[0]["role"].lower() == "system":
        session.system_prompt = conv.pop(0)["content"]
    if not conv or conv[-1]["role"].lower() != "user":
        raise ValueError("the conversation must end with a user message")
    images = list(images or [])
    tag = processor.image_tag
    counts = [m["content"].count(tag) for m in conv]
    if sum(counts) != len(images):
        raise ValueError(
            f"the prompt has {sum(counts)} image placeholder(s) {tag!r} but {len(images)} image(s) were given"
        )
    start = 0
    for m, n in zip(conv[:-1], counts[:-1]):  # history: features cached, nothing generated
        keys = session.add_images(images[start:start + n])
        session.messages.append({"role": m["role"].lower(), "content": m["content"], "images": keys})
        start += n
    yield from session.send(conv[-1]["content"], images[start:], **sampling)


def generate(model, processor, conversation: Sequence[dict], images: Optional[Sequence] = None,
             **sampling) -> str:
    """The assistant's reply to ``conversation`` as one string."""
    return "".join(c.text for c in stream_generate(model, processor, conversation, images, **sampling))


def generate_batch(model, processor, conversations: Sequence[Sequence[dict]],
                   images: Optional[Sequence[Sequence]] = None, sampling: Optional[SamplingOptions] = None,
                   **options) -> List[str]:
    """Replies to several conversations at once (left-padded batch, one KV cache per layer).

    ``sampling`` (default :data:`~mlx_dsvl.sampling.GREEDY`, so that it returns what one-by-one
    greedy generation returns) with ``options`` (``max_tokens=...``) changed.
    """
    opts = (sampling or GREEDY).with_(**options)
    if opts.seed is not None:
        mx.random.seed(opts.seed)
    images = list(images) if images is not None else [None] * len(conversations)
    batch = processor.batch(list(zip(conversations, images)))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    B = ids.shape[0]
    pad = (ids.shape[1] - mask.sum(axis=1)).tolist()
    cache = [BatchKVCache(pad) for _ in model.language_model.layers]
    embeds = model.get_input_embeddings(ids, batch["pixel_values"])
    sampler, processors = opts.make_sampler(), opts.make_logits_processors()
    eos = processor.tokenizer.eos_token_id
    logits = last_logits(model.language_model, ids, cache, embeds)
    history = ids
    out: List[List[int]] = [[] for _ in range(B)]
    done = [False] * B
    for _ in range(opts.max_tokens):
        for p in processors:
            logits = mx.stack([p(history[b], logits[b:b + 1])[0] for b in range(B)])
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        tokens = sampler(logprobs)  # [B]
        mx.eval(tokens)
        for b, t in enumerate(tokens.tolist()):
            if not done[b]:
                if t == eos:
                    done[b] = True
                else:
                    out[b].append(t)
                    done[b] = _hit_stop(processor, out[b])
        if all(done):
            break
        history = mx.concatenate([history, tokens[:, None]], axis=1)
        logits = model.language_model(tokens[:, None], cache=cache)[:, -1, :]
    return [_finish_text(processor, o) for o in out]


def _hit_stop(processor, tokens: List[int]) -> bool:
    """Whether the reply's recent text contains a stop string (checked on a short tail)."""
    tail = processor.tokenizer.decode(tokens[-8:])
    return any(s in tail for s in STOP_STRINGS)


def _finish_text(processor, tokens: List[int]) -> str:
    detok = make_detokenizer(processor)
    for t in tokens:
        detok.add_token(t)
    detok.finalize()
    f = StopStringFilter()
    return f.push(detok.text) + f.flush()
