"""``transformers`` ``deepseek_vl`` / ``deepseek_vl_hybrid`` config -> the original ``config.json``.

Sizes that differ from the named reference towers are written as overrides in ``params``. The
``transformers`` processor files differ from the original ones, so those are rebuilt from what each
family's released files hold: 1.3B 384 px, mean = std = 0.5, normalized in the processor; 7B
1024 px, CLIP mean/std, normalized by each tower inside the model.
"""

from __future__ import annotations

from typing import Any

from ..config import CLIP_MEAN, CLIP_STD, IMAGE_TOKEN_ID, SAM_MODELS, SIGLIP_MODELS
from .files import ConvertError

HF_MODEL_TYPES = ("deepseek_vl", "deepseek_vl_hybrid")
SIGLIP_NAME = "siglip_large_patch16_384"
SAM_NAME = "sam_b_downsample"
SIGLIP_HALF = [0.5, 0.5, 0.5]


def _get(cfg: dict[str, Any], key: str, default=None):
    v = cfg.get(key, default)
    return default if v is None else v


def _siglip_params(v: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    ref = SIGLIP_MODELS[SIGLIP_NAME]
    width = int(_get(v, "hidden_size", ref["width"]))
    mlp = int(_get(v, "intermediate_size", int(width * ref["mlp_ratio"])))
    params: dict[str, Any] = {"model_name": SIGLIP_NAME, "image_size": int(_get(v, "image_size", 384)),
                              "select_feature": "same", "select_layer": -1}
    sizes = {"patch_size": int(_get(v, "patch_size", ref["patch_size"])), "width": width,
             "layers": int(_get(v, "num_hidden_layers", ref["layers"])),
             "heads": int(_get(v, "num_attention_heads", ref["heads"])), "mlp_ratio": mlp / width}
    if int(width * sizes["mlp_ratio"]) != mlp:
        raise ConvertError(f"SigLIP intermediate_size {mlp} is not expressible as width {width} x mlp_ratio")
    for k, val in sizes.items():
        if val != ref[k]:
            params[k] = val
    act = v.get("hidden_act", "gelu")
    if act != "gelu":
        notes.append(f"the transformers SigLIP config says hidden_act={act!r}; DeepSeek-VL's SigLIP uses "
                     "exact (erf) GELU, as the converted model does")
    return params


def _sam_params(h: dict[str, Any], aligner_in: int) -> dict[str, Any]:
    ref = {**SAM_MODELS[SAM_NAME], "image_size": 1024, "patch_size": 16, "mlp_ratio": 4.0,
           "window_size": 14, "prompt_embed_dim": 256}
    width = int(_get(h, "hidden_size", ref["width"]))
    out = int(_get(h, "output_channels", ref["prompt_embed_dim"]))
    mlp = int(_get(h, "mlp_dim", int(width * ref["mlp_ratio"])))
    params: dict[str, Any] = {"model_name": SAM_NAME, "image_size": int(_get(h, "image_size", 1024)),
                              "select_feature": "same", "select_layer": -1, "output_dim": aligner_in,
                              "pixel_mean": list(CLIP_MEAN), "pixel_std": list(CLIP_STD)}
    sizes = {"patch_size": int(_get(h, "patch_size", 16)), "width": width,
             "layers": int(_get(h, "num_hidden_layers", ref["layers"])),
             "heads": int(_get(h, "num_attention_heads", ref["heads"])), "mlp_ratio": mlp / width,
             "window_size": int(_get(h, "window_size", 14)),
             "global_attn_indexes": tuple(int(i) for i in _get(h, "global_attn_indexes", ref["global_attn_indexes"])),
             # transformers' high-res projection is two stride-2 convs: out -> 2 out -> 4 out
             "downsample_channels": (2 * out, 4 * out), "prompt_embed_dim": out}
    if int(width * sizes["mlp_ratio"]) != mlp:
        raise ConvertError(f"SAM mlp_dim {mlp} is not expressible as width {width} x mlp_ratio")
    for k, val in sizes.items():
        if val != (tuple(ref[k]) if isinstance(ref[k], (list, tuple)) else ref[k]):
            params[k] = list(val) if isinstance(val, tuple) else val
    return params


def _language_config(t: dict[str, Any], dtype: str) -> dict[str, Any]:
    act = t.get("hidden_act", "silu")
    if act != "silu":
        raise ConvertError(f"unsupported text_config.hidden_act {act!r} (DeepSeek-VL's Llama uses silu)")
    hidden = int(_get(t, "hidden_size", 4096))
    heads = int(_get(t, "num_attention_heads", 32))
    rope = t.get("rope_parameters") or {}
    theta = rope.get("rope_theta", t.get("rope_theta", 10000.0))
    scaling = t.get("rope_scaling")
    if rope.get("rope_type", "default") not in ("default", None):
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    out: dict[str, Any] = {
        "model_type": "llama",
        "vocab_size": int(_get(t, "vocab_size", 102400)),
        "hidden_size": hidden,
        "intermediate_size": int(_get(t, "intermediate_size", 11008)),
        "num_hidden_layers": int(_get(t, "num_hidden_layers", 32)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_get(t, "num_key_value_heads", heads)),
        "max_position_embeddings": int(_get(t, "max_position_embeddings", 16384)),
        "rms_norm_eps": float(_get(t, "rms_norm_eps", 1e-6)),
        "rope_theta": float(theta),
        "torch_dtype": dtype,
    }
    if scaling:
        out["rope_scaling"] = scaling
    if t.get("head_dim") not in (None, hidden // heads):
        out["head_dim"] = int(t["head_dim"])
    for k in ("attention_bias", "mlp_bias"):
        if t.get(k):
            out[k] = True
    return out


def original_config(hf: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A ``transformers`` DeepSeek-VL ``config.json`` dict -> (original ``config.json`` dict, notes)."""
    kind = hf.get("model_type")
    if kind not in HF_MODEL_TYPES:
        raise ConvertError(f"not a transformers DeepSeek-VL config (model_type {kind!r})")
    notes: list[str] = []
    vision = hf.get("vision_config") or {}
    text = hf.get("text_config") or {}
    if vision.get("model_type", "siglip_vision_model") != "siglip_vision_model":
        raise ConvertError(f"unsupported vision_config.model_type {vision.get('model_type')!r} (expected SigLIP)")
    dtype = str(hf.get("dtype") or hf.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype") or "float16")
    language = _language_config(text, dtype)
    siglip = _siglip_params(vision, notes)
    width = siglip.get("width", SIGLIP_MODELS[SIGLIP_NAME]["width"])
    if kind == "deepseek_vl_hybrid":
        high = hf.get("high_res_vision_config") or {}
        if high.get("model_type", "sam_vision_model") != "sam_vision_model":
            raise ConvertError(f"unsupported high_res_vision_config.model_type {high.get('model_type')!r}")
        sam = _sam_params(high, width)
        if sam.get("downsample_channels", SAM_MODELS[SAM_NAME]["downsample_channels"])[-1] != width:
            raise ConvertError("the SAM high-res output width differs from the SigLIP width; the original "
                               "low_high_hybrid_split_mlp_gelu aligner needs them equal")
        low = {**siglip, "output_dim": width, "pixel_mean": SIGLIP_HALF, "pixel_std": SIGLIP_HALF}
        vision_config = {"cls": "HybridVisionTower", "model_type": "vision",
                         "params": {"concat_type": "tuple", "freeze_high": True, "freeze_low": True,
                                    "high_res_cfg": sam, "low_res_cfg": low}}
        projector = "low_high_hybrid_split_mlp_gelu"
    else:
        vision_config = {"cls": "CLIPVisionTower", "model_type": "vision", "params": siglip}
        projector = "mlp_gelu"
    config: dict[str, Any] = {
        "aligner_config": {"cls": "MlpProjector", "model_type": "aligner",
                           "params": {"depth": 2, "input_dim": width, "n_embed": language["hidden_size"],
                                      "projector_type": projector}},
        "language_config": language,
        "model_type": "multi_modality",
        "torch_dtype": dtype,
        "vision_config": vision_config,
    }
    image_token = hf.get("image_token_id", hf.get("image_token_index", IMAGE_TOKEN_ID))
    if image_token is not None and int(image_token) != IMAGE_TOKEN_ID:
        config["image_token_id"] = int(image_token)
    return config, notes


def tied_embeddings(hf: dict[str, Any]) -> bool:
    """Whether the transformers model ties ``lm_head`` to the embeddings (its default is True)."""
    return bool(hf.get("tie_word_embeddings", (hf.get("text_config") or {}).get("tie_word_embeddings", True)))


def original_processor_configs(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(preprocessor_config.json, processor_config.json) of the original layout for ``config``."""
    vision = config["vision_config"]
    if "Hybrid" in vision["cls"]:
        low = vision["params"]["low_res_cfg"]
        image_size = vision["params"]["high_res_cfg"].get("image_size", 1024)
        mean, std, normalize = list(CLIP_MEAN), list(CLIP_STD), False
    else:
        low = vision["params"]
        image_size = low.get("image_size", 384)
        mean, std, normalize = SIGLIP_HALF, SIGLIP_HALF, True
    grid = int(low.get("image_size", 384)) // int(low.get("patch_size", 16))
    preprocessor = {
        "image_size": int(image_size),
        "min_size": 14,
        "image_mean": mean,
        "image_std": std,
        "rescale_factor": 1.0 / 255.0,
        "do_normalize": normalize,
        "image_processor_type": "VLMImageProcessor",
        "processor_class": "VLChatProcessor",
    }
    processor = {
        "image_tag": "<image_placeholder>",
        "num_image_tokens": grid * grid,
        "sft_format": "deepseek",
        "add_special_token": False,
        "ignore_id": -100,
        "mask_prompt": True,
        "processor_class": "VLChatProcessor",
    }
    return preprocessor, processor
