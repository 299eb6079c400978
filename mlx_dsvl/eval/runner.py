"""``evaluate()``: score a loaded model on items, batch by batch, and summarize.

The model is in inference mode for the call (dropout off, so a training run's random state is
untouched) and every module's mode is restored afterwards. Nothing is written.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ..processing.image import ImageLoadError, load_image
from . import greedy, likelihood
from .items import EvalDataError, Item, first_groups, prompt_text, select
from .metrics import summarize
from .readers import ReadResult, read

if TYPE_CHECKING:
    from ..models.deepseek_vl import DeepseekVL
    from ..processing.chat import ChatProcessor

METHODS = ("likelihood", "generate")
DEFAULT_BATCH_SIZE = 8


@contextmanager
def inference_mode(model: DeepseekVL):
    """``model.eval()`` for the block; each module's own mode is put back afterwards."""
    modes = [(name, m, m.training) for name, m in model.named_modules()]
    model.eval()
    try:
        yield model
    finally:
        # train() sets a module's whole subtree: parents first (a name is a prefix of its
        # children's), so each module ends with its own mode
        for _, m, training in sorted(modes, key=lambda entry: len(entry[0])):
            m.train(training)


def prepare_items(data: str | ReadResult | Sequence[Item], circular: bool = False,
                  limit: int | None = None, skip_bad: bool = False) -> tuple[list[Item], int]:
    """Items to score and how many shipped rotations were left out (:func:`items.select`)."""
    if not isinstance(data, (ReadResult, list, tuple)):
        data = read(data, skip_bad=skip_bad)
    items = data.items if isinstance(data, ReadResult) else list(data)
    items, left_out = select(items, circular)
    return first_groups(items, limit), left_out


def base_record(item: Item, method: str) -> dict:
    rec = {"id": item.id, "type": "mc" if item.is_mc else "short", "category": item.category}
    if item.l2_category is not None:
        rec["l2_category"] = item.l2_category
    if item.group is not None:
        rec.update(group=item.group, rotation=item.rotation)
    rec["method"] = method if item.is_mc else "generate"
    rec["prompt"] = prompt_text(item)
    rec["answer"] = item.answer_letter if item.is_mc else item.answers
    return rec


def load_pictures(items: Sequence[Item]):
    """Decode each distinct image once: ``({key: PIL image}, {item id: error message})``."""
    pictures, failed, errors = {}, {}, {}
    for it in items:
        for get, key in zip(it.images, it.image_keys):
            if key in errors:
                failed[it.id] = errors[key]
            elif key not in pictures:
                try:
                    pictures[key] = load_image(get())
                except (ImageLoadError, OSError, ValueError) as e:
                    errors[key] = failed[it.id] = f"{it.source}: {e}"
    return pictures, failed


def score_batch(model: DeepseekVL, processor: ChatProcessor, batch: Sequence[Item], method: str,
                target: str = "letter", system_prompt: str | None = None, max_tokens: int = greedy.DEFAULT_MAX_TOKENS,
                skip_bad: bool = False) -> list[dict]:
    """Records for one batch, in its order (short answers are always generated)."""
    pictures, failed = load_pictures(batch)
    if failed and not skip_bad:
        raise EvalDataError(next(iter(failed.values())))
    ok = [it for it in batch if it.id not in failed]
    by_id: dict[str, dict] = {it.id: {**base_record(it, method), "skipped": failed[it.id]}
                              for it in batch if it.id in failed}
    scored = [it for it in ok if it.is_mc and method == "likelihood"]
    generated = [it for it in ok if not (it.is_mc and method == "likelihood")]
    if scored:
        recs = likelihood.score(model, processor, scored, pictures, target, system_prompt)
        by_id.update({it.id: {**base_record(it, method), **r} for it, r in zip(scored, recs)})
    if generated:
        recs = greedy.score(model, processor, generated, pictures, system_prompt, max_tokens)
        by_id.update({it.id: {**base_record(it, method), **r} for it, r in zip(generated, recs)})
    return [by_id[it.id] for it in batch]


def iter_records(model: DeepseekVL, processor: ChatProcessor, items: Sequence[Item],
                 method: str = "likelihood", batch_size: int = DEFAULT_BATCH_SIZE, **options) -> Iterator[list[dict]]:
    """Each batch's records, in item order (``options``: see :func:`score_batch`)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    with inference_mode(model):
        for i in range(0, len(items), batch_size):
            yield score_batch(model, processor, items[i: i + batch_size], method, **options)


def evaluate(model: DeepseekVL, processor: ChatProcessor, data: str | ReadResult | Sequence[Item],
             method: str = "likelihood", batch_size: int = DEFAULT_BATCH_SIZE, limit: int | None = None,
             circular: bool = False, target: str = "letter", system_prompt: str | None = None,
             max_tokens: int = greedy.DEFAULT_MAX_TOKENS, skip_bad: bool = False,
             done: Mapping[str, dict] | None = None,
             on_records: Callable[[list[dict]], None] | None = None,
             progress: Callable[[int, int, int], None] | None = None) -> dict[str, object]:
    """Score ``model`` on ``data`` (a path, a :class:`ReadResult` or items: read once when calling
    repeatedly); ``done``: records by id from an interrupted run; ``progress(done, correct, new)``."""
    if method == "generate" and target != "letter":
        raise ValueError("target applies to method='likelihood' only")
    t0 = time.perf_counter()
    items, left_out = prepare_items(data, circular, limit, skip_bad)
    done = dict(done or {})
    todo = [it for it in items if it.id not in done]
    kept = [done[it.id] for it in items if it.id in done]
    n_done, n_correct, n_new = len(kept), sum(bool(r.get("correct")) for r in kept), 0
    options = dict(target=target, system_prompt=system_prompt, max_tokens=max_tokens, skip_bad=skip_bad)
    for records in iter_records(model, processor, todo, method, batch_size, **options):
        kept += records
        n_done, n_new = n_done + len(records), n_new + len(records)
        n_correct += sum(bool(r.get("correct")) for r in records)
        if on_records is not None:
            on_records(records)
        if progress is not None:
            progress(n_done, n_correct, n_new)
    summary = summarize(kept, circular)
    used = Counter(r["method"] for r in kept if "skipped" not in r)  # rows per method
    summary.update(method=method if method in used or not used else "generate", methods=dict(used),
                   circular=circular, rotations_left_out=left_out, resumed=len(items) - len(todo),
                   seconds=round(time.perf_counter() - t0, 3))
    if "likelihood" in used:
        summary["target"] = target
    return summary

