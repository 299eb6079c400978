"""The model options the entry points share (``--model``, ``--dtype``, ``--device``, ``--quantize``,
``--quantize-vision``, ...), :func:`load_from_args` and :func:`load_draft_from_args`.

This module imports no MLX: entry points import it at the top and build their parsers after
:func:`mlx_dsvl.blas.ensure_fast_blas`, which may re-execute the process first.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .models.deepseek_vl import DeepseekVL
    from .processing.chat import ChatProcessor

DEFAULT_MODEL = "deepseek-ai/deepseek-vl-1.3b-chat"


class DefaultContext(int):
    """``--max-context``'s default (4096 as an int): a value the memory budget may lower, unlike
    one the user gave."""


def gigabytes(text: str) -> float:
    """``--memory-limit``'s type: a positive, finite number of GB."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GB, got {text!r}") from None
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number of GB, got {text}")
    return value


def _arguments() -> dict[str, tuple[str, dict[str, Any]]]:
    """Each option's flag and ``add_argument`` keywords, with its choices from its own module."""
    # (these import MLX: called when a parser is built, after the BLAS re-execution)
    from .device import DEVICES
    from .drafting import DRAFTERS, NUM_DRAFT_TOKENS
    from .loading import DTYPES
    from .mlx_format import QUANT_BITS
    from .streaming import KV_BITS, KV_GROUP_SIZES

    return {
        "model": ("--model", dict(default=DEFAULT_MODEL,
                                  help=f"local model folder or Hugging Face hub id (default: {DEFAULT_MODEL})")),
        "dtype": ("--dtype", dict(choices=list(DTYPES), default=None,
                                  help="compute dtype (default: float32 on CPU, bfloat16 on GPU)")),
        "adapter": ("--adapter", dict(
            default=None,
            help="a training output folder (python -m mlx_dsvl.train): its adapters/weights are applied")),
        "device": ("--device", dict(choices=list(DEVICES), default="auto",
                                    help="auto = the GPU when MLX has one (Metal/CUDA), else the CPU (default: auto)")),
        "quantize": ("--quantize", dict(
            type=int, choices=QUANT_BITS, default=None,
            help="quantize the LLM to 4 or 8 bits (groups of 64) while loading: the unquantized LLM is "
                 "never held in memory (a folder from python -m mlx_dsvl.convert --quantize loads "
                 "quantized as it is)")),
        "quantize_vision": ("--quantize-vision", dict(
            type=int, choices=QUANT_BITS, default=None,
            help="quantize the vision towers' and the aligner's linear layers to 4 or 8 bits (groups of "
                 "64) while loading; patch embeddings, SAM's neck, norms and position embeddings stay "
                 "in the compute dtype (default: not quantized)")),
        "kv_bits": ("--kv-bits", dict(type=int, choices=KV_BITS, default=None,
                                      help="keep the KV cache quantized to 4 or 8 bits (default: not quantized)")),
        "kv_group_size": ("--kv-group-size", dict(
            type=int, choices=KV_GROUP_SIZES, default=64,
            help="KV-cache quantization group size; it must divide the LLM's head size (default: 64)")),
        "quantized_kv_start": ("--quantized-kv-start", dict(
            type=int, default=0, help="quantize the KV cache once it holds this many tokens (default: 0)")),
        "draft": ("--draft", dict(
            choices=list(DRAFTERS), default=None,
            help="speculative decoding: ngram = prompt lookup, the conversation's own tokens proposed where "
                 "its last few tokens occurred before; a greedy reply gets the same tokens as without, a "
                 "sampled one the same distribution (default: none)")),
        "draft_model": ("--draft-model", dict(
            default=None, metavar="PATH",
            help="speculative decoding with a smaller DeepSeek-VL of the same vocabulary drafting (the 1.3B "
                 "for the 7B; folder or hub id), loaded with the same --dtype, --quantize and "
                 "--quantize-vision; as --draft, the same tokens or distribution as without (default: none)")),
        "num_draft_tokens": ("--num-draft-tokens", dict(
            type=int, default=NUM_DRAFT_TOKENS, metavar="K",
            help=f"tokens drafted at most per check with --draft or --draft-model (default: {NUM_DRAFT_TOKENS})")),
        "max_context": ("--max-context", dict(
            type=int, default=DefaultContext(4096),
            help="context limit in tokens; older turns are dropped beyond it (default: 4096)")),
        "memory_limit": ("--memory-limit", dict(
            type=gigabytes, default=None, metavar="GB",
            help="memory the model may use, in GB: the options not given among --quantize, "
                 "--quantize-vision, --kv-bits and --max-context are chosen to fit it, the most accurate first (default: what "
                 "the machine can give: Metal's recommended working set, a CUDA GPU's free memory, "
                 "else the system's available memory)")),
    }


def add_model_arguments(parser: argparse.ArgumentParser, *options: str, **changes: dict[str, Any]) -> None:
    """Add the named ``options``; ``changes`` update their keywords (``model={"default": None}``)."""
    arguments = _arguments()
    bad = sorted(set(options) - set(arguments) | set(changes) - set(options))
    if bad:
        raise ValueError(f"no model option {bad} to add or change; the options: {list(arguments)}")
    for name in options:
        flag, keywords = arguments[name]
        parser.add_argument(flag, **{**keywords, **changes.get(name, {})})


def load_from_args(args: argparse.Namespace, model: str | None = None) -> tuple[DeepseekVL, ChatProcessor]:
    """:func:`mlx_dsvl.load` with the flags an entry point has; the caller selects the device first.

    With ``--memory-limit`` among them, the budget first chooses the options not given (see
    :func:`mlx_dsvl.memory_budget.apply_budget`: ``args`` is updated, a reduction is said on
    stderr, ``BudgetError`` when nothing fits)."""
    from .loading import load  # (imports MLX)
    from .memory_budget import apply_budget

    path = model or args.model
    if hasattr(args, "memory_limit"):
        apply_budget(args, path)
    return load(path, dtype=getattr(args, "dtype", None),
                quantize=getattr(args, "quantize", None), adapter_path=getattr(args, "adapter", None),
                quantize_vision=getattr(args, "quantize_vision", None))


def check_draft_args(args: argparse.Namespace) -> None:
    """``ValueError`` for drafting flags that contradict each other."""
    if getattr(args, "draft", None) is not None and getattr(args, "draft_model", None) is not None:
        raise ValueError(f"--draft {args.draft} and --draft-model are exclusive: choose one drafter")
    if getattr(args, "num_draft_tokens", 1) < 1:
        raise ValueError(f"--num-draft-tokens must be an integer >= 1, got {args.num_draft_tokens}")


def load_draft_from_args(args: argparse.Namespace, target: tuple[DeepseekVL, ChatProcessor],
                         model: str | None = None) -> tuple[DeepseekVL, ChatProcessor] | None:
    """The ``--draft-model`` (None without one), loaded with the target's ``--dtype``,
    ``--quantize`` and ``--quantize-vision`` (no adapter, no memory budget of its own);
    ``ModelLoadError`` naming both folders when it cannot draft for ``target``."""
    from .drafting import draft_mismatch  # (imports MLX)
    from .loading import ModelLoadError, load

    if getattr(args, "draft_model", None) is None:
        return None
    draft = load(args.draft_model, dtype=getattr(args, "dtype", None), quantize=getattr(args, "quantize", None),
                 quantize_vision=getattr(args, "quantize_vision", None))
    problem = draft_mismatch(target, draft)
    if problem is not None:
        raise ModelLoadError(f"--draft-model {args.draft_model} cannot draft for {model or args.model}: "
                             f"{problem}")
    return draft
