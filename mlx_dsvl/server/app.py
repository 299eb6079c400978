"""The HTTP side (FastAPI): OpenAI's routes, errors in OpenAI's shape, server-sent events.

A request is checked, its images fetched and decoded and its prompt built off the event loop,
then handed to the :class:`~.scheduler.Scheduler`, whose events come back through an
``asyncio.Queue``. A client that goes away is noticed and its request cancelled, which frees its
batch slot at the next step.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..caches import image_key
from ..grammar import Grammar, ResponseFormatError, compile_format
from ..utils import release_free_memory
from .images import ImagePolicy, decode_image
from .metrics import CountResponses, app_registry
from .scheduler import Busy, Delta, Failed, Finished, Job, Scheduler
from .schema import (
    APIError,
    SamplingParams,
    chunk_body,
    completion_body,
    error_body,
    parse_request,
    to_conversation,
)
from .security import Guard

if TYPE_CHECKING:
    from ..processing.chat import ChatProcessor

LARGE_PIXELS = 16_000_000  # after decoding more, freed memory is handed back to the system
RETRY_AFTER_S = 1  # told with every 503 (busy, shutting down): a slot frees within a reply


@dataclass
class ServerConfig:
    model_name: str  # the id in /v1/models
    model_aliases: tuple[str, ...] = ()  # other names a request's "model" may use
    max_context: int = 4096
    defaults: SamplingParams = field(default_factory=SamplingParams)
    api_key: str | None = None
    max_body_bytes: int = 50 * 1024 * 1024
    images: ImagePolicy = field(default_factory=ImagePolicy)
    hosts: tuple[str, ...] | None = ()  # Host names served besides loopback ones; None = any
    origins: tuple[str, ...] = ()  # web pages allowed to call (CORS); none by default


@dataclass
class Prepared:
    ids: list[int]
    image_keys: list[str]
    pixels: dict[str, np.ndarray]
    pictures: dict[str, Any] | None = None  # the decoded images by key (for a draft model's own towers)


class PromptBuilder:
    """Conversation + image bytes -> prompt ids, pixels and image content hashes."""

    def __init__(self, processor: ChatProcessor, max_context: int, keep_pictures: bool = False):
        self.processor = processor
        self.max_context = max_context
        self.keep_pictures = keep_pictures  # a draft model preprocesses the images its own way
        self._lock = threading.Lock()  # one tokenizer, several request threads

    def check_image_count(self, n: int) -> None:
        if n and n * self.processor.num_image_tokens >= self.max_context:
            raise APIError(400, f"{n} images take {n * self.processor.num_image_tokens} tokens, more "
                                f"than the {self.max_context}-token context", param="messages",
                           code="context_length_exceeded")

    def build(self, conversation: list[dict], images: Sequence[tuple[bytes, str]]) -> Prepared:
        pictures = [decode_image(data, param) for data, param in images]
        pixels = self.processor.image_processor(pictures)  # [N, 3, S, S]
        keys = [image_key(px) for px in pixels]
        decoded = sum(p.width * p.height for p in pictures)
        kept = dict(zip(keys, pictures)) if self.keep_pictures else None
        del pictures
        if decoded > LARGE_PIXELS:
            release_free_memory()
        with self._lock:
            try:
                ids = self.processor.tokenize(self.processor.format(conversation)).tolist()
            except ValueError as e:
                raise APIError(400, str(e), param="messages") from None
        if len(ids) >= self.max_context:
            raise APIError(400, f"the prompt is {len(ids)} tokens; this server's context is "
                                f"{self.max_context} tokens (--max-context)", param="messages",
                           code="context_length_exceeded")
        return Prepared(ids, keys, dict(zip(keys, pixels)), kept)


def _compile_format(processor: ChatProcessor, response_format) -> Grammar | None:
    """The request's compiled response format; a 400 naming what cannot be followed."""
    try:
        return compile_format(processor, response_format)
    except ResponseFormatError as e:
        raise APIError(400, str(e), param=e.param, code="invalid_response_format") from None


def _not_json(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Events:
    """A request's events; ``next()`` is None (the request cancelled) once the client has gone away."""

    def __init__(self, queue: asyncio.Queue, request: Request, scheduler: Scheduler, job_id: str,
                 check_every: float = 0.5):
        self.queue, self.request, self.scheduler, self.job_id = queue, request, scheduler, job_id
        self.check_every = check_every
        self._checked = time.monotonic()

    async def next(self):
        while True:
            try:
                event = await asyncio.wait_for(self.queue.get(), timeout=self.check_every)
            except asyncio.TimeoutError:
                event = None
            if event is None or time.monotonic() - self._checked > self.check_every:
                self._checked = time.monotonic()
                if await self.request.is_disconnected():
                    self.scheduler.cancel(self.job_id)
                    return None
            if event is not None:
                return event


def create_app(scheduler: Scheduler, processor: ChatProcessor, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="mlx-dsvl", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, api_key=config.api_key, max_body_bytes=config.max_body_bytes,
                       hosts=config.hosts, origins=config.origins)
    if config.origins:  # outside the guard: it answers the allowed pages' preflights
        app.add_middleware(CORSMiddleware, allow_origins=list(config.origins),
                           allow_methods=["GET", "POST"], allow_headers=["authorization", "content-type"])
    registry, responses = app_registry(scheduler)
    prompts = PromptBuilder(processor, config.max_context, keep_pictures=scheduler.draft_model is not None)
    names = (config.model_name, *config.model_aliases)

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        retry = {"Retry-After": str(RETRY_AFTER_S)} if e.status == 503 else None
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status,
                            headers=retry)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_, e: Exception):  # (uvicorn logs the traceback)
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"),
                            status_code=500)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model",
                                            "created": int(time.time()), "owned_by": "mlx-dsvl"}]}

    @app.get("/stats")
    async def stats():
        return scheduler.stats()

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            data = json.loads(await request.body(), parse_constant=_not_json)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, too deep
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        req = parse_request(data)
        if req.model is not None and req.model not in names:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves "
                                f"{config.model_name!r}", param="model", code="model_not_found")
        sampling = SamplingParams.from_request(req, config.defaults)
        grammar = await run_in_threadpool(_compile_format, processor, req.response_format)
        conversation, urls = to_conversation(req.messages, processor.image_tag)
        prompts.check_image_count(len(urls))
        blobs = [(await config.images.fetch(url, param), param) for url, param in urls]
        prepared = await run_in_threadpool(prompts.build, conversation, blobs)
        room = config.max_context - len(prepared.ids)
        sampling = replace(sampling, max_tokens=min(sampling.max_tokens, room))

        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job = Job(id=f"chatcmpl-{uuid.uuid4().hex}", ids=prepared.ids,
                  image_keys=prepared.image_keys, pixels=prepared.pixels, pictures=prepared.pictures,
                  sampling=sampling, grammar=grammar,
                  emit=lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
        try:
            scheduler.submit(job)
        except Busy as e:
            raise APIError(503, f"server busy: {e}", code="server_busy") from None
        try:
            return await _respond(req, Events(queue, request, scheduler, job.id), req.model or config.model_name,
                                  logprobs=bool(req.logprobs))
        except BaseException:  # an error, or the handler cancelled (shutdown): free the slot
            scheduler.cancel(job.id)
            raise

    # outside the door: its refusals are counted too
    app.add_middleware(CountResponses, counter=responses, paths=[r.path for r in app.routes])
    return app


async def _respond(req, events: Events, model: str, logprobs: bool) -> Response:
    """Errors before admission are plain HTTP errors; then the reply is streamed or collected."""
    first = await events.next()
    if first is None:
        return Response(status_code=499)  # nobody is listening any more
    if isinstance(first, Failed):
        raise APIError(first.status, first.message)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(events, model, include_usage, logprobs), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _collect(events, model, logprobs)


async def _stream(events: Events, model: str, include_usage: bool, logprobs: bool):
    """OpenAI's chunks; Starlette cancels this generator when the client disconnects.  With
    ``logprobs``, a chunk carries its tokens' (a token whose text is held back, with the next text)."""
    created, cid = int(time.time()), events.job_id
    held: list[dict] = []

    def chunk(delta, reason=None, tokens=None):
        return _sse(chunk_body(cid, model, created, delta, reason, include_usage=include_usage, logprobs=tokens))

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            event = await events.queue.get()
            if isinstance(event, Delta):
                held += event.logprobs
                if event.text:
                    yield chunk({"content": event.text}, tokens=held if logprobs else None)
                    held = []
            elif isinstance(event, Finished):
                yield chunk({}, event.finish_reason, tokens=held if held else None)
                if include_usage:
                    yield _sse(chunk_body(cid, model, created, None, usage=event.usage(), include_usage=True))
                break
            elif isinstance(event, Failed):
                yield _sse(error_body(event.message, "server_error"))
                break
        yield "data: [DONE]\n\n"
    finally:
        events.scheduler.cancel(cid)  # a no-op once finished


async def _collect(events: Events, model: str, logprobs: bool) -> Response:
    pieces: list[str] = []
    tokens: list[dict] = []
    while True:
        event = await events.next()
        if event is None:
            return Response(status_code=499)
        if isinstance(event, Delta):
            pieces.append(event.text)
            tokens += event.logprobs
        elif isinstance(event, Failed):
            raise APIError(event.status, event.message)
        elif isinstance(event, Finished):
            return JSONResponse(completion_body(events.job_id, model, "".join(pieces), event.finish_reason,
                                                event.usage(), logprobs=tokens if logprobs else None))
