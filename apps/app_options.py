"""The chat app's command line and start-up, without Streamlit: its arguments and their checks,
``python apps/chat.py``'s ``streamlit run`` command line, and the warnings shown at start
(a server reachable from other machines, a CPU without OpenBLAS).  ``chat_logic`` re-exports
these names; ``apps/chat.py`` uses them through it."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from mlx_dsvl import blas
from mlx_dsvl.model_options import DEFAULT_MODEL, add_model_arguments
from mlx_dsvl.sampling import add_arguments, controls

# MLX is imported in the functions: `python apps/chat.py` may re-execute itself first (mlx_dsvl.blas).
MODEL_ENV = "MLX_DSVL_APP_MODEL"  # the model when no --model is given (tests use it)
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# The sidebar's KV-cache choices -> ChatSession's kv_bits (groups of 64)
KV_CACHE_OPTIONS = {"full precision": None, "8-bit": 8, "4-bit": 4}
# The sidebar's vision choices -> load's quantize_vision (groups of 64)
VISION_OPTIONS = {"full precision": None, "8-bit": 8, "4-bit": 4}


# -- command line ---------------------------------------------------------------------------
class _Strict(argparse.ArgumentParser):
    def error(self, message):  # a ValueError for the caller to report, not usage + exit
        raise ValueError(message)


def parse_args(argv: Sequence[str], strict: bool = False) -> argparse.Namespace:
    """The app's own arguments: ``streamlit run apps/chat.py -- --model DIR|hub-id ...``.

    ``--4bit`` starts with the 4-bit toggle on, ``--quantize-vision 8|4`` with that vision choice; ``--device auto|cpu|gpu`` as in ``generate``;
    ``--draft-model PATH`` drafts for the model (the "Speculative decoding" toggle starts on); ``--max-tokens``, ``--temperature``, ``--top-p``,
    ``--repetition-penalty``, ``--kv-bits`` and ``--system`` set the sidebar's starting values.

    Streamlit puts what follows ``--`` in ``sys.argv[1:]``.  Unless ``strict`` (``python
    apps/chat.py`` checks its arguments before starting the server), unknown arguments are
    ignored (under pytest's AppTest ``sys.argv`` is pytest's).  Without ``--model``:
    ``$MLX_DSVL_APP_MODEL``, then the 1.3B chat model.
    """
    p = _Strict(prog="python apps/chat.py", add_help=False)
    add_model_arguments(p, "model", model={"default": None})
    p.add_argument("--4bit", dest="quantize", action="store_true")
    add_model_arguments(p, "quantize_vision", "adapter", "device", "draft_model")
    # starting values of the sidebar (python -m mlx_dsvl.generate's names; None: its defaults)
    add_arguments(p, defaults=False, skip=("seed",))
    add_model_arguments(p, "kv_bits")
    p.add_argument("--system", default=None)
    if strict:
        args = p.parse_args(list(argv))
    else:
        try:
            args, _ = p.parse_known_args(list(argv))
        except ValueError:  # e.g. "--model" with no value: fall back to the defaults
            args = p.parse_args([])
    if not args.model:
        args.model = os.environ.get(MODEL_ENV) or DEFAULT_MODEL
    return args


# The sidebar widgets' limits; a starting value (--temperature ...) must lie within them.
SLIDERS = {name: (c.low, c.high) for name, c in controls().items()}


def check_start_values(args: argparse.Namespace) -> None:
    """``ValueError`` naming the flag whose starting value the sidebar cannot take."""
    for name, (lo, hi) in SLIDERS.items():
        value = getattr(args, name)
        if value is not None and not lo <= value <= hi:
            raise ValueError(f"--{name.replace('_', '-')} must be in [{lo}, {hi}] (the sidebar's range), got {value}")


def check_launch(args: argparse.Namespace) -> None:
    """Before ``python apps/chat.py`` starts a server: the values, the device, a local model
    folder's config.json and the adapter folder (a hub id is fetched by the app itself)."""
    from mlx_dsvl.device import select_device
    from mlx_dsvl.loading import ModelLoadError, is_hub_id, load_config

    check_start_values(args)
    select_device(args.device)  # --device gpu without one
    folder = Path(args.model).expanduser()
    if folder.is_dir():
        load_config(folder)
    elif not is_hub_id(args.model):
        raise ModelLoadError(f"{args.model}: no such model folder")
    if args.adapter and not (Path(args.adapter).expanduser() / "adapter_config.json").is_file():
        raise ValueError(f"{args.adapter}: no adapter_config.json (not an adapter folder)")


def address_warning(address: str | None) -> str | None:
    """A warning when the server is reachable from other machines (not loopback only)."""
    if address and address.strip().strip("[]") in LOOPBACK:
        return None
    if not address:
        return ("This server listens on every network interface (apps/.streamlit/config.toml was not "
                "read: Streamlit >= 1.64 reads it): restart it with --server.address 127.0.0.1.")
    return f"This server listens on {address}: anyone who can reach it can use the model."


def blas_hint() -> str | None:
    """On Linux's CPU backend without OpenBLAS loaded: how to start the app much faster.

    (``python apps/chat.py`` re-executes itself with OpenBLAS preloaded before it starts the
    server; ``streamlit run`` cannot, so its users preload it.)"""
    if not sys.platform.startswith("linux"):
        return None
    import mlx.core as mx

    if mx.default_device() != mx.cpu or blas.openblas_loaded():
        return None
    lib = blas.find_openblas()
    if lib is None:
        return ("MLX's CPU backend is much faster with OpenBLAS: `pip install ngsolve-openblas` "
                "(x86-64) or `apt-get install libopenblas0-pthread`, then start the app with "
                "`python apps/chat.py ...`, which preloads it.")
    env = " ".join(f"{k}={v}" for k, v in blas.preload_env(lib).items())
    return (f"MLX's CPU backend is much faster with OpenBLAS: start the app with `python apps/chat.py ...` "
            f"(it preloads {lib}) or `{env} streamlit run apps/chat.py ...`.")


# -- python apps/chat.py --------------------------------------------------------------------
def launch_argv(script: str, argv: Sequence[str]) -> list[str]:
    """``python apps/chat.py ARGS`` -> the ``streamlit run`` command line it stands for.

    Streamlit's own ``--section.option[=value]`` flags go before ``--``, the app's options after
    it.  The server settings (loopback only, no usage statistics, upload limit) come from
    ``apps/.streamlit/config.toml``, which Streamlit reads next to the script from any folder,
    so flags and ``STREAMLIT_*`` variables the user gives still win.
    """
    st_args: list[str] = []
    app_args: list[str] = []
    items = iter(argv)
    for a in items:
        if a.startswith("--") and "." in a.split("=", 1)[0]:
            st_args.append(a)
            if "=" not in a:
                st_args.append(next(items, ""))
        else:
            app_args.append(a)
    return ["streamlit", "run", script, *st_args, "--", *app_args]
