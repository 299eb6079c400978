"""The image processor against an independent transcription of the original DeepSeek-VL rules.

``reference_pixels`` below restates ``VLMImageProcessor`` step by step (open + convert("RGB"),
torchvision's PIL-path BICUBIC resize = ``img.resize((w, h), BICUBIC)``, ``expand2square``,
``np.array``, HWC->CHW, transformers' float64 rescale then float32). Our processor must agree
bit for bit (``np.array_equal``).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mlx_dsvl.processing import ImageLoadError, ImageProcessor, load_image
from mlx_dsvl.random_tokenizer import write_processor_configs

SIGLIP_MEAN = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def reference_pixels(path, image_size, image_mean, min_size=14):
    """The original pipeline, written out independently: returns float32 [3, side, side]."""
    img = Image.open(path).convert("RGB")
    width, height = img.size
    longest = max(width, height)
    size_hw = [
        max(int(height / longest * image_size), min_size),
        max(int(width / longest * image_size), min_size),
    ]
    if [height, width] != size_hw:  # torchvision returns the input untouched in that case
        img = img.resize((size_hw[1], size_hw[0]), Image.BICUBIC)
    background = (127, 127, 127) if image_mean is None else tuple(int(m * 255) for m in image_mean)
    w, h = img.size
    if w > h:
        square = Image.new(img.mode, (w, w), background)
        square.paste(img, (0, (w - h) // 2))
        img = square
    elif h > w:
        square = Image.new(img.mode, (h, h), background)
        square.paste(img, ((h - w) // 2, 0))
        img = square
    x = np.array(img)  # [H, W, 3] uint8
    x = np.transpose(x, (2, 0, 1))  # [3, H, W]
    return (x.astype(np.float64) * (1.0 / 255.0)).astype(np.float32)


def noise(shape, seed, dtype=np.uint8, high=256):
    return np.random.default_rng(seed).integers(0, high, size=shape, dtype=dtype)


def save_rgb(tmp_path, width, height, seed=0):
    path = tmp_path / f"rgb_{width}x{height}.png"
    Image.fromarray(noise((height, width, 3), seed)).save(path)
    return path


SIZES = [(333, 777), (777, 333), (1, 2000), (3000, 5), (500, 500), (384, 384)]
PROCESSORS = [
    (384, SIGLIP_MEAN, SIGLIP_MEAN),
    (384, CLIP_MEAN, CLIP_STD),
    (1024, CLIP_MEAN, CLIP_STD),
    (1024, SIGLIP_MEAN, SIGLIP_MEAN),
]


@pytest.mark.parametrize("image_size,mean,std", PROCESSORS)
@pytest.mark.parametrize("width,height", SIZES)
def test_matches_original_rules_rgb(tmp_path, width, height, image_size, mean, std):
    path = save_rgb(tmp_path, width, height, seed=width * 7 + height)
    do_norm = mean == SIGLIP_MEAN
    proc = ImageProcessor(image_size, image_mean=mean, image_std=std, do_normalize=do_norm)
    out = proc([path])  # [1, 3, S, S]
    assert out.shape == (1, 3, image_size, image_size) and out.dtype == np.float32
    assert np.array_equal(out[0], reference_pixels(path, image_size, mean))
    assert out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize("image_size,mean", [(384, SIGLIP_MEAN), (1024, CLIP_MEAN)])
def test_clamped_short_side_and_pad_colour(tmp_path, image_size, mean):
    """1x2000 -> 14 x S strip centred; 3000x5 -> S x 14; the rest is exactly the pad colour."""
    proc = ImageProcessor(image_size, image_mean=mean, image_std=mean)
    pad = np.array([int(m * 255) for m in mean], dtype=np.float64) / 255.0
    assert proc.target_size(1, 2000) == (14, image_size)
    assert proc.target_size(3000, 5) == (image_size, 14)

    pad = pad.astype(np.float32)[:, None, None]  # [3, 1, 1]
    offset = (image_size - 14) // 2

    tall = proc([save_rgb(tmp_path, 1, 2000)])[0]  # [3, S, S]
    assert np.all(tall[:, :, :offset] == pad) and np.all(tall[:, :, offset + 14 :] == pad)
    assert not np.all(tall[:, :, offset : offset + 14] == pad)

    wide = proc([save_rgb(tmp_path, 3000, 5)])[0]  # [3, S, S]
    assert np.all(wide[:, :offset, :] == pad) and np.all(wide[:, offset + 14 :, :] == pad)
    assert not np.all(wide[:, offset : offset + 14, :] == pad)


def _write_mode_images(tmp_path):
    """One file per PIL mode the loader must handle; returns {name: path}."""
    h, w = 61, 97
    rgba = Image.fromarray(noise((h, w, 4), 1), "RGBA")
    paths = {}
    paths["RGBA"] = tmp_path / "rgba.png"
    rgba.save(paths["RGBA"])
    paths["LA"] = tmp_path / "la.png"
    rgba.convert("LA").save(paths["LA"])
    paths["L"] = tmp_path / "l.png"
    Image.fromarray(noise((h, w), 2), "L").save(paths["L"])
    paths["P"] = tmp_path / "p.png"
    pal = Image.fromarray(noise((h, w, 3), 3)).quantize(colors=64)
    pal.info["transparency"] = 0
    pal.save(paths["P"], transparency=0)
    paths["CMYK"] = tmp_path / "cmyk.tiff"
    Image.fromarray(noise((h, w, 4), 4), "CMYK").save(paths["CMYK"])
    paths["I;16"] = tmp_path / "i16.png"
    Image.fromarray(noise((h, w), 5, dtype=np.uint16, high=65536)).save(paths["I;16"])
    paths["GIF"] = tmp_path / "anim.gif"
    frames = [Image.fromarray(noise((h, w, 3), 10 + k)).quantize(colors=32) for k in range(3)]
    frames[0].save(paths["GIF"], save_all=True, append_images=frames[1:], duration=50, loop=0)
    return paths


@pytest.mark.parametrize("image_size,mean", [(384, SIGLIP_MEAN), (1024, CLIP_MEAN)])
def test_matches_original_rules_modes(tmp_path, image_size, mean):
    paths = _write_mode_images(tmp_path)
    with Image.open(paths["I;16"]) as im:
        assert im.mode.startswith("I")  # really a 16-bit greyscale file
    with Image.open(paths["GIF"]) as im:
        assert getattr(im, "n_frames", 1) == 3
    proc = ImageProcessor(image_size, image_mean=mean, image_std=mean)
    for name, path in paths.items():
        out = proc([path])[0]
        assert np.array_equal(out, reference_pixels(path, image_size, mean)), name


def test_load_image_modes_equal_convert_rgb(tmp_path):
    paths = _write_mode_images(tmp_path)
    for name, path in paths.items():
        img = load_image(path)
        assert img.mode == "RGB", name
        with Image.open(path) as raw:
            assert np.array_equal(np.array(img), np.array(raw.convert("RGB"))), name
    # Animated GIF: the first frame, not a later one.
    with Image.open(paths["GIF"]) as gif:
        gif.seek(2)
        last = np.array(gif.convert("RGB"))
    assert not np.array_equal(np.array(load_image(paths["GIF"])), last)
    # I;16: Pillow's convert("RGB") saturates at 255 instead of rescaling 16-bit values.
    raw16 = np.array(Image.open(paths["I;16"])).astype(np.int64)
    assert np.array_equal(np.array(load_image(paths["I;16"]))[..., 0], np.clip(raw16, 0, 255))


def test_pil_input_and_batch(tmp_path):
    a = save_rgb(tmp_path, 333, 777, seed=1)
    b = save_rgb(tmp_path, 777, 333, seed=2)
    proc = ImageProcessor(384, image_mean=SIGLIP_MEAN, image_std=SIGLIP_MEAN)
    out = proc([a, Image.open(b)])  # [2, 3, 384, 384]
    assert out.shape == (2, 3, 384, 384)
    assert np.array_equal(out[0], reference_pixels(a, 384, SIGLIP_MEAN))
    assert np.array_equal(out[1], reference_pixels(b, 384, SIGLIP_MEAN))
    assert proc([]).shape == (0, 3, 384, 384)


def test_from_pretrained(tmp_path):
    write_processor_configs(tmp_path, 1024, CLIP_MEAN, CLIP_STD, do_normalize=False)
    cfg = tmp_path / "preprocessor_config.json"
    cfg.write_text(cfg.read_text().replace('"min_size"', '"unknown_key": 3, "min_size"'))
    proc = ImageProcessor.from_pretrained(tmp_path)
    assert proc.image_size == 1024 and proc.min_size == 14 and proc.do_normalize is False
    assert proc.image_mean == CLIP_MEAN and proc.image_std == CLIP_STD
    assert proc.background_color == (122, 116, 104)
    assert ImageProcessor(384, image_mean=SIGLIP_MEAN).background_color == (127, 127, 127)
    assert ImageProcessor(384, image_mean=None).background_color == (127, 127, 127)


# ----------------------------------------------------------------------------- errors


def _assert_load_error(path, match=None):
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)
    if match:
        assert match in str(info.value)


def test_missing_file(tmp_path):
    _assert_load_error(tmp_path / "nope.png", "not found")


def test_corrupt_and_non_image_files(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _assert_load_error(junk)
    text = tmp_path / "notes.txt"
    text.write_text("this is not an image\n")
    _assert_load_error(text)
    truncated = tmp_path / "truncated.png"
    full = save_rgb(tmp_path, 64, 64).read_bytes()
    truncated.write_bytes(full[: len(full) // 2])
    _assert_load_error(truncated)


def test_decompression_bomb(tmp_path, monkeypatch):
    warn_size = save_rgb(tmp_path, 40, 40)  # 1600 px: above the limit -> Pillow warns
    error_size = save_rgb(tmp_path, 100, 100)  # 10000 px: above 2x the limit -> Pillow raises
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    _assert_load_error(warn_size, "decompression-bomb")
    _assert_load_error(error_size, "decompression-bomb")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    assert load_image(warn_size).size == (40, 40)
