"""Saving during training: checkpoints every N steps, at the end and on a stop signal, then the
final adapters; the first checkpoint of a ``force`` run swaps its folder into place.  With
several processes rank 0 writes; the others hand it their random state and wait until it is done."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from . import checkpoint as ckpt
from .adapters import save_adapters
from .callbacks import TrainingCallback, due
from .distributed import SOLO, World
from .loop import TrainingStopped
from .rundir import RunDir


class Checkpointer(TrainingCallback):
    """Writes checkpoints of ``model`` + ``optimizer`` into ``run``.

    ``meta``: what every checkpoint's state records besides the step, data position and history
    (config, base-model fingerprint, data digests); ``last``: the checkpoint resumed from.
    ``on_publish(folder)`` runs when a staged (``force``) run takes its place.  ``world``: the
    processes of the run (rank 0 writes).
    """

    def __init__(self, run: RunDir, model, optimizer, adapter_cfg: dict, meta: dict, history: list[dict],
                 every: int, keep: int, start_step: int, last: Path | None = None,
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
            self.saved_step, self.last = step, ckpt.step_dir(self.run.out, step)
            return
        state = {"config": self.meta["config"], "fingerprint": self.meta["fingerprint"], "streams": streams,
                 "history": self.history, "data": self.meta["data"], "processes": self.world.size,
                 "version": 1}
        try:
            self.last = ckpt.save_checkpoint(self.run.path, step, self.model, self.optimizer, self.adapter_cfg,
                                             state, self.keep, ranks if self.world.size > 1 else None)
        except OSError as e:
            raise ckpt.CheckpointWriteError(
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
