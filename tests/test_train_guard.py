"""The language guard (``--guard-data``) and ``--eval-target`` during training, on tiny random
checkpoints.

The guard set is text multiple choice that the base model answers: the questions of
mlx_dsvl.testing.facts with, as each answer key, the option the base model itself picks, so it
scores 100% before training (chance is 25%). A run built to forget (stage 2, multimodal only, the
LLM trained in full at a high learning rate) must trip the guard; the same run at a learning rate
that cannot move the weights must not.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mlx_dsvl
from mlx_dsvl.eval import evaluate, read
from mlx_dsvl.testing import facts
from mlx_dsvl.testing.synthetic import write_shapes_dataset
from mlx_dsvl.train import load_adapters
from mlx_dsvl.train.__main__ import main as train_main
from mlx_dsvl.train.callbacks import plot_losses
from mlx_dsvl.train.checkpoint import LATEST, list_checkpoints, read_checkpoint, step_of

N_GUARD = 24


@pytest.fixture(autouse=True)
def _no_reexec(monkeypatch):
    monkeypatch.setenv("MLX_DSVL_NO_BLAS_REEXEC", "1")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Shapes pairs (multimodal only), a multimodal set (the guard refuses it) and facts questions."""
    root = tmp_path_factory.mktemp("guard")
    pairs = write_shapes_dataset(root / "shapes", 8, seed=4)["pairs"]
    mm = root / "mm.jsonl"
    mm.write_text(json.dumps({"images": ["shapes/images/4-00000.png"], "question": "Colour?",
                              "choices": ["red", "blue"], "answer": "red"}) + "\n")
    questions = facts.write_questions(root / "facts.jsonl", facts.questions(facts.make_facts(N_GUARD, seed=1), 2))
    return dict(pairs=pairs, mm=mm, guard=questions, root=root)


@pytest.fixture(scope="module")
def data(tiny_model, files):
    """The facts questions with the base model's own choices as answers: a guard set it answers."""
    items = read(files["guard"]).items
    picks = []
    evaluate(*tiny_model, items, target="text", on_records=picks.extend)
    for it, rec in zip(items, picks):  # the base model's own choice becomes the answer key
        it.answer = it.letters.index(rec["choice"])
    return {**files, "guard": facts.write_questions(files["root"] / "guard.jsonl", items)}


def run(tiny_dir, data, out, *extra, lr="3e-2", iters=4):
    return train_main(["--stage", "2", "--model", str(tiny_dir), "--data", str(data["pairs"]), "--out", str(out),
                       "--iters", str(iters), "--batch-size", "2", "--method", "full", "--lr", lr,
                       "--warmup", "0", "--guard-data", str(data["guard"]), "--guard-max-drop", "10",
                       "--eval-target", "text", "--eval-every", "1", "--eval-batch-size", "12", "--quiet",
                       *extra])


def guard_records(out: Path) -> list[dict]:
    recs = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [r for r in recs if r["type"] == "guard"]


def warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if "language guard" in line]


@pytest.mark.slow
def test_the_guard_trips_on_a_run_built_to_forget(tiny_dir, data, tmp_path, capsys):
    out = tmp_path / "forget"
    assert run(tiny_dir, data, out, "--save-every", "0") == 0  # no --guard-stop: it goes on
    recs = guard_records(out)
    assert [r["step"] for r in recs] == [0, 1, 2, 3, 4]
    assert recs[0]["guard_acc"] == 1.0 and recs[0]["guard_items"] == N_GUARD
    tripped = [r for r in recs if r.get("guard_tripped")]
    assert len(tripped) == 1 and tripped[0]["guard_drop"] > 10
    first_over = next(r for r in recs if r["guard_drop"] > 10)
    assert tripped[0] is first_over and first_over["guard_over_limit"]
    for r in recs:  # the drop in points from the first score, every time
        assert r["guard_drop"] == pytest.approx(100 * (1.0 - r["guard_acc"]))
    lines = warnings(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("warning: language guard: ")
    assert f"to {tripped[0]['guard_acc']:.1%} at step {tripped[0]['step']}" in lines[0]
    assert "--guard-max-drop" in lines[0]
    with Image.open(out / "loss.png") as im:  # the accuracy panel shows the trip in red
        right = np.asarray(im.convert("RGB"))[:, im.size[0] // 2:].astype(int)
    assert (np.abs(right - (200, 0, 0)).sum(axis=2) < 30).sum() > 300


@pytest.mark.slow
def test_the_guard_stays_quiet_on_a_run_that_does_not_move(tiny_dir, data, tmp_path, capsys):
    out = tmp_path / "still"
    assert run(tiny_dir, data, out, "--save-every", "0", lr="1e-9") == 0
    recs = guard_records(out)
    assert [r["step"] for r in recs] == [0, 1, 2, 3, 4]
    assert all(r["guard_acc"] == 1.0 and not r["guard_over_limit"] for r in recs)
    assert not any("guard_tripped" in r for r in recs)
    assert warnings(capsys.readouterr().err) == []


@pytest.mark.slow
def test_guard_stop_keeps_the_last_good_checkpoint(tiny_dir, data, tmp_path, capsys):
    """A checkpoint every step, only the newest kept: the run stops at the trip without saving
    it, and the checkpoint left (``latest``) is the last step the guard passed."""
    out = tmp_path / "stop"
    code = run(tiny_dir, data, out, "--save-every", "1", "--keep-checkpoints", "1", "--guard-stop",
               "--warmup", "3", iters=8)
    err = capsys.readouterr().err.strip()
    assert code == 3
    assert len(err.splitlines()) == 1 and err.startswith("error: language guard: "), err
    recs = guard_records(out)
    trip = recs[-1]
    assert trip["guard_tripped"] and trip["step"] < 8 and all(not r["guard_over_limit"] for r in recs[:-1])
    good = trip["step"] - 1
    assert good >= 1, "the guard tripped at the first step: no checkpoint to check"
    (kept,) = list_checkpoints(out)
    assert step_of(kept) == good and (out / "checkpoints" / LATEST).read_text().strip() == kept.name
    assert err.endswith(f"training stopped without saving step {trip['step']}; the last good checkpoint "
                        f"is kept: {kept}")
    history = read_checkpoint(kept)["history"]
    last = [r for r in history if r["type"] == "guard"][-1]
    assert last["step"] == good and not last["guard_over_limit"]
    assert not (out / "adapters.safetensors").exists()  # the tripped weights are not the run's result
    # the kept checkpoint is an adapter folder that scores what its record says
    model, processor = mlx_dsvl.load(tiny_dir)
    load_adapters(model, kept)
    s = evaluate(model, processor, read(data["guard"]), target="text", batch_size=12)
    assert s["accuracy"] == last["guard_acc"]


def test_guard_options_are_checked_before_any_work(tiny_dir, files, tmp_path, capsys):
    data = files
    base = ["--stage", "2", "--model", str(tiny_dir), "--data", str(data["pairs"]), "--iters", "1", "--quiet"]
    out = tmp_path / "o"
    assert train_main(base + ["--out", str(out), "--guard-stop"]) == 2
    assert capsys.readouterr().err.strip() == "error: --guard-stop needs --guard-data"
    assert train_main(base + ["--out", str(out), "--guard-data", str(data["mm"])]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --guard-data {data['mm']}: the guard scores text-only multiple-choice questions; "
        f"{data['mm']}:1 has images")
    assert train_main(base + ["--out", str(out), "--guard-data", str(data["guard"]),
                              "--guard-max-drop", "-1"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --guard-max-drop must be within [0, 100] (accuracy "
                                               "points), got -1.0")
    assert train_main(base + ["--out", str(out), "--eval-data", str(data["guard"]), "--eval-method",
                              "generate", "--eval-target", "text"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --eval-target text applies to --eval-method likelihood "
                                               "only (--eval-method generate reads the option out of the reply)")
    assert not out.exists()


def test_the_plot_marks_the_guard_and_its_trip(tmp_path):
    train_recs = [{"type": "train", "step": s, "loss": 3.0 / s} for s in (1, 2, 3)]
    guard = [{"type": "guard", "step": s, "guard_acc": a, "guard_baseline": 0.9, "guard_max_drop": 10.0}
             for s, a in ((0, 0.9), (2, 0.85), (3, 0.5))]
    guard[-1]["guard_tripped"] = True
    plot_losses(train_recs + guard[:2], tmp_path / "quiet.png")
    plot_losses(train_recs + guard, tmp_path / "tripped.png")
    with Image.open(tmp_path / "quiet.png") as a, Image.open(tmp_path / "tripped.png") as b:
        assert a.size == b.size == (1800, 540)
        red = [(np.abs(np.asarray(im.convert("RGB"))[:, 900:].astype(int) - (200, 0, 0)).sum(axis=2) < 30).sum()
               for im in (a, b)]
    assert red[0] > 100  # the limit line
    assert red[1] > red[0] + 200  # and the trip's vertical line with its label
