"""Generation API (the command line is ``python -m mlx_dsvl.generate``, in generate.py).

On the engine (:mod:`mlx_dsvl.streaming`: prefill, batched decode step) and mlx-lm's samplers,
logits processors and KV caches:

- ``stream_generate(model, processor, conversation, images=None, **sampling)`` yields
  :class:`~mlx_dsvl.streaming.GenerationChunk` (text piece, token counts, speeds, peak memory);
- ``generate(...) -> str``;
- ``generate_batch(model, processor, conversations, images=None, **sampling) -> list[str]``:
  several conversations decoded together, the same greedy outputs as one by one;
- ``warm_up(model, processor)``: on a GPU, a throw-away chat that compiles the kernels.

Sampling options: the fields of :class:`~mlx_dsvl.sampling.SamplingOptions` as keywords
(``max_tokens``, ``temperature`` (0 = greedy), ``top_p``, ``repetition_penalty``, ``seed``), or a
whole one as ``sampling=``.  KV-cache quantization (one-by-one generation): ``kv_bits`` (None, 4 or 8), ``kv_group_size`` (64),
``quantized_kv_start`` (0).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from PIL import Image

from .processing.chat import ChatProcessor, place_images  # noqa: F401 -- place_images: public here too
from .sampling import GREEDY, PROCESSOR_CONTEXT, SamplingOptions
from .session import ChatSession
from .streaming import Batch, GenerationChunk, Row, prefill
from .warmup import kernels_compile

if TYPE_CHECKING:
    from .models.deepseek_vl import DeepseekVL


def stream_generate(model: DeepseekVL, processor: ChatProcessor, conversation: Sequence[dict], images: Sequence | None = None,
                    max_context: int = 4096, kv_bits: int | None = None, kv_group_size: int = 64,
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


def generate(model: DeepseekVL, processor: ChatProcessor, conversation: Sequence[dict], images: Sequence | None = None,
             **sampling) -> str:
    """The assistant's reply to ``conversation`` as one string."""
    return "".join(c.text for c in stream_generate(model, processor, conversation, images, **sampling))


def generate_batch(model: DeepseekVL, processor: ChatProcessor, conversations: Sequence[Sequence[dict]],
                   images: Sequence[Sequence] | None = None, sampling: SamplingOptions | None = None,
                   **options) -> list[str]:
    """Replies to several conversations at once: each prompt is prefilled alone, then all are
    decoded together (one :class:`~mlx_dsvl.streaming.Batch`), each as if alone.

    ``sampling`` (default :data:`~mlx_dsvl.sampling.GREEDY`, so that it returns what one-by-one
    greedy generation returns) with ``options`` (``max_tokens=...``) changed.
    """
    opts = (sampling or GREEDY).with_(**options)
    images = list(images) if images is not None else [None] * len(conversations)
    lm = model.language_model
    batch = Batch(lm, processor.tokenizer.eos_token_id)
    replies = [""] * len(conversations)
    for i, (conv, imgs) in enumerate(zip(conversations, images)):
        inputs = processor(conv, imgs)
        ids = inputs["input_ids"]  # [1, T]
        embeds = model.get_input_embeddings(ids, inputs["pixel_values"])[0]
        cache = model.make_cache()
        logits = prefill(lm, ids[0], lambda s, e, x=embeds: x[s:e], cache)
        batch.add(Row.start(processor, opts, ids[0, -PROCESSOR_CONTEXT:].tolist(), tag=i), cache, logits)
    while batch.rows:
        for out in batch.step():
            replies[out.row.tag] += out.text + out.tail
    return replies


def warm_up(model: DeepseekVL, processor: ChatProcessor, say: Callable[[str], None] | None = None) -> float:
    """On a GPU, run a short throw-away chat so that a conversation's kernels are compiled:
    the vision towers, an image prompt's prefill, follow-up prefills of 4 lengths (4-bit
    matmuls compile one kernel per range of token counts), sampling and decoding.

    Returns the seconds it took (0.0 on the CPU backend, where nothing is compiled).  ``say``
    gets :data:`~mlx_dsvl.warmup.MESSAGE` if the first forward is slow.
    """
    if not kernels_compile():
        return 0.0
    tic = time.perf_counter()
    chat = ChatSession(model, processor, on_truncate=None, on_slow_start=say)
    tag = processor.image_tag
    turns = [(tag + "Describe the image.", [Image.new("RGB", (64, 48), (128, 128, 128))])]
    turns += [(" ".join(["word"] * n), []) for n in (8, 24, 48, 100)]
    for text, images in turns:
        for _ in chat.send(text, images, max_tokens=3):
            pass
    return time.perf_counter() - tic
