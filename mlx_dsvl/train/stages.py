"""The training stages (one declaration each: the CLI's choices and help come from
:data:`STAGES`), and what they train and how.

``method`` applies to the trained transformer blocks: ``lora`` / ``dora`` wrap their ``Linear``
layers with mlx-lm's adapters (on a quantized LLM that is QLoRA: the ``QuantizedLinear`` stays
frozen), ``full`` trains every weight. The aligner and ``sam-neck`` always train in full.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING

import mlx.nn as nn
from mlx.utils import tree_flatten

from ..adapters import ADAPTER_TYPES, AdapterError, adapt_modules

if TYPE_CHECKING:
    from ..models.deepseek_vl import DeepseekVL

COMPONENTS = ("aligner", "llm", "siglip", "sam", "sam-neck")


@dataclass(frozen=True)
class Stage:
    """One stage of the recipe and the defaults it implies."""

    number: int
    name: str
    components: tuple[str, ...]  # what trains unless the ``train`` option overrides it
    frozen: str  # what stays frozen (for the help)
    data: str  # the data it is meant for (for the help)
    text_ratio: float  # share of text-only batches once warmed up (with text-only data)
    modality_warmup: Fraction = field(default=Fraction(0), kw_only=True)  # default warm-up, as a share of the run's steps

    def warmup_steps(self, run_steps: int) -> int:
        """The default modality warm-up of a run of about ``run_steps`` steps."""
        return max(0, int(run_steps * self.modality_warmup))

    def describe(self) -> str:
        mix = f"text share {self.text_ratio:g} with text-only data"
        if self.modality_warmup:
            mix += f", reached after a modality warm-up of {self.modality_warmup} of the run"
        return (f"{self.name}: trains {' + '.join(self.components)} ({self.frozen} frozen); "
                f"{self.data}; {mix}")


STAGES: tuple[Stage, ...] = (
    Stage(1, "adaptor warm-up", ("aligner",), "vision encoders and LLM", "image-text pairs", 0.7),
    Stage(2, "joint pre-training", ("aligner", "llm"), "vision encoders",
          "image-text pairs mixed with text-only data", 0.7, modality_warmup=Fraction(1, 5)),
    Stage(3, "supervised fine-tuning", ("aligner", "llm", "siglip"), "SAM-B",
          "chat data, text-only data optional", 0.48),
)


def get_stage(number: int) -> Stage:
    for stage in STAGES:
        if stage.number == number:
            return stage
    raise StageError(f"`stage` must be one of {', '.join(str(s.number) for s in STAGES)}, got {number}")


METHODS = ("lora", "dora", "full")
# Peak learning rates by what trains: the aligner alone, else by the method.
ALIGNER_ONLY_LR = 1e-3
METHOD_LR = {"lora": 1e-4, "dora": 1e-4, "full": 2e-5}


def default_lr(components: Sequence[str], method: str) -> float:
    return ALIGNER_ONLY_LR if tuple(components) == ("aligner",) else METHOD_LR[method]


# LoRA targets: names of Linear layers inside the transformer blocks.
LLM_TARGETS = {
    "attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
}
SIGLIP_TARGETS = {"attn": ("attn.qkv", "attn.proj"), "mlp": ("mlp.fc1", "mlp.fc2")}
SAM_TARGETS = {"attn": ("attn.qkv", "attn.proj"), "mlp": ("mlp.lin1", "mlp.lin2")}
TARGET_GROUPS = ("attn", "mlp", "lm_head")
# Single layers may be named too (the last part of their name).
TARGET_LEAVES = tuple(sorted({n.rsplit(".", 1)[-1] for t in (LLM_TARGETS, SIGLIP_TARGETS, SAM_TARGETS)
                              for names in t.values() for n in names}))


class StageError(ValueError):
    """An impossible training set-up (unknown component, full training of a quantized LLM, ...)."""


@dataclass(kw_only=True)
class TrainSpec:
    """Which parts train and how; stored in ``adapter_config.json``."""

    stage: int
    components: tuple[str, ...]
    method: str
    rank: int
    scale: float
    dropout: float
    targets: tuple[str, ...]
    llm_layers: int | None  # adapt the last N LLM blocks (None = all)

    def to_dict(self) -> dict:
        return {
            "stage": self.stage, "components": list(self.components), "method": self.method,
            "rank": self.rank, "scale": self.scale, "dropout": self.dropout,
            "targets": list(self.targets), "llm_layers": self.llm_layers,
        }


def parse_components(stage: int, train: str | Sequence[str] | None, hybrid: bool) -> tuple[str, ...]:
    """Resolve the ``train`` option (comma list or None for the stage's set) against the model."""
    if train is None or train == "":
        comps = get_stage(stage).components
    else:
        get_stage(stage)
        items = train.split(",") if isinstance(train, str) else list(train)
        comps = tuple(dict.fromkeys(c.strip().lower() for c in items if c.strip()))
        unknown = [c for c in comps if c not in COMPONENTS]
        if unknown:
            raise StageError(
                f"`train`: unknown component(s) {', '.join(unknown)}; choose from {', '.join(COMPONENTS)}"
            )
        if not comps:
            raise StageError("`train` names no component")
    if not hybrid and any(c in ("sam", "sam-neck") for c in comps):
        raise StageError(
            "`train`: this model has no SAM-B tower (the 1.3B layout is SigLIP only); "
            "'sam' and 'sam-neck' need a 7B-layout (hybrid) model"
        )
    return comps


def module_prefix(model: DeepseekVL, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise KeyError("module not found in model")


def llm_is_quantized(model: DeepseekVL) -> bool:
    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
               for _, m in model.language_model.named_modules())


def adapter_paths(model: DeepseekVL, spec: TrainSpec) -> list[str]:
    """Full names of the Linear layers that ``spec`` puts adapters on."""
    if spec.method == "full":
        return []
    groups = set(spec.targets)
    paths: list[str] = []

    def blocks(prefix: str, n_blocks: int, names: dict[str, tuple[str, ...]], last: int | None):
        start = 0 if last is None else max(0, n_blocks - last)
        for i in range(start, n_blocks):
            for g in ("attn", "mlp"):
                paths.extend(f"{prefix}.{i}.{n}" for n in names[g]
                             if g in groups or n.rsplit(".", 1)[-1] in groups)

    if "llm" in spec.components:
        blocks("language_model.model.layers", len(model.layers), LLM_TARGETS,
               spec.llm_layers)
        if "lm_head" in groups and not model.tied_embeddings:
            paths.append("language_model.lm_head")
    towers = model.towers()
    for name, targets in (("siglip", SIGLIP_TARGETS), ("sam", SAM_TARGETS)):
        if name in spec.components:
            blocks(module_prefix(model, towers[name]) + ".blocks", len(towers[name].blocks), targets, None)
    return paths


def setup_trainable(model: DeepseekVL, spec: TrainSpec) -> list[str]:
    """Freeze ``model``, add adapters and unfreeze what ``spec`` trains; returns the adapted layers' names."""
    if spec.method not in METHODS:
        raise StageError(f"`method` must be one of {', '.join(METHODS)}, got {spec.method!r}")
    bad = [t for t in spec.targets if t not in TARGET_GROUPS + TARGET_LEAVES]
    if bad:
        raise StageError(f"`lora_targets`: unknown {', '.join(bad)}; choose from "
                         f"{', '.join(TARGET_GROUPS + TARGET_LEAVES)}")
    if spec.method == "full" and "llm" in spec.components and llm_is_quantized(model):
        raise StageError(
            "the loaded LLM is quantized, so it cannot be trained in full: use `method` lora or "
            "`method` dora (QLoRA), or load an unquantized model"
        )
    if spec.rank < 1:
        raise StageError("`lora_rank` must be >= 1")
    model.freeze()
    paths = adapter_paths(model, spec)
    try:
        adapt_modules(model, paths, spec.method, spec.rank, spec.scale, spec.dropout)
    except AdapterError as e:
        raise StageError(str(e)) from None
    comps = set(spec.components)
    if "aligner" in comps:
        model.aligner.unfreeze()
    if spec.method == "full":
        if "llm" in comps:
            model.language_model.unfreeze()
        for name in ("siglip", "sam"):
            if name in comps:
                model.towers()[name].unfreeze()
    if "sam" in comps or "sam-neck" in comps:
        sam = model.towers()["sam"]
        for name in ("neck", "neck_hd", "downsamples"):
            for layer in getattr(sam, name):
                layer.unfreeze()
        sam.unfreeze(keys=["hd_alpha_downsamples"], recurse=False)
    # Adapters wrap frozen layers: keep the wrapped base weights frozen.
    for _, m in model.named_modules():
        if isinstance(m, ADAPTER_TYPES):
            m.linear.freeze()
    return paths


def vision_trainable(spec: TrainSpec) -> bool:
    return any(c in spec.components for c in ("siglip", "sam", "sam-neck"))


def count_parameters(model: DeepseekVL) -> tuple[int, int]:
    """(trainable, total); a quantized weight counts unpacked, its scales and biases do not."""
    modules = dict(model.named_modules())

    def size(name: str, v) -> int:
        owner, _, leaf = name.rpartition(".")
        bits = getattr(modules.get(owner), "bits", None)
        if bits is None:
            return v.size
        return 0 if leaf in ("scales", "biases") else v.size * 32 // bits if leaf == "weight" else v.size

    trainable = sum(size(k, v) for k, v in tree_flatten(model.trainable_parameters()))
    return trainable, sum(size(k, v) for k, v in tree_flatten(model.parameters()))
