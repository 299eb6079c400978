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

from importlib import import_module

_API = {"evaluate": ".runner", "iter_records": ".runner", "prepare_items": ".runner",
        "inference_mode": ".runner", "read": ".readers", "ReadResult": ".readers",
        "Item": ".items", "EvalDataError": ".items", "summarize": ".metrics"}

__all__ = list(_API)


def __getattr__(name):
    if name in _API:
        value = getattr(import_module(_API[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
