"""Generation API (the command line is ``python -m mlx_dsvl.generate``): ``stream_generate``,
``generate``, ``generate_batch``, ``warm_up``; sampling options are
:class:`~mlx_dsvl.sampling.SamplingOptions`' fields as keywords, or a whole one as ``sampling=``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from PIL import Image

from .drafting import NUM_DRAFT_TOKENS
from .grammar import compile_format
from .processing.chat import ChatProcessor, place_images  # noqa: F401 -- place_images: public here too
from .sampling import GREEDY, PROCESSOR_CONTEXT, SamplingOptions
from .session import ChatSession
from .streaming import Batch, GenerationChunk, Row, prefill
from .warmup import kernels_compile

if TYPE_CHECKING:
    from .models.deepseek_vl import DeepseekVL


def stream_generate(model: DeepseekVL, processor: ChatProcessor, conversation: Sequence[dict], images: Sequence | None = None,
                    max_context: int = 4096, kv_bits: int | None = None, kv_group_size: int = 64,
                    quantized_kv_start: int = 0, draft: str | None = None, num_draft_tokens: int = NUM_DRAFT_TOKENS,
                    draft_model: tuple[DeepseekVL, ChatProcessor] | None = None, **sampling) -> Iterator[GenerationChunk]:
    """Stream the assistant's reply to ``conversation`` (its last message is the user's);
    ``response_format=`` (OpenAI's) constrains it, see :meth:`ChatSession.send`; ``draft``,
    ``draft_model``: speculative decoding of a greedy reply (see :class:`ChatSession`)."""
    session = ChatSession(model, processor, max_context=max_context, on_truncate=None, kv_bits=kv_bits,
                          kv_group_size=kv_group_size, quantized_kv_start=quantized_kv_start, draft=draft,
                          num_draft_tokens=num_draft_tokens, draft_model=draft_model)
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
                   response_format: Mapping | None = None, **options) -> list[str]:
    """Replies to several conversations, decoded together, each as if alone: with the default
    :data:`~mlx_dsvl.sampling.GREEDY`, what one-by-one generation returns; ``response_format``
    (OpenAI's) applies to each."""
    opts = (sampling or GREEDY).with_(**options)
    grammar = compile_format(processor, response_format)
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
        batch.add(Row.start(processor, opts, ids[0, -PROCESSOR_CONTEXT:].tolist(), tag=i, grammar=grammar),
                  cache, logits)
    while batch.rows:
        for out in batch.step():
            replies[out.row.tag] += out.text + out.tail
    return replies


def warm_up(model: DeepseekVL, processor: ChatProcessor, say: Callable[[str], None] | None = None) -> float:
    """On a GPU, a throw-away chat that compiles a conversation's kernels (follow-up prefills of
    several lengths: 4-bit matmuls compile one kernel per range of token counts); returns seconds."""
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
