"""The server's two caches, both bounded in bytes and least-recently-used first out.

- :class:`PrefixCache`: KV caches of token prefixes already run through the LLM (mlx-lm's
  ``LRUPromptCache``: a trie over the tokens, nearest-prefix lookup, trimming, byte budget).
  Its keys are the prompt's token ids with every image position replaced by the image's content
  hash (:meth:`~mlx_dsvl.processing.image_tokens.ImageTokens.keyed`): all images share one
  token id, so ids alone would let a request reuse the KV of another request's different image.
  Two keys agree on a prefix only when their text and their images agree, so a hit gives
  exactly the KV a fresh prefill would.
- :class:`ByteLRU`: aligned image features by content hash (the same pixels always give the
  same features).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Hashable, List, Optional, Tuple

from mlx_lm.models.cache import LRUPromptCache

_MODEL = "model"  # LRUPromptCache keys its trie by model; this server has one


class ByteLRU:
    """A dict bounded in bytes; the least recently used entries leave first."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._items: "OrderedDict[Hashable, Tuple[Any, int]]" = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key) -> bool:
        return key in self._items

    def get(self, key) -> Optional[Any]:
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


class PrefixCache:
    """KV caches by prompt key (see the module docstring); ``max_bytes == 0`` turns it off."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._lru = LRUPromptCache(max_size=1 << 30, max_bytes=max(self.max_bytes, 1))

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def nbytes(self) -> int:
        return self._lru.nbytes

    def fetch(self, key: List[Any]) -> Tuple[Optional[List[Any]], int]:
        """(a private copy of the KV cache of the longest cached prefix of ``key``, its length),
        or (None, 0)."""
        if not self.max_bytes or not key:
            return None, 0
        cache, rest = self._lru.fetch_nearest_cache(_MODEL, key)
        if cache is None:
            return None, 0
        return cache, len(key) - len(rest)

    def store(self, key: List[Any], cache: List[Any]) -> None:
        """Keep ``cache`` (holding exactly ``key``'s tokens); the caller must not change it."""
        if self.max_bytes and key and sum(c.nbytes for c in cache) <= self.max_bytes:
            self._lru.insert_cache(_MODEL, key, cache)
