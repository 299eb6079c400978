"""The token loop shared by one-shot generation, chat sessions and the app.

Built on mlx-lm: ``generate_step`` (decoding with a KV cache), its samplers and logits
processors, and its byte-level BPE streaming detokenizer (multi-byte characters split across
tokens are held back until complete).  This module adds the DeepSeek-VL stop rules (EOS and the
``User:`` stop string, which never reaches the output) and per-chunk statistics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional

import mlx.core as mx
from mlx_lm.generate import generate_step, maybe_quantize_kv_cache
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer

from .models.deepseek_vl import lm_head
from .sampling import DEFAULTS, PROCESSOR_CONTEXT

STOP_STRINGS = ("User:",)
KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)
DEFAULT_SAMPLING = DEFAULTS.as_dict()  # the defaults as keywords (SamplingOptions is the source)


@dataclass
class GenerationChunk:
    """One streamed piece of a reply, with running statistics."""

    text: str  # new text since the previous chunk (may be "")
    token: Optional[int]  # the token that produced it (None for the final flush)
    prompt_tokens: int  # tokens prefilled for this reply (only the new ones in a session)
    prompt_tps: float  # prefill tokens per second
    time_to_first_token: float  # seconds from the call to the first sampled token
    generation_tokens: int  # tokens generated so far
    generation_tps: float  # decode tokens per second
    peak_memory: float  # GB, mx.get_peak_memory()
    # on the last chunk: "stop" (EOS or a stop string), "length" (max_tokens reached) or
    # "context" (a ChatSession's max_context reached first)
    finish_reason: Optional[str] = None


def make_detokenizer(processor) -> BPEStreamingDetokenizer:
    """A streaming detokenizer for the processor's byte-level BPE (token map built once)."""
    base = getattr(processor, "_mlx_dsvl_detokenizer", None)
    if base is None:
        base = BPEStreamingDetokenizer(processor.tokenizer)
        # ids the tokenizer does not define (gaps below its size) map to None: make them empty
        base.tokenmap = [t if t is not None else "" for t in base.tokenmap]
        processor._mlx_dsvl_detokenizer = base
    detok = BPEStreamingDetokenizer.__new__(BPEStreamingDetokenizer)
    detok.tokenmap = base.tokenmap
    detok.reset()
    return detok


class StopStringFilter:
    """Emit text as it streams, holding back anything that may begin a stop string."""

    def __init__(self, stops=STOP_STRINGS):
        self.stops = stops
        self.text = ""  # everything released so far
        self._pending = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        buf = self._pending + piece
        for s in self.stops:
            i = buf.find(s)
            if i >= 0:
                self.stopped = True
                self._pending = ""
                return self._release(buf[:i])
        hold = 0
        for s in self.stops:  # longest suffix of buf that is a proper prefix of a stop string
            for n in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        self._pending = buf[len(buf) - hold:] if hold else ""
        return self._release(buf[: len(buf) - hold])

    def flush(self) -> str:
        out, self._pending = ("" if self.stopped else self._pending), ""
        return self._release(out)

    def _release(self, s: str) -> str:
        self.text += s
        return s


def last_logits(language_model, ids: mx.array, cache, input_embeddings: Optional[mx.array] = None) -> mx.array:
    """[B, vocab] logits of the last position of a prefill.

    mlx-lm's ``Model.__call__`` applies the LM head to every position: for a 666-token prompt
    that is 666 x 102400 logits (273 MB in float32, and on a 4-bit LM head a full dequantized
    copy of it) of which one row is used.  Here the head sees the last position only.
    """
    return lm_head(language_model, language_model.model(ids, cache, input_embeddings)[:, -1, :])


def kv_cache_options(kv_bits: Optional[int] = None, kv_group_size: int = 64,
                     quantized_kv_start: int = 0, head_dim: Optional[int] = None) -> Optional[dict]:
    """Validated KV-cache quantization settings (mlx-lm's ``generate_step`` keywords), or None.

    ``kv_bits`` 4 or 8 stores keys and values quantized in groups of ``kv_group_size`` once a
    cache holds ``quantized_kv_start`` tokens (0: from the first prefill on; mlx-lm's default of
    5000 would never start within DeepSeek-VL's 4096-token context).  ``head_dim``: the LLM's
    head size, which the group size must divide.
    """
    if kv_bits is None:
        return None
    if kv_bits not in KV_BITS:
        raise ValueError(f"kv_bits must be one of {KV_BITS}, got {kv_bits}")
    if kv_group_size not in KV_GROUP_SIZES:
        raise ValueError(f"kv_group_size must be one of {KV_GROUP_SIZES}, got {kv_group_size}")
    if quantized_kv_start < 0:
        raise ValueError(f"quantized_kv_start must be >= 0, got {quantized_kv_start}")
    if head_dim is not None and head_dim % kv_group_size:
        raise ValueError(f"kv_group_size {kv_group_size} does not divide the LLM's head size {head_dim}")
    return dict(kv_bits=kv_bits, kv_group_size=kv_group_size, quantized_kv_start=quantized_kv_start)


def quantize_cache(cache: List[Any], kv: Optional[dict]) -> None:
    if kv is not None:
        maybe_quantize_kv_cache(cache, kv["quantized_kv_start"], kv["kv_group_size"], kv["kv_bits"])


def prefill_step_size(kv: Optional[dict]) -> int:
    """Tokens per prefill pass: mlx-lm's 2048 where attention is one fused kernel (a GPU, a plain
    cache); 512 where the attention scores are materialized (MLX's CPU backend, a quantized
    cache), which bounds them to [heads, 512, context] instead of [heads, 2048, context]."""
    return 2048 if kv is None and mx.default_device() == mx.gpu else 512


def prefill(language_model, new_ids: mx.array, new_embeds: mx.array, cache: List[Any],
            kv: Optional[dict] = None) -> mx.array:
    """Run ``new_ids``/``new_embeds`` ([T], [T, D]) through onto ``cache`` in passes of
    :func:`prefill_step_size`; returns the last position's logits [1, vocab] (not evaluated).
    With ``kv`` the cache is quantized as it fills."""
    T, step = int(new_ids.shape[0]), prefill_step_size(kv)
    for s in range(0, T, step):
        e = min(s + step, T)
        if e < T:
            language_model.model(new_ids[None, s:e], cache, new_embeds[None, s:e])
            quantize_cache(cache, kv)
            mx.eval([c.state for c in cache])
        else:
            logits = last_logits(language_model, new_ids[None, s:e], cache, new_embeds[None, s:e])
    quantize_cache(cache, kv)
    return logits


def token_steps(language_model, new_ids: mx.array, new_embeds: mx.array, cache: List[Any],
                max_tokens: int, sampler, processors, history: Optional[mx.array] = None,
                kv: Optional[dict] = None, timings: Optional[dict] = None) -> Iterator[int]:
    """Token ids: the prompt prefilled (:func:`prefill`), then mlx-lm's ``generate_step``.

    ``generate_step`` runs the last prompt token in a pass of its own, one more full read of
    the weights; for the short prompts of a chat turn that is a large share of the time to first
    token.  Here the whole prompt goes through in passes of :func:`prefill_step_size` tokens,
    the first token is sampled from the last position, and ``generate_step`` decodes from it.

    ``history``: the prompt's last tokens, the new ones included (default: ``new_ids``) -- the
    context the logits processors (the repetition penalty) see, as they would in one pass over
    the whole prompt.  ``kv``: :func:`kv_cache_options`.  ``timings``: when a dict, the prefill
    is evaluated before sampling and ``prefill_ms`` / ``first_sample_ms`` are recorded.
    """
    tic = time.perf_counter()
    logits = prefill(language_model, new_ids, new_embeds, cache, kv)
    if timings is not None:
        mx.eval(logits)
        timings["prefill_ms"] = (time.perf_counter() - tic) * 1e3
        tic = time.perf_counter()
    context = (new_ids if history is None else history)[-PROCESSOR_CONTEXT:]
    for p in processors:
        logits = p(context, logits)
    y = sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True)).item()
    if timings is not None:
        timings["first_sample_ms"] = (time.perf_counter() - tic) * 1e3
    yield y
    if max_tokens <= 1:
        return

    def with_context(p):
        # generate_step passes the tokens generated so far; the prompt's tail goes in front
        # until they alone fill the processors' window (then nothing is concatenated per token)
        def run(tokens, lg):
            if tokens.shape[0] < PROCESSOR_CONTEXT:
                tokens = mx.concatenate([context, tokens])
            return p(tokens, lg)
        return run

    for token, _ in generate_step(mx.array([y]), language_model, max_tokens=max_tokens - 1,
                                  sampler=sampler, logits_processors=[with_context(p) for p in processors],
                                  prompt_cache=cache, **(kv or {})):
        yield token


def stream_tokens(
    language_model,
    processor,
    new_ids: mx.array,
    new_embeds: mx.array,
    cache: List[Any],
    *,
    sampler,
    processors: List[Any],
    max_tokens: int = DEFAULTS.max_tokens,
    generated: Optional[List[int]] = None,
    start_time: Optional[float] = None,
    history: Optional[mx.array] = None,
    kv: Optional[dict] = None,
    timings: Optional[dict] = None,
) -> Iterator[GenerationChunk]:
    """Prefill ``new_ids``/``new_embeds`` ([T], [T, D]) on top of ``cache``, then decode.

    ``sampler`` and ``processors``: :meth:`~mlx_dsvl.sampling.SamplingOptions.make_sampler` and
    ``make_logits_processors``, built by the caller (which also seeds the random state).
    Sampled token ids are appended to ``generated`` (when given) so a caller can track the cache.
    ``start_time`` (``time.perf_counter()``) is when the request began -- before image encoding --
    so that time to first token covers everything the user waits for.  ``history``, ``kv`` and
    ``timings``: see :func:`token_steps`.
    """
    eos = {processor.tokenizer.eos_token_id}
    detok = make_detokenizer(processor)
    stop = StopStringFilter()
    n_prompt = int(new_ids.shape[0])
    tic = time.perf_counter() if start_time is None else start_time
    ttft = prompt_tps = 0.0
    n = 0
    finish = "length"

    def chunk(text, token, reason=None):
        gen_time = time.perf_counter() - tic - ttft
        return GenerationChunk(
            text=text, token=token, prompt_tokens=n_prompt, prompt_tps=prompt_tps,
            time_to_first_token=ttft, generation_tokens=n,
            generation_tps=(n - 1) / gen_time if n > 1 and gen_time > 0 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9, finish_reason=reason,
        )

    steps = token_steps(language_model, new_ids, new_embeds, cache, max_tokens, sampler, processors,
                        history=history, kv=kv, timings=timings)
    for token in steps:
        if n == 0:
            ttft = time.perf_counter() - tic
            prompt_tps = n_prompt / ttft if ttft > 0 else 0.0
        n += 1
        if generated is not None:
            generated.append(token)
        if token in eos:
            finish = "stop"
            break
        detok.add_token(token)
        text = stop.push(detok.last_segment)
        if stop.stopped:
            finish = "stop"
            if text:
                yield chunk(text, token)
            break
        if text:
            yield chunk(text, token)
    detok.finalize()
    tail = stop.push(detok.last_segment) if not stop.stopped else ""
    tail += stop.flush()
    yield chunk(tail, None, finish)
