"""Training: ``python -m mlx_dsvl.train --stage {1,2,3}`` (the DeepSeek-VL recipe).

Modules: ``config`` (every option: default, help, range; derived defaults), ``stages`` (one
declaration per stage; what trains, LoRA/DoRA/QLoRA/full), ``data`` (JSONL -> tokenized examples
with loss masks -> batch indices), ``batches`` (mixed, prefetched micro-batches), ``schedule``
(learning rate, modality mix, run length), ``loss`` (loss, gradient checkpointing), ``setup``
(model, data, optimizer, resume state -> the parts), ``loop`` (the compiled step and the loop,
with callbacks), ``callbacks`` / ``evaluation`` / ``saving`` / ``report`` / ``plot`` (metrics,
progress, validation, checkpoints, loss.png), ``run`` (``train``: all of it), ``checkpoint``
(atomic save, integrity check, exact resume), ``rundir`` (the output folder: no clobbering,
``force`` replaces atomically), ``files`` (atomic writes), ``signals`` (stop at a step
boundary), ``adapters`` (saving a run's adapters; the format, loading and fusing are
:mod:`mlx_dsvl.adapters`, re-exported here), ``vision_cache`` (``cache_vision_features``),
``distributed`` (data-parallel on the processes ``mlx.launch`` starts: shares of each global
batch, gradient and loss sums, agreed decisions, watchdog).

Python API::

    from mlx_dsvl.train import TrainConfig, train, load_adapters
    result = train(TrainConfig(stage=3, model="...", data="train.jsonl", out="run", iters=100))
    model, processor = mlx_dsvl.load("...")
    load_adapters(model, "run")      # LoRA/DoRA + fully trained weights, in place
"""

from ..adapters import AdapterError, fuse_adapters, load_adapters
from .config import TrainConfig
from .data import DataError
from .loop import TrainingStopped
from .run import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingStopped", "train", "load_adapters",
           "fuse_adapters", "AdapterError", "DataError"]
