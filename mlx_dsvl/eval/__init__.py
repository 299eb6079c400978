"""Evaluation: ``python -m mlx_dsvl.eval`` and the functions under it.

Modules: ``items`` (questions, prompts, circular rotations), ``readers`` (JSONL, CSV, folders)
and ``mmbench`` (OpenCompass's TSV), ``likelihood`` and ``greedy`` (the two ways to answer),
``answers`` (option extraction, exact match, ANLS), ``metrics`` (accuracy, Wilson intervals),
``runner`` (``evaluate``), ``report`` (predictions.jsonl, summary.json, table, progress).

Python API::

    from mlx_dsvl.eval import evaluate, read
    data = read("MMBench_DEV_EN.tsv")                  # once; ReadResult(items, skipped, rows)
    summary = evaluate(model, processor, data, method="likelihood", batch_size=8, limit=200)
    summary["accuracy"], summary["ci95"], summary["categories"]

``evaluate`` takes an already loaded model (adapters applied or not, in training mode or not)
and writes nothing: a training loop can call it every N steps.
"""

from .items import EvalDataError, Item
from .metrics import summarize
from .readers import ReadResult, read
from .runner import evaluate, inference_mode, iter_records, prepare_items

__all__ = ["evaluate", "iter_records", "prepare_items", "inference_mode", "read", "ReadResult",
           "Item", "EvalDataError", "summarize"]
