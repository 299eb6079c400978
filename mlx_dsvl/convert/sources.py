"""A checkpoint folder of any supported kind (original, ``transformers``, MLX) as one lazy MLX-layout view.

PyTorch pickles are read only when allowed, one file at a time with ``weights_only=True`` into
scratch safetensors. Every check happens before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from ..config import ConfigError, ModelConfig
from ..mlx_format import UNUSED_FILE, describe_quantization, mlx_format_info, stored_bits, strip_marker
from ..model_folder import read_json, read_weights, sanitize, split_unused, weight_file_names
from ..models.deepseek_vl import DeepseekVL
from . import hf_config
from .files import ConvertError, as_convert_error, write_safetensors
from .keymaps import hf_to_original, is_hf_state_dict

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "optimizer.bin")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


@dataclass
class Source:
    path: Path
    kind: str  # "original" | "transformers" | "mlx"
    config: dict[str, Any]  # the original-layout config.json (no MLX marker)
    model_config: ModelConfig
    weights: dict[str, mx.array]  # lazy, MLX names and layouts (quantized triples if mlx + quantized)
    extras: dict[str, mx.array]  # lazy, the unused tensors of the original files (original names)
    side_files: list[Path]  # tokenizer, processor and other non-weight files to copy as they are
    generated: dict[str, dict[str, Any]] = field(default_factory=dict)  # file name -> JSON to write
    quantization: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    weight_files: list[str] = field(default_factory=list)

    @property
    def hybrid(self) -> bool:
        return self.model_config.vision.hybrid

    def describe(self) -> str:
        layout = "7B hybrid layout" if self.hybrid else "1.3B layout"
        q = self.quantization
        qtxt = f", {describe_quantization(q)}" if q else ""
        return f"{self.kind} format, {layout}{qtxt}, {len(self.weight_files)} weight file(s)"


def hub_patterns(allow_pickle: bool) -> tuple[str, ...]:
    """Beyond ``mlx_dsvl.load``'s download: the chat template and model card, and allowed pickles."""
    return ("*.jinja", "*.md") + (tuple("*" + s for s in PICKLE_SUFFIXES) if allow_pickle else ())


def _detect_kind(path: Path, config: dict[str, Any]) -> str:
    try:
        if mlx_format_info(config) is not None:
            return "mlx"
    except ValueError as e:
        raise ConvertError(f"{path / 'config.json'}: {e}") from None
    if all(isinstance(config.get(k), dict) for k in ("vision_config", "aligner_config", "language_config")):
        return "original"
    if config.get("model_type") in hf_config.HF_MODEL_TYPES:
        return "transformers"
    arch = config.get("model_type") or (config.get("architectures") or [None])[0]
    raise ConvertError(
        f"{path / 'config.json'}: unknown architecture (model_type {arch!r}); expected DeepSeek-VL in the "
        "original deepseek-ai layout (vision_config/aligner_config/language_config) or transformers' "
        "deepseek_vl / deepseek_vl_hybrid"
    )


def _pickle_files(path: Path) -> list[Path]:
    index = path / "pytorch_model.bin.index.json"
    if index.exists():
        weight_map = read_json(index, "weight index").get("weight_map") or {}
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise ConvertError(f"{index}: missing shard file(s) {', '.join(missing)}")
        return [path / f for f in files]
    return sorted(p for p in path.iterdir()
                  if p.is_file() and p.suffix in PICKLE_SUFFIXES and p.name not in NOT_WEIGHTS)


def _read_pickles(files: list[Path], scratch: Callable[[], Path], log: Callable[[str], None]) -> list[Path]:
    """Each pickle -> a scratch safetensors file, one at a time (``weights_only`` unpickling)."""
    try:
        import torch
    except ImportError:
        raise ConvertError("reading PyTorch pickles needs torch, which is not installed "
                           "(pip install torch), or convert the weights to safetensors first") from None
    out = []
    for i, f in enumerate(files):
        log(f"  reading pickle [{i + 1}/{len(files)}] {f.name} (torch.load, weights_only=True)")
        try:
            try:
                obj = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
                obj = torch.load(str(f), map_location="cpu", weights_only=True)
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConvertError(f"{f}: cannot read PyTorch weights ({msg})") from None
        for key in ("state_dict", "model"):
            if isinstance(obj, dict) and isinstance(obj.get(key), dict) and not any(
                    isinstance(v, torch.Tensor) for v in obj.values()):
                obj = obj[key]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ConvertError(f"{f}: not a state dict of tensors")
        tensors = {}
        for k, t in obj.items():
            t = t.detach().contiguous()
            if t.dtype == torch.bfloat16:
                tensors[k] = mx.array(t.float().numpy()).astype(mx.bfloat16)  # exact
            else:
                tensors[k] = mx.array(t.numpy())
        del obj
        dst = scratch() / (f.stem + ".safetensors")
        write_safetensors(dst, tensors)
        out.append(dst)
    return out


def _load_safetensors(files: list[Path]) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for f in files:
        try:
            part = mx.load(str(f))
        except Exception as e:
            raise ConvertError(f"{f}: cannot read safetensors file ({e})") from None
        dup = sorted(set(part) & set(weights))
        if dup:
            raise ConvertError(f"{f}: tensor {dup[0]} also appears in another weight file")
        weights.update(part)
    return weights


def _side_files(path: Path, skip_processor: bool) -> list[Path]:
    out = []
    for p in sorted(path.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        if p.name == "config.json" or p.name.endswith(".index.json") or p.suffix in WEIGHT_SUFFIXES:
            continue
        if skip_processor and p.name in PROCESSOR_FILES:
            continue
        out.append(p)
    return out


def open_source(path: Path, allow_pickle: bool = False, scratch: Callable[[], Path] | None = None,
                log: Callable[[str], None] = print) -> Source:
    """Open ``path`` (a folder) and check everything short of reading the tensors' data."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise ConvertError(f"{path}: no such model folder")
    if not cfg_file.is_file():
        raise ConvertError(f"{path}: no config.json, so not a model folder")
    with as_convert_error():
        raw = read_json(cfg_file, "config.json")
    if not isinstance(raw, dict):
        raise ConvertError(f"{cfg_file}: not a JSON object")
    kind = _detect_kind(path, raw)
    notes: list[str] = []
    generated: dict[str, dict[str, Any]] = {}

    # -- config ---------------------------------------------------------------------------
    if kind == "transformers":
        try:
            config, notes = hf_config.original_config(raw)
        except ConvertError as e:
            raise ConvertError(f"{cfg_file}: {e}") from None
        prep, proc = hf_config.original_processor_configs(config)
        generated = {"preprocessor_config.json": prep, "processor_config.json": proc}
        notes.append("wrote the original preprocessor_config.json / processor_config.json for the "
                     f"{'7B' if 'Hybrid' in config['vision_config']['cls'] else '1.3B'} family "
                     "(transformers' processor files differ)")
    else:
        config = strip_marker(raw)
        prep_file = path / "preprocessor_config.json"
        if not prep_file.is_file():
            raise ConvertError(f"{path}: missing preprocessor_config.json")
        with as_convert_error():
            prep = read_json(prep_file, "preprocessor_config.json")
    try:
        model_config = ModelConfig.from_dict(config, prep)
    except ConfigError as e:
        raise ConvertError(f"{cfg_file}: {e}") from None
    if not (path / "tokenizer_config.json").is_file() or not any((path / n).is_file() for n in TOKENIZER_FILES):
        raise ConvertError(f"{path}: missing tokenizer files (tokenizer_config.json and tokenizer.json); "
                           "the converted folder would not load")
    side_files = _side_files(path, skip_processor=bool(generated))
    with as_convert_error():  # copied as they are: a damaged one would make a folder that won't load
        for f in side_files:
            if f.suffix == ".json":
                read_json(f, f.name)

    # -- weights (lazy) -------------------------------------------------------------------
    has_safetensors = (path / "model.safetensors.index.json").exists() or any(path.glob("*.safetensors"))
    if has_safetensors:
        with as_convert_error():
            weights = read_weights(path)  # index / missing shard / missing tensor / truncation checks
            files = weight_file_names(path)
    else:
        pickles = _pickle_files(path)
        if not pickles:
            raise ConvertError(f"{path}: no weights found (model.safetensors, shards with "
                               "model.safetensors.index.json, or PyTorch .bin/.pt files)")
        if not allow_pickle:
            raise ConvertError(
                f"{path}: the weights are PyTorch pickles ({pickles[0].name}); unpickling can run arbitrary "
                "code, so they are read only with --allow-pickle (only for files you trust)")
        if scratch is None:
            raise ConvertError("reading pickles needs a scratch folder")
        weights = _load_safetensors(_read_pickles(pickles, scratch, log))
        files = [p.name for p in pickles]

    quantization = None
    extras: dict[str, mx.array] = {}
    if kind == "mlx":
        info = mlx_format_info(raw)
        quantization = info.get("quantization")
        try:
            stored_bits(weights, quantization)  # the tensors match the record
        except ValueError as e:
            raise ConvertError(f"{path / 'config.json'}: {e}") from None
        unused = path / UNUSED_FILE
        if unused.is_file():
            extras = _load_safetensors([unused])
    else:
        if is_hf_state_dict(weights):
            if ("lm_head.weight" not in weights and "model.language_model.embed_tokens.weight" in weights
                    and kind == "transformers" and hf_config.tied_embeddings(raw)):
                weights["lm_head.weight"] = weights["model.language_model.embed_tokens.weight"]
                notes.append("the transformers checkpoint ties lm_head to the embeddings: copied them "
                             "into DeepSeek-VL's separate lm_head")
            try:
                weights = hf_to_original(weights, hybrid=model_config.vision.hybrid)
            except (KeyError, ValueError) as e:
                raise ConvertError(f"{path}: {e.args[0] if e.args else e}") from None
        weights, extras = split_unused(weights)
        weights = sanitize(weights)  # conv transposes (lazy)

    return Source(path=path, kind=kind, config=config, model_config=model_config, weights=weights,
                  extras=extras, side_files=side_files,
                  generated=generated, quantization=quantization, notes=notes, weight_files=files)


def skeleton_parameters(model: DeepseekVL) -> dict[str, mx.array]:
    """The model's parameters by name (lazy; building even the 7B allocates nothing)."""
    return dict(tree_flatten(model.parameters()))
