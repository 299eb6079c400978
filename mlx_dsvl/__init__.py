"""mlx-dsvl: DeepSeek-VL in MLX.

Public API: ``load``, ``generate``, ``stream_generate``, ``generate_batch``, ``ChatSession``.

The names are imported on first use, so that tools which need no MLX (the checkpoint maker,
the BLAS check that runs before MLX is loaded) can be imported without it.
"""

import sys
from importlib import import_module
from types import ModuleType
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


class _Package(ModuleType):
    """Keeps the API's names: importing the CLI module ``mlx_dsvl.generate`` would otherwise
    bind it as the package's ``generate`` (the import system sets every submodule on its
    parent), hiding the function.  (mlx-lm imports its function eagerly over the module; this
    package must import without MLX.)"""

    def __setattr__(self, name, value):
        if name in _API and isinstance(value, ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
