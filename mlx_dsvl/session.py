"""``ChatSession``: a conversation that never redoes work.

A new turn formats the whole conversation, keeps the longest prefix the KV cache holds (same
tokens, same images: the server's rule) and prefills only the rest; only images seen in neither
the conversation nor the byte-bounded feature cache go through the vision towers. Because the
prompt is always the from-scratch prompt, the tokens are exactly those of a fresh encoding on the
CPU backend (on a GPU a follow-up is prefilled in other pieces, so bf16 rounding may differ: see
:mod:`mlx_dsvl.models.llm`). Past ``max_context`` the oldest turns are dropped, like the reference
demo's "max history tokens".
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

from .caches import IMAGE_CACHE_BYTES, ImageFeatureCache, image_key, reusable_prefix, trim_cache
from .drafting import NUM_DRAFT_TOKENS, BackOff, ModelDrafter, check_drafting, make_drafter
from .grammar import Grammar, compile_format
from .processing.chat import PromptTokens
from .sampling import DEFAULTS, PROCESSOR_CONTEXT, SamplingOptions
from .streaming import GenerationChunk, Row, kv_cache_options, prefill, range_embeddings, stream_tokens
from .warmup import FirstUseNotice

if TYPE_CHECKING:
    from .models.deepseek_vl import DeepseekVL
    from .processing.chat import ChatProcessor


class PromptTooLongError(ValueError):
    """The newest turn alone does not fit in the context."""


def _warn(message: str) -> None:
    print(f"[mlx-dsvl] {message}", file=sys.stderr)


class ChatSession:
    """A multi-turn chat over one model with KV-cache and image-feature reuse.

    >>> chat = ChatSession(model, processor)
    >>> for chunk in chat.send("<image_placeholder>What is this?", images=["cat.png"]):
    ...     print(chunk.text, end="")

    ``draft="ngram"``: replies are decoded speculatively, prompt lookup proposing up to
    ``num_draft_tokens`` tokens at a time (:mod:`mlx_dsvl.drafting`); a greedy reply keeps its
    tokens, a sampled one its distribution.
    ``draft_model=(model, processor)``: a smaller model of the same vocabulary drafts instead
    (``draft="model"``, implied), its own cache following the conversation across turns.
    """

    def __init__(self, model: DeepseekVL, processor: ChatProcessor, system_prompt: str | None = None,
                 max_context: int = 4096, on_truncate: Callable[[str], None] | None = _warn,
                 kv_bits: int | None = None, kv_group_size: int = 64, quantized_kv_start: int = 0,
                 on_slow_start: Callable[[str], None] | None = _warn, profile: bool = False,
                 image_cache_bytes: int = IMAGE_CACHE_BYTES,
                 image_cache: ImageFeatureCache | None = None, draft: str | None = None,
                 num_draft_tokens: int = NUM_DRAFT_TOKENS,
                 draft_model: tuple[DeepseekVL, ChatProcessor] | None = None):
        self.model = model
        self.processor = processor
        self.system_prompt = system_prompt
        self.max_context = int(max_context)
        self.on_truncate = on_truncate
        self.on_slow_start = on_slow_start  # told if the process's first GPU forward is slow
        # profile: each turn's stages are evaluated apart and timed into ``timings``
        self.profile = profile
        self.timings: dict[str, float] = {}
        self.encode_calls = 0  # images run through the vision tower (tests count these)
        # features of images seen before, at most ``image_cache_bytes`` (or ``image_cache``:
        # one shared with other sessions, with its own bound)
        self.image_features = ImageFeatureCache(image_cache_bytes) if image_cache is None else image_cache
        self._features: dict[str, mx.array] = {}  # the conversation's images: hash -> [I, D]
        self._tokens = PromptTokens(processor)
        self.kv: dict | None = None
        check_drafting((model, processor), draft, draft_model, num_draft_tokens)
        self.draft_model = None if draft_model is None else ModelDrafter(*draft_model, num_draft_tokens=num_draft_tokens)
        self.num_draft_tokens = num_draft_tokens
        self.set_draft("model" if draft is None and draft_model is not None else draft)
        self.reset()
        self.set_kv_cache(kv_bits, kv_group_size, quantized_kv_start)

    # -- state --------------------------------------------------------------------------------
    def set_draft(self, draft: str | None) -> None:
        """Speculative decoding: "ngram" (prompt lookup), "model" (the ``draft_model``) or None;
        the draft model's cache is kept while it is off."""
        if draft == "model" and self.draft_model is None:
            raise ValueError('draft="model" needs a draft_model')
        if draft != "model" and draft is not None:
            make_drafter(draft, [], self.num_draft_tokens)  # checked now
        self.draft = draft

    def reset(self) -> None:
        """Start a new conversation (image features stay cached: same image, same features)."""
        self.messages: list[dict] = []  # {"role", "content", "images": [hash, ...]}
        self._features = {}
        self.cache = self.model.make_cache()
        self.cached_ids: list[int] = []
        self.cached_images: list[str] = []  # keys of the images whose tokens the cache holds

    def set_kv_cache(self, kv_bits: int | None = None, kv_group_size: int = 64,
                     quantized_kv_start: int = 0) -> None:
        """KV-cache quantization; a change empties the cache (the next turn prefills again)."""
        kv = kv_cache_options(kv_bits, kv_group_size, quantized_kv_start,
                              head_dim=self.model.language_model.layers[0].self_attn.head_dim)
        if kv != self.kv:
            self.kv = kv
            self.cache, self.cached_ids, self.cached_images = self.model.make_cache(), [], []

    @property
    def conversation(self) -> list[dict]:
        conv = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        return conv + [{"role": m["role"], "content": m["content"]} for m in self.messages]

    def _trim_cache(self, keep: int) -> None:
        trim_cache(self.cache, keep)
        self.cached_ids = self.cached_ids[:keep]

    # -- images -------------------------------------------------------------------------------
    def add_images(self, images: Sequence) -> list[str]:
        """Hold the images' features for the conversation; returns their content keys."""
        if not images:
            return []
        pixels = self.processor.image_processor(list(images))  # [N, 3, S, S] float32
        keys = [image_key(px) for px in pixels]
        by_key = dict(zip(keys, pixels))
        new = [k for k in by_key if k not in self._features]
        found = self.image_features.fetch(new, lambda todo: self.model.encode_images(
            mx.array(np.stack([by_key[k] for k in todo]))))
        self.encode_calls += found.encoded
        in_use = {k for m in self.messages for k in m["images"]}.union(keys)
        held = {**self._features, **dict(zip(new, found.features))}
        self._features = {k: f for k, f in held.items() if k in in_use}
        if self.draft_model is not None:
            self.draft_model.add_images(list(images), keys)
        return keys

    # -- turns --------------------------------------------------------------------------------
    def _prompt_ids(self) -> np.ndarray:
        return self._tokens(self.processor.format(self.conversation))

    def _fit_context(self, max_tokens: int) -> np.ndarray:
        ids = self._prompt_ids()
        dropped = 0
        while len(ids) + max_tokens > self.max_context and len(self.messages) > 1:
            cut = 2 if len(self.messages) > 2 and self.messages[1]["role"] == "assistant" else 1
            self.messages = self.messages[cut:]
            dropped += 1
            ids = self._prompt_ids()
        if len(ids) >= self.max_context:  # send() restores the dropped turns
            raise PromptTooLongError(
                f"the prompt is {len(ids)} tokens, more than the {self.max_context}-token context"
            )
        if dropped and self.on_truncate:
            self.on_truncate(
                f"conversation longer than the {self.max_context}-token context: dropped the "
                f"oldest {dropped} turn(s)"
            )
        return ids

    def send(self, text: str, images: Sequence = (), sampling: SamplingOptions | None = None, *,
             response_format: Mapping | None = None, logprobs: int | None = None,
             **options) -> Iterator[GenerationChunk]:
        """Add a user turn (``images`` fill its ``<image_placeholder>`` tags) and stream the reply;
        ``options`` change fields of ``sampling`` (default :data:`~mlx_dsvl.sampling.DEFAULTS`).
        ``response_format``: OpenAI's (:mod:`mlx_dsvl.grammar`), e.g. ``{"type": "json_object"}``;
        one it cannot follow is a ``ValueError`` before anything is run.  ``logprobs`` (0-20
        alternatives): each chunk's tokens' log-probabilities (``chunk.logprobs``)."""
        opts = (sampling or DEFAULTS).with_(**options)
        grammar = compile_format(self.processor, response_format)
        with FirstUseNotice(self.on_slow_start) as notice:
            for chunk in self._send(text, images, opts, grammar=grammar, logprobs=logprobs):
                notice.done()
                yield chunk

    def _send(self, text: str, images: Sequence, opts: SamplingOptions, *, grammar: Grammar | None,
              logprobs: int | None) -> Iterator[GenerationChunk]:
        tic = time.perf_counter()
        n_tags = text.count(self.processor.image_tag)
        if n_tags != len(images):
            raise ValueError(
                f"the message has {n_tags} image placeholder(s) {self.processor.image_tag!r} "
                f"but {len(images)} image(s) were given"
            )
        keys = self.add_images(images)
        before = list(self.messages)  # a refused turn leaves the conversation as it was
        self.messages.append({"role": "user", "content": text, "images": keys})
        tic_prompt = time.perf_counter()
        try:
            ids = self._fit_context(opts.max_tokens)
        except PromptTooLongError:
            self.messages = before
            raise
        self.timings = {"images_ms": (tic_prompt - tic) * 1e3,
                        "format_tokenize_ms": (time.perf_counter() - tic_prompt) * 1e3}
        max_tokens = min(opts.max_tokens, self.max_context - len(ids))
        reply: list[str] = []
        got = False
        try:
            for chunk in self._run(ids, opts, max_tokens, tic, grammar=grammar, logprobs=logprobs):
                got = True
                reply.append(chunk.text)
                if chunk.finish_reason == "length" and max_tokens < opts.max_tokens:
                    chunk.finish_reason = "context"
                    if self.on_truncate:
                        self.on_truncate(
                            f"the reply stopped at the {self.max_context}-token context limit after "
                            f"{chunk.generation_tokens} of {opts.max_tokens} tokens"
                        )
                yield chunk
        except Exception:
            if not got:  # nothing generated: the question was not asked
                self.messages = before
            else:
                self._add_reply(reply)
            raise
        except BaseException:  # generator closed early (a stop button) or interrupted: keep it
            self._add_reply(reply)
            raise
        self._add_reply(reply)

    def _add_reply(self, pieces: list[str]) -> None:
        self.messages.append({"role": "assistant", "content": "".join(pieces), "images": []})

    def _new_input(self, ids: np.ndarray):
        """Trim the cache to the prefix it can keep; (image keys, prefix length, new embeddings)."""
        t = self.timings
        tic = time.perf_counter()
        keys = [k for m in self.messages for k in m["images"]]  # the prompt's images, in order
        keep = self._reusable_prefix(ids, keys)
        self._trim_cache(keep)
        t["prefix_match_ms"] = (time.perf_counter() - tic) * 1e3
        tic = time.perf_counter()
        embeds = self._new_embeddings(ids, keep, keys)
        if self.profile:
            mx.eval(embeds)
        t.update(embed_merge_ms=(time.perf_counter() - tic) * 1e3, cached_tokens=keep,
                 new_tokens=len(ids) - keep)
        return keys, keep, embeds

    def _run(self, ids: np.ndarray, opts: SamplingOptions, max_tokens: int, start_time: float, *,
             grammar: Grammar | None, logprobs: int | None) -> Iterator[GenerationChunk]:
        keys, keep, embeds = self._new_input(ids)
        row = Row.start(self.processor, opts, ids[-PROCESSOR_CONTEXT:], max_tokens=max_tokens, grammar=grammar,
                        logprobs=logprobs, drafter=self._drafter(ids, keys, opts))
        try:
            yield from stream_tokens(self.model.language_model, self.processor, mx.array(ids[keep:]),
                                     lambda s, e: embeds[s:e], self.cache, row=row,
                                     start_time=start_time, kv=self.kv,
                                     timings=self.timings if self.profile else None)
        finally:
            # The cache now holds the prompt and every generated token that was fed back.
            self.cached_ids = (ids.tolist() + row.generated)[: self.cache[0].offset]
            self.cached_images = keys

    def _drafter(self, ids: np.ndarray, keys: list[str], opts: SamplingOptions) -> BackOff | None:
        """This reply's drafter: prompt lookup over ``ids``, or the draft model begun on them."""
        if self.draft == "model":
            return self.draft_model.start(ids.tolist(), keys, opts.temperature, opts.seed)
        return make_drafter(self.draft, ids.tolist(), self.num_draft_tokens)

    def _reusable_prefix(self, ids: np.ndarray, keys: list[str]) -> int:
        """Tokens at the start of ``ids`` the cache holds (never the last: it must give logits)."""
        layout = self.processor.image_tokens
        return reusable_prefix(layout.keyed(self.cached_ids, self.cached_images), layout.keyed(ids, keys))

    def _new_embeddings(self, ids: np.ndarray, keep: int, keys: list[str]) -> mx.array:
        """Embeddings [T, D] of ``ids[keep:]``: token embeddings, image features at image tokens."""
        return range_embeddings(self.model, ids, keep, len(ids), layout=self.processor.image_tokens,
                                image_keys=keys, features=lambda ks: [self._features[k] for k in ks])

    def next_logits(self, text: str, images: Sequence = ()) -> mx.array:
        """Logits [vocab] of the reply's first token; the question is prefilled, then taken back."""
        self.messages.append({"role": "user", "content": text, "images": self.add_images(images)})
        self.timings = {}
        try:
            ids = self._fit_context(1)
            keys, keep, embeds = self._new_input(ids)
            logits = prefill(self.model.language_model, mx.array(ids[keep:]), lambda s, e: embeds[s:e],
                             self.cache, self.kv)
            mx.eval(logits)
            self.cached_ids, self.cached_images = ids.tolist()[: self.cache[0].offset], keys
        finally:
            self.messages.pop()
        return logits[0]

    def undo(self) -> None:
        """Remove the last exchange (the cache is trimmed lazily on the next turn)."""
        while self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if self.messages:
            self.messages.pop()
