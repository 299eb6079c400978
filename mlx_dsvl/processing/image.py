"""Image loading and preprocessing, bit-exact with DeepSeek-VL's ``VLMImageProcessor``.

The original pipeline (``deepseek_vl/models/image_processing_vlm.py``), per image:
``convert("RGB")``; resize so the longest side is ``S`` (each side ``int``-truncated, at least
``min_size``) with PIL's BICUBIC (what torchvision's ``resize`` does for a PIL input);
``expand2square`` on the pad colour; ``[3, H, W]``; rescale in float64, then float32
(transformers' ``rescale``).  The original then normalizes; this port does **not**: the model
applies ``(x - mean) / std`` itself, so the output is always in ``[0, 1]``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..config import CLIP_MEAN, CLIP_STD

ImageInput = str | os.PathLike | bytes | Image.Image


class ImageLoadError(ValueError):
    """An image could not be opened or decoded; the message names the file."""


def load_image(image: ImageInput, name: str | None = None) -> Image.Image:
    """Open ``image`` (a path, a ``data:image/...;base64,`` URI, raw ``bytes`` -- e.g. an upload,
    named ``name`` in errors -- or a PIL image) as RGB PIL.

    Conversion is exactly ``img.convert("RGB")`` as in the original, so alpha is dropped (not
    composited), palettes are expanded, CMYK uses Pillow's naive formula and 16-bit greyscale
    (``I;16``) is clipped to 255 rather than rescaled. Animated images give their first frame.
    EXIF orientation is ignored, like the original.

    Raises:
        ImageLoadError: missing file, not an image / corrupt data, or more pixels than
            ``PIL.Image.MAX_IMAGE_PIXELS`` (decompression-bomb guard, warning level included).
    """
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, (bytes, bytearray)):
        return _decode(io.BytesIO(image), name or "<image bytes>")
    if not isinstance(image, (str, os.PathLike)):
        raise TypeError(f"expected a path, bytes or a PIL.Image.Image, got {type(image).__name__}")

    path = os.fspath(image)
    if path.startswith("data:image"):
        # Base64 data URI, as accepted by the original's load_pil_images.
        name = "<base64 data URI>"
        try:
            source = io.BytesIO(base64.b64decode(path.split(",", 1)[1], validate=False))
        except (IndexError, binascii.Error) as exc:
            raise ImageLoadError(f"malformed base64 image data URI: {path[:40]}...") from exc
    else:
        name = path
        if not os.path.exists(path):
            raise ImageLoadError(f"image file not found: {path}")
        if os.path.isdir(path):
            raise ImageLoadError(f"image path is a directory, not a file: {path}")
        source = path
    return _decode(source, name)


def _decode(source, path: str) -> Image.Image:
    """Decode ``source`` (a path or a file object) to RGB; errors name ``path``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                img.seek(0)  # first frame of animated GIF / APNG / multi-page TIFF
                return img.convert("RGB")  # forces the full decode inside the try
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(
            f"image is too large (decompression-bomb limit, "
            f"PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}): {path}: {exc}"
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(f"not a recognised image file: {path}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageLoadError(f"corrupt or unreadable image file: {path}: {exc}") from exc


class ImageProcessor:
    """Resize, pad to square and rescale to ``[0, 1]``; output ``[N, 3, S, S]`` float32.

    Args:
        image_size: ``S``, the side of the square output (384 for 1.3B, 1024 for 7B).
        min_size: lower bound on the resized short side (14 in every release).
        image_mean: per-channel mean; sets the pad colour ``int(m * 255)`` (127s when None).
            Not applied here: the model normalizes.
        image_std: per-channel std, kept for the model loader.
        do_normalize: whether the original applied ``(x - mean) / std`` in the processor.
        rescale_factor: multiplier taking uint8 to ``[0, 1]`` (1/255).
    """

    def __init__(
        self,
        image_size: int,
        min_size: int = 14,
        image_mean: Sequence[float] | None = CLIP_MEAN,
        image_std: Sequence[float] | None = CLIP_STD,
        do_normalize: bool = True,
        rescale_factor: float = 1.0 / 255.0,
    ):
        if int(image_size) <= 0 or int(min_size) <= 0:
            raise ValueError(
                f"image_size and min_size must be positive, got {image_size}, {min_size}"
            )
        self.image_size = int(image_size)
        self.min_size = int(min_size)
        self.image_mean = None if image_mean is None else tuple(float(x) for x in image_mean)
        self.image_std = None if image_std is None else tuple(float(x) for x in image_std)
        self.do_normalize = bool(do_normalize)
        self.rescale_factor = float(rescale_factor)
        if self.image_mean is None:
            self.background_color: tuple[int, int, int] = (127, 127, 127)
        else:
            self.background_color = tuple(int(x * 255) for x in self.image_mean)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> ImageProcessor:
        """Build from ``folder/preprocessor_config.json``; unknown keys are ignored."""
        path = Path(folder) / "preprocessor_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: missing preprocessor_config.json ({path})")
        cfg = json.loads(path.read_text(encoding="utf-8"))
        if "image_size" not in cfg:
            raise ValueError(f"{path}: 'image_size' is required")
        known = ("min_size", "image_mean", "image_std", "do_normalize", "rescale_factor")
        kwargs = {k: cfg[k] for k in known if k in cfg}
        return cls(image_size=cfg["image_size"], **kwargs)

    @property
    def default_shape(self) -> tuple[int, int, int]:
        """``(3, S, S)``: the shape of one processed image."""
        return (3, self.image_size, self.image_size)

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """Resized ``(width, height)``: longest side ``S``, each side truncated, >= min_size."""
        if width <= 0 or height <= 0:
            raise ValueError(f"invalid image size {width}x{height}")
        longest = max(width, height)
        new_h = max(int(height / longest * self.image_size), self.min_size)
        new_w = max(int(width / longest * self.image_size), self.min_size)
        return new_w, new_h

    def resize_and_pad(self, image: Image.Image) -> Image.Image:
        """RGB PIL image -> resized (BICUBIC) and centred on a square of the pad colour."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        new_w, new_h = self.target_size(*image.size)
        if (new_w, new_h) != image.size:
            image = image.resize((new_w, new_h), Image.BICUBIC)
        if new_w == new_h:
            return image
        side = max(new_w, new_h)  # == image_size: the longest side is int(m / m * S) == S
        canvas = Image.new("RGB", (side, side), self.background_color)
        canvas.paste(image, ((side - new_w) // 2, (side - new_h) // 2))
        return canvas

    def to_array(self, image: Image.Image) -> np.ndarray:
        """Square RGB PIL image -> ``[3, side, side]`` float32 in ``[0, 1]``."""
        x = np.asarray(image, dtype=np.uint8)  # [H, W, 3]
        x = np.transpose(x, (2, 0, 1))  # [3, H, W]
        # transformers' rescale: upcast to float64, multiply, downcast to float32.
        return (x.astype(np.float64) * self.rescale_factor).astype(np.float32)

    def preprocess_one(self, image: ImageInput) -> np.ndarray:
        """One path or PIL image -> ``[3, S, S]`` float32."""
        return self.to_array(self.resize_and_pad(load_image(image)))

    def __call__(self, images: ImageInput | Iterable[ImageInput]) -> np.ndarray:
        """Images (paths or PIL) -> ``[N, 3, S, S]`` float32 in ``[0, 1]``; N may be 0."""
        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        arrays = [self.preprocess_one(im) for im in images]
        if not arrays:
            return np.zeros((0, *self.default_shape), dtype=np.float32)
        return np.stack(arrays, axis=0)

    def __repr__(self) -> str:
        return (
            f"ImageProcessor(image_size={self.image_size}, min_size={self.min_size}, "
            f"image_mean={self.image_mean}, image_std={self.image_std}, "
            f"do_normalize={self.do_normalize}, background_color={self.background_color})"
        )
