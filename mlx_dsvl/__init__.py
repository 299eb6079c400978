"""mlx-dsvl: DeepSeek-VL in MLX.

Public API: ``load``, ``generate``, ``stream_generate``, ``generate_batch``, ``ChatSession``.
"""

from .generation import generate, generate_batch, stream_generate
from .loading import load
from .session import ChatSession

__all__ = ["load", "generate", "stream_generate", "generate_batch", "ChatSession"]
