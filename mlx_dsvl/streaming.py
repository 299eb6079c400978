"""The generation engine: one prefill and one decode step under every way of producing tokens.

``generate``/``stream_generate`` and ``ChatSession`` (the CLI's ``--chat``, the app),
``generate_batch`` (and eval's generate method) and the server's scheduler all run a prompt
through :func:`prefill` (in passes, images merged by the caller's embeddings) and then decode
with a :class:`Batch`: each step feeds every row's last token through the LLM in one forward and
samples each row's next token with its own sampler and logits processors
(:meth:`~mlx_dsvl.sampling.SamplingOptions.make_sampler`), one row or many.  The next step is
computed while the last one's tokens are read (``mx.async_eval``, as mlx-lm's ``generate_step``).
Rows stop on EOS, on ``User:`` (and a request's own stop strings, which never reach the output)
and at their token budget; text comes out through mlx-lm's byte-level BPE streaming
detokenizer (multi-byte characters split across tokens are held back until complete).  A row
may ask for its tokens' log-probabilities: the log-softmax of the logits its sampler sees
(:meth:`Row.adjust`), for the rows that ask computed together.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np
from mlx_lm.generate import maybe_quantize_kv_cache
from mlx_lm.models.llama import Model as LanguageModel
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, _byte_decoder

from .batch_cache import merge_row
from .models.deepseek_vl import DeepseekVL, lm_head
from .processing.chat import ChatProcessor
from .processing.image_tokens import ImageTokens
from .sampling import PROCESSOR_CONTEXT, Sampler, SamplingOptions

if TYPE_CHECKING:  # grammar.py and drafting.py build on this module
    from .drafting import BackOff
    from .grammar import Constraint, Grammar

STOP_STRINGS = ("User:",)
SUM_BLOCK = 256  # terms a log-softmax adds up at once (log_softmax)
MAX_TOP_LOGPROBS = 20  # alternatives a row may ask for at each step (OpenAI's limit)
KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)


@dataclass
class GenerationChunk:
    """One streamed piece of a reply, with running statistics."""

    text: str  # new text since the previous chunk (may be "")
    token: int | None  # the token that produced it (None for the final flush)
    prompt_tokens: int  # tokens prefilled for this reply (only the new ones in a session)
    prompt_tps: float  # prefill tokens per second
    time_to_first_token: float  # seconds from the call to the first sampled token
    generation_tokens: int  # tokens generated so far
    generation_tps: float  # decode tokens per second
    peak_memory: float  # GB, mx.get_peak_memory()
    # on the last chunk: "stop" (EOS or a stop string), "length" (max_tokens reached) or
    # "context" (a ChatSession's max_context reached first)
    finish_reason: str | None = None
    # when asked for: the tokens whose text this chunk holds (TokenLogprobs; EOS not listed)
    logprobs: list[TokenLogprobs] | None = None
    drafted_tokens: int = 0  # speculative decoding: tokens drafted so far
    accepted_tokens: int = 0  # and those of them the model agreed with (kept)


def make_detokenizer(processor: ChatProcessor) -> BPEStreamingDetokenizer:
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


def token_bytes(detok: BPEStreamingDetokenizer, token: int) -> bytes:
    """A token's own bytes (maybe part of a UTF-8 character): its byte-level BPE piece decoded;
    a special token's characters as UTF-8."""
    piece, decoder = detok.tokenmap[token] if token < len(detok.tokenmap) else "", _byte_decoder()
    return b"".join(bytes([decoder[c]]) if c in decoder else c.encode() for c in piece)


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


def last_logits(language_model: LanguageModel, ids: mx.array, cache,
                input_embeddings: mx.array | None = None) -> mx.array:
    """[B, vocab] logits of the last position of a prefill: the LM head sees that position only
    (mlx-lm's ``Model.__call__`` projects every position, a large array of which one row is used)."""
    return lm_head(language_model, language_model.model(ids, cache, input_embeddings)[:, -1, :])


def kv_cache_options(kv_bits: int | None = None, kv_group_size: int = 64,
                     quantized_kv_start: int = 0, head_dim: int | None = None) -> dict | None:
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


def quantize_cache(cache: list[Any], kv: dict | None) -> None:
    if kv is not None:
        maybe_quantize_kv_cache(cache, kv["quantized_kv_start"], kv["kv_group_size"], kv["kv_bits"])


def prefill_step_size(kv: dict | None) -> int:
    """Tokens per prefill pass: mlx-lm's 2048 where attention is one fused kernel (a GPU, a plain
    cache); 512 where the attention scores are materialized (MLX's CPU backend, a quantized
    cache), which bounds them to [heads, 512, context] instead of [heads, 2048, context]."""
    return 2048 if kv is None and mx.default_device() == mx.gpu else 512


Embed = Callable[[int, int], mx.array]  # (start, end) -> embeddings [end - start, D] of those ids


def range_embeddings(model: DeepseekVL, ids: Sequence[int], start: int, end: int, *, layout: ImageTokens,
                     image_keys: Sequence[str], features: Callable[[list[str]], list[mx.array]]) -> mx.array:
    """Input embeddings [end - start, D] of ``ids[start:end]``: token embeddings, and at image
    positions the features of the images the range overlaps (``layout.overlap``; the range may
    begin inside one), asked of ``features(keys)`` for those images only."""
    tokens = mx.array(np.asarray(ids[start:end]))[None]
    span = layout.overlap(ids, start, end, len(image_keys))
    if span.first == span.stop:
        return model.get_input_embeddings(tokens)[0]
    feats = mx.stack(features(list(image_keys[span.first:span.stop])))  # [n, I, D]
    return model.get_input_embeddings(tokens, image_embeds=feats, skip=span.skip)[0]


def prefill(language_model: LanguageModel, new_ids: mx.array, embed: Embed, cache: list[Any],
            kv: dict | None = None) -> mx.array:
    """Run ``new_ids`` ([T]) through onto ``cache`` in passes of :func:`prefill_step_size`,
    each pass's input embeddings from ``embed(start, end)`` (text and images merged; a pass may
    begin inside an image); returns the last position's logits [1, vocab] (not evaluated).
    With ``kv`` the cache is quantized as it fills."""
    T, step = int(new_ids.shape[0]), prefill_step_size(kv)
    for s in range(0, T, step):
        e = min(s + step, T)
        if e < T:
            language_model.model(new_ids[None, s:e], cache, embed(s, e)[None])
            quantize_cache(cache, kv)
            mx.eval([c.state for c in cache])
        else:
            logits = last_logits(language_model, new_ids[None, s:e], cache, embed(s, e)[None])
    quantize_cache(cache, kv)
    return logits


# -- decoding ---------------------------------------------------------------------------------
def extend_context(context: mx.array, tokens: mx.array | Sequence[int]) -> mx.array:
    """A row's repetition-penalty context with ``tokens`` appended: its last
    :data:`PROCESSOR_CONTEXT` tokens."""
    if not isinstance(tokens, mx.array):
        tokens = mx.array(tokens, context.dtype)
    return mx.concatenate([context, tokens])[-PROCESSOR_CONTEXT:]


def sampler_input(x: mx.array) -> mx.array:
    """Adjusted logits [n, vocab] -> the log-probabilities a :class:`Sampler` takes (``x -
    logsumexp``: cheaper than :func:`log_softmax`, and a sampler needs no more)."""
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


@dataclass(eq=False)
class Row:
    """One reply being decoded: its options, stop rules and progress.  ``tag``: the caller's."""

    options: SamplingOptions
    max_tokens: int
    context: mx.array  # what the logits processors see: the prompt's tail, then the reply
    detok: BPEStreamingDetokenizer
    stop: StopStringFilter
    ignore_eos: bool = False
    tag: Any = None
    sampler: Sampler = None
    processors: list = None
    constraint: Constraint | None = None  # a grammar the reply follows (structured output)
    logprobs: int | None = None  # None: no log-probabilities; k: them and the k likeliest tokens'
    y: mx.array | None = None  # the token sampled last, not read yet [1]
    y_logprobs: tuple | None = None  # its log-probabilities, not read yet (token_logprobs)
    next: mx.array | None = None  # the token after it, being computed
    next_logprobs: tuple | None = None
    pending: mx.array | None = None  # a constrained row's next logits, sampled once y is read
    drafter: BackOff | None = None  # proposes tokens checked in one forward (Batch._speculate)
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None  # why the grammar ended the row ("error")

    @classmethod
    def start(cls, processor: ChatProcessor, options: SamplingOptions, prompt_tail: Sequence[int],
              max_tokens: int | None = None, stops: Sequence[str] = (), ignore_eos: bool = False,
              tag: Any = None, grammar: Grammar | None = None, logprobs: int | None = None,
              drafter: BackOff | None = None) -> Row:
        """A row for ``options`` (sampler and processors built here, once); ``max_tokens``
        (default ``options.max_tokens``) may be cut to the context.  With ``grammar`` the reply
        follows it and ends when it is complete; the template's ``User:`` stop is then left out
        (the grammar ends the reply, and the text may hold ``User:``), ``stops`` still apply.
        ``logprobs``: each token's log-probability and the ``logprobs`` likeliest alternatives'
        come on its Output.  ``drafter``: speculative decoding, alone or in a batch
        (:meth:`Batch._speculate`, :meth:`Batch._judge`)."""
        if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {logprobs}")
        return cls(options=options, max_tokens=options.max_tokens if max_tokens is None else max_tokens,
                   context=mx.array(np.asarray(prompt_tail, dtype=np.int32)[-PROCESSOR_CONTEXT:]),
                   detok=make_detokenizer(processor),
                   stop=StopStringFilter((STOP_STRINGS if grammar is None else ()) + tuple(stops)),
                   ignore_eos=ignore_eos, tag=tag, sampler=options.make_sampler(),
                   processors=options.make_logits_processors(), logprobs=logprobs,
                   constraint=None if grammar is None else grammar.constraint(), drafter=drafter)

    @property
    def greedy(self) -> bool:
        return self.options.temperature == 0 and not self.processors and self.constraint is None

    def takes_draft(self) -> bool:
        """Whether this step checks a draft: the row's drafter, when not backing off (asking
        counts a back-off step)."""
        return self.drafter is not None and self.drafter.wants()

    def sample(self, x: mx.array) -> mx.array:
        """The token this row's sampler draws from ``x``, logits already adjusted (:meth:`adjust`)."""
        return self.sampler(sampler_input(x))

    def adjust(self, logits: mx.array, context: mx.array | None = None,
               allowed: mx.array | None = None) -> mx.array:
        """[1, vocab] logits -> what the sampler sees: after this row's processors (seeing
        ``context``, default the row's) and grammar mask (``allowed``, default the matcher's
        now); whatever changes them belongs here, so that logprobs follow."""
        for p in self.processors:
            logits = p(self.context if context is None else context, logits)
        if self.constraint is not None:
            logits = self.constraint.apply(logits, allowed)
        return logits

    def targets(self, fed: Sequence[int], logits: mx.array) -> mx.array:
        """What the sampler sees [m + 1, vocab] after each of ``fed`` (the pending token, then a
        draft of k) from one forward's logits [k + 1, vocab], as :meth:`adjust` would at each
        step: the processors see the tokens fed up to that one, the grammar's mask follows the
        draft as far as the grammar allows it (m drafted tokens; k without a grammar)."""
        if self.greedy:
            return logits
        masks = ([None] * len(fed) if self.constraint is None
                 else self.constraint.along(fed[1:], logits.shape[-1]))
        return mx.concatenate([
            self.adjust(logits[i:i + 1], extend_context(self.context, fed[:i + 1]) if self.processors else None, a)
            for i, a in enumerate(masks)])


def accept_probability(p_x: mx.array, q_x: mx.array) -> mx.array:
    """Speculative sampling's chance [n] of keeping drafted tokens: min(1, p(x) / q(x))."""
    return mx.minimum(p_x / q_x, 1.0)


def residual(p: mx.array, q: mx.array) -> mx.array:
    """What a rejected position draws from (unnormalized, [1, vocab]): max(p - q, 0); p itself
    where that is all zero (p equal to q up to rounding, when a rejection is rounding's)."""
    r = mx.maximum(p - q, 0.0)
    return mx.where(mx.sum(r, axis=-1, keepdims=True) > 0, r, p)


def speculative_sample(sampler: Sampler, logprobs: mx.array, draft: Sequence[int],
                       q: mx.array | None) -> tuple[int, mx.array]:
    """Speculative rejection sampling (Leviathan et al., Chen et al. 2023) of ``draft`` (k
    tokens drawn from ``q`` [k, vocab], or chosen: None, a point mass on each): ``logprobs``
    [m + 1, vocab] are the target's before each of the first m <= k drafted tokens and after
    them (a drafted token past m is one the target cannot take).  The first m are kept while a
    uniform draw is below min(1, p/q); the first rejected one is replaced by a draw from
    norm(max(p - q, 0)), or after k kept tokens one from p.  Every draw uses ``sampler``'s key.
    Returns (tokens kept, the token [1] after them)."""
    m, k = logprobs.shape[0] - 1, len(draft)
    p, d = sampler.distribution(logprobs), mx.array(draft)
    if q is None:
        q = (mx.arange(p.shape[-1]) == d[:, None]).astype(p.dtype)
    n = m
    if m:
        at = d[:m, None]
        p_x, q_x = (mx.take_along_axis(x[:m], at, axis=-1)[:, 0] for x in (p, q))
        kept = (mx.random.uniform(shape=(m,), key=sampler.key()) < accept_probability(p_x, q_x)).tolist()
        n = kept.index(False) if False in kept else m
    if n == k:
        return n, sampler(logprobs[k:k + 1])
    return n, mx.random.categorical(mx.log(residual(p[n:n + 1], q[n:n + 1])), key=sampler.key())


def log_softmax(logits: mx.array) -> mx.array:
    """[n, vocab] -> log-probabilities, to float32's precision: the exponentials summed in blocks
    of :data:`SUM_BLOCK`, then the blocks' sums (MLX's CPU ``sum`` and ``logsumexp`` over a whole
    vocabulary drift well past it; ``tests/test_logprobs.py`` checks against float64)."""
    shifted = logits - mx.max(logits, axis=-1, keepdims=True)
    p = mx.exp(shifted)
    p = mx.pad(p, [(0, 0), (0, -p.shape[-1] % SUM_BLOCK)]).reshape(p.shape[0], -1, SUM_BLOCK)
    return shifted - mx.log(mx.sum(mx.sum(p, axis=-1), axis=-1, keepdims=True))


def token_logprobs(scores: mx.array, tokens: mx.array, k: int) -> tuple[mx.array, mx.array, mx.array]:
    """Log-probabilities [n, vocab] and the tokens chosen from them [n] -> each chosen token's
    log-probability [n], the ``k`` likeliest tokens [n, k] and theirs [n, k], likeliest first
    (lazy; one partial sort for the n rows)."""
    chosen = mx.take_along_axis(scores, tokens[:, None], axis=-1)[:, 0]
    k = min(k, scores.shape[-1])
    if k == 0:
        return chosen, mx.zeros((scores.shape[0], 0), mx.uint32), mx.zeros((scores.shape[0], 0))
    top = mx.argpartition(-scores, kth=k - 1, axis=-1)[:, :k]
    values = mx.take_along_axis(scores, top, axis=-1)
    order = mx.argsort(-values, axis=-1)
    return chosen, mx.take_along_axis(top, order, axis=-1), mx.take_along_axis(values, order, axis=-1)


def attach_logprobs(rows: Sequence[Row], scores: Sequence[mx.array]) -> None:
    """Each row's pending log-probabilities (``row.next_logprobs``) from what its sampler saw
    ([1, vocab] each) and its chosen ``row.next``, computed together."""
    chosen, top, values = token_logprobs(mx.concatenate(list(scores)), mx.concatenate([r.next for r in rows]),
                                         max(r.logprobs for r in rows))
    for i, r in enumerate(rows):
        r.next_logprobs = (chosen[i], top[i, :r.logprobs], values[i, :r.logprobs])


@dataclass
class TokenLogprobs:
    """A sampled token, its log-probability and the likeliest tokens' ``(token, logprob)``, likeliest first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]

    @classmethod
    def read(cls, token: int, pending: tuple[mx.array, mx.array, mx.array]) -> TokenLogprobs:
        chosen, top, values = pending  # (alternatives a grammar bars, at -inf, are not listed)
        return cls(token, chosen.item(), [(t, v) for t, v in zip(top.tolist(), values.tolist()) if v > -math.inf])


class GrammarError(RuntimeError):
    """llguidance failed a reply midway (a token the mask allowed was refused): that reply ends."""


@dataclass
class Output:
    """What a step gave a row: its token, the text it released, and when the row is done, its
    finish reason ("stop": EOS or a stop string, "length"; "error": its grammar failed, see
    ``row.error``) and the text held back until then."""

    row: Row
    token: int
    text: str
    finish_reason: str | None = None
    tail: str = ""
    logprobs: TokenLogprobs | None = None  # when the row asks for them (not for the EOS ending it)


class Batch:
    """Rows decoded together over one KV cache: one forward per step for all of them.

    ``batched=False``: one row, decoding on the caller's own cache (a session's, quantized as
    it grows with ``kv``); else rows join and leave a left-padded batch cache (quantized with
    ``kv``).  ``on_finish(row, cache)``: told of each finished row with its KV cache, which then
    holds the prompt and every reply token but the last's unread successor."""

    def __init__(self, language_model: LanguageModel, eos_token_id: int, kv: dict | None = None,
                 batched: bool = True, on_finish: Callable[[Row, list[Any]], None] | None = None):
        self.lm, self.eos, self.kv, self.batched = language_model, eos_token_id, kv, batched
        self.on_finish = on_finish
        self.rows: list[Row] = []
        self.cache: list[Any] | None = None

    def add(self, row: Row, cache: list[Any], logits: mx.array) -> None:
        """``cache`` holds the row's prompt, ``logits`` [1, vocab] are its last position's: the
        row's first token is sampled from them (computed in the background) and the row joins."""
        if not self.batched and self.rows:
            raise ValueError("an unbatched Batch decodes one row")
        self._choose([row], [logits])
        row.y, row.y_logprobs = row.next, row.next_logprobs
        mx.async_eval(row.y, row.y_logprobs or ())
        if not self.batched:
            self.cache = cache
        elif self.cache is None:
            self.cache = merge_row(cache, self.kv)
        else:
            for a, b in zip(self.cache, merge_row(cache, self.kv)):
                a.extend(b)
        self.rows.append(row)

    def step(self) -> list[Output]:
        """Read every row's pending token (while the next ones are computed); finished rows
        leave the batch.  When rows with drafters check a draft, the step is :meth:`_speculate`
        (those rows may give several tokens)."""
        wanting = [r for r in self.rows if r.takes_draft()]
        if wanting:
            return self._speculate(wanting)
        rows = list(self.rows)
        last = [r for r in rows if len(r.generated) + 1 >= r.max_tokens]  # no successor needed
        self.remove(last, finished=True)
        if self.rows:
            self._forward(self.rows)
        tokens = mx.concatenate([r.y for r in rows]).tolist()
        outs = [self._advance(r, t) for r, t in zip(rows, tokens)]
        self.remove([r for r in self.rows if r.finish_reason], finished=True)
        self._choose_pending(self.rows)
        for r in self.rows:
            r.y, r.y_logprobs = r.next, r.next_logprobs
        return outs

    def remove(self, rows: Sequence[Row], finished: bool = False) -> None:
        """Take ``rows`` out (finished: ``on_finish`` is told first; else cancelled)."""
        if not rows:
            return
        keep = [i for i, r in enumerate(self.rows) if r not in rows]
        if finished and self.on_finish is not None:
            for i, r in enumerate(self.rows):
                if r in rows:
                    self.on_finish(r, [c.extract(i) for c in self.cache] if self.batched else self.cache)
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = None
            if self.batched:
                mx.clear_cache()
        elif self.batched:
            for c in self.cache:
                c.filter(keep)

    def _forward(self, rows: list[Row]) -> None:
        """Feed each row's pending token; each row's next token (``row.next``), lazily, or for a
        constrained row its logits (``row.pending``: sampled once the grammar has the token)."""
        if not self.batched:
            quantize_cache(self.cache, self.kv)
        inputs = mx.concatenate([r.y for r in rows])[:, None]  # [B, 1]
        self._pick(rows, lm_head(self.lm, self.lm.model(inputs, self.cache)[:, -1, :]))

    def _pick(self, rows: list[Row], logits: mx.array) -> None:
        """Each row's next token from the logits [B, vocab] after its pending token (lazily), or
        for a constrained row those logits (``row.pending``)."""
        if all(r.greedy for r in rows):
            nxt = mx.argmax(logits, axis=-1)
            for b, r in enumerate(rows):
                r.next = nxt[b:b + 1]
            asked = [b for b, r in enumerate(rows) if r.logprobs is not None]
            if asked:  # what greedy rows' argmax sees: no processors
                attach_logprobs([rows[b] for b in asked], [log_softmax(logits[mx.array(asked)])])
        else:
            free = []
            for b, r in enumerate(rows):
                if r.processors:
                    r.context = extend_context(r.context, r.y)
                if r.constraint is None:
                    free.append(b)
                else:
                    r.pending = logits[b:b + 1]
            self._choose([rows[b] for b in free], [logits[b:b + 1] for b in free])
        mx.async_eval([r.next if r.constraint is None else r.pending for r in rows],
                      [r.next_logprobs for r in rows if r.constraint is None and r.logprobs is not None])

    def _choose_pending(self, rows: Sequence[Row]) -> None:
        """The next token of the constrained rows among ``rows``, whose grammar has its last token now."""
        constrained = [r for r in rows if r.constraint is not None]
        if constrained:
            self._choose(constrained, [r.pending for r in constrained])
            mx.async_eval([r.next for r in constrained],
                          [r.next_logprobs for r in constrained if r.logprobs is not None])

    def _speculate(self, wanting: list[Row]) -> list[Output]:
        """Read every row's pending token, then check the drafts of the rows ``wanting`` in one
        forward of every row's [token + drafts], right-padded to the longest: a drafting row keeps
        the drafts :meth:`_judge` accepts (:meth:`_keep`), a row without a draft
        takes its next token as in :meth:`_forward`; then the cache drops what each row did not
        keep (:meth:`_roll_back`)."""
        tokens = mx.concatenate([r.y for r in self.rows]).tolist()
        outs = [self._advance(r, t) for r, t in zip(list(self.rows), tokens)]
        self.remove([r for r in self.rows if r.finish_reason], finished=True)
        drafts = {r: r.drafter.propose(r.generated, r.max_tokens - len(r.generated) - 1)
                  for r in wanting if r in self.rows}
        rows = list(self.rows)
        plain = [r for r in rows if not drafts.get(r)]
        if len(plain) == len(rows):  # nothing to check: a plain step
            if rows:
                self._forward(rows)
        else:
            fed = [[r.generated[-1], *drafts.get(r, ())] for r in rows]
            width = max(map(len, fed))
            if not self.batched:
                quantize_cache(self.cache, self.kv)
            inputs = mx.array([f + f[:1] * (width - len(f)) for f in fed])  # [B, width]
            logits = lm_head(self.lm, self.lm.model(inputs, self.cache))  # [B, width, vocab]
            if plain:
                self._pick(plain, logits[mx.array([b for b, r in enumerate(rows) if r in plain]), 0])
            kept = [self._keep(r, f, logits[b, :len(f)], outs) if drafts.get(r) else 1
                    for b, (r, f) in enumerate(zip(rows, fed))]
            self._roll_back([width - k for k in kept])
        self.remove([r for r in rows if r.finish_reason], finished=True)
        self._choose_pending(plain)
        for r in plain:
            r.y, r.y_logprobs = r.next, r.next_logprobs
        return outs

    def _keep(self, r: Row, fed: list[int], logits: mx.array, outs: list[Output]) -> int:
        """A drafting row's verdict on ``fed`` (its token and drafts; their logits [len(fed),
        vocab]): the drafts :meth:`_judge` keeps go through ``_advance`` into ``outs`` token by
        token (stop rules, budget, grammar), the token it takes after them becomes the pending one
        (log-probabilities from the same forward); returns the
        positions of ``fed`` it keeps."""
        n, following, logprobs = self._judge(r, fed, logits)
        r.drafter.record(len(fed) - 1, n)
        kept = 1
        for i, t in enumerate(fed[1:n + 1]):
            if r.finish_reason:
                break
            r.y_logprobs = logprobs[i] if logprobs else None
            outs.append(self._advance(r, t))
            kept += 1
        if r.processors:
            r.context = extend_context(r.context, fed[:kept])
        r.y, r.y_logprobs = following, logprobs[n] if logprobs else None
        return kept

    def _roll_back(self, dropped: list[int]) -> None:
        """Drop each row's last ``dropped[b]`` positions from the cache: what every row dropped
        is trimmed; the rest of a row's is rolled into its left padding (``prepare``/``finalize``
        of the batch cache: its kept positions end where the batch's do, offsets adjusted)."""
        common = min(dropped)
        for c in self.cache:
            c.trim(common)
            if max(dropped) > common:
                c.prepare(right_padding=[d - common for d in dropped])
                c.finalize()

    @staticmethod
    def _judge(r: Row, fed: list[int], logits: mx.array) -> tuple[int, mx.array, list[tuple] | None]:
        """How many of the drafts ``fed[1:]`` the row keeps, the token [1] it takes after them and,
        for a row that asks, each kept token's log-probabilities and then that one's
        (:func:`token_logprobs`, one tuple each), from the logits [k + 1, vocab] of one forward of
        ``fed`` (:meth:`Row.targets`: the processors and the grammar at each position).  At
        temperature 0 the drafts are kept while they are the row's own choice (the same tokens as
        without drafting); sampled, by :func:`speculative_sample` against the drafter's ``probs``:
        the reply follows the sampler's distribution, but is not token for token the undrafted
        one of the same seed."""
        draft, x = fed[1:], r.targets(fed, logits)
        if r.options.temperature == 0:
            wanted = mx.argmax(x, axis=-1) if r.greedy else r.sample(x)  # as _forward / _choose choose
            listed, n = wanted.tolist(), 0
            while n < x.shape[0] - 1 and listed[n] == draft[n]:
                n += 1
            following = wanted[n:n + 1]
        else:
            n, following = speculative_sample(r.sampler, sampler_input(x), draft, r.drafter.probs)
        if r.logprobs is None:
            return n, following, None
        tokens = mx.concatenate([mx.array(draft[:n], mx.uint32), following.astype(mx.uint32)])
        chosen, top, values = token_logprobs(log_softmax(x[:n + 1]), tokens, r.logprobs)
        return n, following, [(chosen[i], top[i], values[i]) for i in range(n + 1)]

    @staticmethod
    def _choose(rows: Sequence[Row], logits: Sequence[mx.array]) -> None:
        """Each row's next token from its [1, vocab] logits (lazily), and the log-probabilities of
        the rows that ask, computed together."""
        asked, scores = [], []
        for r, x in zip(rows, logits):
            x = r.adjust(x)
            r.next = r.sample(x)
            if r.logprobs is not None:  # to float32's precision (the sampler needs no more)
                asked.append(r)
                scores.append(log_softmax(x))
        if asked:
            attach_logprobs(asked, scores)

    def _advance(self, r: Row, token: int) -> Output:
        r.generated.append(token)
        if r.constraint is not None:
            try:
                r.constraint.advance(token)
            except GrammarError as e:  # this row ends; the batch's other rows go on
                r.finish_reason, r.error = "error", str(e)
                return Output(r, token, "", "error")
        text, reason, listed = "", None, r.y_logprobs is not None
        if token == self.eos and (not r.ignore_eos or r.constraint is not None):
            reason, listed = "stop", False  # the EOS that ends a reply has no logprobs entry
        else:
            r.detok.add_token(token)
            text = r.stop.push(r.detok.last_segment)
            done = r.stop.stopped or (r.constraint is not None and r.constraint.done)
            reason = "stop" if done else "length" if len(r.generated) >= r.max_tokens else None
        out = Output(r, token, text, reason, logprobs=TokenLogprobs.read(token, r.y_logprobs) if listed else None)
        if reason is not None:
            r.finish_reason = reason
            r.detok.finalize()
            out.tail = ("" if r.stop.stopped else r.stop.push(r.detok.last_segment)) + r.stop.flush()
        return out


def stream_tokens(language_model: LanguageModel, processor: ChatProcessor, new_ids: mx.array, embed: Embed,
                  cache: list[Any], *, row: Row, start_time: float | None = None, kv: dict | None = None,
                  timings: dict | None = None) -> Iterator[GenerationChunk]:
    """Prefill ``new_ids`` on top of ``cache``, then decode ``row`` alone (a :class:`Batch` of
    one on this cache), as chunks with running statistics.

    ``start_time`` (``time.perf_counter()``) is when the request began -- before image encoding
    -- so that time to first token covers everything the user waits for.  ``timings``: when a
    dict, the prefill is evaluated before sampling and ``prefill_ms`` / ``first_sample_ms`` are
    recorded.  ``row.generated`` holds the sampled tokens (a caller tracks its cache with them).
    """
    n_prompt = int(new_ids.shape[0])
    tic = time.perf_counter() if start_time is None else start_time
    ttft = prompt_tps = 0.0
    n = 0
    held: list[TokenLogprobs] = []  # tokens whose text is not out yet

    def chunk(text, token, reason=None):
        nonlocal held
        gen_time = time.perf_counter() - tic - ttft
        listed, held = (held if row.logprobs is not None else None), []
        return GenerationChunk(
            text=text, token=token, prompt_tokens=n_prompt, prompt_tps=prompt_tps,
            time_to_first_token=ttft, generation_tokens=n,
            generation_tps=(n - 1) / gen_time if n > 1 and gen_time > 0 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9, finish_reason=reason, logprobs=listed,
            drafted_tokens=row.drafter.drafted if row.drafter else 0,
            accepted_tokens=row.drafter.accepted if row.drafter else 0,
        )

    t0 = time.perf_counter()
    logits = prefill(language_model, new_ids, embed, cache, kv)
    batch = Batch(language_model, processor.tokenizer.eos_token_id, kv, batched=False)
    if timings is not None:
        mx.eval(logits)
        timings["prefill_ms"] = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
    batch.add(row, cache, logits)
    if timings is not None:
        mx.eval(row.y)
        timings["first_sample_ms"] = (time.perf_counter() - t0) * 1e3
    while batch.rows:
        for out in batch.step():
            if out.finish_reason == "error":
                raise GrammarError(row.error)
            if n == 0:
                ttft = time.perf_counter() - tic
                prompt_tps = n_prompt / ttft if ttft > 0 else 0.0
            n += 1
            if out.logprobs is not None:
                held.append(out.logprobs)
            if out.text:
                yield chunk(out.text, out.token)
    yield chunk(out.tail, None, row.finish_reason)


