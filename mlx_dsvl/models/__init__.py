"""MLX modules: SigLIP, SAM-B, the vision towers, the aligner and the full DeepSeek-VL model."""

from .deepseek_vl import DeepseekVL

__all__ = ["DeepseekVL"]
