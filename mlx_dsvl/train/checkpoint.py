"""Atomic training checkpoints and exact resume.

``OUT/checkpoints/step-NNNNNNN/`` holds the adapter files (so a checkpoint is also an adapter
folder), the optimizer state, MLX's random state (every process's under ``ranks``) and, written
last, ``state.json``: step, data positions, history, config, base-model fingerprint and each other
file's size and SHA-256. It is staged in a held temporary sibling, renamed into place, then the
one-line ``checkpoints/latest`` is replaced atomically: an interrupted save never leaves a half
checkpoint, and damage done later is found on resume.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map_with_path

from ..adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, trained_weights
from ..faults import fault_point
from ..outputs import (
    fsync_dir,
    fsync_file,
    remove_abandoned,
    replace_atomic,
    save_arrays,
    temporary,
    write_text_atomic,
)
from ..utils import file_digest
from .callbacks import TrainingCallback, due
from .distributed import SOLO, World
from .loop import TrainingStopped

if TYPE_CHECKING:
    from ..models.deepseek_vl import DeepseekVL
    from .rundir import RunDir  # rundir imports this module

STATE = "state.json"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
LATEST = "latest"
FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, OPTIMIZER, RNG)  # + STATE, written last
STEP_DIR = re.compile(r"step-(\d+)")


class ResumeError(ValueError):
    """A `resume` folder that cannot be resumed from (missing, damaged, foreign model, other set-up)."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. a full disk); the previous one is intact."""


def checkpoint_root(out: str | os.PathLike) -> Path:
    return Path(out) / "checkpoints"


def step_of(path: Path) -> int:
    return int(STEP_DIR.fullmatch(path.name).group(1))


def run_of(checkpoint: Path) -> Path | None:
    """The run folder that holds ``checkpoint`` (``RUN/checkpoints/step-N``), if any."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


def step_dir(out: str | os.PathLike, step: int) -> Path:
    """Where checkpoint ``step`` of the run in ``out`` lives."""
    return checkpoint_root(out) / f"step-{step:07d}"


def list_checkpoints(out: str | os.PathLike) -> list[Path]:
    """The run's checkpoint folders, oldest first."""
    root = checkpoint_root(out)
    return sorted((p for p in root.glob("step-*") if p.is_dir() and STEP_DIR.fullmatch(p.name)),
                  key=step_of)


def save_adapters(folder: str | os.PathLike, model: DeepseekVL, config: dict) -> None:
    """The trainable parameters and adapter config into an existing folder, each file replaced in one step."""
    folder = Path(folder)
    weights = trained_weights(model)
    replace_atomic(folder / ADAPTER_WEIGHTS, lambda tmp: save_arrays(tmp, weights, {"format": "mlx"}))
    write_text_atomic(folder / ADAPTER_CONFIG, json.dumps(config, indent=2))


# -- writing ------------------------------------------------------------------------------------


def _digest(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": file_digest(path, chunk=1 << 24)}


def _write_files(folder: Path, model: DeepseekVL, optimizer: optim.Optimizer, adapter_cfg: dict, state: dict,
                 rng_ranks: mx.array | None) -> None:
    """The checkpoint's files, ``state.json`` last with every other file's size and digest."""
    save_adapters(folder, model, adapter_cfg)
    fault_point("checkpoint-file")
    save_arrays(folder / OPTIMIZER, dict(tree_flatten(optimizer.state)))
    fault_point("checkpoint-file")
    rng = {"state": mx.random.state[0]}
    if rng_ranks is not None:
        rng["ranks"] = rng_ranks
    save_arrays(folder / RNG, rng)
    fault_point("checkpoint-file")
    files = {}
    for f in FILES:
        fsync_file(folder / f)
        files[f] = _digest(folder / f)
    (folder / STATE).write_text(json.dumps({**state, "files": files}, indent=1))
    fsync_file(folder / STATE)
    fault_point("checkpoint-file")


def save_checkpoint(
    out: str | os.PathLike,
    step: int,
    *,
    model: DeepseekVL,
    optimizer: optim.Optimizer,
    adapter_cfg: dict,
    state: dict[str, Any],
    keep: int = 0,
    rng_ranks: mx.array | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically and point ``latest`` at it, then remove later steps (a
    rolled-back timeline) and all but the ``keep`` newest (0 keeps all). On any error nothing of
    it remains and ``latest`` is unchanged."""
    root = checkpoint_root(out)
    root.mkdir(parents=True, exist_ok=True)
    remove_abandoned(root)
    final = step_dir(out, step)
    with temporary(final, folder=True) as tmp:
        _write_files(tmp, model, optimizer, adapter_cfg, {**state, "step": step}, rng_ranks)
        tmp.chmod(0o755)
        if final.exists():  # the same step of an abandoned timeline: moved aside, then removed
            with temporary(final, folder=True) as old:
                os.replace(final, old / final.name)
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fsync_dir(root)
    write_text_atomic(root / LATEST, final.name + "\n")
    fsync_dir(root)
    steps = list_checkpoints(out)
    stale = [p for p in steps if step_of(p) > step]
    kept = [p for p in steps if step_of(p) <= step]
    for p in stale + (kept[:-keep] if keep > 0 else []):
        shutil.rmtree(p, ignore_errors=True)
    return final


# -- reading ------------------------------------------------------------------------------------


def damage(path: Path) -> str | None:
    """Why checkpoint folder ``path`` cannot be resumed from (None: intact); one from before
    recorded digests must at least load."""
    try:
        state = json.loads((path / STATE).read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("no step number")
    except FileNotFoundError:
        return f"{path / STATE} is missing"
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"{path / STATE} is damaged (not a checkpoint state: {e})"
    recorded = state.get("files") or {}
    for name in FILES:
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        want = recorded.get(name)
        if want is None:  # an older checkpoint: it must at least load
            try:
                mx.load(str(f)) if name.endswith(".safetensors") else json.loads(f.read_text())
            except Exception as e:
                return f"{f} is damaged (unreadable: {str(e).splitlines()[0][:120]})"
            continue
        size = f.stat().st_size
        if size != want["bytes"]:
            return f"{f} is damaged ({size} bytes, {want['bytes']} were written)"
        if _digest(f)["sha256"] != want["sha256"]:
            return f"{f} is damaged (its contents differ from what was written)"
    return None


def _fallback(root: Path, below: int | None) -> str:
    """The clause naming the newest intact checkpoint before step ``below`` (None: any)."""
    steps = list_checkpoints(root.parent)
    for p in reversed(steps):
        if (below is None or step_of(p) < below) and damage(p) is None:
            later = step_of(steps[-1]) > step_of(p)
            return (f"the newest intact checkpoint is step {step_of(p)}: continue from it with "
                    f"`resume` {p}" + (f" `force` (which drops the later steps of {root.parent})"
                                       if later else ""))
    return "no earlier checkpoint of this run is intact: start the run again"


def find_checkpoint(path: str | os.PathLike) -> Path:
    """``path``: a checkpoint folder or a run folder (its latest). Damage is never silently
    replaced by another step: the error names it and the newest intact checkpoint instead."""
    p = Path(path)
    if not p.exists():
        raise ResumeError(f"`resume` {p}: no such folder")
    if (p / STATE).exists() or (STEP_DIR.fullmatch(p.name) and p.parent.name == "checkpoints"):
        why = damage(p)
        if why and run_of(p):
            why += "; " + _fallback(p.parent, step_of(p) if STEP_DIR.fullmatch(p.name) else None)
        if why:
            raise ResumeError(why)
        return p
    for root in (p / "checkpoints", p):
        latest = root / LATEST
        if latest.is_file():
            name = latest.read_bytes().decode("utf-8", "replace").strip()
            cand = root / name
            if not (STEP_DIR.fullmatch(name) and cand.is_dir()):
                raise ResumeError(f"{latest} is damaged (it names {name[:40]!r}, not a checkpoint "
                                  f"folder of {root}); " + _fallback(root, None))
            why = damage(cand)
            if why:
                raise ResumeError(f"{why}; " + _fallback(root, step_of(cand)))
            return cand
    raise ResumeError(
        f"`resume` {p}: not a training checkpoint (expected {STATE}, or a run folder with "
        f"checkpoints/{LATEST})"
    )


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The state of a checkpoint that :func:`find_checkpoint` returned (so: intact)."""
    return json.loads((path / STATE).read_text())


def restore(path: Path, model: DeepseekVL, optimizer: optim.Optimizer) -> mx.array | None:
    """Load trained weights, optimizer state and RNG state (rank 0's) from checkpoint ``path``;
    returns every process's random state when several saved it (``[processes, 2]``), else None."""
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
    rng = mx.load(str(path / RNG))
    set_rng_state(rng["state"])
    mx.eval(model.parameters(), optimizer.state, mx.random.state)
    return rng.get("ranks")


def set_rng_state(key: mx.array) -> None:
    """MLX has no key setter, but ``seed(n)`` sets key ``[n >> 32, n & 0xffffffff]``."""
    hi, lo = (int(x) for x in key.tolist())
    mx.random.seed((hi << 32) | lo)
    if mx.random.state[0].tolist() != [hi, lo]:
        raise ResumeError("cannot restore the random state")


# -- saving during training -----------------------------------------------------------------------


class Checkpointer(TrainingCallback):
    """Saves checkpoints every N steps, at the end and on a stop signal, then the final adapters.
    Rank 0 writes; the other processes hand it their random state and wait."""

    def __init__(self, run: RunDir, *, model: DeepseekVL, optimizer: optim.Optimizer, adapter_cfg: dict,
                 meta: dict, history: list[dict], every: int, keep: int, start_step: int, last: Path | None = None,
                 say: Callable[[str], None] = print, on_publish: Callable[[Path], None] | None = None,
                 world: World = SOLO):
        self.run, self.model, self.optimizer, self.adapter_cfg = run, model, optimizer, adapter_cfg
        self.meta, self.history, self.every, self.keep = meta, history, every, keep
        self.start_step, self.saved_step, self.last = start_step, start_step, last
        self.say, self.on_publish, self.world, self.writer = say, on_publish, world, world.writer

    def where(self, staged: bool = False) -> str:
        """What is left on disk if the run stops now."""
        return ((f"the last good checkpoint is kept: {self.last}" if self.last
                 else "no checkpoint had been saved yet")
                + (f"; {self.run.out} is unchanged" if staged and self.run.staged else ""))

    def save(self, step: int, streams: dict) -> None:
        bad = [k for k, v in tree_flatten(self.model.trainable_parameters())
               if not bool(mx.all(mx.isfinite(v)).item())]
        if bad:
            raise TrainingStopped(f"trained weights became non-finite at step {step} ({bad[0]}); "
                                  f"training stopped without saving; {self.where(staged=True)}", self.last)
        ranks = self.world.gather(mx.random.state[0], f"the random states for checkpoint {step}")
        if not self.writer:  # rank 0 writes it (or fails, and the run ends)
            self.world.barrier(f"rank 0 writing checkpoint {step}")
            self.saved_step, self.last = step, step_dir(self.run.out, step)
            return
        state = {"config": self.meta["config"], "fingerprint": self.meta["fingerprint"], "streams": streams,
                 "history": self.history, "data": self.meta["data"], "processes": self.world.size,
                 "version": 1}
        try:
            self.last = save_checkpoint(self.run.path, step, model=self.model, optimizer=self.optimizer,
                                        adapter_cfg=self.adapter_cfg, state=state, keep=self.keep,
                                        rng_ranks=ranks if self.world.size > 1 else None)
        except OSError as e:
            raise CheckpointWriteError(
                f"cannot write the checkpoint of step {step} into {self.run.out / 'checkpoints'} "
                f"({e.strerror or e}); nothing of it remains; {self.where(staged=True)}") from None
        self.saved_step = step
        if self.run.publish():  # a `force` run's first checkpoint: it now replaces the earlier run
            self.last = self.run.path / self.last.relative_to(self.last.parents[1])
            if self.on_publish is not None:
                self.on_publish(self.run.path)
            self.say(f"replaced the earlier run in {self.run.out}")
        self.say(f"saved checkpoint {self.last}")
        self.world.barrier(f"rank 0 writing checkpoint {step}")

    def on_step_end(self, state) -> None:
        if due(state.step, self.every, state.iters):
            self.save(state.step, state.streams)

    def on_train_end(self, state, error) -> None:
        if error is not None:
            return
        if state.stopped and state.step > self.saved_step:
            self.save(state.step, state.streams)
        if self.writer and self.last is not None and state.step > self.start_step:
            try:
                save_adapters(self.run.path, self.model, self.adapter_cfg)
            except OSError as e:
                raise OSError(f"cannot write the adapters into {self.run.path} ({e.strerror or e}); the "
                              f"last checkpoint, {self.last}, holds them too (it is an adapter folder as well)") from None
