"""One worker thread owns the model and decodes every active request in one batch.

Each loop drops cancelled requests (their slot is free at once), admits waiting ones (the
longest cached prefix reused, only the images overlapping the rest encoded, the rest prefilled as
a session's), runs one decode step for the batch, and sends each finished row's KV cache to the
prefix cache for the follow-up request. Rows are computed as if alone (left padding masked,
positions from each row's first token), so a greedy reply does not depend on the batch. With a
drafter (``draft``, ``draft_model``), requests are decoded speculatively inside the batch (``Batch.step``:
one forward of every row's token and drafts, each row's cache rolled back to what it kept). An error
in a batch step fails that step's requests and the worker goes on.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

from ..caches import ImageFeatureCache, PrefixCache
from ..drafting import NUM_DRAFT_TOKENS, BackOff, ModelDrafter, check_drafting, make_drafter
from ..grammar import Grammar
from ..streaming import Batch, Output, Row, prefill, range_embeddings, token_bytes
from .metrics import EngineMetrics
from .schema import SamplingParams, token_logprob, usage_body

if TYPE_CHECKING:
    from ..models.deepseek_vl import DeepseekVL
    from ..processing.chat import ChatProcessor


# -- what flows between the HTTP side and the worker ------------------------------------------
@dataclass(eq=False)
class Job:
    id: str
    ids: list[int]  # the whole prompt
    image_keys: list[str]  # content hash of each image, in prompt order
    pixels: dict[str, np.ndarray]  # content hash -> [3, S, S] float32
    sampling: SamplingParams  # max_tokens already within the context
    emit: Callable[[Any], None]  # thread-safe sink for the events below
    grammar: Grammar | None = None  # the response format's, compiled (structured output)
    pictures: dict[str, Any] | None = None  # content hash -> the decoded image (for a draft model)
    submitted: float = field(default_factory=time.monotonic)  # handed to the scheduler


@dataclass
class Started:
    cached_tokens: int  # prompt tokens taken from the prefix cache


@dataclass
class Delta:
    text: str
    logprobs: list[dict] = field(default_factory=list)  # entries of OpenAI's logprobs.content


@dataclass
class Finished:
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    drafted_tokens: int = 0  # speculative decoding (--draft): tokens drafted for the reply
    accepted_tokens: int = 0  # and those of them kept

    def usage(self) -> dict:
        """OpenAI's usage object of this reply."""
        return usage_body(self.prompt_tokens, self.completion_tokens, self.cached_tokens,
                          drafted=self.drafted_tokens, accepted=self.accepted_tokens)


@dataclass
class Failed:
    status: int
    message: str


class Busy(Exception):
    """Too many requests are waiting already."""


@dataclass
class Slot:
    """What the scheduler keeps of an admitted request (a decode row's ``tag``)."""

    job: Job
    key: list[Any]  # the prompt's ids, its images named (ImageTokens.keyed)
    cached: int  # prompt tokens taken from the prefix cache
    last: float | None = None  # when its last token came out (time.monotonic)


class Scheduler:
    """Batched decoding of concurrent requests over one model, on one worker thread."""

    def __init__(self, model: DeepseekVL, processor: ChatProcessor, max_batch: int = 8, max_queue: int = 64,
                 cache_bytes: int = 1 << 30, image_cache_bytes: int = 256 << 20,
                 device: mx.Device | None = None,
                 kv: dict | None = None, draft: str | None = None, num_draft_tokens: int = NUM_DRAFT_TOKENS,
                 draft_model: tuple[DeepseekVL, ChatProcessor] | None = None):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        check_drafting((model, processor), draft, draft_model, num_draft_tokens)
        # speculative decoding inside the batch: each request's own drafter (prompt lookup, or a
        # ModelDrafter of draft_model, its image features shared by the requests')
        self.draft, self.num_draft_tokens, self.draft_model = draft, num_draft_tokens, draft_model
        self.draft_features = ImageFeatureCache(image_cache_bytes) if draft_model is not None else None
        self.model, self.processor = model, processor
        self.lm = model.language_model
        self.max_batch, self.max_queue = max_batch, max_queue
        self.kv = kv  # KV-cache quantization (streaming.kv_cache_options), None = float
        self.device = device or mx.default_device()
        self.prefixes = PrefixCache(cache_bytes)
        self.features = ImageFeatureCache(image_cache_bytes)
        self.eos = processor.tokenizer.eos_token_id
        self.image_tokens = processor.image_tokens
        self.batch = Batch(self.lm, self.eos, kv, on_finish=self._store_reply)
        self._inbox: queue.Queue[Job] = queue.Queue()
        self._waiting: deque[Job] = deque()
        self._lock = threading.Lock()
        self._live: set = set()  # submitted and not finished
        self._cancelled: set = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.counters = dict(requests=0, finished=0, cancelled=0, failed=0, prompt_tokens=0,
                             prefilled_tokens=0, cached_tokens=0, generated_tokens=0,
                             images_encoded=0, image_cache_hits=0, decode_steps=0, peak_batch=0,
                             drafted_tokens=0, accepted_tokens=0)
        self.metrics = EngineMetrics()  # GET /metrics' timings and cache use

    # -- the HTTP side --------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._lock:
            if len(self._live) >= self.max_batch + self.max_queue:
                raise Busy(f"{len(self._live)} requests are in progress or waiting; try again later")
            self._live.add(job.id)
        self._inbox.put(job)

    def cancel(self, job_id: str) -> None:
        """Free the request's slot (its client went away); harmless once it has finished."""
        with self._lock:
            if job_id in self._live:
                self._cancelled.add(job_id)

    def load(self) -> tuple[int, int]:
        """(requests decoding now, requests waiting for a slot)."""
        with self._lock:
            live = len(self._live)
        active = len(self.batch.rows)
        return active, max(live - active, 0)

    def stats(self) -> dict:
        active, waiting = self.load()
        return {**self.counters, "active": active, "waiting": waiting,
                "max_batch": self.max_batch, "kv_bits": self.kv and self.kv["kv_bits"],
                "prefix_cache": {"entries": len(self.prefixes), "bytes": self.prefixes.nbytes,
                                 "max_bytes": self.prefixes.max_bytes},
                "image_cache": {"entries": len(self.features), "bytes": self.features.nbytes,
                                "max_bytes": self.features.max_bytes}}

    def start(self) -> None:
        """The worker on a thread of its own (tests, embedding); the CLI calls :meth:`run` instead."""
        def main():
            mx.set_default_stream(mx.new_stream(self.device))  # streams are per thread
            self.run()

        self._thread = threading.Thread(target=main, name="mlx-dsvl-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # -- the worker -----------------------------------------------------------------------------
    def run(self) -> None:
        """The worker loop, until :meth:`stop`."""
        mx.set_default_device(self.device)
        try:
            while not self._stop.is_set():
                self._once()
        finally:  # stopped or interrupted: end every request still here, none waits forever
            self._waiting.extend(self._take_inbox())
            self._fail([r.tag.job for r in self.batch.rows] + list(self._waiting), 503,
                       "the server is shutting down")
            self._waiting.clear()

    def _once(self) -> None:
        """Cancellations, admissions, one decode step."""
        if not self.batch.rows and not self._waiting:  # idle: wait for work
            try:
                self._waiting.append(self._inbox.get(timeout=0.2))
            except queue.Empty:
                return
        self._waiting.extend(self._take_inbox())
        self._drop_cancelled()
        while self._waiting and len(self.batch.rows) < self.max_batch:
            self._admit(self._waiting.popleft())
            self._drop_cancelled()
        if self.batch.rows:
            self._step()

    def _take_inbox(self) -> list[Job]:
        jobs = []
        while True:
            try:
                jobs.append(self._inbox.get_nowait())
            except queue.Empty:
                return jobs

    def _fail(self, jobs: list[Job], status: int, message: str) -> None:
        for job in jobs:
            self._emit(job, Failed(status, message))
            self._forget(job, "failed")
        gone = {job.id for job in jobs}
        self.batch.remove([r for r in self.batch.rows if r.tag.job.id in gone])

    def _emit(self, job: Job, event) -> bool:
        try:
            job.emit(event)
            return True
        except Exception:  # the client's side is gone (event loop closed)
            self.cancel(job.id)
            return False

    def _forget(self, job: Job, counter: str) -> None:
        self.counters[counter] += 1
        with self._lock:
            self._live.discard(job.id)
            self._cancelled.discard(job.id)

    def _drop_cancelled(self) -> None:
        with self._lock:
            gone = set(self._cancelled)
        if not gone:
            return
        for job in [j for j in self._waiting if j.id in gone]:
            self._waiting.remove(job)
            self._forget(job, "cancelled")
        drop = [r for r in self.batch.rows if r.tag.job.id in gone]
        for r in drop:
            self._forget(r.tag.job, "cancelled")
        self.batch.remove(drop)

    # -- admission: prefix cache, images, prefill -----------------------------------------------
    def _admit(self, job: Job) -> None:
        try:
            self._prefill(job)
        except Exception as e:  # this request only; the batch goes on
            print(f"[mlx-dsvl server] request {job.id} failed in prefill: {e!r}", file=sys.stderr)
            self._fail([job], 500, f"prefill failed: {type(e).__name__}: {e}")
            return
        self.counters["peak_batch"] = max(self.counters["peak_batch"], len(self.batch.rows))
        self._emit(job, Started(self.batch.rows[-1].tag.cached))

    def new_cache(self) -> list[Any]:
        """A request's KV cache: float; with ``kv`` the prefill quantizes it as it fills."""
        return self.model.make_cache()

    def _prefill(self, job: Job) -> None:
        """Prefill after the longest cached prefix; the request joins the batch with its first token."""
        ids, s = job.ids, job.sampling
        key = self.image_tokens.keyed(ids, job.image_keys)
        kv, cached = self.prefixes.fetch(key)  # never the last token: it gives the first logits
        if kv is None:
            kv, cached = self.new_cache(), 0
        self._count_cache_use(job, cached)
        logits = prefill(self.lm, mx.array(ids[cached:]),
                         lambda a, b: self.embeddings(job, cached + a, cached + b)[1][0], kv, self.kv)
        mx.eval(logits, [c.state for c in kv])
        self.prefixes.store(key, kv)
        self.counters["requests"] += 1
        self.counters["prompt_tokens"] += len(ids)
        self.counters["prefilled_tokens"] += len(ids) - cached
        self.counters["cached_tokens"] += cached
        row = Row.start(self.processor, s, ids, stops=s.stop, ignore_eos=s.ignore_eos,
                        tag=Slot(job, key, cached), grammar=job.grammar, logprobs=s.top_logprobs,
                        drafter=self._drafter(job))
        self.batch.add(row, kv, logits)

    def _drafter(self, job: Job) -> BackOff | None:
        """The request's drafter: prompt lookup over its prompt, or the draft model begun on it."""
        if self.draft_model is None:
            return make_drafter(self.draft, job.ids, self.num_draft_tokens)
        drafter = ModelDrafter(*self.draft_model, num_draft_tokens=self.num_draft_tokens,
                               image_features=self.draft_features)
        drafter.add_images([job.pictures[k] for k in job.image_keys], job.image_keys)
        return drafter.start(job.ids, job.image_keys, job.sampling.temperature, job.sampling.seed)

    def _count_cache_use(self, job: Job, cached: int) -> None:
        """A prefix reused or not; each image the prefill will read, found encoded or not (once
        per request, however many passes read it)."""
        self.metrics.cache_use("prefix", hits=int(cached > 0), misses=int(cached == 0))
        span = self.image_tokens.overlap(job.ids, cached, len(job.ids), len(job.image_keys))
        needed = set(job.image_keys[span.first:span.stop])
        held = sum(k in self.features for k in needed)
        self.metrics.cache_use("image", hits=held, misses=len(needed) - held)

    def embeddings(self, job: Job, start: int, end: int):
        """(tokens [1, L], embeds [1, L, D]) of prompt positions ``start:end``."""
        embeds = range_embeddings(self.model, job.ids, start, end, layout=self.image_tokens,
                                  image_keys=job.image_keys, features=lambda ks: self._image_features(job, ks))
        return mx.array(job.ids[start:end])[None], embeds[None]

    def _image_features(self, job: Job, keys: list[str]) -> list[mx.array]:
        """Features of each image in ``keys``, the misses encoded together (caching one cannot evict another)."""
        found = self.features.fetch(keys, lambda todo: self.model.encode_images(
            mx.array(np.stack([job.pixels[k] for k in todo]))))
        self.counters["image_cache_hits"] += found.hits
        self.counters["images_encoded"] += found.encoded
        return found.features

    # -- decoding -------------------------------------------------------------------------------
    def _step(self) -> None:
        rows = list(self.batch.rows)
        try:
            outs = self.batch.step()
        except Exception as e:
            print(f"[mlx-dsvl server] decode step failed: {e!r}", file=sys.stderr)
            self._fail([r.tag.job for r in rows], 500, f"decoding failed: {type(e).__name__}: {e}")
            return
        self.counters["decode_steps"] += 1
        self.metrics.rows.observe(len(rows))
        self.counters["generated_tokens"] += len(outs)
        for out in outs:
            self._deliver(out)

    def _deliver(self, out: Output) -> None:
        slot, text = out.row.tag, out.text + out.tail
        if out.finish_reason == "error":  # its grammar failed: this request only
            print(f"[mlx-dsvl server] request {slot.job.id} failed: {out.row.error}", file=sys.stderr)
            self._fail([slot.job], 500, f"structured output failed: {out.row.error}")
            return
        slot.last = self.metrics.token(slot.job.submitted, slot.last)
        logprobs = [] if out.logprobs is None else [
            token_logprob(out.logprobs, lambda t: token_bytes(out.row.detok, t))]
        if text or logprobs:
            self._emit(slot.job, Delta(text, logprobs))
        if out.finish_reason is not None:
            drafter = out.row.drafter
            drafted, accepted = (drafter.drafted, drafter.accepted) if drafter else (0, 0)
            self.counters["drafted_tokens"] += drafted
            self.counters["accepted_tokens"] += accepted
            self._emit(slot.job, Finished(out.finish_reason, len(slot.job.ids), len(out.row.generated),
                                          slot.cached, drafted, accepted))
            self._forget(slot.job, "finished")

    def _store_reply(self, row: Row, kv: list[Any]) -> None:
        """A finished row's KV cache (prompt and reply) to the prefix cache, for the follow-up request."""
        if self.prefixes.max_bytes:
            mx.eval([c.state for c in kv])  # a copy now: a lazy slice would hold the whole batch
            self.prefixes.store((row.tag.key + row.generated)[:kv[0].offset], kv)
