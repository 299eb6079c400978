"""Sampling options: each option's default, valid range, help and app control, in one place.

Everything that samples derives from :class:`SamplingOptions`: the CLI and server flags
(:func:`add_arguments`), the Python API, the server's request model (a subclass), the app's
sidebar (:func:`controls`) and eval's greedy answers (:data:`GREEDY`).  Importing this module
loads no MLX (the app and the CLIs parse their flags before MLX is loaded).

Adding an option: a field here (default, help, check, control) and its use in
:class:`Sampler` or :meth:`SamplingOptions.make_logits_processors`; the
server's request model names it too (its JSON field).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any, NamedTuple

# Tokens the repetition penalty looks back on (mlx-lm's default window), prompt tokens included.
PROCESSOR_CONTEXT = 20


class Control(NamedTuple):
    """The app's widget for an option: a slider (floats) or a number box (integers)."""

    label: str
    low: Any  # the widget's range, inside the option's valid range
    high: Any
    step: Any
    help: str | None = None


class SamplingError(ValueError):
    """An option outside its valid range: ``option`` names it, ``problem`` says what is wrong."""

    def __init__(self, option: str, problem: str):
        super().__init__(f"{option} {problem}")
        self.option, self.problem = option, problem


def _count(v, least: int = 1) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def _option(default, help: str, valid: Callable | None = None, what: str = "",
            control: Control | None = None):
    return field(default=default, metadata=dict(help=help, valid=valid, what=what, control=control))


@dataclass(frozen=True)
class SamplingOptions:
    """How a reply is sampled; checked when made (:class:`SamplingError` names the option).

    The defaults are the original DeepSeek-VL command line's: temperature 0.2, top-p 0.95,
    repetition penalty 1.1.
    """

    temperature: float = _option(0.2, "sampling temperature, 0 = greedy", lambda v: 0 <= v < math.inf,
                                 ">= 0 and finite (0 = greedy)", Control("Temperature", 0.0, 1.5, 0.05, "0 = greedy"))
    top_p: float = _option(0.95, "nucleus sampling", lambda v: 0 < v <= 1, "in (0, 1]",
                           Control("Top-p", 0.05, 1.0, 0.01))
    top_k: int = _option(0, "sample among the k most likely tokens, 0 = all", lambda v: _count(v, 0),
                         "an integer >= 0 (0 = all)", Control("Top-k", 0, 200, 1, "0 = all"))
    min_p: float = _option(0.0, "drop tokens less likely than min_p x the most likely one, 0 = off",
                           lambda v: 0 <= v < 1, "in [0, 1) (0 = off)", Control("Min-p", 0.0, 0.5, 0.01, "0 = off"))
    repetition_penalty: float = _option(1.1, "repetition penalty, 1 = off", lambda v: 0 < v < math.inf,
                                        "> 0 and finite (1 = off)",
                                        Control("Repetition penalty", 1.0, 2.0, 0.01, "1 = off"))
    max_tokens: int = _option(512, "maximum new tokens", _count, "an integer >= 1",
                              Control("Max new tokens", 1, 4096, 64))
    seed: int | None = _option(None, "random seed")

    def __post_init__(self):
        for name, problem in self.problems():
            raise SamplingError(name, problem)

    def problems(self):
        """``(option, "must be ..., got ...")`` for each option outside its range."""
        for f in fields(SamplingOptions):
            valid, value = f.metadata.get("valid"), getattr(self, f.name)
            if valid is not None and not valid(value):
                yield f.name, f"must be {f.metadata['what']}, got {value}"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SamplingOptions:
        """The options of parsed :func:`add_arguments` flags (those not added keep their
        defaults); a value out of range is a ``ValueError`` that names the flag."""
        given = {f.name: getattr(args, f.name) for f in fields(SamplingOptions) if hasattr(args, f.name)}
        try:
            return cls(**given)
        except SamplingError as e:
            raise ValueError(f"{flag(e.option)} {e.problem}") from None

    def with_(self, **options) -> SamplingOptions:
        """A checked copy with ``options`` changed (an unknown name is a ``TypeError``)."""
        return replace(self, **options) if options else self

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(SamplingOptions)}

    # -- mlx-lm's sampler and logits processors ---------------------------------------------
    def make_sampler(self) -> Sampler:
        """This reply's :class:`Sampler`, with its own random key (from ``seed``, else fresh)."""
        return Sampler(self)

    def make_logits_processors(self) -> list[Callable]:
        """``(tokens, logits) -> logits`` steps: the repetition penalty over the last
        :data:`PROCESSOR_CONTEXT` tokens (none at 1)."""
        from mlx_lm.sample_utils import make_logits_processors

        penalty = self.repetition_penalty if self.repetition_penalty != 1.0 else None
        return make_logits_processors(repetition_penalty=penalty, repetition_context_size=PROCESSOR_CONTEXT)


class Sampler:
    """Log-probabilities [n, vocab] -> tokens [n]: mlx-lm's filters (top-p, min-p, top-k, in its
    order) and the temperature (:meth:`logits`), then a draw with this sampler's own random key
    (:meth:`key`), so that a seeded reply is the same alone or in a batch.  Temperature 0 is
    argmax.  :meth:`distribution` is what a draw is drawn from (speculative decoding's target)."""

    def __init__(self, options: SamplingOptions):
        import mlx.core as mx  # here, not at the top: this module imports without MLX
        from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

        self.temperature = options.temperature
        self.filters = [f for use, f in (
            (options.top_p < 1, lambda x: apply_top_p(x, options.top_p)),
            (options.min_p > 0, lambda x: apply_min_p(x, options.min_p)),
            (options.top_k > 0, lambda x: apply_top_k(x, options.top_k))) if use]
        self._key = None
        if self.temperature:
            seed = options.seed if options.seed is not None else int.from_bytes(os.urandom(8), "little")
            self._key = mx.random.key(seed % 2**64)

    def key(self):
        """A fresh key for one draw, split off this sampler's own."""
        import mlx.core as mx  # (see __init__)

        self._key, draw = mx.random.split(self._key)
        return draw

    def logits(self, logprobs):
        """The logits a draw is a categorical of: the filters, then the temperature (> 0)."""
        for f in self.filters:
            logprobs = f(logprobs)
        return logprobs * (1 / self.temperature)

    def distribution(self, logprobs):
        """The probabilities [n, vocab] of each row's draw; at temperature 0 a point mass on the argmax."""
        import mlx.core as mx  # (see __init__)

        if self.temperature == 0:
            return (mx.arange(logprobs.shape[-1]) == mx.argmax(logprobs, axis=-1, keepdims=True)).astype(mx.float32)
        return mx.softmax(self.logits(logprobs), axis=-1, precise=True)

    def __call__(self, logprobs):
        import mlx.core as mx  # (see __init__)

        if self.temperature == 0:
            return mx.argmax(logprobs, axis=-1)
        return mx.random.categorical(self.logits(logprobs), key=self.key())


DEFAULTS = SamplingOptions()
# The same outputs as one-by-one greedy decoding (generate_batch's and eval's default).
GREEDY = SamplingOptions(temperature=0.0, top_p=1.0, repetition_penalty=1.0)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, lead: str = "", defaults: bool = True,
                  skip=()) -> None:
    """One flag per option (``--top-p``...), with its help and default; ``lead`` goes before
    each help text; ``defaults=False``: unset flags are None."""
    for f in fields(SamplingOptions):
        if f.name in skip:
            continue
        kind = int if "int" in str(f.type) else float
        shown = "" if f.default is None else f" (default: {f.default})"
        parser.add_argument(flag(f.name), type=kind, default=f.default if defaults else None,
                            help=f"{lead}{f.metadata['help']}{shown}")


def controls() -> dict[str, Control]:
    """Option name -> its app widget, in display order (the fields' order)."""
    return {f.name: f.metadata["control"] for f in fields(SamplingOptions) if f.metadata.get("control")}


__all__ = ["SamplingOptions", "Sampler", "SamplingError", "Control", "DEFAULTS", "GREEDY", "PROCESSOR_CONTEXT",
           "add_arguments", "controls", "flag"]
