"""A model folder on disk: where it is, its config, its weight files, its tensor layout.

The one reader of checkpoint folders (:func:`mlx_dsvl.load` and the converter), with the layout
maps side by side: :func:`sanitize` and its inverse :func:`to_pytorch_layout`. Every failure is a
:class:`ModelLoadError` whose one-line message names the file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import mlx.core as mx

from .config import ConfigError, ModelConfig
from .mlx_format import group_bits, mlx_format_info

INDEX = "model.safetensors.index.json"
# What a hub download fetches: configs, safetensors weights and the tokenizer's files.
HUB_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken")

# Tensors present in the released checkpoints that the model never uses.
UNUSED_PREFIXES = ("vision_model.high_layer_norm.", "vision_model.low_layer_norm.")
UNUSED_PARTS = ("attn_pool.", "rotary_emb.")
# Conv weights: PyTorch stores [O, I, kH, kW], MLX wants [O, kH, kW, I].
CONV_SUFFIXES = (
    "patch_embed.proj.weight",
    "neck.0.weight",
    "neck.2.weight",
    "neck_hd.0.weight",
    "neck_hd.2.weight",
    "downsamples.0.weight",
    "downsamples.1.weight",
    "downsamples.2.weight",
    "downsamples.3.weight",
)


class ModelLoadError(ValueError):
    """A model folder or hub id that cannot be loaded; the message says what and where."""


# -- where ------------------------------------------------------------------------------------
def is_hub_id(text: str) -> bool:
    """``owner/name`` that is not a local path: what :func:`resolve_model_path` downloads."""
    text = str(text)
    return not (Path(text).expanduser().exists() or text.startswith((".", "/", "~")) or text.count("/") != 1)


def resolve_model_path(path_or_repo: str | Path, extra_patterns: Sequence[str] = ()) -> Path:
    """A local folder as is; otherwise a hub id fetched once into the standard HF cache."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_repo)
    if path.exists():
        raise ModelLoadError(f"{text}: not a folder")
    if not is_hub_id(text):
        raise ModelLoadError(f"{text}: no such model folder")
    try:
        from huggingface_hub import snapshot_download

        patterns = [*HUB_PATTERNS, *extra_patterns]
        try:  # offline first: a cached model never touches the network
            return Path(snapshot_download(text, allow_patterns=patterns, local_files_only=True))
        except Exception:
            return Path(snapshot_download(text, allow_patterns=patterns))
    except Exception as e:  # network down, unknown repo, gated, ...
        raise ModelLoadError(
            f"could not download {text!r} from the Hugging Face hub and it is not in the local "
            f"cache ({type(e).__name__}); download it elsewhere and pass its folder instead, "
            "e.g. --model /path/to/deepseek-vl-1.3b-chat"
        ) from None


# -- config -----------------------------------------------------------------------------------
def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: invalid JSON in {what} ({e})") from None


def load_config(path: Path) -> ModelConfig:
    config = read_json(path / "config.json", "config.json (not a model folder?)")
    prep_file = path / "preprocessor_config.json"
    prep = read_json(prep_file, "preprocessor_config.json") if prep_file.exists() else {}
    try:
        mlx_format_info(config)  # an MLX folder's marker must be one we can read
    except ValueError as e:
        raise ModelLoadError(f"{path / 'config.json'}: {e}") from None
    try:
        return ModelConfig.from_dict(config, prep)
    except ConfigError as e:
        raise ModelLoadError(f"{path / 'config.json'}: {e}") from None


# -- weight files -----------------------------------------------------------------------------
def weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> file, every named shard checked (no index: ``{"*NAME": file}``, names unknown)."""
    index = path / INDEX
    if index.exists():
        weight_map = read_json(index, "weight index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index}: no weight_map")
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise ModelLoadError(f"{index}: missing shard file(s) {', '.join(missing)}")
        return {k: path / f for k, f in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no model.safetensors (or shards with an index) found")
    return {f"*{f.name}": f for f in files}


def weight_file_names(path: Path) -> list[str]:
    return sorted({f.name for f in weight_files(path).values()})


def folder_fingerprint(path: Path, sample: int = 64) -> dict[str, str]:
    """What identifies a folder's weights, cheaply: headers and ``sample`` bytes from the middle of
    each tensor, not whole files; ``layout`` too, since only one layout's files are comparable."""
    config = read_json(path / "config.json", "config.json (not a model folder?)")
    info = mlx_format_info(config)
    quant = (info or {}).get("quantization")
    layout = "original" if info is None else " ".join(["mlx", str(info.get("dtype"))] + quant_tags(quant))
    digest = hashlib.sha256()
    for f in sorted(set(weight_files(path).values())):
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = fh.read(n)
                digest.update(f"{f.name}:{f.stat().st_size}:".encode() + header)
                for entry in json.loads(header).values():
                    if isinstance(entry, dict) and "data_offsets" in entry:
                        start, end = entry["data_offsets"]
                        fh.seek(8 + n + max(start, (start + end - sample) // 2))
                        digest.update(fh.read(min(sample, end - start)))
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{f}: cannot read safetensors header ({e})") from None
    return {"layout": layout, "files": digest.hexdigest()[:16]}


def quant_tags(quant: dict | None) -> list[str]:
    """``q4/64`` (the LLM's, or vision and LLM alike, as folders before vision bits of their own
    said), ``vision q8`` for vision bits of their own."""
    if not quant:
        return []
    bits = group_bits(quant)
    own = bits["vision"] is not None and bits["vision"] != bits["language"]
    return [f"q{bits['language'] or '-'}/{quant['group_size']}"] + ([f"vision q{bits['vision']}"] if own else [])


def read_weights(path: Path) -> dict[str, mx.array]:
    """Lazily read all tensors named by the folder's safetensors files (or its index)."""
    files = weight_files(path)
    weights: dict[str, mx.array] = {}
    for f in sorted(set(files.values())):
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:
            raise ModelLoadError(f"{f}: cannot read safetensors file ({e})") from None
    if (path / INDEX).exists():
        absent = sorted(k for k in files if k not in weights)
        if absent:
            raise ModelLoadError(
                f"{path / INDEX}: tensor {absent[0]} is not in "
                f"{files[absent[0]].name}" + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else "")
            )
    return weights


def shard_names(count: int, single: str = "model.safetensors") -> list[str]:
    if count == 1:
        return [single]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def plan_shards(sizes: Mapping[str, int], max_bytes: int,
                group: Callable[[str], str] = lambda k: k.rpartition(".")[0]) -> list[list[str]]:
    """Consecutive shards of at most ``max_bytes``; tensors with the same ``group`` key (one
    module's) stay in one shard."""
    modules: dict[str, list[str]] = {}
    for k in sizes:
        modules.setdefault(group(k), []).append(k)
    shards: list[list[str]] = [[]]
    size = 0
    for keys in modules.values():
        n = sum(sizes[k] for k in keys)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(keys)
        size += n
    return shards


# -- the strict check -------------------------------------------------------------------------
def check_weights(path: Path, weights: Mapping[str, mx.array], expected: Mapping[str, mx.array]) -> None:
    """Exactly the names of ``expected`` (the model's parameters), each with its shape."""
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        raise ModelLoadError(
            f"{path}: missing weight {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    if unexpected:
        raise ModelLoadError(
            f"{path}: unexpected weight {unexpected[0]}"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
        )
    for k, v in weights.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ModelLoadError(
                f"{path}: weight {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}"
            )


# -- the layout maps --------------------------------------------------------------------------
def is_unused(name: str) -> bool:
    """A tensor the released checkpoints carry and no model uses (SigLIP's ``attn_pool``, ...)."""
    return name.startswith(UNUSED_PREFIXES) or any(p in name for p in UNUSED_PARTS)


def split_unused(weights: Mapping[str, mx.array]) -> tuple[dict[str, mx.array], dict[str, mx.array]]:
    """(the tensors the model uses, the unused ones), original names both."""
    used, unused = {}, {}
    for k, v in weights.items():
        (unused if is_unused(k) else used)[k] = v
    return used, unused


def to_mlx_layout(k: str, v: mx.array) -> mx.array:
    """PyTorch conv weights [O, I, kH, kW] -> MLX [O, kH, kW, I]; everything else as is."""
    if k.endswith(CONV_SUFFIXES) and v.ndim == 4:
        return v.transpose(0, 2, 3, 1)
    return v


def to_pytorch_layout(k: str, v: mx.array) -> mx.array:
    """The inverse of :func:`to_mlx_layout`: MLX conv weights [O, kH, kW, I] -> PyTorch [O, I, kH, kW]."""
    if k.endswith(CONV_SUFFIXES) and v.ndim == 4:
        return v.transpose(0, 3, 1, 2)
    return v


def sanitize(weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
    """Original deepseek-ai checkpoint tensors -> this package's names and layouts (lazily):
    the unused tensors dropped, the convs transposed."""
    return {k: to_mlx_layout(k, v) for k, v in split_unused(weights)[0].items()}

