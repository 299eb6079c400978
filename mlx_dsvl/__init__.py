"""mlx-dsvl: DeepSeek-VL in MLX."""

from .loading import load

__all__ = ["load"]
