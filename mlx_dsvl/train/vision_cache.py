"""``cache_vision_features``: encode each image once while the vision towers are frozen.

Keyed by the image file's SHA-256 and by a model key (architecture, vision weights digest,
dtype and image size), so a changed image, another model or another dtype never reuses stale
features.  Features are the towers' outputs *before* the aligner (the aligner trains); they
live in memory (up to a budget) and, when a folder is given, on disk as safetensors files
``<folder>/<model key>/<sha[:2]>/<sha>.safetensors`` that later runs reuse.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..outputs import replace_atomic, save_arrays
from ..utils import file_digest

Features = tuple[mx.array, ...]  # (features,) or (high, low) for the hybrid tower


def vision_model_key(model) -> str:
    """Digest of everything that determines the tower outputs for given pixels."""
    h = hashlib.sha256()
    h.update(repr(model.config.vision).encode())
    h.update(str(model._dtype).encode())
    for name, v in sorted(tree_flatten(model.vision_model.parameters()), key=lambda kv: kv[0]):
        v32 = v.astype(mx.float32)
        s = mx.stack([mx.sum(v32), mx.sum(mx.abs(v32)), mx.sum(v32 * v32)])
        h.update(f"{name}{tuple(v.shape)}{[f'{x:.6e}' for x in s.tolist()]}".encode())
    return h.hexdigest()[:20]


def _copy(x: mx.array) -> mx.array:
    """A copy with its own buffer (a slice would keep the whole batch alive)."""
    if x.dtype == mx.bfloat16:
        return mx.array(np.asarray(x.astype(mx.float32))).astype(mx.bfloat16)
    return mx.array(np.asarray(x))


def as_tuple(features) -> Features:
    return tuple(features) if isinstance(features, (tuple, list)) else (features,)


class VisionFeatureCache:
    def __init__(self, model_key: str, folder: str | os.PathLike | None = None,
                 mem_bytes: int = 2 << 30):
        self.model_key = model_key
        self.folder = Path(folder) / model_key if folder else None
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)
        self.mem_bytes = int(mem_bytes)
        self._mem: OrderedDict[str, Features] = OrderedDict()
        self._mem_used = 0
        self._digests: dict[tuple[str, int, int], str] = {}
        self.hits = self.misses = 0

    # -- keys -------------------------------------------------------------------------------
    def digest(self, path: str) -> str:
        st = os.stat(path)
        k = (path, st.st_size, st.st_mtime_ns)
        d = self._digests.get(k)
        if d is None:
            d = self._digests[k] = file_digest(path)
        return d

    def _file(self, digest: str) -> Path | None:
        return self.folder / digest[:2] / f"{digest}.safetensors" if self.folder else None

    # -- get / put --------------------------------------------------------------------------
    def has(self, digest: str) -> bool:
        """Whether features of ``digest`` are kept (callable from another thread)."""
        f = self._file(digest)
        return digest in self._mem or bool(f and f.is_file())

    def get(self, digest: str) -> Features | None:
        feats = self._mem.get(digest)
        if feats is not None:
            self._mem.move_to_end(digest)
            self.hits += 1
            return feats
        f = self._file(digest)
        if f and f.is_file():
            try:
                data = mx.load(str(f))
                feats = tuple(data[f"f{i}"] for i in range(len(data)))
            except Exception:
                return None  # unreadable cache entry: recompute
            self._remember(digest, feats)
            self.hits += 1
            return feats
        return None

    def put(self, digest: str, feats: Features) -> None:
        self.misses += 1
        self._remember(digest, feats)
        f = self._file(digest)
        if f and not f.exists():
            f.parent.mkdir(parents=True, exist_ok=True)
            try:
                replace_atomic(f, lambda tmp: save_arrays(tmp, {f"f{i}": x for i, x in enumerate(feats)}),
                               durable=False)  # a lost entry is recomputed
            except OSError as e:
                raise OSError(f"cannot write to the vision feature cache {self.folder}: "
                              f"{e.strerror or e}") from None

    def _remember(self, digest: str, feats: Features) -> None:
        size = sum(x.nbytes for x in feats)
        if size > self.mem_bytes:
            return
        self._mem[digest] = feats
        self._mem_used += size
        while self._mem_used > self.mem_bytes:
            _, old = self._mem.popitem(last=False)
            self._mem_used -= sum(x.nbytes for x in old)

    def features(self, model, paths: Sequence[str], digests: Sequence[str], pixels_for) -> Features:
        """Stacked features for ``paths`` (``[M, 576, C]`` each), encoding the misses once.

        ``pixels_for(indices)`` returns the ``[K, 3, S, S]`` pixels of the missing images.
        """
        got = [self.get(d) for d in digests]
        miss = [i for i, g in enumerate(got) if g is None]
        if miss:
            px = pixels_for(miss)
            enc = as_tuple(model.vision_features(mx.array(px)))
            mx.eval(enc)
            for j, i in enumerate(miss):
                one = tuple(_copy(x[j]) for x in enc)
                self.put(digests[i], one)
                got[i] = one
        n = len(got[0])
        return tuple(mx.stack([g[k] for g in got]) for k in range(n))
