"""Drafters for speculative decoding: cheap guesses of a reply's next tokens, which the engine
(:meth:`mlx_dsvl.streaming.Batch.step`) checks in one forward and keeps while the target agrees.

``ngram`` is prompt lookup (llama.cpp's and transformers' idea): the conversation's last ``n``
tokens (``n`` from :data:`MAX_NGRAM` down to 1) are looked up at their latest earlier occurrence
and what followed there is proposed.  A drafter backs off when nothing it drafts is accepted
(it skips a number of steps that doubles each time, up to :data:`MAX_PAUSE`), so that a reply
that never repeats pays for a check only now and then; a step with nothing to propose costs
no forward and no back-off.

:class:`ModelDrafter` (``--draft-model``) is a smaller DeepSeek-VL of the same tokenizer (the
1.3B for the 7B): its own towers and KV cache over the same conversation, kept across a session's
turns; it drafts greedily, or for a sampled row from its temperature-scaled distribution
(``probs``).  :func:`draft_mismatch` is the check that two models can pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from .caches import IMAGE_CACHE_BYTES, ImageFeatureCache, reusable_prefix, trim_cache
from .models.deepseek_vl import lm_head
from .streaming import log_softmax, prefill, range_embeddings

if TYPE_CHECKING:
    from .models.deepseek_vl import DeepseekVL
    from .processing.chat import ChatProcessor

DRAFTERS = ("ngram",)
NUM_DRAFT_TOKENS = 4  # --num-draft-tokens' default
MAX_NGRAM = 3
MAX_PAUSE = 32  # steps skipped at most after a draft of which nothing was accepted


class BackOff:
    """What every drafter shares: ``k`` tokens at most per draft, the counts ``drafted`` /
    ``accepted`` (tokens proposed, tokens the target agreed with) and the back-off."""

    probs: mx.array | None = None  # [len(draft), vocab]: the drafts' distributions; None: chosen

    def __init__(self, num_draft_tokens: int):
        if num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
        self.k = int(num_draft_tokens)
        self.restart()

    def restart(self) -> None:
        """Counts at zero, no pause (a new reply)."""
        self.drafted = self.accepted = 0
        self._pause = 0  # steps to skip before the next draft
        self._backoff = 1  # the next pause after a draft of which nothing is accepted

    def wants(self) -> bool:
        """Whether to draft at this step (counts down a back-off pause)."""
        if self._pause:
            self._pause -= 1
            return False
        return True

    def record(self, drafted: int, accepted: int) -> None:
        """Count a checked draft; back off when none of it was accepted."""
        self.drafted += drafted
        self.accepted += accepted
        if accepted:
            self._backoff = 1
        else:
            self._pause, self._backoff = self._backoff, min(2 * self._backoff, MAX_PAUSE)


class NgramDrafter(BackOff):
    """Prompt-lookup drafting over ``prompt`` and the reply so far."""

    def __init__(self, prompt: Sequence[int], num_draft_tokens: int = NUM_DRAFT_TOKENS,
                 max_ngram: int = MAX_NGRAM):
        super().__init__(num_draft_tokens)
        self.max_ngram = int(max_ngram)
        self.prompt_len = len(prompt)
        self.tokens: list[int] = []
        # n -> the n-gram -> the position of its last token, latest occurrence with a successor
        self._index: list[dict[tuple[int, ...], int]] = [{} for _ in range(self.max_ngram + 1)]
        self._extend(prompt)

    def _extend(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            self.tokens.append(int(t))
            end = len(self.tokens) - 2  # the n-grams ending here now have a successor
            for n in range(1, self.max_ngram + 1):
                if end - n + 1 >= 0:
                    self._index[n][tuple(self.tokens[end - n + 1:end + 1])] = end

    def propose(self, generated: Sequence[int], limit: int) -> list[int]:
        """Up to ``min(k, limit)`` tokens to follow ``generated`` (the reply so far): the
        continuation of the longest recent n-gram's latest earlier occurrence, copied on
        through what it proposes (a loop shorter than the draft repeats)."""
        self._extend(generated[len(self.tokens) - self.prompt_len:])
        k, seq = min(self.k, limit), self.tokens
        for n in range(min(self.max_ngram, len(seq)), 0, -1):
            pos = self._index[n].get(tuple(seq[-n:]))
            if pos is not None:
                draft: list[int] = []
                for j in range(pos + 1, pos + 1 + k):
                    draft.append(seq[j] if j < len(seq) else draft[j - len(seq)])
                return draft
        return []



def make_drafter(kind: str | None, prompt: Sequence[int],
                 num_draft_tokens: int = NUM_DRAFT_TOKENS) -> NgramDrafter | None:
    """The drafter named ``kind`` (one of :data:`DRAFTERS`, or None: no drafting) for a reply
    to ``prompt`` (the conversation's token ids)."""
    if kind is None:
        return None
    if kind not in DRAFTERS:
        raise ValueError(f"draft must be one of {DRAFTERS}, got {kind!r}")
    return NgramDrafter(prompt, num_draft_tokens)


class ModelDrafter(BackOff):
    """A draft model's side of a conversation: its KV cache and image features, kept across a
    session's turns (:meth:`start` begins a reply; its first draft prefills only what the cache
    does not hold, by the session's prefix-reuse rule).  Images come by the target's content keys
    (:meth:`add_images`) and go through the drafter's own towers when a prefill first needs them,
    each once (``image_features``, which drafters may share)."""

    def __init__(self, model: DeepseekVL, processor: ChatProcessor, num_draft_tokens: int = NUM_DRAFT_TOKENS,
                 image_features: ImageFeatureCache | None = None):
        super().__init__(num_draft_tokens)
        self.model, self.processor = model, processor
        # (a server's drafters, one per request, share one)
        self.image_features = ImageFeatureCache(IMAGE_CACHE_BYTES) if image_features is None else image_features
        self.encode_calls = 0  # images run through the drafter's towers
        self._sources: dict[str, Any] = {}  # the conversation's images by key, until encoded
        self.cache = model.make_cache()
        self.cached_ids: list[int] = []  # what the cache holds
        self.cached_images: list[str] = []  # the keys of the images among them
        self.start([], [])

    def add_images(self, images: Sequence, keys: Sequence[str]) -> None:
        """The conversation's ``images`` (what the target's processor took) by their ``keys``."""
        self._sources.update(zip(keys, images))

    def start(self, prompt: Sequence[int], keys: Sequence[str], temperature: float = 0.0,
              seed: int | None = None) -> ModelDrafter:
        """Begin a reply to ``prompt`` (ids; ``keys``: its images', in order): counts at zero,
        drafts greedy (``temperature`` 0) or drawn at ``temperature`` (``seed``: their key)."""
        self.restart()
        self.prompt, self.keys, self.temperature = [int(t) for t in prompt], list(keys), float(temperature)
        self._sources = {k: self._sources[k] for k in self.keys if k in self._sources}
        self._key = None if seed is None else mx.random.key((seed + 1) % 2**64)  # not the row's key
        self._synced = False  # the cache is a prefix of this reply's sequence (after a draft)
        self._seq_len = 0  # tokens of the sequence when the last draft began
        self.probs = None
        return self

    def propose(self, generated: Sequence[int], limit: int) -> list[int]:
        """Up to ``min(k, limit)`` tokens to follow the prompt and ``generated``: the tokens the
        cache lacks are fed in one forward, then a draft step per token (evaluated once)."""
        k = min(self.k, limit)
        if k < 1:
            return []
        seq = self.prompt + [int(t) for t in generated]
        logits = self._catch_up(seq)
        tokens, dists = [], []
        for i in range(k):
            y, p = self._draw(logits)
            tokens.append(y)
            dists.append(p)
            if i + 1 < k:
                lm = self.model.language_model
                logits = lm_head(lm, lm.model(y[None], self.cache)[:, -1, :])
        drafts = mx.concatenate(tokens)
        self.probs = None if self.temperature == 0 else mx.concatenate(dists)
        mx.eval(drafts, self.probs, [c.state for c in self.cache])
        draft = drafts.tolist()
        self._seq_len, self.cached_ids = len(seq), seq + draft[:-1]
        return draft

    def record(self, drafted: int, accepted: int) -> None:
        """Count, back off, and roll the cache back to the drafts the target kept."""
        super().record(drafted, accepted)
        keep = self._seq_len + min(accepted, drafted - 1)
        trim_cache(self.cache, keep)
        self.cached_ids = self.cached_ids[:keep]

    def _catch_up(self, seq: list[int]) -> mx.array:
        """Feed what the cache lacks of ``seq``; the last position's logits [1, vocab]."""
        if self._synced:
            keep = min(len(self.cached_ids), len(seq) - 1)
        else:  # a new reply: keep what this prompt shares with the cache (the session's rule)
            layout = self.processor.image_tokens
            keep = reusable_prefix(layout.keyed(self.cached_ids, self.cached_images), layout.keyed(seq, self.keys))
            self._synced, self.cached_images = True, self.keys
        trim_cache(self.cache, keep)
        n = len(self.prompt)
        parts = []
        if keep < n:  # the prompt's tail, images merged
            parts.append(range_embeddings(self.model, self.prompt, keep, n, layout=self.processor.image_tokens,
                                          image_keys=self.keys, features=self._features))
        if len(seq) > max(keep, n):  # the reply's tokens
            parts.append(self.model.get_input_embeddings(mx.array(seq[max(keep, n):])[None])[0])
        embeds = mx.concatenate(parts)
        self.cached_ids = seq
        return prefill(self.model.language_model, mx.array(seq[keep:]), lambda s, e: embeds[s:e], self.cache)

    def _features(self, keys: list[str]) -> list[mx.array]:
        """The drafter's features of the images ``keys``, each image encoded once."""
        def encode(todo: list[str]) -> mx.array:
            pixels = self.processor.image_processor([self._sources[k] for k in todo])
            return self.model.encode_images(mx.array(pixels))

        found = self.image_features.fetch(keys, encode)
        self.encode_calls += found.encoded
        return found.features

    def _draw(self, logits: mx.array) -> tuple[mx.array, mx.array | None]:
        """The next draft token [1] from logits [1, vocab], and for a sampled draft the
        distribution [1, vocab] it was drawn from."""
        if self.temperature == 0:
            return mx.argmax(logits, axis=-1), None
        scores = log_softmax(logits.astype(mx.float32) / self.temperature)  # (MLX's CPU softmax drifts)
        key = None
        if self._key is not None:
            self._key, key = mx.random.split(self._key)
        return mx.random.categorical(scores, key=key), mx.exp(scores)


def draft_mismatch(target: tuple[DeepseekVL, ChatProcessor], draft: tuple[DeepseekVL, ChatProcessor]) -> str | None:
    """What keeps ``draft`` (model, processor) from drafting for ``target`` ("its ..."): a different
    vocabulary (token -> id map, image tag, EOS, BOS, LM-head size) or image-token count; None
    when they pair."""
    (t_model, t_proc), (d_model, d_proc) = target, draft
    t_tok, d_tok = t_proc.tokenizer, d_proc.tokenizer
    facts = {
        "image tag": (t_proc.image_tag, d_proc.image_tag),
        "image tag id": (t_proc.image_tokens.token_id, d_proc.image_tokens.token_id),
        "image tokens per image": (t_proc.image_tokens.per_image, d_proc.image_tokens.per_image),
        "EOS id": (t_tok.eos_token_id, d_tok.eos_token_id),
        "BOS id": (t_tok.bos_token_id, d_tok.bos_token_id),
        "vocabulary size (LM head)": (t_model.language_model.args.vocab_size,
                                      d_model.language_model.args.vocab_size),
    }
    for name, (a, b) in facts.items():
        if a != b:
            return f"its {name} is {b!r} (the target's: {a!r})"
    t_vocab, d_vocab = t_tok.get_vocab(), d_tok.get_vocab()
    if t_vocab != d_vocab:
        differ = sorted({*t_vocab, *d_vocab} - {t for t, i in t_vocab.items() if d_vocab.get(t) == i},
                        key=lambda t: (t_vocab.get(t, d_vocab.get(t)), t))
        return (f"its token -> id map differs ({len(differ)} tokens, first {differ[0]!r}: "
                f"{d_vocab.get(differ[0])}, the target's: {t_vocab.get(differ[0])})")
    return None


def check_drafting(target: tuple[DeepseekVL, ChatProcessor], draft: str | None,
                   draft_model: tuple[DeepseekVL, ChatProcessor] | None, num_draft_tokens: int) -> None:
    """``ValueError`` for a drafting set-up that cannot work: an unknown ``draft``, a bad
    ``num_draft_tokens``, both drafters at once, or a ``draft_model`` of another vocabulary."""
    make_drafter(draft, [], num_draft_tokens)
    if draft is not None and draft_model is not None:
        raise ValueError(f"draft={draft!r} and a draft_model are exclusive: choose one drafter")
    problem = None if draft_model is None else draft_mismatch(target, draft_model)
    if problem is not None:
        raise ValueError(f"the draft model cannot draft for this model: {problem}")
