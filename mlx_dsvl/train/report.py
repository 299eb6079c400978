"""What a run tells its user: the metrics of each report window, progress lines, warnings."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import mlx.core as mx

if TYPE_CHECKING:
    from .config import TrainConfig

_style: Callable[[str], str] = lambda text: text  # noqa: E731 -- how option names are printed
_rank, _size = 0, 1  # this process among the run's processes


@contextmanager
def option_style(style: Callable[[str], str]):
    """Print the library's warnings and notes through ``style`` (the CLI: option names as flags)."""
    global _style
    old, _style = _style, style
    try:
        yield
    finally:
        _style = old


@contextmanager
def as_process(rank: int, size: int):
    """Speak as process ``rank`` of ``size``: rank 0 says what every process would say alike;
    what concerns one process's share (``local``) every process says, with its rank."""
    global _rank, _size
    old, (_rank, _size) = (_rank, _size), (rank, size)
    try:
        yield
    finally:
        _rank, _size = old


def who() -> str:
    """``"[rank R] "`` when several processes share the output, else nothing."""
    return f"[rank {_rank}] " if _size > 1 else ""


def warn(text: str, local: bool = False) -> None:
    if _rank == 0 or local:
        print(f"{who() if local else ''}warning: {_style(text)}", file=sys.stderr)


def note(text: str) -> None:
    if _rank == 0:
        print(_style(text), file=sys.stderr, flush=True)


def error(text: str) -> None:
    """An error line: every process says its own (with its rank when there are several)."""
    print(f"{who()}error: {_style(text)}", file=sys.stderr, flush=True)


def fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """A one-line progress bar on a terminal, plain report lines otherwise."""

    def __init__(self, total: int, quiet: bool, stream=None):
        self.total, self.quiet = total, quiet
        self.stream = stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()
        self._last = ""

    def bar(self, step: int, text: str) -> None:
        if self.quiet or not self.tty:
            return
        frac = step / max(1, self.total)
        n = 24
        fill = int(frac * n)
        line = f"\r[{'#' * fill}{'.' * (n - fill)}] {step}/{self.total} {text}"
        self.stream.write(line.ljust(len(self._last)))
        self.stream.flush()
        self._last = line

    def line(self, text: str) -> None:
        if self.quiet:
            return
        if self.tty and self._last:
            self.stream.write("\r" + " " * len(self._last) + "\r")
            self._last = ""
        print(_style(text), file=self.stream, flush=True)


@dataclass
class StepSums:
    """One optimizer step summed over its micro-batches (and processes, in :meth:`as_list` order)."""

    loss: float = 0.0
    ntoks: float = 0.0
    mm: float = 0.0
    mm_n: float = 0.0
    tokens: float = 0.0
    skipped: float = 0.0

    def as_list(self) -> list[float]:
        return [getattr(self, f.name) for f in fields(self)]

    def __add__(self, other: StepSums) -> StepSums:
        return StepSums(*(a + b for a, b in zip(self.as_list(), other.as_list())))


class Window:
    """Sums over the steps since the last report; :meth:`record` makes the ``"train"`` record."""

    def __init__(self, mixer=None):
        self.mixer = mixer
        self.reset()

    def reset(self) -> None:
        self.sums = StepSums()
        self.time = 0.0
        self.text_batches = self.batches = self.steps = 0

    def add_step(self, sums: StepSums, text_batches: int, batches: int, seconds: float) -> None:
        self.sums = self.sums + sums
        self.text_batches += text_batches
        self.batches += batches
        self.steps += 1
        self.time += seconds

    def record(self, step: int, lr: float, gnorm: float) -> dict[str, Any]:
        t, s = max(self.time, 1e-9), self.sums
        rec: dict[str, Any] = {
            "type": "train", "step": step,
            "loss": s.loss / max(s.ntoks, 1e-9),
            "tokens": int(s.tokens), "target_tokens": int(s.ntoks),
            "tokens_per_s": s.tokens / t, "steps_per_s": self.steps / t,
            "lr": lr, "grad_norm": gnorm, "peak_memory_gb": mx.get_peak_memory() / 1e9,
            "text_batches": int(self.text_batches), "batches": int(self.batches),
            "time": time.time(),
        }
        if s.mm_n > 0:
            rec["loss_mm"] = s.mm / s.mm_n
        if s.ntoks - s.mm_n > 0:
            rec["loss_text"] = (s.loss - s.mm) / (s.ntoks - s.mm_n)
        if self.mixer is not None:
            rec["text_share"] = self.text_batches / max(1, self.batches)
            rec["text_share_scheduled"] = self.mixer.share(step - 1)
        if s.skipped:
            rec["skipped_examples"] = int(s.skipped)
        return rec

    def eta(self, steps_left: int) -> float:
        return steps_left * self.time / max(1, self.steps)


def train_line(rec: dict, iters: int, elapsed: float, eta: float) -> str:
    parts = [f"mm {rec['loss_mm']:.3f}" if "loss_mm" in rec else "",
             f"text {rec['loss_text']:.3f}" if "loss_text" in rec else ""]
    split = ", ".join(p for p in parts if p)
    return (f"step {rec['step']}/{iters} | loss {rec['loss']:.4f}" + (f" ({split})" if split else "")
            + f" | {rec['tokens_per_s']:.0f} tok/s | lr {rec['lr']:.2e} | peak {rec['peak_memory_gb']:.2f} GB"
            + (f" | text share {rec['text_share']:.2f}" if "text_share" in rec else "")
            + f" | {fmt_time(elapsed)} elapsed, eta {fmt_time(eta)}")


def val_line(rec: dict, iters: int, seconds: float) -> str:
    return (f"step {rec['step']}/{iters} | val loss {rec['val_loss']:.4f}"
            + (f" | val multimodal {rec['val_loss_mm']:.4f}" if "val_loss_mm" in rec else "")
            + (f" | val text-only {rec['val_loss_text']:.4f}" if "val_loss_text" in rec else "")
            + f" ({seconds:.1f}s)")


def start_line(cfg: TrainConfig, *, components: Sequence[str], frozen_vision: bool, n_train: int, n_total: int,
               n_main: int, n_text: int | None, resume: str | None, start_step: int) -> str:
    how = cfg.method if "llm" in components or not frozen_vision else "full"
    return (f"stage {cfg.stage}: training {', '.join(components)} ({how}) "
            f"-- {n_train / 1e6:.3f}M trainable of {n_total / 1e6:.3f}M parameters; {n_main} examples"
            + (f" + {n_text} text-only (ratio {cfg.text_ratio}, warm-up {cfg.modality_warmup} steps)"
               if n_text is not None else "")
            + f"; {cfg.iters} steps of {cfg.batch_size}"
            + (f" x {_size} processes (a global batch of {cfg.batch_size * _size})" if _size > 1 else "")
            + f" x {cfg.grad_accum}; lr {cfg.lr:g}"
            + (f" (vision {cfg.vision_lr:g})" if not frozen_vision else "")
            + (f" (resuming {resume} at step {start_step})" if resume else ""))
