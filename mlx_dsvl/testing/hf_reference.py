"""``transformers``' DeepseekVL / DeepseekVLHybrid built from one of our checkpoint folders.

Independent of ``mlx_dsvl``'s model and loading code (only the converter's name maps are shared).
Every ``transformers`` config field that matters is set explicitly (its defaults are wrong for
DeepSeek-VL: tanh GELU, a SigLIP pooling head, tied embeddings) and every parameter is loaded with
``strict=True``: nothing keeps ``transformers``' init, which zeros ``high_res_vision_alpha``, SAM's
``pos_embed`` and the rel-pos tables. Its image processors are bypassed: their preprocessing
differs from the original's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch  # test/benchmark-only dependency: this module is imported on demand

from mlx_dsvl.convert.keymaps import original_to_hf

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)

# deepseek_vl/models/siglip_vit.py and sam.py (the named models DeepSeek-VL uses).
SIGLIP_TABLE = {
    "siglip_large_patch16_384": dict(image_size=384, patch_size=16, width=1024, layers=24, heads=16,
                                     mlp_ratio=4.0),
}
SAM_TABLE = {
    "sam_b_downsample": dict(image_size=1024, patch_size=16, width=768, layers=12, heads=12,
                             mlp_ratio=4.0, global_attn_indexes=[2, 5, 8, 11],
                             downsample_channels=[512, 1024], prompt_embed_dim=256, window_size=14),
}
# transformers' LlamaConfig defaults, which the sparse 7B language_config relies on.
LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None,
                      max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
                      hidden_act="silu")


def _siglip(params: dict) -> dict:
    cfg = {**SIGLIP_TABLE[params.get("model_name", "siglip_large_patch16_384")]}
    cfg.update({k: params[k] for k in ("image_size", "patch_size", "width", "layers", "heads",
                                       "mlp_ratio") if k in params})
    select_layer = params.get("select_layer", -1)
    layers = cfg["layers"]
    # create_siglip_vit: blocks after select_layer are never built.
    cfg["layers"] = min(layers, layers + select_layer + 1) if select_layer <= 0 else min(layers, select_layer)
    return dict(
        model_type="siglip_vision_model",
        hidden_size=cfg["width"],
        intermediate_size=int(cfg["width"] * cfg["mlp_ratio"]),
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        num_channels=3,
        image_size=cfg["image_size"],
        patch_size=cfg["patch_size"],
        hidden_act="gelu",  # exact erf GELU (timm nn.GELU); transformers defaults to tanh
        layer_norm_eps=1e-6,
        attention_dropout=0.0,
        vision_use_head=False,  # attn_pool is never used
    )


def _sam(params: dict) -> tuple[dict, dict]:
    cfg = {**SAM_TABLE[params.get("model_name", "sam_b_downsample")]}
    cfg.update({k: params[k] for k in ("image_size", "patch_size", "width", "layers", "heads",
                                       "mlp_ratio", "global_attn_indexes", "downsample_channels",
                                       "prompt_embed_dim", "window_size") if k in params})
    out = cfg["prompt_embed_dim"]
    # transformers' DeepseekVLSamVisionProj hard-codes the two stride-2 convs as out -> 2 out -> 4 out.
    if list(cfg["downsample_channels"]) != [2 * out, 4 * out]:
        raise ValueError(f"transformers cannot express downsample_channels {cfg['downsample_channels']}"
                         f" with prompt_embed_dim {out}")
    return dict(
        model_type="sam_vision_model",
        hidden_size=cfg["width"],
        output_channels=out,
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        num_channels=3,
        image_size=cfg["image_size"],
        patch_size=cfg["patch_size"],
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        attention_dropout=0.0,
        qkv_bias=True,
        mlp_ratio=float(cfg["mlp_ratio"]),
        mlp_dim=int(cfg["width"] * cfg["mlp_ratio"]),
        use_abs_pos=True,
        use_rel_pos=True,
        window_size=cfg["window_size"],
        global_attn_indexes=list(cfg["global_attn_indexes"]),
    ), cfg


def _llama(lang: dict) -> dict:
    a = {**LLAMA_DEFAULTS, **{k: v for k, v in lang.items() if k in LLAMA_DEFAULTS and v is not None}}
    if a["num_key_value_heads"] is None:
        a["num_key_value_heads"] = a["num_attention_heads"]
    return dict(
        model_type="llama",
        vocab_size=a["vocab_size"],
        hidden_size=a["hidden_size"],
        intermediate_size=a["intermediate_size"],
        num_hidden_layers=a["num_hidden_layers"],
        num_attention_heads=a["num_attention_heads"],
        num_key_value_heads=a["num_key_value_heads"],
        head_dim=a["hidden_size"] // a["num_attention_heads"],
        hidden_act=a["hidden_act"],
        max_position_embeddings=a["max_position_embeddings"],
        rms_norm_eps=a["rms_norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": float(a["rope_theta"])},
        attention_bias=False,
        attention_dropout=0.0,
        mlp_bias=False,
        pretraining_tp=1,
        tie_word_embeddings=False,  # DeepSeek-VL's lm_head is untied
    )


def read_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def image_token_id(folder: Path) -> int:
    """The tokenizer's id of ``<image_placeholder>`` (what the reference processor marks)."""
    tok = Path(folder) / "tokenizer.json"
    if tok.is_file():
        for t in json.loads(tok.read_text(encoding="utf-8")).get("added_tokens", []):
            if t["content"] == "<image_placeholder>":
                return int(t["id"])
    return int(read_config(folder).get("image_token_id", 100015))


def is_hybrid(folder: Path) -> bool:
    return "Hybrid" in read_config(folder)["vision_config"]["cls"]


def hf_config(folder: Path):
    """The ``transformers`` config equivalent to the folder's original ``config.json``."""
    from transformers import DeepseekVLConfig, DeepseekVLHybridConfig

    raw = read_config(folder)
    vision = raw["vision_config"]
    aligner = raw["aligner_config"]["params"]
    text = _llama(raw["language_config"])
    common = dict(text_config=text, image_token_id=image_token_id(folder),
                  tie_word_embeddings=False)
    if "Hybrid" in vision["cls"]:
        sam, sam_sizes = _sam(vision["params"]["high_res_cfg"])
        siglip = _siglip(vision["params"]["low_res_cfg"])
        assert aligner["projector_type"] == "low_high_hybrid_split_mlp_gelu" and aligner["depth"] == 2
        assert aligner["input_dim"] == siglip["hidden_size"] == sam_sizes["downsample_channels"][-1]
        assert aligner["n_embed"] == text["hidden_size"]
        # transformers resizes the neck output to 4 x the SigLIP grid (96 for 384/16), as the original.
        return DeepseekVLHybridConfig(vision_config=siglip, high_res_vision_config=sam, **common)
    siglip = _siglip(vision["params"])
    assert aligner["projector_type"] == "mlp_gelu" and aligner["depth"] == 2
    assert aligner["input_dim"] == siglip["hidden_size"] and aligner["n_embed"] == text["hidden_size"]
    return DeepseekVLConfig(vision_config=siglip, **common)


def original_state_dict(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else ["model.safetensors"])
    out: dict[str, np.ndarray] = {}
    for f in files:
        out.update(load_file(str(folder / f)))
    return out


def build_hf_model(folder: Path, attn_implementation: str = "eager", device: str = "cpu",
                   dtype: torch.dtype = torch.float32):
    """Eval-mode ``DeepseekVL[Hybrid]ForConditionalGeneration`` with the folder's weights."""
    from transformers import DeepseekVLForConditionalGeneration, DeepseekVLHybridForConditionalGeneration

    config = hf_config(folder)
    hybrid = hasattr(config, "high_res_vision_config") and config.high_res_vision_config is not None
    config._attn_implementation = attn_implementation
    for sub in ("text_config", "vision_config", "high_res_vision_config"):
        if getattr(config, sub, None) is not None:
            getattr(config, sub)._attn_implementation = attn_implementation
    cls = DeepseekVLHybridForConditionalGeneration if hybrid else DeepseekVLForConditionalGeneration
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(config).to(dtype).eval()
    weights = original_to_hf(original_state_dict(folder), hybrid=hybrid)
    # strict: every parameter from the file, no extras, same shapes -- copied one tensor at a
    # time so that a real-size model never holds a second float32 copy (benchmarks use this)
    state = model.state_dict()
    missing, unexpected = sorted(set(state) - set(weights)), sorted(set(weights) - set(state))
    if missing or unexpected:
        raise KeyError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for k in list(weights):
            v = np.ascontiguousarray(weights.pop(k), dtype=np.float32)
            if tuple(v.shape) != tuple(state[k].shape):
                raise ValueError(f"{k}: shape {v.shape}, expected {tuple(state[k].shape)}")
            state[k].copy_(torch.from_numpy(v))  # casts to the model's dtype and device
    lm_head = model.lm_head.weight
    embed = model.model.language_model.embed_tokens.weight
    assert lm_head.data_ptr() != embed.data_ptr(), "lm_head must stay untied"
    return model


def reference_inputs(x: torch.Tensor, folder: Path) -> dict[str, torch.Tensor]:
    """[M, 3, S, S] pixels in [0, 1] -> exactly what the original model feeds each tower (hybrid:
    SigLIP gets an antialiased resize of the un-normalized pixels, as ``HybridVisionTower`` does)."""
    raw = read_config(folder)
    vision = raw["vision_config"]
    x = x.float()
    if "Hybrid" in vision["cls"]:
        high, low = vision["params"]["high_res_cfg"], vision["params"]["low_res_cfg"]
        assert np.allclose(high["pixel_mean"], CLIP_MEAN) and np.allclose(high["pixel_std"], CLIP_STD)
        assert np.allclose(low["pixel_mean"], SIGLIP_MEAN) and np.allclose(low["pixel_std"], SIGLIP_STD)
        size = low.get("image_size", 384)
        small = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                                align_corners=False, antialias=True)
        return {"pixel_values": _norm(small, low["pixel_mean"], low["pixel_std"]),
                "high_res_pixel_values": _norm(x, high["pixel_mean"], high["pixel_std"])}
    prep = json.loads((Path(folder) / "preprocessor_config.json").read_text())
    assert prep.get("do_normalize", False)
    assert np.allclose(prep["image_mean"], SIGLIP_MEAN) and np.allclose(prep["image_std"], SIGLIP_STD)
    return {"pixel_values": _norm(x, prep["image_mean"], prep["image_std"])}


def _norm(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s
