"""benchmarks/modality_ratio.py's parts, without its training runs: the synthetic corpora, how
the runs' evaluation records become results (seeds pooled, Wilson intervals), the JSON's shape,
the table and the plot; and mlx_dsvl.testing.facts."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlx_dsvl.eval import read
from mlx_dsvl.eval.metrics import wilson
from mlx_dsvl.testing import facts
from mlx_dsvl.train.data import load_jsonl

spec = importlib.util.spec_from_file_location(
    "modality_ratio", Path(__file__).resolve().parents[1] / "benchmarks" / "modality_ratio.py")
bench = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bench  # dataclasses look their module up
spec.loader.exec_module(bench)


def test_facts_are_balanced_and_asked_in_new_orders():
    known = facts.make_facts(8, seed=0)
    assert len({f.name for f in known}) == 8
    assert sorted(f.food for f in known) == sorted(facts.FOODS * 2)
    qs = facts.questions(known, seed=1, per_fact=3)
    assert len(qs) == 24 and len({it.id for it in qs}) == 24
    for it, f in zip(qs, [f for f in known for _ in range(3)]):
        assert it.question == f"What does {f.name} eat?" and sorted(it.choices) == sorted(facts.FOODS)
        assert it.choices[it.answer] == f.food
    lines = facts.corpus(known, seed=2, copies=2)
    assert len(lines) == 8 * 3
    assert sorted(line["text"] for line in lines if "text" in line) == sorted(f"{f.name} eats {f.food}."
                                                                               for f in known)
    replies = [(line["messages"][0]["content"], line["messages"][1]["content"]) for line in lines
               if "messages" in line]
    for f in known:
        asked = [reply for prompt, reply in replies if f"What does {f.name} eat?" in prompt]
        assert asked == [f.food, f.food]


def test_the_tasks_are_files_the_evaluator_and_the_trainer_read(tmp_path, chat_processor):
    plan = replace(bench.PLANS["quick"], facts=8, images=6, test_images=4)
    paths = bench.write_tasks(tmp_path, plan)
    lang = read(paths["language_test"]).items
    assert len(lang) == 8 * plan.lang_per_fact and not any(it.images for it in lang)
    mm = read(paths["multimodal_test"]).items
    assert len(mm) == 4 and all(len(it.images) == 1 and it.choices == bench.COLOURS for it in mm)
    chat = [json.loads(line) for line in paths["multimodal_train"].read_text().splitlines()]
    assert len(chat) == 6
    for line in chat:
        assert (tmp_path / line["images"][0]).is_file()
        assert line["messages"][-1]["content"] in bench.COLOURS
    assert len(load_jsonl(paths["multimodal_train"], chat_processor, max_seq_len=2048, verbose=False)) == 6
    corpus = load_jsonl(paths["corpus"], chat_processor, max_seq_len=2048, verbose=False)
    assert len(corpus) == 8 * plan.copies  # answered questions, no statements
    assert all(not ex.images for ex in corpus.examples)


def history(lang: tuple[int, int], mm: tuple[int, int], steps=(0, 20)) -> list[dict]:
    """Eval records as a training run writes them: chance at step 0, then ``(correct, items)``."""
    recs = [{"type": "train", "step": 10, "loss": 1.0, "batches": 10, "text_batches": 7},
            {"type": "train", "step": 20, "loss": 1.0, "batches": 10, "text_batches": 6}]
    for step in steps:
        (kl, nl), (km, nm) = ((lang[1] // 4, lang[1]), (mm[1] // 4, mm[1])) if step == 0 else (lang, mm)
        recs.append({"type": "eval", "step": step, "eval_language_acc": kl / nl, "eval_language_items": nl,
                     "eval_multimodal_acc": km / nm, "eval_multimodal_items": nm})
    return recs


def test_mixes_pool_their_seeds_into_the_documented_json(tmp_path):
    entry = bench.mix_entry(0.3, {0: history((30, 32), (10, 48)), 1: history((26, 32), (14, 48))})
    assert entry["multimodal_share"] == 0.3
    assert entry["language_accuracy"] == pytest.approx(56 / 64)
    assert entry["multimodal_accuracy"] == pytest.approx(24 / 96)
    assert entry["language_ci95"] == [round(x, 4) for x in wilson(56, 64)]
    assert [s["seed"] for s in entry["seeds"]] == [0, 1]
    assert entry["seeds"][0]["multimodal_batches"] == 3 + 4
    assert entry["seeds"][1]["language_accuracy"] == 26 / 32
    assert [c["step"] for c in entry["seeds"][0]["curve"]] == [0, 20]
    assert entry["seeds"][0]["curve"][0]["language_accuracy"] == 0.25
    only = bench.mix_entry(1.0, {0: history((8, 32), (40, 48))})
    result = {"before": {"language_accuracy": 0.9, "language_ci95": [0.8, 0.95],
                         "multimodal_accuracy": 0.25, "multimodal_ci95": [0.15, 0.4]},
              "mixes": [only, entry]}
    json.loads(json.dumps(result))  # JSON as it is written
    text = bench.table(result)
    assert text.splitlines()[2].split()[:2] == ["100:0", "25.0"]
    assert text.splitlines()[3].split()[:2] == ["30:70", "87.5"]
    assert text.splitlines()[3].split()[-1] == "7"  # multimodal batches, the mean over seeds
    bench.plot(result, tmp_path / "fig.png")
    with Image.open(tmp_path / "fig.png") as im:
        assert im.size == (1800, 540)
        pixels = np.asarray(im.convert("RGB")).astype(int)
    for half in (pixels[:, :900], pixels[:, 900:]):  # both panels draw both modalities' colours
        for color in ((255, 127, 14), (31, 119, 180)):
            assert (np.abs(half - color).sum(axis=2) < 30).sum() > 50
