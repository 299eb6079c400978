"""The DeepSeek-VL model: vision tower -> aligner -> merge into token embeddings -> Llama.

Attribute names mirror the original checkpoint: ``vision_model``, ``aligner``,
``language_model`` (mlx-lm's llama ``Model``: ``language_model.model.*`` and the untied
``language_model.lm_head``; its attention in :mod:`.llm`).  The original on-disk format is
converted in one place, :func:`mlx_dsvl.model_folder.sanitize` (conv transposes, unused tensors
dropped).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama
from mlx_lm.models.cache import BatchKVCache, KVCache

from ..config import IMAGE_TOKEN_ID, ModelConfig
from .aligner import MlpProjector
from .llm import build_language_model
from .vision import HybridVisionTower, build_vision_tower, normalize


def merge_image_embeddings(input_ids: mx.array, text_embeds: mx.array, image_embeds: mx.array,
                           image_token_id: int, skip: int | mx.array = 0) -> mx.array:
    """Overwrite image-token positions with image features, vectorized.

    input_ids: [B, T]; text_embeds: [B, T, D]; image_embeds: [M, I, D], read as the images'
    tokens laid end to end ([M * I, D]).  Row b's k-th image position takes token
    ``skip[b] + k`` of them (``skip``: an int for every row, or [B]), the last one past the end.
    """
    M, I, D = image_embeds.shape
    is_image = input_ids == image_token_id  # [B, T]
    rank = mx.cumsum(is_image.astype(mx.int32), axis=1) - 1  # k-th image token of its row
    rank = rank + (skip[:, None] if isinstance(skip, mx.array) else skip)
    rank = mx.clip(rank, 0, M * I - 1)
    gathered = mx.take(image_embeds.reshape(M * I, D), rank, axis=0)  # [B, T, D]
    return mx.where(is_image[..., None], gathered.astype(text_embeds.dtype), text_embeds)


class ImagePositionError(ValueError):
    """Images were given, but the ids do not hold one run of image positions per image."""


def check_image_positions(input_ids: mx.array, num_images: int, tokens_per_image: int,
                          image_token_id: int) -> None:
    """Raise :class:`ImagePositionError` unless the ids hold room for exactly the images given.

    ``num_images`` is N of ``[B, N, ...]`` images.  Each row must hold a whole number of runs of
    ``tokens_per_image`` image positions, at most N; the fullest row exactly N (trailing image
    slots of a row are batch padding).  This reads the ids on the host (one small sync), so
    compiled code (the training step) calls :func:`merge_image_embeddings` directly and checks
    its ids when the batch is built.
    """
    counts = (input_ids == image_token_id).astype(mx.int32).sum(axis=-1).reshape(-1).tolist()
    want = num_images * tokens_per_image
    bad = [b for b, n in enumerate(counts) if n % tokens_per_image or n > want]
    if bad or max(counts) != want:
        b = bad[0] if bad else max(range(len(counts)), key=counts.__getitem__)
        row = f" in row {b}" if len(counts) > 1 else ""
        raise ImagePositionError(
            f"the ids hold {counts[b]} image position(s) (id {image_token_id}){row}, but "
            f"{num_images} image(s) x {tokens_per_image} tokens were given: build the ids with this "
            f"model's processor (its image-tag id is the model's) and one placeholder per image"
        )


def lm_head(language_model: llama.Model, h: mx.array) -> mx.array:
    """The LLM's output projection (tied to the embeddings or not): [..., D] -> [..., vocab]."""
    if getattr(language_model.args, "tie_word_embeddings", False):
        return language_model.model.embed_tokens.as_linear(h)
    return language_model.lm_head(h)


class DeepseekVL(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vision_model = build_vision_tower(config.vision)
        self.aligner = MlpProjector(config.aligner)
        self.language_model = build_language_model(config.language)
        # Where images go in the ids: load() sets the tokenizer's id of the image tag; a model
        # built from a config alone starts with config.json's, else DeepSeek's.
        self.image_token_id = IMAGE_TOKEN_ID if config.image_token_id is None else config.image_token_id
        self.input_mean, self.input_std = config.input_mean, config.input_std

    # -- vision -------------------------------------------------------------------------------
    def vision_features(self, pixel_values: mx.array):
        """[M, 3, S, S] pixels in [0, 1] -> tower output (array, or (high, low) for hybrid)."""
        x = pixel_values.transpose(0, 2, 3, 1)  # NCHW -> NHWC
        x = normalize(x, self.input_mean, self.input_std)
        return self.vision_model(x.astype(self._dtype))

    def _encode(self, x: mx.array) -> mx.array:
        return self.aligner(self.vision_features(x))

    def compile_vision(self, enable: bool = True) -> None:
        """Run the vision towers + aligner as one compiled graph (fuses the elementwise work).

        ``encode_images`` compiles by default on a GPU only: on the CPU the matmuls dominate and
        compiling gained nothing.  The parameters are inputs, so later weight updates are seen.
        """
        self._compiled = (
            mx.compile(self._encode, inputs=[self.vision_model.state, self.aligner.state])
            if enable else False
        )

    def encode_images(self, pixel_values: mx.array) -> mx.array:
        """[..., 3, S, S] pixels in [0, 1] -> aligned embeddings [..., I, D]."""
        lead = pixel_values.shape[:-3]
        x = pixel_values.reshape(-1, *pixel_values.shape[-3:])
        if getattr(self, "_compiled", None) is None:
            self.compile_vision(mx.default_device() == mx.gpu)
        emb = self._compiled(x) if self._compiled else self._encode(x)
        return emb.reshape(*lead, *emb.shape[1:])

    @property
    def _dtype(self):
        return self.language_model.model.norm.weight.dtype

    # -- text + images ------------------------------------------------------------------------
    def get_input_embeddings(
        self,
        input_ids: mx.array,
        pixel_values: mx.array | None = None,
        image_embeds: mx.array | None = None,
        skip: int = 0,
    ) -> mx.array:
        """Token embeddings [B, T, D] with image positions filled from pixels or features.

        Per row: pixel_values [B, N, 3, S, S] or image_embeds [B, N, I, D], trailing slots of a
        row may be padding; each row's ids must hold its runs of I image positions (checked:
        :func:`check_image_positions`).  Laid end to end: image_embeds [M, I, D], the images the
        ids overlap in order, row after row (a training batch), the first image position being
        token ``skip`` of them (a piece of a prompt that begins inside an image); not checked,
        so compiled code may call it (processing's ``ImageTokens.overlap`` finds the images).
        """
        embeds = self.language_model.model.embed_tokens(input_ids)
        if image_embeds is None and pixel_values is not None:
            image_embeds = self.encode_images(pixel_values)  # lazy: checked before it runs
        if image_embeds is None:
            return embeds
        if image_embeds.ndim == 4:
            B, N, I, D = image_embeds.shape
            check_image_positions(input_ids, N, I, self.image_token_id)
            image_embeds, row_skip = image_embeds.reshape(B * N, I, D), mx.arange(B) * (N * I)
        else:  # each row goes on where the one before it stopped
            counts = (input_ids == self.image_token_id).astype(mx.int32).sum(axis=1)
            row_skip = skip + mx.cumsum(counts) - counts
        return merge_image_embeddings(input_ids, embeds, image_embeds, self.image_token_id, row_skip)

    def __call__(
        self,
        input_ids: mx.array,
        pixel_values: mx.array | None = None,
        cache: list[Any] | None = None,
        attention_mask: mx.array | None = None,
        image_embeds: mx.array | None = None,
    ) -> mx.array:
        """input_ids [B, T] (+ pixel_values [B, N, 3, S, S]) -> logits [B, T, vocab].

        ``attention_mask`` ([B, T], 1 = token, 0 = left padding) makes padded rows compute as if
        unpadded: positions start at their first real token and padding is never attended.
        """
        embeds = self.get_input_embeddings(input_ids, pixel_values, image_embeds)
        if attention_mask is not None and cache is None:
            cache = self.make_cache((attention_mask.shape[1] - attention_mask.sum(axis=1)).tolist())
        return self.language_model(input_ids, cache=cache, input_embeddings=embeds)

    # -- what training needs ------------------------------------------------------------------
    def towers(self) -> dict[str, nn.Module]:
        """The vision transformers by name: ``{"siglip": ...}``, plus ``"sam"`` in the hybrid."""
        vm = self.vision_model
        if isinstance(vm, HybridVisionTower):
            return {"siglip": vm.vision_tower_low.vision_tower, "sam": vm.vision_tower_high.vision_tower}
        return {"siglip": vm.vision_tower}

    @property
    def tied_embeddings(self) -> bool:
        """True when the LLM's output projection is its embedding matrix (no own ``lm_head``)."""
        return bool(getattr(self.language_model.args, "tie_word_embeddings", False))

    def hidden_states(self, input_ids: mx.array, image_embeds: mx.array | None = None) -> mx.array:
        """Final-norm hidden states ``[B, T, D]`` (apply :meth:`lm_head` for logits).

        ``image_embeds``: ``[B, N, I, D]`` per row, or ``[M, I, D]``: the batch's images in row
        order, however many each row has (a training batch); see :meth:`get_input_embeddings`.
        """
        embeds = self.get_input_embeddings(input_ids, image_embeds=image_embeds)
        return self.language_model.model(input_ids, input_embeddings=embeds)

    def lm_head(self, h: mx.array) -> mx.array:
        """Hidden states ``[..., D]`` -> logits ``[..., vocab]``."""
        return lm_head(self.language_model, h)

    def make_cache(self, left_padding: list[int] | None = None) -> list[KVCache]:
        """The LLM's KV cache: one sequence's, or with ``left_padding`` (per row) a left-padded
        batch's, in which each row computes as if unpadded."""
        if left_padding is None:
            return self.language_model.make_cache()
        return [BatchKVCache(left_padding) for _ in self.language_model.layers]

    @property
    def layers(self):
        return self.language_model.layers
