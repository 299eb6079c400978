"""Training: ``python -m mlx_dsvl.train --stage {1,2,3}`` (the DeepSeek-VL recipe).

Modules: ``config`` (every option: default, help, range; derived defaults), ``stages`` (one
declaration per stage; what trains, LoRA/DoRA/QLoRA/full), ``data`` (JSONL -> tokenized examples
with loss masks), ``batches`` (batch order, mixed and prefetched micro-batches, the vision feature
cache), ``schedule`` (learning rate, modality mix, run length), ``loop`` (the standard loss, the
compiled step and the loop), ``callbacks`` (metrics, progress, validation, benchmarks, loss.png),
``checkpoint`` (atomic save, integrity check, exact resume, the saving callback), ``report``
(what a run prints), ``run`` (``train``: set-up, stop signals, the run), ``rundir`` (the output
folder), ``files`` (atomic writes), ``distributed`` (data-parallel on the processes
``mlx.launch`` starts).

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
