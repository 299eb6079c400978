"""Training batches: length-bucketed order, padding, the mixed prefetched micro-batches, and
the vision feature cache.

With frozen vision towers each image is encoded once. Cache entries are keyed by the image's
SHA-256 and a model key (vision config, weights digest, dtype), so a changed image or model never
reuses stale features; they are the towers' outputs *before* the aligner (the aligner trains),
kept in memory and optionally in ``<folder>/<model key>/<sha[:2]>/<sha>.safetensors``.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..outputs import replace_atomic, save_arrays
from ..utils import file_digest
from .data import IGNORE, DataError, Dataset, Example
from .schedule import ModalityMixer

if TYPE_CHECKING:
    from ..models.deepseek_vl import DeepseekVL
    from ..processing.chat import ChatProcessor


class BatchStream:
    """Endless, deterministic, length-bucketed batches of example indices over one dataset.

    Epoch ``e`` is a pure function of ``(seed, stream, e)``, so ``(epoch, index)`` resumes it
    exactly. Examples are grouped by length class (a factor ``bucket_ratio`` wide) within windows
    of ``bucket_window`` batches, not sorted by exact length: that would group examples by content
    (an answer's length says which answer it is) and bias every step.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, *, stream: int = 0,
                 bucket_window: int = 16, bucket_ratio: float = 1.25):
        if batch_size < 1:
            raise ValueError("batch size must be >= 1")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.buckets = np.floor(np.log(np.maximum(self.lengths, 1)) / np.log(bucket_ratio)).astype(np.int64)
        self.batch_size = int(batch_size)
        self.seed, self.stream, self.window = int(seed), int(stream), int(bucket_window)
        self.epoch, self.index = 0, 0
        self._cache: tuple[int, list[np.ndarray]] = (-1, [])

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        if self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, self.stream, epoch])
        perm = rng.permutation(len(self.lengths))
        span = self.batch_size * max(1, self.window)
        batches = []
        for w in range(0, len(perm), span):
            chunk = perm[w : w + span]
            if self.window > 0:
                chunk = chunk[np.argsort(self.buckets[chunk], kind="stable")]
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        order = rng.permutation(len(batches))
        batches = [batches[i] for i in order]
        self._cache = (epoch, batches)
        return batches

    @property
    def batches_per_epoch(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def next(self) -> np.ndarray:
        batches = self.epoch_batches(self.epoch)
        b = batches[self.index]
        self.index += 1
        if self.index >= len(batches):
            self.epoch, self.index = self.epoch + 1, 0
        return b

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, s: Mapping[str, int]) -> None:
        """A position past its epoch's end (the data shrank since) continues with the next epoch."""
        self.epoch, self.index = int(s["epoch"]), int(s["index"])
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0


@dataclass(kw_only=True)
class Batch:
    """A padded numpy batch. ``input_ids`` [B, T] is right-padded (causal attention hides it).
    The loss is taken only at ``label_pos`` [N], flat indices ``b * T + t - 1`` whose logits predict
    ``label_ids``; ``label_w`` is 0 on padding (N is rounded up to limit recompilation);
    ``label_mm`` marks targets of examples with images.
    """

    input_ids: np.ndarray
    label_pos: np.ndarray
    label_ids: np.ndarray
    label_w: np.ndarray
    label_mm: np.ndarray
    images: list[str]  # flat, in order of the image runs (row by row)
    sources: list[str]
    n_tokens: int  # real (unpadded) tokens
    n_targets: int
    multimodal: int  # examples with images
    text: int  # examples without images


def _round_up(n: int, m: int) -> int:
    return max(m, -(-n // m) * m) if m > 1 else max(n, 1)


def collate(examples: Sequence[Example], pad_id: int, pad_to: int = 32, label_pad_to: int = 16) -> Batch:
    """No examples (a process's empty share, or every image bad) give one padding row that learns nothing."""
    B = max(1, len(examples))
    T = _round_up(max((e.length for e in examples), default=1), pad_to)
    ids = np.full((B, T), pad_id, dtype=np.int32)
    pos, tgt, mm = [], [], []
    images: list[str] = []
    for b, e in enumerate(examples):
        ids[b, : e.length] = e.ids
        t = np.flatnonzero(e.labels != IGNORE)
        t = t[t > 0]
        pos.append(b * T + t - 1)
        tgt.append(e.labels[t])
        mm.append(np.full(t.shape, float(e.has_images), np.float32))
        images += e.images
    pos = np.concatenate(pos or [np.zeros(0, np.int64)]).astype(np.int32)
    n = pos.shape[0]
    N = _round_up(n, label_pad_to)
    label_pos = np.zeros((N,), np.int32)
    label_ids = np.zeros((N,), np.int32)
    label_w = np.zeros((N,), np.float32)
    label_mm = np.zeros((N,), np.float32)
    if n:
        label_pos[:n], label_ids[:n], label_w[:n], label_mm[:n] = pos, np.concatenate(tgt), 1.0, np.concatenate(mm)
    return Batch(
        input_ids=ids, label_pos=label_pos, label_ids=label_ids, label_w=label_w, label_mm=label_mm,
        images=images, sources=[e.source for e in examples], n_tokens=sum(e.length for e in examples), n_targets=n,
        multimodal=sum(e.has_images for e in examples), text=sum(not e.has_images for e in examples),
    )


@dataclass(kw_only=True)
class Prepared:
    batch: Batch
    is_text_stream: bool
    pixels: np.ndarray | None = None  # [M, 3, S, S]; when caching, of the images in ``uncached`` only
    digests: list[str] | None = None  # cache keys when caching
    skipped: list[str] = field(default_factory=list)
    streams_after: dict[str, dict[str, int]] = field(default_factory=dict)
    micro: int = 0  # global micro-batch index
    inputs: tuple | None = None  # the loss's array arguments, made on the main thread
    uncached: list[int] = field(default_factory=list)  # images not in the cache when prepared


class BatchProducer:
    """Deterministic micro-batches, images decoded by a prefetch thread. ``skip_bad`` drops an
    example with a bad image without moving the streams, so all processes stay on the same batches;
    :meth:`next` makes the MLX inputs on the calling thread (MLX streams are per thread)."""

    def __init__(self, *, main: Dataset, main_stream: BatchStream, text: Dataset | None,
                 text_stream: BatchStream | None, mixer: ModalityMixer | None, processor: ChatProcessor,
                 grad_accum: int, pad_to: int, skip_bad: bool, cache: VisionFeatureCache | None,
                 model: DeepseekVL | None = None, start_step: int = 0, prefetch: int = 2,
                 shard: Callable[[np.ndarray], np.ndarray] = lambda b: b):
        self.model, self.shard = model, shard
        self.main, self.main_stream = main, main_stream
        self.text, self.text_stream = text, text_stream
        self.mixer, self.processor = mixer, processor
        self.grad_accum, self.pad_to, self.skip_bad, self.cache = grad_accum, pad_to, skip_bad, cache
        self.micro = start_step * grad_accum
        self.prefetch = prefetch
        self._q: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def streams_state(self) -> dict[str, dict[str, int]]:
        s = {"main": self.main_stream.state()}
        if self.text_stream is not None:
            s["text"] = self.text_stream.state()
        return s

    def _make(self) -> Prepared:
        step, k = divmod(self.micro, self.grad_accum)
        use_text = self.mixer is not None and self.text_stream is not None and self.mixer.is_text(step, k)
        ds, stream = (self.text, self.text_stream) if use_text else (self.main, self.main_stream)
        examples = [ds[i] for i in self.shard(stream.next())]
        skipped: list[str] = []
        pixels, digests, uncached = None, None, []
        while True:
            paths = [p for e in examples for p in e.images]
            try:
                if paths and self.cache is not None:  # the images still to encode are decoded here too
                    digests = [self.cache.digest(p) for p in paths]
                    uncached = [i for i, d in enumerate(digests) if not self.cache.has(d)]
                    pixels = self.processor.image_processor([paths[i] for i in uncached]) if uncached else None
                elif paths:
                    pixels = self.processor.image_processor(paths)
                break
            except (ValueError, OSError) as e:  # ImageLoadError is a ValueError
                bad = next((x for x in paths if str(x) in str(e)), None)
                if not self.skip_bad or bad is None:
                    src = next((ex.source for ex in examples if bad in ex.images), "")
                    raise DataError(f"{src}: {e}" if src else str(e)) from None
                skipped.append(f"{bad}: {e}")
                examples = [ex for ex in examples if bad not in ex.images]
        batch = collate(examples, self.processor.pad_id, self.pad_to)
        prep = Prepared(batch=batch, is_text_stream=use_text, pixels=pixels, digests=digests, skipped=skipped,
                        streams_after=self.streams_state(), micro=self.micro, uncached=uncached)
        self.micro += 1
        return prep

    def _worker(self):
        try:
            while not self._stop.is_set():
                item = self._make()
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # hand the error to the consumer
            self._q.put(e)

    def _take(self) -> Prepared:
        if self.prefetch <= 0:
            return self._make()
        if self._thread is None:
            self._q = queue.Queue(maxsize=self.prefetch)
            self._thread = threading.Thread(target=self._worker, daemon=True)
            self._thread.start()
        item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def next(self) -> Prepared:
        """The next micro-batch, with ``inputs`` set."""
        prep = self._take()
        prep.inputs = loss_inputs(prep.batch, vision_input(prep, self.model, self.cache, self.processor))
        return prep

    def close(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def vision_input(prep: Prepared, model: DeepseekVL, cache: VisionFeatureCache | None, processor: ChatProcessor):
    """The ``vis`` argument of the loss: pixels, cached features or None."""
    b = prep.batch
    if not b.images:
        return None
    if cache is not None:
        ready = dict(zip(prep.uncached, prep.pixels)) if prep.pixels is not None else {}

        def pixels_for(idx):  # decoded while the batch was prepared, unless evicted since
            if all(i in ready for i in idx):
                return np.stack([ready[i] for i in idx])
            return processor.image_processor([b.images[i] for i in idx])

        return cache.features(model, b.images, prep.digests, pixels_for)
    return mx.array(prep.pixels)


def loss_inputs(b: Batch, vis) -> tuple:
    """The loss's arguments after the model: ``(input_ids, vis, label_pos, label_ids, label_w, label_mm)``."""
    return (mx.array(b.input_ids), vis, mx.array(b.label_pos), mx.array(b.label_ids), mx.array(b.label_w),
            mx.array(b.label_mm))


# -- the vision feature cache ---------------------------------------------------------------------


Features = tuple[mx.array, ...]  # (features,) or (high, low) for the hybrid tower


def vision_model_key(model: DeepseekVL) -> str:
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

    def features(self, model: DeepseekVL, paths: Sequence[str], digests: Sequence[str], pixels_for) -> Features:
        """Stacked ``[M, 576, C]`` features; ``pixels_for(indices)`` gives the misses' pixels."""
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
