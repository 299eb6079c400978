"""``GET /metrics``: the server's counts and timings in Prometheus' text format (prometheus-client).

The worker observes its timings as tokens come out and each request's use of the caches as it is
admitted (:class:`EngineMetrics`); :class:`SchedulerCollector` reads those, the scheduler's
counters (the ones ``/stats`` shows), its load and the caches' sizes when scraped. Each app has a
registry of its own, with its count of responses by endpoint and status (:class:`CountResponses`),
so several servers in one process keep apart.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from .scheduler import Scheduler

PREFIX = "mlx_dsvl"
# from a small model on a GPU (tens of ms) to a 7B reading images on a CPU (tens of seconds)
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0)
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
OTHER = "other"  # the endpoint label of paths the app does not serve (one series, whatever the path)


class EngineMetrics:
    """What the worker observes (thread-safe), exposed by each app serving its scheduler."""

    def __init__(self):
        self.first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds", "From a request's hand-over to the scheduler "
            "(queue, prefill) to its first token", buckets=TTFT_BUCKETS, registry=None)
        self.per_token = Histogram(
            f"{PREFIX}_time_per_output_token_seconds", "Between a reply's consecutive tokens",
            buckets=TOKEN_BUCKETS, registry=None)
        self.rows = Histogram(f"{PREFIX}_batch_rows_per_step", "Rows (requests) in each decode step",
                              buckets=ROWS_BUCKETS, registry=None)
        self.hits = Counter(f"{PREFIX}_cache_hits", "Per request: prefix, a cached prefix reused; "
                            "image, each image its prefill reads found encoded", ["cache"], registry=None)
        self.misses = Counter(f"{PREFIX}_cache_misses", "Per request: no prefix reused; each image "
                              "its prefill reads encoded", ["cache"], registry=None)
        for cache in ("prefix", "image"):  # every series from the start, at 0
            self.hits.labels(cache)
            self.misses.labels(cache)

    def cache_use(self, cache: str, hits: int, misses: int) -> None:
        self.hits.labels(cache).inc(hits)
        self.misses.labels(cache).inc(misses)

    def token(self, submitted: float, last: float | None) -> float:
        """Observe a token that came out now, of a request handed over at ``submitted`` whose
        previous token came at ``last`` (None: this is its first); returns now."""
        now = time.monotonic()
        if last is None:
            self.first_token.observe(now - submitted)
        else:
            self.per_token.observe(now - last)
        return now

    def collect(self) -> Iterator[Metric]:
        for m in (self.first_token, self.per_token, self.rows, self.hits, self.misses):
            yield from m.collect()


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)


def _by_cache(kind: type[Metric], name: str, doc: str, values: dict[str, float]) -> Metric:
    family = kind(f"{PREFIX}_{name}", doc, labels=["cache"])
    for cache, v in values.items():
        family.add_metric([cache], v)
    return family


class SchedulerCollector:
    """The scheduler's counters, load and caches, read when scraped (from another thread: each
    value is written by the worker alone)."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler

    def collect(self) -> Iterator[Metric]:
        s = self.scheduler
        c = dict(s.counters)
        active, waiting = s.load()
        yield _counter("prompt_tokens", "Prompt tokens of the requests admitted (tokens in)", c["prompt_tokens"])
        yield _counter("prompt_tokens_cached", "Prompt tokens taken from the prefix cache", c["cached_tokens"])
        yield _counter("generation_tokens", "Tokens generated (tokens out)", c["generated_tokens"])
        yield _counter("images_encoded", "Images run through the vision towers", c["images_encoded"])
        yield _counter("decode_steps", "Decode steps of the batch", c["decode_steps"])
        yield _counter("draft_tokens", "Tokens drafted for finished replies (--draft)", c["drafted_tokens"])
        yield _counter("draft_tokens_accepted", "Drafted tokens the model agreed with (kept)", c["accepted_tokens"])
        ended = CounterMetricFamily(f"{PREFIX}_requests_ended", "Requests the scheduler let go, by how",
                                    labels=["outcome"])
        for outcome in ("finished", "cancelled", "failed"):
            ended.add_metric([outcome], c[outcome])
        yield ended
        yield _gauge("batch_rows", "Requests decoding now (batch occupancy)", active)
        yield _gauge("max_batch", "Rows one decode step may hold (--max-batch)", s.max_batch)
        yield _gauge("queue_length", "Requests waiting for a batch slot", waiting)
        caches = {"prefix": s.prefixes, "image": s.features}
        yield _by_cache(GaugeMetricFamily, "cache_bytes", "Bytes held", {k: v.nbytes for k, v in caches.items()})
        yield _by_cache(GaugeMetricFamily, "cache_max_bytes", "The bound (--cache-mb, --image-cache-mb)",
                        {k: v.max_bytes for k, v in caches.items()})
        yield _by_cache(GaugeMetricFamily, "cache_entries", "Entries held", {k: len(v) for k, v in caches.items()})
        yield from s.metrics.collect()


class CountResponses:
    """ASGI middleware: each response counted by endpoint (a served path, else ``other``) and status,
    the door's refusals included; an error raised past it counts as a 500."""

    def __init__(self, app, counter: Counter, paths: Iterable[str]):
        self.app, self.counter, self.paths = app, counter, frozenset(paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in self.paths else OTHER
        status = None

        async def counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                self.counter.labels(endpoint, str(status)).inc()
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except Exception:
            if status is None:
                self.counter.labels(endpoint, "500").inc()
            raise


def app_registry(scheduler: Scheduler) -> tuple[CollectorRegistry, Counter]:
    """An app's registry: its scheduler's metrics and a new count of responses."""
    registry = CollectorRegistry(auto_describe=True)  # a clash of names fails here, not when scraped
    registry.register(SchedulerCollector(scheduler))
    responses = Counter(f"{PREFIX}_requests", "HTTP responses by endpoint and status",
                        ["endpoint", "status"], registry=registry)
    return registry, responses
