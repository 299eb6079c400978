"""The decode batch's KV cache with its keys and values stored quantized (``--kv-bits``).

mlx-lm 0.32 has a left-padded batch cache (``BatchKVCache``, float) and a quantized cache of one
sequence (``QuantizedKVCache``), but no batch cache that is quantized: its own server stops
batching when ``--kv-bits`` is set.  :class:`BatchQuantizedKVCache` is ``BatchKVCache``'s
bookkeeping (left padding, per-row offsets; rows filtered out, joined, extracted, trimmed, a
row's right padding rolled into its left padding: speculative decoding's per-row roll-back) over
``QuantizedKVCache``'s storage: keys and values are each a tuple (packed ``uint32``
[B, H, S, D*bits/32], scales and biases [B, H, S, D/group]).  Because it has ``bits``, mlx-lm's
attention runs a decode step on it with ``mx.quantized_matmul``, as ``generate_step`` does on a
``QuantizedKVCache``; padding is all zeros (it dequantizes to 0) and masked anyway.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, QuantizedKVCache, dynamic_roll

Packed = tuple[mx.array, mx.array, mx.array]  # (packed, scales, biases)


class BatchQuantizedKVCache(BatchKVCache):
    def __init__(self, left_padding: list[int], group_size: int = 64, bits: int = 8):
        super().__init__(left_padding)
        self.group_size, self.bits = group_size, bits

    def _zeros(self, like: mx.array, B: int, steps: int) -> Packed:
        D = like.shape[-1]
        return (mx.zeros((B, like.shape[1], steps, D * self.bits // 32), mx.uint32),
                mx.zeros((B, like.shape[1], steps, D // self.group_size), like.dtype),
                mx.zeros((B, like.shape[1], steps, D // self.group_size), like.dtype))

    def _map(self, fn: Callable[[mx.array], mx.array]) -> None:
        if self.keys is not None:
            self.keys, self.values = (tuple(fn(a) for a in t) for t in (self.keys, self.values))

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        prev, n = self._idx, keys.shape[2]
        if self.keys is None or prev + n > self.keys[0].shape[2]:
            steps = (self.step + n - 1) // self.step * self.step
            fresh = [self._zeros(x, keys.shape[0], steps) for x in (keys, values)]
            if self.keys is None:
                self.keys, self.values = fresh
            else:
                self.keys, self.values = (
                    tuple(mx.concatenate([a[..., :prev, :], z], axis=2) for a, z in zip(old, new))
                    for old, new in zip((self.keys, self.values), fresh))
        self.offset = self.offset + n
        self._idx += n
        for store, x in ((self.keys, keys), (self.values, values)):
            for a, q in zip(store, mx.quantize(x, group_size=self.group_size, bits=self.bits)):
                a[..., prev:self._idx, :] = q
        return self.keys_and_values()

    def keys_and_values(self):
        return tuple(tuple(a[..., :self._idx, :] for a in t) for t in (self.keys, self.values))

    def finalize(self) -> None:
        """Move each row's right padding (``prepare(right_padding=)``) into its left padding:
        its packed keys and values rolled right, as ``BatchKVCache.finalize`` rolls floats."""
        if self._right_padding is not None:
            shifts = self._right_padding[:, None]
            self._map(lambda a: dynamic_roll(a, shifts, axis=2))
            self.offset = self.offset - self._right_padding
            self.left_padding = self.left_padding + self._right_padding
            self._right_padding = None

    def filter(self, batch_indices) -> None:
        self._map(lambda a: a[batch_indices])
        self.offset = self.offset[batch_indices]
        self.left_padding = self.left_padding[batch_indices]
        shift = min(self.left_padding.tolist())  # padding every row has: drop it
        if shift > 0:
            self._map(lambda a: a[..., shift:, :])
            self._idx -= shift
            self.left_padding -= shift

    def extend(self, other: BatchQuantizedKVCache) -> None:
        """Append ``other``'s rows, both right-aligned at the longer one's end."""
        caches = [c for c in (self, other) if c.keys is not None]
        if caches:
            idx = max(self._idx, other._idx)
            size = max(c.keys[0].shape[2] for c in caches)
            parts = [self._aligned(c, caches[0], idx, size) for c in (self, other)]
            self.keys, self.values = (tuple(mx.concatenate(z) for z in zip(*kv))
                                      for kv in zip(*(p[0] for p in parts)))
            self.left_padding = mx.concatenate([p[1] for p in parts])
            self._idx = idx
        else:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
        self.offset = mx.concatenate([self.offset, other.offset])

    def _aligned(self, c, like, idx: int, size: int):
        """(c's (keys, values) padded to [.., size, ..] with its last token at ``idx``, its left
        padding)."""
        rows = c.offset.shape[0]
        if c.keys is None:
            kv = tuple(self._zeros_like(t, rows) for t in (like.keys, like.values))
        else:
            kv = (c.keys, c.values)
        left = idx - c._idx
        right = size - kv[0][0].shape[2] - left

        def pad(a):
            if right < 0:
                a = a[..., :right, :]
            return mx.pad(a, [(0, 0), (0, 0), (left, max(right, 0)), (0, 0)]) if left or right > 0 else a

        return tuple(tuple(pad(a) for a in t) for t in kv), c.left_padding + left

    @staticmethod
    def _zeros_like(t: Packed, rows: int) -> Packed:
        return tuple(mx.zeros((rows, a.shape[1], 0, a.shape[3]), a.dtype) for a in t)

    def extract(self, idx: int) -> QuantizedKVCache:
        """Row ``idx`` as a cache of one sequence (a copy, without its padding)."""
        cache = QuantizedKVCache(group_size=self.group_size, bits=self.bits)
        pad = self.left_padding.tolist()[idx]
        cache.keys, cache.values = (tuple(mx.contiguous(a[idx:idx + 1, :, pad:self._idx]) for a in t)
                                    for t in (self.keys, self.values))
        cache.offset = self._idx - pad
        return cache

    @classmethod
    def merge(cls, caches: list[QuantizedKVCache]) -> BatchQuantizedKVCache:
        """Quantized caches of one sequence each -> one batch cache, left-padded."""
        lengths = [c.offset for c in caches]
        longest = max(lengths)
        out = cls([longest - n for n in lengths], caches[0].group_size, caches[0].bits)
        full = [c for c in caches if c.keys is not None and c.offset]
        if not full:
            return out
        keys, values = ([mx.zeros((len(caches), a.shape[1], longest, a.shape[3]), a.dtype) for a in t]
                        for t in (full[0].keys, full[0].values))
        for i, c in enumerate(caches):
            if c.keys is not None and c.offset:
                for store, t in ((keys, c.keys), (values, c.values)):
                    for a, b in zip(store, t):
                        a[i:i + 1, :, longest - c.offset:] = b[..., :c.offset, :]
        out.keys, out.values = tuple(keys), tuple(values)
        out.offset += longest
        out._idx = longest
        return out

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(a.nbytes for t in (self.keys, self.values) for a in t)


def merge_row(cache: list, kv: dict | None) -> list[BatchKVCache]:
    """A request's per-layer KV cache as a batch of one: quantized when ``kv`` (the server's
    :func:`~mlx_dsvl.streaming.kv_cache_options`) says so, else mlx-lm's float ``BatchKVCache``."""
    kind = BatchKVCache if kv is None else BatchQuantizedKVCache
    return [kind.merge([c]) for c in cache]
