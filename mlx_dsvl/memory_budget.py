"""The memory budget (``--memory-limit GB``): what a configuration needs at its peak, and the
most accurate configuration that fits a limit.

The memory model is computed from a :class:`~mlx_dsvl.config.ModelConfig` alone: the model is
built lazily (MLX allocates nothing until an array is evaluated) to read its parameter shapes.

- weights: exact, in the loaded layout (:func:`mlx_dsvl.mlx_format.quantize_policy`'s layers
  as packed ``uint32`` + scales + biases per group, in the compute dtype; the rest in the
  compute dtype);
- KV cache: ``rows`` x the context rounded up to mlx-lm's allocation step, plain or quantized
  (packed + scales + biases, groups of 64) from the first prefill on;
- transients: the larger of the vision phase (one image through the towers) and a prefill pass
  at the full context (attention scores, the MLP, a quantized cache's layer dequantized, the
  last position's logits), on top of weights and the whole cache.

The planner keeps what the user chose and picks the rest: the least accuracy lost (the measured
costs in :data:`COSTS`) at the target context, else the longest context down to
:func:`min_context`.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, replace

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ModelConfig
from .loading import resolve_dtype
from .mlx_format import group_bits, mlx_format_info, quantize_policy
from .model_folder import load_config, resolve_model_path
from .model_options import DefaultContext
from .models.deepseek_vl import DeepseekVL
from .models.sam import QUERY_BLOCK

GB = 1e9
GROUP_SIZE = 64  # weights and KV cache, as --quantize and --kv-bits use
KV_STEP = 256  # mlx-lm's KVCache grows by this many positions
BITS = (None, 8, 4)  # None: not quantized

# Accuracy cost of each choice: the largest change of the first-token logits against the
# unquantized part, as a fraction of the largest logit (docs/PERFORMANCE.md; random real-size
# 1.3B weights, float32, CPU).  The costs of several parts are added.
COSTS: dict[tuple[str, int | None], float] = {
    ("llm", None): 0.0, ("vision", None): 0.0, ("kv", None): 0.0,
    # "KV cache over 4096 tokens": 0.0056 and 0.110 of a max logit of 4.43 (same top-1)
    ("kv", 8): 0.0013, ("kv", 4): 0.025,
    # "LLM quantization": 0.116 and 1.94 of 4.39, a 30-token text prompt (4-bit: top-1 changed)
    ("llm", 8): 0.026, ("llm", 4): 0.44,
    # "Quantized vision": 3.4% and 50% (4-bit: top-1 changed)
    ("vision", 8): 0.034, ("vision", 4): 0.50,
}


@dataclass(frozen=True)
class Choice:
    """One configuration: bits of each part (None: not quantized) and the context in tokens."""

    llm_bits: int | None = None
    vision_bits: int | None = None
    kv_bits: int | None = None
    context: int = 4096

    def parts(self) -> list[tuple[str, int | None]]:
        return [("llm", self.llm_bits), ("vision", self.vision_bits), ("kv", self.kv_bits)]

    @property
    def cost(self) -> float:
        """The measured costs of its parts, added."""
        return sum(COSTS[p] for p in self.parts())

    def describe(self) -> str:
        def part(bits, name):
            return f"{bits}-bit {name}" if bits else f"unquantized {name}"

        return (f"{part(self.llm_bits, 'LLM')}, {part(self.vision_bits, 'vision')}, "
                f"{part(self.kv_bits, 'KV')}, {self.context}-token context")


def quantized_bytes(elements: int, bits: int, dtype_size: int, group_size: int = GROUP_SIZE) -> int:
    """A quantized tensor of ``elements``: packed values + a scale and a bias per group."""
    return elements * bits // 8 + 2 * (elements // group_size) * dtype_size


class MemoryModel:
    """Predicted bytes of a model's weights, KV cache and transient peaks."""

    def __init__(self, config: ModelConfig, dtype: mx.Dtype, gpu: bool = False, kv_group_size: int = GROUP_SIZE):
        self.config, self.dtype_size, self.gpu, self.kv_group_size = config, dtype.size, gpu, kv_group_size
        model = DeepseekVL(config)  # lazy: nothing is allocated
        self.elements = {"llm": 0, "vision": 0, "plain": 0}  # quantizable by part, never quantized
        quantizable = {path: "llm" for path in quantize_policy(model, {"language": 4}, GROUP_SIZE)}
        quantizable.update({path: "vision" for path in quantize_policy(model, {"vision": 4}, GROUP_SIZE)})
        for key, v in tree_flatten(model.parameters()):
            path, _, leaf = key.rpartition(".")
            self.elements[quantizable[path] if leaf == "weight" and path in quantizable else "plain"] += v.size
        lm = model.language_model.layers[0].self_attn
        self.layers = len(model.language_model.layers)
        self.kv_heads, self.head_dim, self.heads = lm.n_kv_heads, lm.head_dim, lm.n_heads
        lang = config.language
        self.hidden, self.intermediate, self.vocab = lang["hidden_size"], lang["intermediate_size"], lang["vocab_size"]
        self.layer_linears = sum(  # one decoder layer's linear weights
            m.weight.size for m in model.language_model.layers[0].modules() if isinstance(m, nn.Linear))
        self.towers = _towers(config)

    def weights(self, llm_bits: int | None = None, vision_bits: int | None = None) -> int:
        """Bytes of the loaded parameters."""
        d, e = self.dtype_size, self.elements
        total = e["plain"] * d
        for part, bits in (("llm", llm_bits), ("vision", vision_bits)):
            total += quantized_bytes(e[part], bits, d) if bits else e[part] * d
        return total

    def kv_cache(self, context: int, kv_bits: int | None = None, rows: int = 1) -> int:
        """Bytes of ``rows`` caches of ``context`` tokens (keys and values, every layer)."""
        slots = -(-context // KV_STEP) * KV_STEP
        elements = rows * self.layers * slots * 2 * self.kv_heads * self.head_dim
        if kv_bits:
            return quantized_bytes(elements, kv_bits, self.dtype_size, self.kv_group_size)
        return elements * self.dtype_size

    def vision_peak(self) -> int:
        """Bytes above the weights while one image goes through the towers: the pixels (as read,
        normalized, resized) and the largest block's activations: the MLP, and the attention
        scores (on the CPU copies in float32: scores and the softmax's steps, with SAM's rel-pos
        bias and its sum too; a GPU's fused attention holds SAM's bias only)."""
        d = self.dtype_size
        worst = 0
        for tokens, width, mlp, heads, queries, copies in self.towers:
            scores = heads * queries * tokens * ((copies - 4) * d if self.gpu else copies * 4)
            worst = max(worst, scores + 2 * tokens * mlp * d + 6 * tokens * width * d)
        side = self.config.vision.high.image_size if self.config.vision.hybrid else self.config.vision.low.image_size
        return worst + 3 * 3 * side * side * 4

    def prefill_peak(self, context: int, kv_bits: int | None = None, llm_bits: int | None = None) -> int:
        """Bytes above weights and cache during the last prefill pass of a ``context``-token
        prompt: attention scores and softmax over the context (materialized on the CPU and with a
        quantized cache), a quantized cache's layer dequantized, the MLP, the last logits."""
        d = self.dtype_size
        fused = self.gpu and kv_bits is None
        step = 2048 if fused else 512  # mlx_dsvl.streaming.prefill_step_size
        step = min(step, context)
        attention = 0 if fused else 2 * self.heads * step * context * d
        if kv_bits:
            attention += 2 * context * self.kv_heads * self.head_dim * d
        mlp = 3 * step * self.intermediate * d
        if llm_bits and not self.gpu:  # the CPU's quantized prefill holds about one decoder layer's
            mlp += self.layer_linears * d  # weights dequantized (docs/PERFORMANCE.md)
        return max(attention, mlp) + 4 * step * self.hidden * d + self.vocab * 4

    def peak(self, choice: Choice, rows: int = 1) -> int:
        """Predicted peak bytes of ``choice`` with ``rows`` conversations decoded together."""
        transient = max(self.vision_peak(), self.prefill_peak(choice.context, choice.kv_bits, choice.llm_bits))
        return (self.weights(choice.llm_bits, choice.vision_bits)
                + self.kv_cache(choice.context, choice.kv_bits, rows) + transient)


def _towers(config: ModelConfig) -> list[tuple[int, int, int, int, int, int]]:
    """(tokens, width, MLP width, heads, queries per attention call, copies of the scores) of
    each vision tower: SigLIP's softmax holds 4, SAM's rel-pos bias and its sum 3 more."""
    low = config.vision.low
    towers = [(low.grid**2, low.width, low.mlp_dim, low.heads, low.grid**2, 4)]
    high = config.vision.high
    if high is not None:
        tokens = high.grid**2
        towers.append((tokens, high.width, int(high.width * high.mlp_ratio), high.heads, min(QUERY_BLOCK, tokens), 7))
    return towers


def min_context(config: ModelConfig) -> int:
    """The shortest context the planner gives: one image's tokens and 256 more, for DeepSeek-VL's
    system prompt, a short question and a reply of a paragraph (one KV allocation step)."""
    return config.vision.num_image_tokens + 256


@dataclass(frozen=True)
class Plan:
    choice: Choice
    peak: int
    limit: int
    reduced: bool  # whether anything was chosen below the unquantized, full-context default

    def line(self) -> str:
        """The one line the CLIs print."""
        cost = self.choice.cost
        said = ("none (nothing quantized)" if cost == 0 else
                f"first-token logits move by up to ~{cost:.1%} of the largest logit")
        return (f"memory limit {self.limit / GB:.1f} GB: {self.choice.describe()}; "
                f"predicted peak {self.peak / GB:.2f} GB; cost: {said}")


class BudgetError(ValueError):
    """Nothing fits the memory limit; ``smallest`` is the plan that needs the least."""

    def __init__(self, message: str, smallest: Plan):
        super().__init__(message)
        self.smallest = smallest


def plan(memory: MemoryModel, limit: int, *, llm_bits: int | None | str = "auto",
         vision_bits: int | None | str = "auto", kv_bits: int | None | str = "auto",
         context: int = 4096, fixed_context: bool = False, rows: int = 1, reserve: int = 0) -> Plan:
    """The most accurate configuration whose peak (plus ``reserve`` bytes) fits ``limit``.

    A bits argument left ``"auto"`` is chosen; any other value is kept.  Among the choices that
    fit ``context`` the least costly wins (then the smallest); when none does and the context is
    not ``fixed_context``, the one that fits the longest context (a multiple of mlx-lm's step,
    at least :func:`min_context`).  Raises :class:`BudgetError` naming what the smallest needs.
    """
    options = [BITS if b == "auto" else (b,) for b in (llm_bits, vision_bits, kv_bits)]
    candidates = [Choice(*bits, context=context) for bits in itertools.product(*options)]

    def need(choice: Choice) -> int:
        return memory.peak(choice, rows) + reserve

    fitting = [c for c in candidates if need(c) <= limit]
    if fitting:
        best = min(fitting, key=lambda c: (c.cost, need(c)))
    else:
        floor = min(context, min_context(memory.config))
        smallest = min(candidates, key=lambda c: need(replace(c, context=floor)))
        longest = 0 if fixed_context else _longest(memory, smallest, limit - reserve, rows, floor, context)
        if not longest:
            small = replace(smallest, context=context if fixed_context else floor)
            raise BudgetError(f"nothing fits a memory limit of {limit / GB:.2f} GB: the smallest choice "
                              f"({small.describe()}) needs {need(small) / GB:.2f} GB"
                              + (f", {reserve / GB:.2f} GB of it for the caches" if reserve else ""),
                              Plan(small, need(small), limit, reduced=True))
        best = replace(smallest, context=longest)
    reduced = best != Choice(llm_bits=None if llm_bits == "auto" else llm_bits,
                             vision_bits=None if vision_bits == "auto" else vision_bits,
                             kv_bits=None if kv_bits == "auto" else kv_bits, context=context)
    return Plan(best, need(best), limit, reduced)


def _longest(memory: MemoryModel, choice: Choice, limit: int, rows: int, floor: int, ceiling: int) -> int:
    """The longest context in [floor, ceiling] (multiples of the KV step, or ``floor``) that fits."""
    contexts: Iterable[int] = [*range(ceiling // KV_STEP * KV_STEP, floor, -KV_STEP), floor]
    return next((c for c in contexts if memory.peak(replace(choice, context=c), rows) <= limit), 0)


def machine_limit() -> int:
    """What the machine can give MLX, in bytes: Metal's recommended working set, a CUDA GPU's
    free (else total) memory, or on the CPU backend the system's available memory."""
    info = {}
    try:
        info = mx.device_info()
    except Exception:  # an MLX without device_info
        pass
    if mx.default_device() == mx.gpu:
        for key in ("max_recommended_working_set_size", "free_memory", "total_memory", "memory_size"):
            if isinstance(info.get(key), int) and info[key] > 0:
                return info[key]
    return system_available()


def system_available() -> int:
    """The system's available memory (``MemAvailable`` on Linux, else free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def apply_budget(args: argparse.Namespace, path: str) -> Plan:
    """Choose the options ``args`` leaves unset (``--quantize``, ``--quantize-vision``,
    ``--kv-bits``, ``--max-context`` where the entry point has them) to fit ``--memory-limit`` (default: :func:`machine_limit`),
    before any weight is read, and set them in ``args``.  The choice is said in one line on
    stderr when the limit was given or something was reduced; when nothing fits, a given limit
    raises :class:`BudgetError`, the machine's default only warns and goes on with the smallest."""
    config = load_config(resolve_model_path(path))
    group = getattr(args, "kv_group_size", GROUP_SIZE)
    memory = MemoryModel(config, resolve_dtype(getattr(args, "dtype", None)), gpu=mx.default_device() == mx.gpu,
                         kv_group_size=group)
    given = args.memory_limit is not None
    limit = int(args.memory_limit * GB) if given else machine_limit()
    stored_llm, stored_vision = loaded_bits(config)  # a converted folder's quantized groups are its own
    llm = stored_llm if stored_llm else _given(args, "quantize")
    vision = stored_vision if stored_vision else _given(args, "quantize_vision")
    kv = _given(args, "kv_bits")
    if kv == "auto" and memory.head_dim % group:
        kv = None  # groups that do not divide the head size (tiny test models)
    context = getattr(args, "max_context", DefaultContext(4096))
    rows = getattr(args, "max_batch", 1)  # the server decodes up to --max-batch rows
    reserve = int((getattr(args, "cache_mb", 0) + getattr(args, "image_cache_mb", 0)) * 1024 * 1024)
    fixed = not isinstance(context, DefaultContext)
    try:
        chosen = plan(memory, limit, llm_bits=llm, vision_bits=vision, kv_bits=kv, context=int(context),
                      fixed_context=fixed, rows=rows, reserve=reserve)
    except BudgetError as e:
        if given:
            raise
        print(f"warning: {e} (what this machine can give); going on with it", file=sys.stderr)
        chosen = e.smallest
    if given or chosen.reduced:
        print(f"[mlx-dsvl] {chosen.line()}", file=sys.stderr)
    if chosen.reduced:
        c = chosen.choice
        for name, asked, value in (("quantize", llm, c.llm_bits), ("quantize_vision", vision, c.vision_bits),
                                   ("kv_bits", kv, c.kv_bits)):
            if asked == "auto":
                setattr(args, name, value)
        if hasattr(args, "max_context"):
            args.max_context = c.context
    return chosen


def loaded_bits(config: ModelConfig, quantize: int | None = None,
                quantize_vision: int | None = None) -> tuple[int | None, int | None]:
    """(LLM bits, vision bits) of the model loaded from ``config``'s folder: a converted folder's
    recorded quantization, else what loading quantizes."""
    stored = group_bits((mlx_format_info(config.raw) or {}).get("quantization"))
    return stored["language"] or quantize, stored["vision"] or quantize_vision


def _given(args: argparse.Namespace, name: str) -> int | str | None:
    """``"auto"`` for an option the entry point has and the user left unset; None where it has none."""
    if not hasattr(args, name):
        return None
    value = getattr(args, name)
    return "auto" if value is None else value
