"""Evaluation sees learning: a tiny model taught a synthetic multiple-choice task scores >= 90%
with both methods, the untrained one stays near chance, and circular evaluation exposes that the
trained model learned the option *position*, not the option.

The task: "What colour is the shape?" about a red, green, blue or yellow circle or square
(mlx_dsvl.testing.synthetic's images), options always in the order A. red, B. green, C. blue,
D. yellow, the answer the letter.  It is taught through the real training API (stage 3, LoRA,
as the CLI runs it) with the prompts the evaluator builds.  The model is make_checkpoint's
"tiny" with a 96 px SigLIP input (36 image tokens) to fit a CI budget, as in test_train_learns.
"""

from __future__ import annotations

import copy
import json
import time

import mlx.core as mx
import pytest

import mlx_dsvl
from mlx_dsvl.eval import evaluate, read
from mlx_dsvl.eval.items import conversation
from mlx_dsvl.testing.synthetic import make_images
from mlx_dsvl.train import TrainConfig, train

pytestmark = pytest.mark.slow

IMAGE_SIZE = 96
COLOURS = ["red", "green", "blue", "yellow"]
TASK = dict(shapes=("circle", "square"), sizes={"square": 0.40, "circle": 0.30}, jitter=0.05)
N_TRAIN, N_TEST, STEPS, BATCH = 480, 48, 150, 8
QUESTION = "What colour is the shape?"


def small_grid_checkpoint(out):
    """make_checkpoint's "tiny" with a 96 px SigLIP input (36 image tokens)."""
    from mlx_dsvl import random_checkpoint as mc

    config, (_, mean, std, do_norm), dtype = mc.ARCHS["tiny"]
    config = copy.deepcopy(config)
    config["vision_config"]["params"]["image_size"] = IMAGE_SIZE
    with pytest.MonkeyPatch.context() as m:
        m.setitem(mc.ARCHS, "tiny-96px", (config, (IMAGE_SIZE, mean, std, do_norm), dtype))
        path = mc.make_checkpoint("tiny-96px", out, seed=3)
    proc = json.loads((path / "processor_config.json").read_text())
    proc["num_image_tokens"] = (IMAGE_SIZE // 16) ** 2
    (path / "processor_config.json").write_text(json.dumps(proc))
    return path


def write_task(folder, n, seed):
    """Images + the evaluator's JSONL ({"images", "question", "choices", "answer", "category"})."""
    folder.mkdir(parents=True)
    rows = []
    for i, (im, caption) in enumerate(make_images(n, seed=seed, size=IMAGE_SIZE, **TASK)):
        colour, shape = caption.split()[1:3]  # "a red circle on a white background"
        im.save(folder / f"{i}.png")
        rows.append({"images": [f"{i}.png"], "question": QUESTION, "choices": COLOURS,
                     "answer": colour, "category": shape})
    path = folder / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_data(mc_path, out):
    """The same questions as training chat lines: the evaluator's prompt, the letter as reply."""
    items = read(mc_path).items
    with open(out, "w") as f:
        for it in items:
            msgs = conversation(it, system_prompt="") + [{"role": "assistant", "content": it.answer_letter}]
            f.write(json.dumps({"messages": msgs, "images": [str(p) for p in it.image_keys]}) + "\n")
    return out


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_learns")
    t0 = time.perf_counter()
    ckpt = small_grid_checkpoint(root / "ckpt")
    train_set = chat_data(write_task(root / "train", N_TRAIN, seed=0), root / "train.jsonl")
    test = read(write_task(root / "test", N_TEST, seed=777))  # balanced: 12 per colour
    model, processor = mlx_dsvl.load(ckpt)
    result = train(TrainConfig(stage=3, model=str(ckpt), data=str(train_set), out=str(root / "run"),
                               iters=STEPS, batch_size=BATCH, lr=5e-4, warmup=10, lora_dropout=0.05,
                               lora_targets="attn,mlp,lm_head", save_every=0, steps_per_report=20,
                               quiet=True),
                   loaded=(model, processor))
    base, _ = mlx_dsvl.load(ckpt)
    return dict(model=model, processor=processor, base=base, test=test, result=result,
                seconds=time.perf_counter() - t0)


@pytest.mark.parametrize("method", ["likelihood", "generate"])
def test_trained_model_scores_high_untrained_near_chance(task, method, capsys):
    kw = dict(method=method, batch_size=16, system_prompt="", max_tokens=4)
    trained = evaluate(task["model"], task["processor"], task["test"], **kw)
    untrained = evaluate(task["base"], task["processor"], task["test"], **kw)
    h = task["result"].history
    with capsys.disabled():
        print(f"\n[eval learns] {method}: trained {trained['accuracy']:.1%} "
              f"(95% CI {trained['ci95'][0]:.1%}-{trained['ci95'][1]:.1%}), untrained "
              f"{untrained['accuracy']:.1%}, of {trained['items']}; training {STEPS} steps, loss "
              f"{h[0]['loss']:.2f} -> {h[-1]['loss']:.3f} ({task['seconds']:.0f}s with set-up)")
    assert trained["items"] == N_TEST and trained["accuracy"] >= 0.9
    assert untrained["accuracy"] <= 0.5  # chance is 0.25: one letter per colour, 12 each
    assert trained["categories"].keys() == {"circle", "square"}
    if method == "generate":
        assert trained["unmatched"] <= N_TEST // 10


def test_circular_evaluation_exposes_a_position_bound_model(task):
    """Taught with fixed option order, the model answers by position: right on the original
    order, wrong once the options rotate.  Circular accuracy, recomputed here from the rows,
    is what the summary reports."""
    rows = []
    s = evaluate(task["model"], task["processor"], task["test"], method="likelihood", circular=True,
                 batch_size=16, system_prompt="", on_records=rows.extend)
    assert s["items"] == N_TEST and s["rows"] == 4 * N_TEST == len(rows)
    groups = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r["correct"])
    assert all(len(g) == 4 for g in groups.values())
    assert s["correct"] == sum(all(g) for g in groups.values())
    assert s["accuracy_first_rotation"] >= 0.9
    assert s["accuracy"] <= 0.25 < s["accuracy_first_rotation"]


def test_evaluate_leaves_training_state_alone(task):
    """In training mode (LoRA dropout on) the scores equal eval mode's; each module's mode is
    restored and no random numbers are drawn (a training run's random stream is unchanged)."""
    model, processor = task["model"], task["processor"]
    items = task["test"].items[:8]
    model.eval()
    got_ref = []
    ref = evaluate(model, processor, items, batch_size=8, system_prompt="", on_records=got_ref.extend)
    model.train()
    model.vision_model.eval()  # a mix of modes, as a training loop may leave them
    modes = {name: m.training for name, m in model.named_modules()}
    key = mx.array(mx.random.state[0])
    got = []
    evaluate(model, processor, items, batch_size=8, system_prompt="", on_records=got.extend)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert mx.array_equal(mx.random.state[0], key)
    assert ref["items"] == 8 and [r["scores"] for r in got] == [r["scores"] for r in got_ref]
