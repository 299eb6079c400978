"""Input side of DeepSeek-VL: image loading/preprocessing and the chat template/processor."""

from .chat import DEFAULT_SYSTEM_PROMPT, ChatProcessor, format_conversation
from .image import ImageLoadError, ImageProcessor, load_image

__all__ = [
    "ChatProcessor",
    "DEFAULT_SYSTEM_PROMPT",
    "ImageLoadError",
    "ImageProcessor",
    "format_conversation",
    "load_image",
]
