"""What the Streamlit chat app does, without Streamlit: uploads, loading, the transcript (its
command line and start-up: ``app_options``, re-exported here).

``apps/chat.py`` only draws widgets and calls into this module, so everything here is tested
without a browser (``tests/test_app_logic.py``; the app itself: ``tests/test_app.py``).  The model work itself is :class:`mlx_dsvl.ChatSession`
(KV cache and image features reused across turns); :class:`Conversation` adds what a chat window
needs on top: what to show (thumbnails, per-reply statistics, error notes), stopping a reply
half-way, regenerating and removing the last turn.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from app_options import (  # noqa: F401 -- the app's command line, re-exported for apps/chat.py
    DEFAULT_MODEL,
    KV_CACHE_OPTIONS,
    LOOPBACK,
    MODEL_ENV,
    SLIDERS,
    VISION_OPTIONS,
    address_warning,
    blas_hint,
    check_launch,
    check_start_values,
    launch_argv,
    parse_args,
)
from PIL import Image

import mlx_dsvl
from mlx_dsvl.model_options import load_draft_from_args
from mlx_dsvl.processing.chat import place_images
from mlx_dsvl.processing.image import ImageLoadError, load_image

# MLX is imported in the functions: `python apps/chat.py` may re-execute itself first (mlx_dsvl.blas).

MAX_UPLOAD_MB = 20  # per file; apps/.streamlit/config.toml sets server.maxUploadSize to the same
MAX_UPLOAD_BYTES = MAX_UPLOAD_MB * 1024 * 1024  # Streamlit counts a megabyte as 2**20 bytes
THUMBNAIL_SIZE = (320, 320)


# -- uploads --------------------------------------------------------------------------------
class UploadError(ValueError):
    """An uploaded file that cannot be used as an image; the message is shown in the chat."""


@dataclass
class Attachment:
    """An uploaded image, kept in memory: the file's bytes and a thumbnail for the history."""

    name: str
    data: bytes
    thumbnail: Image.Image
    size: tuple[int, int]

    def image(self) -> Image.Image:
        """The full image, decoded again from memory (the same pixels every time)."""
        return decode_image(self.data, self.name)


def decode_image(data: bytes, name: str = "upload") -> Image.Image:
    """Bytes -> RGB PIL image with ``mlx_dsvl``'s own loading rules (first frame,
    ``convert("RGB")``, Pillow's decompression-bomb limit as an error)."""
    try:
        return load_image(data, name=name)
    except ImageLoadError as e:
        raise UploadError(str(e)) from None


def too_large(name: str, size: int, max_bytes: int) -> str:
    return (f"{name} is too large ({size / 2**20:.2f} MB): images are limited to "
            f"{max_bytes / 2**20:g} MB each")


def read_upload(name: str, data: bytes, max_bytes: int = MAX_UPLOAD_BYTES) -> Attachment:
    """Check and decode one uploaded file (never written to disk)."""
    if len(data) > max_bytes:
        raise UploadError(too_large(name, len(data), max_bytes))
    if not data:
        raise UploadError(f"{name} is empty")
    img = decode_image(data, name)
    thumb = img.copy()
    thumb.thumbnail(THUMBNAIL_SIZE)
    return Attachment(name=name, data=data, thumbnail=thumb, size=img.size)


def read_uploads(files: Iterable, max_bytes: int = MAX_UPLOAD_BYTES) -> tuple[list[Attachment], list[str]]:
    """Streamlit ``UploadedFile``s (``.name``, ``.size``, ``.getvalue()``) -> (attachments, errors)."""
    attachments, errors = [], []
    for f in files or ():
        name = getattr(f, "name", "upload")
        size = getattr(f, "size", None)
        try:
            if size is not None and size > max_bytes:  # don't even look at the bytes
                raise UploadError(too_large(name, size, max_bytes))
            attachments.append(read_upload(name, f.getvalue(), max_bytes))
        except UploadError as e:
            errors.append(str(e))
    return attachments, errors


# -- the model --------------------------------------------------------------------------------
load_calls = 0  # how many times load_model really ran in this process (tests check the cache)


@dataclass
class LoadedModel:
    model: object
    processor: object
    path: str
    quantized: bool
    seconds: float
    warmup_seconds: float = 0.0  # of ``seconds``: the GPU warm-up (0 on the CPU)
    vision_bits: int | None = None  # the towers and the aligner quantized to these bits
    draft: tuple | None = None  # --draft-model's (model, processor), loaded with the same options
    lock: threading.Lock = field(default_factory=threading.Lock)  # one reply at a time


def loading_message(path: str, quantize: bool, vision_bits: int | None = None) -> str:
    """The loading spinner's text; on a GPU it says that the first load prepares kernels."""
    from mlx_dsvl.warmup import kernels_compile

    text = f"Loading {path}{quantization_label(quantize, vision_bits, ' (', ')')}"
    if kernels_compile():
        text += (" and preparing its GPU kernels (the first time on this machine this can take a "
                 "minute; later runs start faster)")
    return text + " ..."


def quantization_label(quantize: bool, vision_bits: int | None, before: str = "", after: str = "") -> str:
    """``4-bit LLM, 8-bit vision`` between ``before`` and ``after``; empty when nothing is quantized."""
    parts = (["4-bit LLM"] if quantize else []) + ([f"{vision_bits}-bit vision"] if vision_bits else [])
    return f"{before}{', '.join(parts)}{after}" if parts else ""


def load_model(path: str, quantize: bool = False, adapter: str | None = None,
               vision_bits: int | None = None, draft_path: str | None = None) -> LoadedModel:
    """``mlx_dsvl.load`` (4-bit LLM, ``vision_bits`` towers and aligner: quantized while loading,
    groups of 64; + adapters from ``python -m mlx_dsvl.train``), then on a GPU a warm-up so that
    the first question does not wait for kernels to compile; ``draft_path``: the draft model
    (``--draft-model``), loaded with the same options and checked against it; raises
    ``mlx_dsvl.loading.ModelLoadError`` and friends."""
    global load_calls
    from mlx_dsvl.generation import warm_up

    load_calls += 1
    tic = time.perf_counter()
    model, processor = mlx_dsvl.load(path, quantize=4 if quantize else None, adapter_path=adapter,
                                     quantize_vision=vision_bits)
    options = argparse.Namespace(draft_model=draft_path, quantize=4 if quantize else None, quantize_vision=vision_bits)
    draft = load_draft_from_args(options, (model, processor), path)
    warmup_s = warm_up(model, processor, say=lambda m: print(f"[mlx-dsvl] {m}", file=sys.stderr))
    return LoadedModel(model, processor, path, quantize, time.perf_counter() - tic, warmup_s,
                       vision_bits=vision_bits, draft=draft)


def load_error_message(path: str, error: BaseException) -> str:
    """The reason a model failed to load, for ``st.error`` (no traceback)."""
    from mlx_dsvl.loading import ModelLoadError

    reason = str(error) if isinstance(error, ModelLoadError) else f"{type(error).__name__}: {error}"
    return f"Could not load the model {path!r}: {reason}"


def _acquire(lock: threading.Lock, on_wait: Callable[[], None] | None) -> None:
    """Take ``lock``, calling ``on_wait()`` every 0.25 s meanwhile (a Streamlit call there lets
    the user interrupt the wait)."""
    while not lock.acquire(timeout=0.25):
        if on_wait is not None:
            on_wait()


# -- the conversation -------------------------------------------------------------------------
@dataclass
class ReplyStats:
    time_to_first_token: float  # s
    generation_tps: float  # tokens/s
    peak_memory: float  # GB
    generation_tokens: int
    prompt_tokens: int  # tokens prefilled for this reply (only the new ones)
    prompt_tps: float
    finish_reason: str | None

    @classmethod
    def from_chunk(cls, c) -> ReplyStats:
        return cls(c.time_to_first_token, c.generation_tps, c.peak_memory, c.generation_tokens,
                   c.prompt_tokens, c.prompt_tps, c.finish_reason)

    def summary(self) -> str:
        return (f"{self.time_to_first_token:.2f} s to first token · {self.generation_tps:.1f} tokens/s · "
                f"{self.peak_memory:.2f} GB peak · {self.generation_tokens} tokens "
                f"({self.prompt_tokens} prompt tokens prefilled)")


@dataclass
class Turn:
    """One entry of the chat window."""

    role: str  # "user" | "assistant" | "error" (a note, never sent to the model) | "notice"
    text: str  # what the user typed / the reply so far / the message
    attachments: list[Attachment] = field(default_factory=list)
    stats: ReplyStats | None = None
    stopped: bool = False  # the reply was interrupted (stop button, new input, closed tab)


class Conversation:
    """A :class:`mlx_dsvl.ChatSession` plus what the chat window shows.

    ``session.messages`` is what the model sees; ``turns`` is what the user sees: the same
    exchanges, with thumbnails and statistics, plus error notes that never reach the model.
    """

    def __init__(self, loaded: LoadedModel, system_prompt: str | None = None, max_context: int = 4096):
        self.loaded = loaded
        self.key = (loaded.path, loaded.quantized, loaded.vision_bits)
        self.session = mlx_dsvl.ChatSession(loaded.model, loaded.processor, system_prompt=system_prompt,
                                   max_context=max_context, on_truncate=self._on_truncate,
                                   draft_model=loaded.draft)
        self.turns: list[Turn] = []
        self._notices: list[str] = []
        self._busy = threading.Lock()  # held while a reply is generated

    # -- state ----------------------------------------------------------------------------
    @property
    def last_stats(self) -> ReplyStats | None:
        for t in reversed(self.turns):
            if t.role == "assistant" and t.stats is not None:
                return t.stats
        return None

    @property
    def last_question(self) -> Turn | None:
        i = self._last_user()
        return None if i is None else self.turns[i]

    def history_before_last_question(self) -> list[Turn]:
        i = self._last_user()
        return self.turns if i is None else self.turns[:i]

    def _last_user(self) -> int | None:
        for i in range(len(self.turns) - 1, -1, -1):
            if self.turns[i].role == "user":
                return i
        return None

    @property
    def can_regenerate(self) -> bool:
        return self._last_user() is not None

    def note_error(self, message: str) -> None:
        self.turns.append(Turn("error", message))

    def new(self) -> None:
        """A new conversation (the image-feature cache is kept: same image, same features)."""
        self.session.reset()
        self.turns = []

    def remove_last_turn(self) -> Turn | None:
        """Remove the last exchange (question and reply, and notes after it); returns the question."""
        i = self._last_user()
        if i is None:
            self.turns = []
            return None
        question = self.turns[i]
        self.session.undo()
        del self.turns[i:]
        return question

    def wait_idle(self, on_wait: Callable[[], None] | None = None) -> None:
        """Wait until no reply is being generated in this conversation.

        Streamlit's fast reruns start the next script run as soon as the user clicks (Stop,
        Regenerate, ...) and stop the running one only at its next Streamlit call, i.e. after
        the next token: the new run waits here before it reads or changes the conversation.
        """
        _acquire(self._busy, on_wait)
        self._busy.release()

    def _on_truncate(self, message: str) -> None:
        self._notices.append(message)

    # -- replies --------------------------------------------------------------------------
    def prompt_text(self, text: str, n_images: int) -> str:
        """The user text the model sees: one image placeholder per image, before the text
        (unless the user placed the placeholders themselves)."""
        return place_images(text, n_images, self.session.processor.image_tag)

    def send(self, text: str, attachments: Sequence[Attachment] = (),
             on_chunk: Callable[[Turn], None] | None = None,
             on_wait: Callable[[], None] | None = None, **sampling) -> Turn | None:
        """Ask; the reply ``Turn`` grows in ``self.turns`` and ``on_chunk(turn)`` is called per piece.

        If ``on_chunk`` raises (Streamlit interrupts a script run that way when the user presses
        Stop or sends something else), the partial reply is kept -- in the transcript, marked
        ``stopped``, and in the session, so the conversation goes on -- and the exception
        propagates.  Errors become an error note: before the reply starts (bad placeholders, a
        prompt longer than the context) ``None`` is returned; during the reply the partial reply
        is kept, marked ``stopped``, and returned.  ``on_wait()`` is called every
        0.25 s while another reply (this conversation's or another browser tab's) is running.
        """
        with self._turn(on_wait):
            return self._ask(text, list(attachments), on_chunk, sampling)

    def regenerate(self, on_chunk=None, on_wait=None, **sampling) -> Turn | None:
        """Ask the last question again (its images' features are still cached: not re-encoded).

        The old exchange is removed only once the model is free, right before asking again, so
        an interruption while waiting loses nothing."""
        with self._turn(on_wait):
            question = self.remove_last_turn()
            if question is None:
                return None
            return self._ask(question.text, question.attachments, on_chunk, sampling)

    @contextmanager
    def _turn(self, on_wait):
        """This conversation, then the model (one reply at a time per process), for one reply."""
        _acquire(self._busy, on_wait)
        try:
            _acquire(self.loaded.lock, on_wait)
            try:
                yield
            finally:
                self.loaded.lock.release()
        finally:
            self._busy.release()

    def _ask(self, text, attachments, on_chunk, sampling) -> Turn | None:
        import mlx.core as mx

        try:
            prompt = self.prompt_text(text, len(attachments))
            images = [a.image() for a in attachments]
        except ValueError as e:  # UploadError included
            self.note_error(str(e))
            return None
        question, reply = Turn("user", text, attachments), Turn("assistant", "")
        self.turns += [question, reply]
        self._notices = []
        started = False
        try:
            mx.reset_peak_memory()  # per-reply peak (replies never overlap: the model lock)
            gen = self.session.send(prompt, images, **sampling)
            try:
                for chunk in gen:
                    started = True
                    reply.text += chunk.text
                    reply.stats = ReplyStats.from_chunk(chunk)
                    if on_chunk is not None:
                        on_chunk(reply)
            finally:
                gen.close()
                self._settle()
        except Exception as e:  # noqa: BLE001 -- shown in the chat; the conversation goes on
            expected = isinstance(e, (ValueError, OSError)) and not started
            if not expected:  # a bug somewhere: the details go to the server's console
                traceback.print_exc()
            message = str(e) if expected else f"{type(e).__name__}: {e}"
            if not started:
                self._drop(question, reply)  # nothing was generated: the question was not asked
                self.note_error(message)
                return None
            reply.stopped = True  # keep what was generated
            self.note_error(f"The reply broke off: {message}")
            return reply
        except BaseException:
            if started:
                reply.stopped = True  # interrupted: keep the partial reply
            else:
                self._drop(question, reply)
            raise
        finally:
            self.turns += [Turn("notice", n) for n in self._notices]
        return reply

    def _drop(self, *turns: Turn) -> None:
        self.turns = [t for t in self.turns if all(t is not x for x in turns)]

    def _settle(self) -> None:
        """After a reply, finished or not (``ChatSession.send`` keeps a partial reply): the KV
        cache is computed on this thread (MLX streams are per thread, and Streamlit may run the
        next turn on another one)."""
        import mlx.core as mx

        mx.eval([c.state for c in self.session.cache if c.offset > 0])
