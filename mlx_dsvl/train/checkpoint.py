"""Atomic training checkpoints and exact resume.

A checkpoint is a folder ``OUT/checkpoints/step-NNNNNNN/`` holding

* ``adapters.safetensors`` + ``adapter_config.json`` -- the trained weights (so a checkpoint is
  also a valid ``--adapter`` folder);
* ``optimizer.safetensors`` -- the optimizer state (AdamW moments, step, learning rate);
* ``rng.safetensors`` -- MLX's global random state (LoRA dropout);
* ``state.json`` -- the step, the data streams' positions, the loss history, the run's config
  and the base model's fingerprint.

It is written into a temporary sibling folder and renamed into place, then ``OUT/checkpoints/
latest`` (a one-line text file) is replaced atomically, so an interrupted save never leaves a
half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map_with_path

from .adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, save_adapters

STATE = "state.json"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
LATEST = "latest"


class ResumeError(ValueError):
    """A --resume folder that cannot be resumed from (missing, foreign model, other set-up)."""


def checkpoint_root(out: str | os.PathLike) -> Path:
    return Path(out) / "checkpoints"


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    out: str | os.PathLike,
    step: int,
    model,
    optimizer,
    adapter_cfg: Dict,
    state: Dict[str, Any],
    keep: int = 0,
) -> Path:
    """Write checkpoint ``step`` atomically; prune all but the ``keep`` newest (0 keeps all)."""
    root = checkpoint_root(out)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:07d}.", dir=root))
    try:
        save_adapters(tmp, model, adapter_cfg)
        opt_state = dict(tree_flatten(optimizer.state))
        mx.save_safetensors(str(tmp / OPTIMIZER), opt_state)
        mx.save_safetensors(str(tmp / RNG), {"state": mx.random.state[0]})
        (tmp / STATE).write_text(json.dumps({**state, "step": step}, indent=1))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        tmp.chmod(0o755)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_text_atomic(root / LATEST, final.name + "\n")
    if keep > 0:
        steps = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in steps[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` is a checkpoint folder, or a run's ``--out`` folder (its latest checkpoint)."""
    p = Path(path)
    if not p.exists():
        raise ResumeError(f"--resume {p}: no such folder")
    if (p / STATE).is_file():
        return p
    for root in (p / "checkpoints", p):
        latest = root / LATEST
        if latest.is_file():
            cand = root / latest.read_text().strip()
            if (cand / STATE).is_file():
                return cand
    raise ResumeError(
        f"--resume {p}: not a training checkpoint (expected {STATE}, or a run folder with "
        f"checkpoints/{LATEST})"
    )


def read_checkpoint(path: Path) -> Dict[str, Any]:
    try:
        state = json.loads((path / STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ResumeError(f"{path / STATE}: unreadable checkpoint state ({e})") from None
    for f in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, OPTIMIZER, RNG):
        if not (path / f).is_file():
            raise ResumeError(f"{path}: incomplete checkpoint, {f} is missing")
    return state


def restore(path: Path, model, optimizer) -> None:
    """Load trained weights, optimizer state and RNG state from checkpoint ``path``."""
    weights = mx.load(str(path / ADAPTER_WEIGHTS))
    params = dict(tree_flatten(model.trainable_parameters()))
    missing = sorted(set(params) - set(weights))
    extra = sorted(set(weights) - set(params))
    if missing or extra:
        raise ResumeError(
            f"{path}: the checkpoint's trained tensors do not match this set-up "
            f"(missing {missing[:3]}, unexpected {extra[:3]})"
        )
    for k, v in weights.items():
        if v.shape != params[k].shape:
            raise ResumeError(f"{path}: tensor {k} has shape {tuple(v.shape)}, expected {tuple(params[k].shape)}")
    model.load_weights([(k, v.astype(params[k].dtype)) for k, v in weights.items()], strict=False)
    opt = mx.load(str(path / OPTIMIZER))
    optimizer.init(model.trainable_parameters())
    have = dict(tree_flatten(optimizer.state))
    if set(have) != set(opt):
        raise ResumeError(f"{path}: the optimizer state does not match this set-up")
    optimizer.state = tree_map_with_path(lambda k, v: opt[k].astype(v.dtype), optimizer.state)
    set_rng_state(mx.load(str(path / RNG))["state"])
    mx.eval(model.parameters(), optimizer.state, mx.random.state)


def set_rng_state(key: mx.array) -> None:
    """Restore MLX's global random key ([hi, lo] uint32): ``seed(n)`` sets key ``[n >> 32, n & 0xffffffff]``."""
    hi, lo = (int(x) for x in key.tolist())
    mx.random.seed((hi << 32) | lo)
    if mx.random.state[0].tolist() != [hi, lo]:
        raise ResumeError("cannot restore the random state")


def list_checkpoints(out: str | os.PathLike) -> List[Path]:
    return sorted(p for p in checkpoint_root(out).glob("step-*") if p.is_dir())
