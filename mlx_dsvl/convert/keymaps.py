"""Tensor-name maps between the original deepseek-ai checkpoints and ``transformers``' ports.

Beyond the renames: SigLIP's fused ``attn.qkv`` is split into ``{q,k,v}_proj`` (and fused back)
and its ``pos_embed`` [1, N, D] loses the leading 1; SAM's ``qkv`` stays fused; convs keep
PyTorch's [O, I, kH, kW] on both sides. Tensors no model uses are dropped either way; any other
unknown name raises. Values may be numpy arrays, torch tensors or mlx arrays, each handled with its
own library, so nothing here imports torch.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "original_to_hf",
    "hf_to_original",
    "is_hf_state_dict",
    "is_hybrid_original",
    "is_hybrid_hf",
    "ORIGINAL_UNUSED",
]

# -- prefixes ---------------------------------------------------------------------------------
O_SIGLIP_13B = "vision_model.vision_tower."
O_SIGLIP_HYBRID = "vision_model.vision_tower_low.vision_tower."
O_SAM = "vision_model.vision_tower_high.vision_tower."
H_SIGLIP_FLAT = "model.vision_model."
H_SIGLIP_NESTED = "model.vision_model.vision_model."
H_SAM = "model.high_res_vision_model.vision_encoder."

# Tensors in the original files that no model (original or ``transformers``) uses.
ORIGINAL_UNUSED = (
    re.compile(r"(^|\.)attn_pool\."),
    re.compile(r"^vision_model\.(high|low)_layer_norm\."),
    re.compile(r"(^|\.)rotary_emb\.inv_freq$"),
)
# ``transformers``' SigLIP pooling head (``vision_use_head=True``); never used by DeepSeek-VL.
HF_UNUSED = (re.compile(r"^model\.vision_model\.(vision_model\.)?head\."),)

# -- rules ------------------------------------------------------------------------------------
# (original template, transformers template, kind); placeholders: {i} layer index, {n} 1/2,
# {p} weight/bias, {hw} h/w, {rest} anything.  kind: "same" | "qkv" | "pos".
Rule = tuple[str, str, str]

_PLACEHOLDERS = {
    "i": r"\d+",
    "n": r"[12]",
    "p": r"weight|bias",
    "hw": r"[hw]",
    "rest": r".+",
    "qkv": r"[qkv]",
}


def _siglip_rules(o: str, h: str) -> list[Rule]:
    """SigLIP (timm ViT) <-> ``SiglipVisionModel``; o/h are the two prefixes."""
    return [
        (o + "patch_embed.proj.{p}", h + "embeddings.patch_embedding.{p}", "same"),
        (o + "pos_embed", h + "embeddings.position_embedding.weight", "pos"),
        (o + "blocks.{i}.norm{n}.{p}", h + "encoder.layers.{i}.layer_norm{n}.{p}", "same"),
        (o + "blocks.{i}.attn.qkv.{p}", h + "encoder.layers.{i}.self_attn.{qkv}_proj.{p}", "qkv"),
        (o + "blocks.{i}.attn.proj.{p}", h + "encoder.layers.{i}.self_attn.out_proj.{p}", "same"),
        (o + "blocks.{i}.mlp.fc{n}.{p}", h + "encoder.layers.{i}.mlp.fc{n}.{p}", "same"),
        (o + "norm.{p}", h + "post_layernorm.{p}", "same"),
    ]


def _neck_rules(o: str, h: str) -> list[Rule]:
    return [
        (o + "0.weight", h + "conv1.weight", "same"),
        (o + "1.{p}", h + "layer_norm1.{p}", "same"),
        (o + "2.weight", h + "conv2.weight", "same"),
        (o + "3.{p}", h + "layer_norm2.{p}", "same"),
    ]


def _sam_rules() -> list[Rule]:
    o, h = O_SAM, H_SAM
    return [
        (o + "pos_embed", h + "pos_embed", "same"),
        (o + "patch_embed.proj.{p}", h + "patch_embed.projection.{p}", "same"),
        (o + "blocks.{i}.norm{n}.{p}", h + "layers.{i}.layer_norm{n}.{p}", "same"),
        (o + "blocks.{i}.attn.rel_pos_{hw}", h + "layers.{i}.attn.rel_pos_{hw}", "same"),
        (o + "blocks.{i}.attn.qkv.{p}", h + "layers.{i}.attn.qkv.{p}", "same"),
        (o + "blocks.{i}.attn.proj.{p}", h + "layers.{i}.attn.proj.{p}", "same"),
        (o + "blocks.{i}.mlp.lin{n}.{p}", h + "layers.{i}.mlp.lin{n}.{p}", "same"),
        *_neck_rules(o + "neck.", h + "neck."),
        *_neck_rules(o + "neck_hd.", "model.high_res_vision_neck."),
        (o + "downsamples.0.weight", "model.high_res_vision_proj.conv1.weight", "same"),
        (o + "downsamples.1.weight", "model.high_res_vision_proj.conv2.weight", "same"),
        (o + "hd_alpha_downsamples", "model.high_res_vision_alpha", "same"),
    ]


_LLM_RULES: list[Rule] = [
    ("language_model.model.{rest}", "model.language_model.{rest}", "same"),
    ("language_model.lm_head.{p}", "lm_head.{p}", "same"),
]
_ALIGNER_13B: list[Rule] = [
    ("aligner.layers.0.{p}", "model.aligner.linear1.{p}", "same"),
    ("aligner.layers.2.{p}", "model.aligner.linear2.{p}", "same"),
]
_ALIGNER_HYBRID: list[Rule] = [
    ("aligner.high_up_proj.{p}", "model.aligner.high_res_vision_proj.{p}", "same"),
    ("aligner.low_up_proj.{p}", "model.aligner.vision_proj.{p}", "same"),
    ("aligner.layers.1.{p}", "model.aligner.proj.{p}", "same"),
]


def _rules(hybrid: bool, siglip_hf_prefix: str) -> list[Rule]:
    if hybrid:
        return [*_siglip_rules(O_SIGLIP_HYBRID, siglip_hf_prefix), *_sam_rules(), *_ALIGNER_HYBRID,
                *_LLM_RULES]
    return [*_siglip_rules(O_SIGLIP_13B, siglip_hf_prefix), *_ALIGNER_13B, *_LLM_RULES]


def _compile(template: str) -> re.Pattern[str]:
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out.append(re.escape(template[pos:m.start()]))
        out.append(f"(?P<{m.group(1)}>{_PLACEHOLDERS[m.group(1)]})")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("^" + "".join(out) + "$")


def _fill(template: str, groups: Mapping[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: groups[m.group(1)], template)


# -- array helpers (library-agnostic) ---------------------------------------------------------
def _concat0(parts: Sequence[Any]) -> Any:
    """Concatenate along axis 0 with the values' own library (numpy, torch or mlx)."""
    lib = type(parts[0]).__module__.split(".")[0]
    if lib == "torch" and "torch" in sys.modules:
        return sys.modules["torch"].cat(list(parts), 0)
    if lib == "mlx" and "mlx.core" in sys.modules:
        return sys.modules["mlx.core"].concatenate(list(parts), 0)
    return np.concatenate([np.asarray(p) for p in parts], 0)


def _shape(v: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in v.shape)


# -- detection --------------------------------------------------------------------------------
def is_hf_state_dict(keys) -> bool:
    """True when the names are ``transformers``' (``model.*`` / ``lm_head.*``)."""
    keys = list(keys)
    return bool(keys) and all(k.startswith(("model.", "lm_head.")) for k in keys)


def is_hybrid_original(keys) -> bool:
    return any(k.startswith(("vision_model.vision_tower_high.", "vision_model.vision_tower_low."))
               for k in keys)


def is_hybrid_hf(keys) -> bool:
    return any(k.startswith("model.high_res_vision_") for k in keys)


def _unused(key: str, patterns) -> bool:
    return any(p.search(key) for p in patterns)


# -- original -> transformers -----------------------------------------------------------------
def original_to_hf(
    state_dict: Mapping[str, Any], hybrid: bool | None = None, nested_siglip: bool = False
) -> dict[str, Any]:
    """Original deepseek-ai tensors -> ``transformers`` names. ``hybrid`` None: detected;
    ``nested_siglip``: the older hub files' ``model.vision_model.vision_model.*`` SigLIP names."""
    if hybrid is None:
        hybrid = is_hybrid_original(state_dict)
    compiled = [(_compile(o), h, kind)
                for o, h, kind in _rules(hybrid, H_SIGLIP_NESTED if nested_siglip else H_SIGLIP_FLAT)]
    out: dict[str, Any] = {}
    unknown = []
    for key, value in state_dict.items():
        if _unused(key, ORIGINAL_UNUSED):
            continue
        match = _first_match(compiled, key)
        if match is None:
            unknown.append(key)
            continue
        target, kind, groups = match
        if kind == "qkv":
            rows = _shape(value)[0]
            if rows % 3:
                raise ValueError(f"{key}: fused qkv with {rows} rows is not divisible by 3")
            d = rows // 3
            for j, name in enumerate("qkv"):
                _put(out, _fill(target, {**groups, "qkv": name}), value[j * d:(j + 1) * d], key)
        elif kind == "pos":
            shape = _shape(value)
            if len(shape) != 3 or shape[0] != 1:
                raise ValueError(f"{key}: expected a [1, N, D] position table, got {list(shape)}")
            _put(out, _fill(target, groups), value[0], key)
        else:
            _put(out, _fill(target, groups), value, key)
    if unknown:
        raise KeyError(
            f"no transformers name for {len(unknown)} original tensor(s) "
            f"({'hybrid' if hybrid else '1.3B'} layout), e.g. {unknown[:5]}"
        )
    return out


# -- transformers -> original -----------------------------------------------------------------
def hf_to_original(state_dict: Mapping[str, Any], hybrid: bool | None = None) -> dict[str, Any]:
    """``transformers`` tensors (either SigLIP naming generation) -> original deepseek-ai names.
    Unused tensors are not invented; a missing ``lm_head.weight`` (tied embeddings) stays missing:
    the caller decides."""
    if hybrid is None:
        hybrid = is_hybrid_hf(state_dict)
    # Both SigLIP generations; the patterns are anchored, so flat never matches nested names.
    compiled = []
    for siglip in (H_SIGLIP_NESTED, H_SIGLIP_FLAT):
        for o, h, kind in _rules(hybrid, siglip):
            if siglip == H_SIGLIP_FLAT and not h.startswith(siglip):
                continue  # the non-SigLIP rules once are enough
            compiled.append((_compile(h), o, kind))
    out: dict[str, Any] = {}
    pending: dict[str, dict[str, Any]] = {}  # fused key -> {"q": .., "k": .., "v": ..}
    unknown = []
    for key, value in state_dict.items():
        if _unused(key, HF_UNUSED):
            continue
        match = _first_match(compiled, key)
        if match is None:
            unknown.append(key)
            continue
        target, kind, groups = match
        if kind == "qkv":
            fused = _fill(target, groups)
            part = pending.setdefault(fused, {})
            if groups["qkv"] in part:
                raise KeyError(f"{key}: duplicate tensor for {fused} (two naming generations?)")
            part[groups["qkv"]] = value
        elif kind == "pos":
            shape = _shape(value)
            if len(shape) != 2:
                raise ValueError(f"{key}: expected an [N, D] position table, got {list(shape)}")
            _put(out, _fill(target, groups), value[None], key)
        else:
            _put(out, _fill(target, groups), value, key)
    if unknown:
        raise KeyError(
            f"no original name for {len(unknown)} transformers tensor(s) "
            f"({'hybrid' if hybrid else '1.3B'} layout), e.g. {unknown[:5]}"
        )
    for fused, parts in pending.items():
        missing = [n for n in "qkv" if n not in parts]
        if missing:
            raise KeyError(f"{fused}: missing the {'/'.join(missing)} projection(s) to fuse")
        _put(out, fused, _concat0([parts["q"], parts["k"], parts["v"]]), fused)
    return out


def _first_match(compiled, key: str):
    """(target, kind, named groups) of the first rule whose pattern matches ``key``, or None."""
    for pattern, target, kind in compiled:
        m = pattern.match(key)
        if m is not None:
            return target, kind, m.groupdict()
    return None


def _put(out: dict[str, Any], key: str, value: Any, source: str) -> None:
    if key in out:
        raise KeyError(f"{source}: maps to {key}, which another tensor already produced")
    out[key] = value
