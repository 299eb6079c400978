"""Benchmarks scored while training (``--eval-data``): records in metrics.jsonl equal to scoring
the saved adapters afterwards, loss.png's accuracy panel, exact resume with evaluation on, and
bad evaluation files refused before any training.  Tiny random checkpoint, synthetic sets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

import mlx_dsvl
from mlx_dsvl.eval import evaluate, read
from mlx_dsvl.testing import facts
from mlx_dsvl.testing.synthetic import make_images, write_shapes_dataset
from mlx_dsvl.train import TrainConfig, load_adapters, train
from mlx_dsvl.train.__main__ import main as train_main
from mlx_dsvl.train.callbacks import plot_losses

TIMING = {"time", "tokens_per_s", "steps_per_s", "peak_memory_gb", "seconds"}


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Training data (pairs, chat, text) and two evaluation sets: shapes (multimodal JSONL) and
    arithmetic (text-only CSV)."""
    root = tmp_path_factory.mktemp("train_eval")
    data = write_shapes_dataset(root / "train", 8, seed=5)
    text = root / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"{i} plus {i} is {2 * i}."}) + "\n" for i in range(8)))
    rows = []
    for i, (im, caption) in enumerate(make_images(6, seed=9)):
        im.save(root / f"q{i}.png")
        colour = caption.split()[1]
        rows.append({"images": [f"q{i}.png"], "question": "What colour is the shape?",
                     "choices": ["red", "green", "blue", "yellow"], "answer": colour})
    shapes = root / "shapes.jsonl"
    shapes.write_text("".join(json.dumps(r) + "\n" for r in rows))
    arithmetic = root / "arith.csv"
    arithmetic.write_text("question,A,B,C,D,answer\n" + "".join(
        f"What is {i} plus {i}?,{2 * i},{2 * i + 1},{i},{3 * i + 2},A\n" for i in range(5)))
    return dict(pairs=data["pairs"], chat=data["chat"], text=text, shapes=shapes, arithmetic=arithmetic)


def records(out: Path, kind: str):
    return [{k: v for k, v in r.items() if k not in TIMING}
            for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


@pytest.mark.slow
def test_stage2_scores_both_sets_and_the_records_match_the_saved_adapters(tiny_dir, sets, tmp_path):
    out = tmp_path / "s2"
    args = ["--stage", "2", "--model", str(tiny_dir), "--data", str(sets["pairs"]), "--text-data",
            str(sets["text"]), "--out", str(out), "--iters", "4", "--batch-size", "2", "--save-every", "0",
            "--eval-data", f"mm={sets['shapes']}", "--eval-data", str(sets["arithmetic"]),
            "--eval-every", "2", "--eval-batch-size", "4", "--quiet"]
    assert train_main(args) == 0
    evals = records(out, "eval")
    assert [r["step"] for r in evals] == [0, 2, 4]  # before the first step, every 2, the end
    for r in evals:
        assert r["eval_mm_kind"] == "multimodal" and r["eval_arith_kind"] == "text-only"
        assert r["eval_mm_items"] == 6 and r["eval_arith_items"] == 5
        for name in ("mm", "arith"):
            acc, (lo, hi) = r[f"eval_{name}_acc"], r[f"eval_{name}_ci95"]
            assert 0 <= lo <= acc <= hi <= 1
    # The last record scored the trained model: the saved adapters on a fresh base score the same.
    model, processor = mlx_dsvl.load(tiny_dir)
    load_adapters(model, out)
    for name, path in (("mm", sets["shapes"]), ("arith", sets["arithmetic"])):
        s = evaluate(model, processor, read(path), method="likelihood", batch_size=4)
        assert s["accuracy"] == evals[-1][f"eval_{name}_acc"] and s["ci95"] == evals[-1][f"eval_{name}_ci95"]
    with Image.open(out / "loss.png") as im:  # losses | accuracies, side by side
        assert im.size == (1800, 540)
        right = np.asarray(im.convert("RGB"))[:, 900:]
        assert (np.abs(right.astype(int) - 255).sum(axis=2) > 60).sum() > 500  # curves drawn


@pytest.mark.slow
def test_evaluation_leaves_training_and_resume_exact(tiny_dir, sets, tmp_path):
    """Evaluation on or off, straight or resumed at step 2: the same losses and weights."""
    common = dict(stage=3, model=str(tiny_dir), data=str(sets["chat"]), iters=4, batch_size=2,
                  lora_dropout=0.1, save_every=2, steps_per_report=1, quiet=True, plot=False)
    ev = dict(eval_data=[str(sets["shapes"]), str(sets["arithmetic"])], eval_every=1, eval_batch_size=3)
    train(TrainConfig(out=str(tmp_path / "plain"), **common))
    train(TrainConfig(out=str(tmp_path / "straight"), **common, **ev))
    resume_from = tmp_path / "straight" / "checkpoints" / "step-0000002"
    train(TrainConfig(out=str(tmp_path / "resumed"), resume=str(resume_from), **common, **ev),
          explicit=["out", "resume"])
    plain, straight, resumed = (records(tmp_path / n, "train") for n in ("plain", "straight", "resumed"))
    assert len(plain) == 4 and plain == straight == resumed
    assert records(tmp_path / "straight", "eval") == records(tmp_path / "resumed", "eval")
    assert [r["step"] for r in records(tmp_path / "resumed", "eval")] == [0, 1, 2, 3, 4]
    # a resumed run keeps its sets unless told otherwise: an empty eval_data scores none
    train(TrainConfig(out=str(tmp_path / "noeval"), resume=str(resume_from), eval_data=[""], **common),
          explicit=["out", "resume", "eval_data"])
    assert [r["step"] for r in records(tmp_path / "noeval", "eval")] == [0, 1, 2]  # the checkpoint's
    assert records(tmp_path / "noeval", "train") == plain
    weights = [mx.load(str(tmp_path / n / "adapters.safetensors")) for n in ("plain", "straight", "resumed")]
    for k in weights[0]:
        a = np.array(weights[0][k])
        assert all(np.array(w[k]).tobytes() == a.tobytes() for w in weights[1:]), k


@pytest.mark.slow
def test_a_model_taught_to_answer_with_words_is_scored_by_their_text(tiny_dir, tmp_path, monkeypatch):
    """Taught two facts ("What does Kofi eat?" -> "rice"), replying with the word: --eval-target
    text scores it as python -m mlx_dsvl.eval --target text does, where the letter is at chance."""
    monkeypatch.setenv("MLX_DSVL_NO_BLAS_REEXEC", "1")
    known = facts.make_facts(2, seed=0)
    corpus = facts.write_jsonl(tmp_path / "corpus.jsonl", facts.corpus(known, seed=1))
    test = facts.write_questions(tmp_path / "facts.jsonl", facts.questions(known, seed=2, per_fact=8))
    out = tmp_path / "run"
    assert train_main(["--stage", "3", "--train", "llm", "--method", "full", "--model", str(tiny_dir), "--data",
                       str(corpus), "--out", str(out), "--iters", "30", "--batch-size", "8", "--lr", "3e-3",
                       "--save-every", "0", "--eval-data", str(test), "--eval-target", "text",
                       "--eval-every", "0", "--quiet", "--no-plot"]) == 0
    before, after = records(out, "eval")
    assert after["eval_facts_items"] == 16 and after["eval_facts_acc"] >= 0.9
    assert before["eval_facts_acc"] <= 0.6  # the random base model: one food for both names at best
    model, processor = mlx_dsvl.load(tiny_dir)
    load_adapters(model, out)
    by_text = evaluate(model, processor, read(test), target="text")
    by_letter = evaluate(model, processor, read(test), target="letter")
    assert by_text["accuracy"] == after["eval_facts_acc"] and by_text["ci95"] == after["eval_facts_ci95"]
    assert by_letter["accuracy"] <= 0.5  # the letter of a model that answers with words: near chance


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_bad_eval_data_is_refused_before_training(tiny_dir, sets, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLX_DSVL_NO_BLAS_REEXEC", "1")
    bad = tmp_path / "bad.jsonl"
    lines = Path(sets["shapes"]).read_text().splitlines()
    bad.write_text(lines[0] + "\n" + '{"question": "no answer", "choices": ["a", "b"]}\n')
    (tmp_path / "q0.png").write_bytes(Path(sets["shapes"]).with_name("q0.png").read_bytes())
    base = ["--stage", "1", "--model", str(tiny_dir), "--data", str(sets["pairs"]), "--iters", "1", "--quiet"]
    out = tmp_path / "o"
    assert train_main(base + ["--out", str(out), "--eval-data", str(bad)]) == 1
    assert f"{bad}:2: " in one_error(capsys)
    assert train_main(base + ["--out", str(out), "--eval-data", str(tmp_path / "none.tsv")]) == 1
    assert "none.tsv: no such file" in one_error(capsys)
    assert train_main(base + ["--out", str(out), "--eval-data", f"x={sets['shapes']}",
                              "--eval-data", f"x={sets['arithmetic']}"]) == 2
    assert one_error(capsys).startswith("error: --eval-data names two sets 'x'")
    assert train_main(base + ["--out", str(out), "--eval-data", str(bad), "--eval-limit", "0"]) == 2
    assert one_error(capsys) == "error: --eval-limit must be >= 1, got 0"
    assert not out.exists()  # nothing was written


def test_plot_draws_an_accuracy_panel_only_when_there_are_eval_records(tmp_path):
    train_recs = [{"type": "train", "step": s, "loss": 3.0 / s} for s in (1, 2, 3)]
    plot_losses(train_recs, tmp_path / "a.png")
    evals = [{"type": "eval", "step": s, "eval_x_acc": a, "eval_x_kind": "text-only", "eval_y_acc": math.nan}
             for s, a in ((0, 0.25), (3, 0.5))]
    plot_losses(train_recs + evals, tmp_path / "b.png")
    with Image.open(tmp_path / "a.png") as a, Image.open(tmp_path / "b.png") as b:
        assert a.size == (900, 540) and b.size == (1800, 540)
        left, right = np.asarray(b.convert("RGB"))[:, :900], np.asarray(b.convert("RGB"))[:, 900:]
        assert np.array_equal(left, np.asarray(a.convert("RGB")))  # the loss panel is unchanged
        orange = np.all(np.abs(right.astype(int) - (255, 127, 14)) < 8, axis=2)
        assert orange.sum() > 100  # set x's curve (set y has no finite point: no curve)
