"""Evaluation: ``python -m mlx_dsvl.eval`` and the functions under it (docs/EVAL.md).

Python API::

    from mlx_dsvl.eval import evaluate, read
    data = read("MMBench_DEV_EN.tsv")                  # once; ReadResult(items, skipped, rows)
    summary = evaluate(model, processor, data, method="likelihood", batch_size=8, limit=200)
    summary["accuracy"], summary["ci95"], summary["categories"]

``evaluate`` writes nothing and leaves a training model as it was: a training loop can call it.
"""

from .items import EvalDataError, Item
from .metrics import summarize
from .readers import ReadResult, read
from .runner import evaluate, inference_mode, iter_records, prepare_items

__all__ = ["evaluate", "iter_records", "prepare_items", "inference_mode", "read", "ReadResult",
           "Item", "EvalDataError", "summarize"]
