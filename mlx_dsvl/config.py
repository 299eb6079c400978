"""Configuration read from the original DeepSeek-VL ``config.json``.

The original file nests ``vision_config`` and ``aligner_config`` as ``{"cls": ..., "params": ...}``
and gives a (possibly sparse) ``language_config`` of ``LlamaConfig`` fields.  Named vision models
come from the reference tables below; a ``params`` block may carry explicit size fields (with the
reference tables' own names) that override the table -- real checkpoints don't, tiny test ones do.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_TOKEN_ID = 100015  # DeepSeek's tokenizer id of <image_placeholder>; load() uses the tokenizer's


class ConfigError(ValueError):
    """The model configuration is missing, malformed or names something we do not support."""


# The reference implementation's tables (deepseek_vl/models/siglip_vit.py and sam.py).
SIGLIP_MODELS = {
    "siglip_large_patch16_384": dict(
        image_size=384, patch_size=16, width=1024, layers=24, heads=16, mlp_ratio=4.0
    ),
    "siglip_so400m_patch14_384": dict(
        image_size=336, patch_size=14, width=1152, layers=27, heads=16, mlp_ratio=3.7362
    ),
}
SAM_MODELS = {
    "sam_b_downsample": dict(
        width=768, layers=12, heads=12, global_attn_indexes=(2, 5, 8, 11),
        downsample_channels=(512, 1024),
    ),
}

# Hugging Face ``LlamaConfig`` defaults: the 7B ``language_config`` relies on them.
LLAMA_DEFAULTS: dict[str, Any] = dict(
    model_type="llama",
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=None,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    rope_scaling=None,
    attention_bias=False,
    mlp_bias=False,
    tie_word_embeddings=False,
    head_dim=None,
)


def _fields(cls, params: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in params.items() if k in names}


@dataclass
class ViTConfig:
    """What both vision towers share: a stride-``patch_size`` patch embedding of an
    ``image_size`` square and ``layers`` blocks (``heads``-head attention, an MLP of
    ``mlp_ratio`` x ``width``, LayerNorm ``eps``).  A subclass names its reference table."""

    image_size: int = 384
    patch_size: int = 16
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    eps: float = 1e-6

    # not dataclass fields: the reference table (model_name -> sizes), its default, the name
    _KIND, _TABLE, _DEFAULT_NAME = "ViT", {}, ""

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_params(cls, params: dict[str, Any]):
        """The named model's sizes (``model_name``), overridden by explicit size fields."""
        name = params.get("model_name", cls._DEFAULT_NAME)
        if name not in cls._TABLE:
            raise ConfigError(f"unknown {cls._KIND} model_name {name!r}; supported: {sorted(cls._TABLE)}")
        return cls(**{**cls._TABLE[name], **_fields(cls, params)})


@dataclass
class SigLIPConfig(ViTConfig):
    select_layer: int = -1

    _KIND, _TABLE, _DEFAULT_NAME = "SigLIP", SIGLIP_MODELS, "siglip_large_patch16_384"

    @property
    def num_layers(self) -> int:
        """Blocks actually built, following the reference ``create_siglip_vit``."""
        if self.select_layer <= 0:
            return min(self.layers, self.layers + self.select_layer + 1)
        return min(self.layers, self.select_layer)

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclass
class SAMConfig(ViTConfig):
    image_size: int = 1024
    width: int = 768
    layers: int = 12
    heads: int = 12
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    downsample_channels: tuple[int, ...] = (512, 1024)
    prompt_embed_dim: int = 256

    _KIND, _TABLE, _DEFAULT_NAME = "SAM", SAM_MODELS, "sam_b_downsample"

    def __post_init__(self):
        self.global_attn_indexes = tuple(self.global_attn_indexes)
        self.downsample_channels = tuple(self.downsample_channels)


@dataclass
class VisionConfig:
    """``cls`` is ``CLIPVisionTower`` (SigLIP only) or ``HybridVisionTower`` (SAM-B + SigLIP)."""

    cls: str = "CLIPVisionTower"
    low: SigLIPConfig = field(default_factory=SigLIPConfig)
    low_mean: tuple[float, ...] | None = None
    low_std: tuple[float, ...] | None = None
    high: SAMConfig | None = None
    high_mean: tuple[float, ...] | None = None
    high_std: tuple[float, ...] | None = None

    @property
    def hybrid(self) -> bool:
        return self.high is not None

    @property
    def num_image_tokens(self) -> int:
        return self.low.grid**2

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VisionConfig:
        name = d.get("cls", "")
        params = d.get("params", {}) or {}
        if "CLIPVisionTower" in name and "Hybrid" not in name:
            if not str(params.get("model_name", "siglip")).startswith("siglip"):
                raise ConfigError(
                    f"CLIPVisionTower with model_name {params.get('model_name')!r} is not "
                    "supported; only SigLIP towers are"
                )
            return cls(
                cls="CLIPVisionTower",
                low=SigLIPConfig.from_params(params),
                low_mean=_tuple(params.get("pixel_mean")),
                low_std=_tuple(params.get("pixel_std")),
            )
        if "HybridVisionTower" in name:
            high = params.get("high_res_cfg")
            low = params.get("low_res_cfg")
            if not isinstance(high, dict) or not isinstance(low, dict):
                raise ConfigError("HybridVisionTower needs high_res_cfg and low_res_cfg blocks")
            concat = params.get("concat_type", "tuple")
            if concat != "tuple":
                raise ConfigError(f"HybridVisionTower concat_type {concat!r} is not supported")
            return cls(
                cls="HybridVisionTower",
                low=SigLIPConfig.from_params(low),
                low_mean=_tuple(low.get("pixel_mean")),
                low_std=_tuple(low.get("pixel_std")),
                high=SAMConfig.from_params(high),
                high_mean=_tuple(high.get("pixel_mean")),
                high_std=_tuple(high.get("pixel_std")),
            )
        raise ConfigError(
            f"unknown vision_config.cls {name!r}; expected CLIPVisionTower or HybridVisionTower"
        )


@dataclass
class AlignerConfig:
    projector_type: str = "mlp_gelu"
    depth: int = 2
    input_dim: int = 1024
    n_embed: int = 2048

    TYPES = ("identity", "linear", "mlp_gelu", "low_high_hybrid_split_mlp_gelu")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AlignerConfig:
        name = d.get("cls", "MlpProjector")
        if "MlpProjector" not in name:
            raise ConfigError(f"unknown aligner_config.cls {name!r}; expected MlpProjector")
        cfg = cls(**_fields(cls, d.get("params", {}) or {}))
        if cfg.projector_type not in cls.TYPES:
            raise ConfigError(
                f"unknown aligner projector_type {cfg.projector_type!r}; supported: {cls.TYPES}"
            )
        return cfg


def language_args(language_config: dict[str, Any]) -> dict[str, Any]:
    """Complete a (sparse) ``language_config`` with the Hugging Face Llama defaults."""
    args = {**LLAMA_DEFAULTS, **{k: v for k, v in language_config.items() if v is not None}}
    if args.get("num_key_value_heads") is None:
        args["num_key_value_heads"] = args["num_attention_heads"]
    args["model_type"] = "llama"
    # DeepSeek-VL's lm_head is always a separate matrix (mlx-lm defaults to tying).
    args["tie_word_embeddings"] = bool(language_config.get("tie_word_embeddings", False))
    return args


@dataclass
class ModelConfig:
    vision: VisionConfig
    aligner: AlignerConfig
    language: dict[str, Any]
    # config.json's ``image_token_id`` (transformers checkpoints carry one, the releases don't).
    # The truth is the tokenizer's id of the image tag: ``load()`` gives the model that one.
    image_token_id: int | None = None
    # Normalization the original image processor applies (``do_normalize``); we apply it inside
    # the model so that pixel values stay in [0, 1] outside it.
    input_mean: tuple[float, ...] | None = None
    input_std: tuple[float, ...] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(
        cls, config: dict[str, Any], preprocessor: dict[str, Any] | None = None
    ) -> ModelConfig:
        for key in ("vision_config", "aligner_config", "language_config"):
            if not isinstance(config.get(key), dict):
                raise ConfigError(f"config.json has no {key} block (not a DeepSeek-VL config)")
        preprocessor = preprocessor or {}
        input_mean = input_std = None
        if preprocessor.get("do_normalize", False):
            input_mean = _tuple(preprocessor.get("image_mean")) or CLIP_MEAN
            input_std = _tuple(preprocessor.get("image_std")) or CLIP_STD
        return cls(
            vision=VisionConfig.from_dict(config["vision_config"]),
            aligner=AlignerConfig.from_dict(config["aligner_config"]),
            language=language_args(config["language_config"]),
            image_token_id=_optional_int(config, "image_token_id"),
            input_mean=input_mean,
            input_std=input_std,
            raw=config,
        )


def _optional_int(config: dict[str, Any], key: str) -> int | None:
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    return value


def _tuple(x) -> tuple[float, ...] | None:
    return None if x is None else tuple(float(v) for v in x)
