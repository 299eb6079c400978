"""Drafters for speculative decoding: cheap guesses of a reply's next tokens, which the engine
(:meth:`mlx_dsvl.streaming.Batch.step`) checks in one forward and keeps while the target agrees.

``ngram`` is prompt lookup (llama.cpp's and transformers' idea): the conversation's last ``n``
tokens (``n`` from :data:`MAX_NGRAM` down to 1) are looked up at their latest earlier occurrence
and what followed there is proposed.  A drafter backs off when nothing it drafts is accepted
(it skips a number of steps that doubles each time, up to :data:`MAX_PAUSE`), so that a reply
that never repeats pays for a check only now and then; a step with nothing to propose costs
no forward and no back-off.  No MLX here.
"""

from __future__ import annotations

from collections.abc import Sequence

DRAFTERS = ("ngram",)
NUM_DRAFT_TOKENS = 4  # --num-draft-tokens' default
MAX_NGRAM = 3
MAX_PAUSE = 32  # steps skipped at most after a draft of which nothing was accepted


class NgramDrafter:
    """Prompt-lookup drafting over ``prompt`` and the reply so far, with back-off and counts.

    ``drafted`` / ``accepted``: tokens proposed and tokens the target agreed with."""

    def __init__(self, prompt: Sequence[int], num_draft_tokens: int = NUM_DRAFT_TOKENS,
                 max_ngram: int = MAX_NGRAM):
        if num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
        self.k, self.max_ngram = int(num_draft_tokens), int(max_ngram)
        self.prompt_len = len(prompt)
        self.tokens: list[int] = []
        # n -> the n-gram -> the position of its last token, latest occurrence with a successor
        self._index: list[dict[tuple[int, ...], int]] = [{} for _ in range(self.max_ngram + 1)]
        self._extend(prompt)
        self.drafted = self.accepted = 0
        self._pause = 0  # steps to skip before the next draft
        self._backoff = 1  # the next pause after a draft of which nothing is accepted

    def _extend(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            self.tokens.append(int(t))
            end = len(self.tokens) - 2  # the n-grams ending here now have a successor
            for n in range(1, self.max_ngram + 1):
                if end - n + 1 >= 0:
                    self._index[n][tuple(self.tokens[end - n + 1:end + 1])] = end

    def wants(self) -> bool:
        """Whether to draft at this step (counts down a back-off pause)."""
        if self._pause:
            self._pause -= 1
            return False
        return True

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

    def record(self, drafted: int, accepted: int) -> None:
        """Count a checked draft; back off when none of it was accepted."""
        self.drafted += drafted
        self.accepted += accepted
        if accepted:
            self._backoff = 1
        else:
            self._pause, self._backoff = self._backoff, min(2 * self._backoff, MAX_PAUSE)



def make_drafter(kind: str | None, prompt: Sequence[int],
                 num_draft_tokens: int = NUM_DRAFT_TOKENS) -> NgramDrafter | None:
    """The drafter named ``kind`` (one of :data:`DRAFTERS`, or None: no drafting) for a reply
    to ``prompt`` (the conversation's token ids)."""
    if kind is None:
        return None
    if kind not in DRAFTERS:
        raise ValueError(f"draft must be one of {DRAFTERS}, got {kind!r}")
    return NgramDrafter(prompt, num_draft_tokens)
