"""``ChatSession``: a conversation that never redoes work.

The session keeps the KV cache of everything already run through the LLM (with the token ids it
holds) and the aligned features of every image already seen.  A new turn formats the whole
conversation, finds the longest prefix that the cache already holds, trims the cache to it and
prefills only the rest; only images new to the session go through the vision tower.  Because the
prompt is always the from-scratch prompt, a session produces exactly the tokens a fresh encoding
of the whole conversation would.

When the prompt plus the reply budget would pass ``max_context`` (4096 by default, the training
length), the oldest turns are dropped -- like the reference demo's "max history tokens" -- and
``on_truncate`` (default: a warning on stderr) is told how many.
"""

from __future__ import annotations

import hashlib
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import mlx.core as mx
import numpy as np

from .streaming import DEFAULT_SAMPLING, SAMPLING_RANGES, GenerationChunk, check_sampling, stream_tokens


class PromptTooLongError(ValueError):
    """The newest turn alone does not fit in the context."""


def _warn(message: str) -> None:
    print(f"[mlx-dsvl] {message}", file=sys.stderr)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    a_, b_ = np.asarray(a[:n]), np.asarray(b[:n])
    diff = np.flatnonzero(a_ != b_)
    return int(diff[0]) if diff.size else n


class ChatSession:
    """A multi-turn chat over one model with KV-cache and image-feature reuse.

    >>> chat = ChatSession(model, processor)
    >>> for chunk in chat.send("<image_placeholder>What is this?", images=["cat.png"]):
    ...     print(chunk.text, end="")
    """

    def __init__(self, model, processor, system_prompt: Optional[str] = None,
                 max_context: int = 4096, on_truncate: Optional[Callable[[str], None]] = _warn):
        self.model = model
        self.processor = processor
        self.system_prompt = system_prompt
        self.max_context = int(max_context)
        self.on_truncate = on_truncate
        self.encode_calls = 0  # images run through the vision tower (tests count these)
        self._features: Dict[str, mx.array] = {}  # content hash -> aligned features [I, D]
        self.reset()

    # -- state --------------------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new conversation (image features stay cached: same image, same features)."""
        self.messages: List[dict] = []  # {"role", "content", "images": [hash, ...]}
        self.cache = self.model.make_cache()
        self.cached_ids: List[int] = []

    @property
    def conversation(self) -> List[dict]:
        conv = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        return conv + [{"role": m["role"], "content": m["content"]} for m in self.messages]

    def _trim_cache(self, keep: int) -> None:
        for c in self.cache:
            extra = c.offset - keep
            if extra > 0:
                c.trim(extra)
        self.cached_ids = self.cached_ids[:keep]

    # -- images -------------------------------------------------------------------------------
    def add_images(self, images: Sequence) -> List[str]:
        """Preprocess, hash and (only if unseen) encode images; returns their content keys."""
        if not images:
            return []
        pixels = self.processor.image_processor(list(images))  # [N, 3, S, S] float32
        keys, todo = [], []
        for i, px in enumerate(pixels):
            key = hashlib.sha256(px.tobytes()).hexdigest()
            keys.append(key)
            if key not in self._features and key not in [k for k, _ in todo]:
                todo.append((key, i))
        if todo:
            batch = mx.array(np.stack([pixels[i] for _, i in todo]))
            feats = self.model.encode_images(batch)  # [M, I, D]
            mx.eval(feats)
            self.encode_calls += len(todo)
            for (key, _), f in zip(todo, feats):
                self._features[key] = f
        return keys

    # -- turns --------------------------------------------------------------------------------
    def _prompt_ids(self) -> List[int]:
        return self.processor.tokenize(self.processor.format(self.conversation)).tolist()

    def _fit_context(self, max_tokens: int) -> List[int]:
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

    def send(self, text: str, images: Sequence = (), **sampling) -> Iterator[GenerationChunk]:
        """Add a user turn (``images`` fill its ``<image_placeholder>`` tags) and stream the reply."""
        opts = {**DEFAULT_SAMPLING, **sampling, "start_time": time.perf_counter()}
        check_sampling(**{k: opts[k] for k in SAMPLING_RANGES})
        n_tags = text.count(self.processor.image_tag)
        if n_tags != len(images):
            raise ValueError(
                f"the message has {n_tags} image placeholder(s) {self.processor.image_tag!r} "
                f"but {len(images)} image(s) were given"
            )
        keys = self.add_images(images)
        before = list(self.messages)  # a refused turn leaves the conversation as it was
        self.messages.append({"role": "user", "content": text, "images": keys})
        try:
            ids = self._fit_context(opts["max_tokens"])
        except PromptTooLongError:
            self.messages = before
            raise
        max_tokens = min(opts["max_tokens"], self.max_context - len(ids))
        reply: List[str] = []
        got = False
        try:
            for chunk in self._run(ids, {**opts, "max_tokens": max_tokens}):
                got = True
                reply.append(chunk.text)
                if chunk.finish_reason == "length" and max_tokens < opts["max_tokens"]:
                    chunk.finish_reason = "context"
                    if self.on_truncate:
                        self.on_truncate(
                            f"the reply stopped at the {self.max_context}-token context limit after "
                            f"{chunk.generation_tokens} of {opts['max_tokens']} tokens"
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

    def _add_reply(self, pieces: List[str]) -> None:
        self.messages.append({"role": "assistant", "content": "".join(pieces), "images": []})

    def _run(self, ids: List[int], opts: dict) -> Iterator[GenerationChunk]:
        keep = common_prefix(self.cached_ids, ids)
        keep = min(keep, len(ids) - 1)  # always prefill at least one token
        self._trim_cache(keep)
        keys = [k for m in self.messages for k in m["images"]]
        image_embeds = mx.stack([self._features[k] for k in keys])[None] if keys else None
        full = mx.array(ids)[None]
        embeds = self.model.get_input_embeddings(full, image_embeds=image_embeds)[0, keep:]
        generated: List[int] = []
        try:
            yield from stream_tokens(
                self.model.language_model, self.processor, full[0, keep:], embeds, self.cache,
                generated=generated, **opts,
            )
        finally:
            # The cache now holds the prompt and every generated token that was fed back.
            self.cached_ids = (ids + generated)[: self.cache[0].offset]

    def undo(self) -> None:
        """Remove the last exchange (the cache is trimmed lazily on the next turn)."""
        while self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if self.messages:
            self.messages.pop()
