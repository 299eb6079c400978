"""Input side of DeepSeek-VL: image loading/preprocessing, the chat template/processor and the
image-token layout."""

from .chat import DEFAULT_SYSTEM_PROMPT, ChatProcessor, format_conversation
from .image import ImageLoadError, ImageProcessor, load_image
from .image_tokens import ImageSpan, ImageTokens

__all__ = [
    "ChatProcessor",
    "DEFAULT_SYSTEM_PROMPT",
    "ImageLoadError",
    "ImageProcessor",
    "ImageSpan",
    "ImageTokens",
    "format_conversation",
    "load_image",
]
