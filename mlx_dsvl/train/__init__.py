"""Training: ``python -m mlx_dsvl.train --stage {1,2,3}`` (the DeepSeek-VL recipe).

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
