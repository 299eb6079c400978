"""The caches of the session, the app and the server, and the one rule for reusing a prefix.

Images are keyed by content hash (:func:`image_key`): the same pixels always give the same
features.  All images share one token id, so ids alone would let a prompt reuse the KV of
another prompt's different image; the prefix caches' keys (``ImageTokens.keyed``) put each
image's hash at its positions, so a shared prefix (:func:`reusable_prefix`) gives exactly the
KV a fresh prefill would.  :class:`PrefixCache` is mlx-lm's ``LRUPromptCache`` (a trie with
nearest-prefix lookup and a byte budget).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import LRUPromptCache

IMAGE_CACHE_BYTES = 256 << 20  # the default bound of the image-feature caches
_MODEL = "model"  # LRUPromptCache keys its trie by model; a PrefixCache serves one


def image_key(pixels: np.ndarray) -> str:
    """The content hash of one preprocessed image ``[3, S, S]``: SHA-256 of its pixels."""
    return hashlib.sha256(pixels.tobytes()).hexdigest()


# -- image features ---------------------------------------------------------------------------
class ByteLRU:
    """A dict bounded in bytes; the least recently used entries leave first."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key) -> bool:
        return key in self._items

    def get(self, key) -> Any | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key, value, nbytes: int) -> None:
        if nbytes > self.max_bytes:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.nbytes -= old[1]
        self._items[key] = (value, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes:
            _, (_, n) = self._items.popitem(last=False)
            self.nbytes -= n


class Found(NamedTuple):
    features: list[mx.array]  # one [I, D] per key asked for, in order
    hits: int  # keys answered from the cache (a repeated key counts each time)
    encoded: int  # images run through the vision tower (each new key once)


class ImageFeatureCache:
    """Aligned image features by :func:`image_key`, bounded in bytes (``0``: nothing kept)."""

    def __init__(self, max_bytes: int = IMAGE_CACHE_BYTES):
        self._lru = ByteLRU(max_bytes)

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, key: str) -> bool:
        return key in self._lru

    @property
    def nbytes(self) -> int:
        return self._lru.nbytes

    @property
    def max_bytes(self) -> int:
        return self._lru.max_bytes

    def fetch(self, keys: Sequence[str], encode: Callable[[list[str]], mx.array]) -> Found:
        """Features of ``keys``: the cached ones first (marked recently used), then the others
        from ``encode(missing keys) -> [M, I, D]``, evaluated and cached; all held in the
        answer, so caching one cannot evict another that the caller needs."""
        found = {}
        for k in dict.fromkeys(keys):
            f = self._lru.get(k)
            if f is not None:
                found[k] = f
        hits = sum(k in found for k in keys)
        todo = [k for k in dict.fromkeys(keys) if k not in found]
        if todo:
            feats = encode(todo)
            mx.eval(feats)
            for k, f in zip(todo, feats):
                found[k] = f
                self._lru.put(k, f, f.nbytes)
        return Found([found[k] for k in keys], hits, len(todo))


# -- the prefix-reuse rule --------------------------------------------------------------------
def reusable_prefix(cached: Sequence[Any], key: Sequence[Any]) -> int:
    """How many of ``key``'s first tokens a KV cache holding ``cached`` can give: their shared
    prefix, but never the last token of ``key``, which must be fed for the reply's logits."""
    n = min(len(cached), len(key))
    if list(cached[:n]) != list(key[:n]):
        n = next(i for i in range(n) if cached[i] != key[i])
    return max(min(n, len(key) - 1), 0)


def trim_cache(cache: Sequence[Any], keep: int) -> None:
    """Trim a KV cache (every layer's, plain or quantized) to its first ``keep`` positions."""
    for c in cache:
        if c.offset > keep:
            c.trim(c.offset - keep)


class PrefixCache:
    """KV caches by key (``ImageTokens.keyed``); ``max_bytes == 0`` turns it off."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._lru = LRUPromptCache(max_size=1 << 30, max_bytes=max(self.max_bytes, 1))

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def nbytes(self) -> int:
        return self._lru.nbytes

    def fetch(self, key: list[Any]) -> tuple[list[Any] | None, int]:
        """(a private copy of the KV cache of the nearest cached prefix of ``key``, trimmed to
        :func:`reusable_prefix`, its length), or (None, 0)."""
        if not self.max_bytes or not key:
            return None, 0
        cache, rest = self._lru.fetch_nearest_cache(_MODEL, key)
        if cache is None:
            return None, 0
        held = len(key) - len(rest)
        keep = reusable_prefix(key[:held], key)
        if held > keep:
            for c in cache:
                c.trim(held - keep)
        return cache, keep

    def store(self, key: list[Any], cache: list[Any]) -> None:
        """Keep ``cache`` (holding exactly ``key``'s tokens); the caller must not change it."""
        if self.max_bytes and key and sum(c.nbytes for c in cache) <= self.max_bytes:
            self._lru.insert_cache(_MODEL, key, cache)
