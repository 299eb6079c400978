"""Training: ``python -m mlx_dsvl.train --stage {1,2,3}`` (the DeepSeek-VL recipe).

Modules: ``data`` (JSONL -> tokenized examples with loss masks -> batches), ``stages`` (what each
stage trains; LoRA/DoRA/QLoRA/full), ``loop`` (loss, compiled step, schedule, mixing,
validation, logging), ``checkpoint`` (atomic save, integrity check, exact resume), ``rundir``
(the output folder: no clobbering, ``--force`` replaces atomically), ``files`` (atomic writes),
``adapters`` (save, load, fuse), ``vision_cache`` (``--cache-vision-features``), ``plot``
(loss.png).

Python API::

    from mlx_dsvl.train import TrainConfig, train, load_adapters
    result = train(TrainConfig(stage=3, model="...", data="train.jsonl", out="run", iters=100))
    model, processor = mlx_dsvl.load("...")
    load_adapters(model, "run")      # LoRA/DoRA + fully trained weights, in place
"""

from .adapters import AdapterError, fuse_adapters, load_adapters
from .data import DataError
from .loop import TrainConfig, TrainingStopped, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingStopped", "train", "load_adapters",
           "fuse_adapters", "AdapterError", "DataError"]
