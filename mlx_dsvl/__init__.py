"""mlx-dsvl: DeepSeek-VL in MLX.

Public API: ``load``, ``generate``, ``stream_generate``, ``generate_batch``, ``ChatSession``.

The names are imported on first use, so that tools which need no MLX (the checkpoint maker,
the BLAS check that runs before MLX is loaded) can be imported without it.
"""

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time the names load on first use
    from .generation import generate as generate
    from .generation import generate_batch as generate_batch
    from .generation import stream_generate as stream_generate
    from .loading import load as load
    from .session import ChatSession as ChatSession

_API = {"load": ".loading", "generate": ".generation", "stream_generate": ".generation",
        "generate_batch": ".generation", "ChatSession": ".session"}

__all__ = list(_API)


def __getattr__(name):
    if name in _API:
        value = getattr(import_module(_API[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
