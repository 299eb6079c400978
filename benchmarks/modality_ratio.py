"""The paper's Figure 4 at toy scale: multimodal-only joint training erodes language; mixing text
back in keeps it, roughly in proportion to its share.

    python benchmarks/modality_ratio.py [--quick] [--json FILE] [--plot FILE] [--seeds N] [--work DIR]

1. A small random DeepSeek-VL (``tiny``'s layout with its LLM twice as deep, 4 blocks of width 64,
   and a 96 px SigLIP: 36 image tokens) is taught a text task until it knows it: facts "<Name>
   eats <food>." asked as multiple choice (mlx_dsvl.testing.facts), the LLM trained in full on
   answered questions in random option orders.
2. Stage 2 (aligner + LLM in full, vision frozen) from the taught model, at several
   multimodal:language mixes (``--text-ratio`` = the language share, no modality warm-up), on a
   visual task: "What colour is the shape?" about mlx_dsvl.testing.synthetic's shapes, answered
   with the colour's word; the language batches replay the facts corpus.
3. Every run is scored during training by ``--eval-data`` (mlx_dsvl.eval's likelihood scorer,
   ``--eval-target text``) on held-out questions of both kinds: the facts asked in new option
   orders, and new images.

Prints a table, writes ``--json`` (``before``, ``mixes``: one entry per share, seeds and 95%
Wilson intervals on the answers pooled over seeds) and ``--plot`` (accuracy vs mix; accuracy vs
step for 100:0 and 30:70), drawn with the training plot's Pillow panels.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_dsvl.blas import ensure_fast_blas  # noqa: E402

IMAGE_SIZE = 96
LLM = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
           num_hidden_layers=4)  # tiny's, twice as deep
SHAPES_TASK = dict(shapes=("circle", "square", "triangle"), jitter=0.05)
COLOURS = ["red", "green", "blue", "yellow"]
SHAPE_QUESTION = "What colour is the shape?"


@dataclass(frozen=True)
class Plan:
    facts: int  # facts taught (a quarter per food)
    teach_steps: int
    teach_lr: float
    images: int  # multimodal training questions
    steps: int  # stage-2 steps per run
    lr: float
    eval_every: int
    mixes: tuple[float, ...]  # multimodal shares
    seeds: int
    lang_per_fact: int = 4  # held-out language questions per fact (new option orders)
    copies: int = 6  # answered questions per fact in the language corpus
    test_images: int = 48
    batch_size: int = 8


PLANS = {
    "default": Plan(facts=8, teach_steps=100, teach_lr=3e-3, images=240, steps=150, lr=1e-3, eval_every=25,
                    mixes=(1.0, 0.9, 0.6, 0.3), seeds=2),
    "quick": Plan(facts=8, teach_steps=100, teach_lr=3e-3, images=160, steps=90, lr=1e-3, eval_every=15,
                  mixes=(1.0, 0.3), seeds=1),
}


# -- the model and the tasks ---------------------------------------------------------------------


def build_model(out: Path, seed: int = 0) -> Path:
    """``tiny``'s layout with :data:`LLM` and a 96 px SigLIP input (36 image tokens)."""
    from mlx_dsvl import random_checkpoint as mc  # (MLX: after main's BLAS re-execution)

    config, (_, mean, std, do_norm), dtype = mc.ARCHS["tiny"]
    config = copy.deepcopy(config)
    config["vision_config"]["params"]["image_size"] = IMAGE_SIZE
    config["language_config"].update(LLM)
    config["aligner_config"]["params"]["n_embed"] = LLM["hidden_size"]
    mc.ARCHS["modality-ratio"] = (config, (IMAGE_SIZE, mean, std, do_norm), dtype)
    try:
        path = mc.make_checkpoint("modality-ratio", out, seed=seed)
    finally:
        del mc.ARCHS["modality-ratio"]
    proc = json.loads((path / "processor_config.json").read_text())
    proc["num_image_tokens"] = (IMAGE_SIZE // 16) ** 2
    (path / "processor_config.json").write_text(json.dumps(proc))
    return path


def shape_questions(folder: Path, n: int, seed: int) -> list:
    """``n`` shapes images in ``folder`` and their "What colour is the shape?" items."""
    from mlx_dsvl.eval import Item  # (MLX: after main's BLAS re-execution)
    from mlx_dsvl.testing.synthetic import make_images

    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i, (im, caption) in enumerate(make_images(n, seed=seed, size=IMAGE_SIZE, **SHAPES_TASK)):
        path = folder / f"{i}.png"
        im.save(path)
        items.append(Item(id=f"{seed}-{i}", question=SHAPE_QUESTION, choices=COLOURS,
                          answer=COLOURS.index(caption.split()[1]), images=[lambda p=path: p],
                          image_keys=[str(path)]))
    return items


def write_tasks(folder: Path, plan: Plan, seed: int = 0) -> dict[str, Path]:
    """The facts corpus and held-out questions, the shapes chat data and held-out questions."""
    from mlx_dsvl.eval.items import conversation  # (MLX: after main's BLAS re-execution)
    from mlx_dsvl.testing import facts

    folder.mkdir(parents=True, exist_ok=True)
    known = facts.make_facts(plan.facts, seed=seed)
    paths = {"corpus": facts.write_jsonl(folder / "facts_corpus.jsonl", facts.corpus(
                 known, seed=seed + 1, copies=plan.copies, statements=False)),
             "language_test": facts.write_questions(folder / "facts_test.jsonl",
                                                    facts.questions(known, seed + 2, per_fact=plan.lang_per_fact))}
    chat = [{"messages": conversation(it) + [{"role": "assistant", "content": it.choices[it.answer]}],
             "images": [str(Path(k).relative_to(folder)) for k in it.image_keys]}
            for it in shape_questions(folder / "train_images", plan.images, seed + 3)]
    paths["multimodal_train"] = facts.write_jsonl(folder / "shapes_train.jsonl", chat)
    test = [{"images": [str(Path(k).relative_to(folder)) for k in it.image_keys], "question": it.question,
             "choices": it.choices, "answer": it.choices[it.answer]}
            for it in shape_questions(folder / "test_images", plan.test_images, seed + 1000)]
    paths["multimodal_test"] = facts.write_jsonl(folder / "shapes_test.jsonl", test)
    return paths


# -- the runs --------------------------------------------------------------------------------------


def teach(model_dir: Path, tasks: dict[str, Path], plan: Plan, out: Path) -> list[dict]:
    """Step 1: the LLM (in full) learns the facts; returns the run's history."""
    from mlx_dsvl.train import TrainConfig, train  # (MLX: after main's BLAS re-execution)

    cfg = TrainConfig(stage=3, train="llm", method="full", model=str(model_dir), data=str(tasks["corpus"]),
                      out=str(out), iters=plan.teach_steps, batch_size=plan.batch_size, lr=plan.teach_lr,
                      save_every=0, eval_data=[f"language={tasks['language_test']}"], eval_target="text",
                      eval_every=0, eval_batch_size=16, steps_per_report=20, quiet=True, plot=False)
    return train(cfg).history


def stage2(model_dir: Path, taught: Path, tasks: dict[str, Path], plan: Plan, share: float, seed: int,
           out: Path) -> list[dict]:
    """Step 2: stage 2 from the taught model at ``share`` multimodal; returns the run's history."""
    import mlx_dsvl  # (MLX: after main's BLAS re-execution)
    from mlx_dsvl.train import TrainConfig, load_adapters, train

    model, processor = mlx_dsvl.load(model_dir)
    load_adapters(model, taught)
    mix = {} if share >= 1 else dict(text_data=str(tasks["corpus"]), text_ratio=round(1 - share, 6))
    cfg = TrainConfig(stage=2, method="full", model=str(model_dir), data=str(tasks["multimodal_train"]),
                      out=str(out), iters=plan.steps, batch_size=plan.batch_size, lr=plan.lr, modality_warmup=0,
                      seed=seed, save_every=0, eval_data=[f"language={tasks['language_test']}",
                                                          f"multimodal={tasks['multimodal_test']}"],
                      eval_target="text", eval_every=plan.eval_every, eval_batch_size=16, steps_per_report=20,
                      quiet=True, **mix)
    return train(cfg, loaded=(model, processor)).history


# -- results -----------------------------------------------------------------------------------------


def evals(history: list[dict]) -> list[dict]:
    return [r for r in history if r.get("type") == "eval"]


def scores(rec: dict) -> dict:
    """One eval record -> accuracies and counts of both sets."""
    out = {"step": rec["step"]}
    for kind in ("language", "multimodal"):
        if f"eval_{kind}_acc" in rec:
            n = rec[f"eval_{kind}_items"]
            out.update({f"{kind}_accuracy": rec[f"eval_{kind}_acc"], f"{kind}_items": n,
                        f"{kind}_correct": round(rec[f"eval_{kind}_acc"] * n)})
    return out


def pooled(runs: list[dict], kind: str) -> tuple[float, list[float]]:
    """Accuracy and 95% Wilson interval over every answer of every run (seeds pooled)."""
    from mlx_dsvl.eval.metrics import wilson  # (MLX: after main's BLAS re-execution)

    k = sum(r[f"{kind}_correct"] for r in runs)
    n = sum(r[f"{kind}_items"] for r in runs)
    return k / n, [round(x, 4) for x in wilson(k, n)]


def multimodal_batches(history: list[dict]) -> int:
    """Multimodal batches the run trained on (its ``"train"`` records count them)."""
    return sum(r["batches"] - r.get("text_batches", 0) for r in history if r.get("type") == "train")


def mix_entry(share: float, histories: dict[int, list[dict]]) -> dict:
    """One mix: the last evaluation of each seed's run, pooled, and each run's curve."""
    finals = {seed: scores(evals(h)[-1]) for seed, h in histories.items()}
    entry: dict = {"multimodal_share": share}
    for kind in ("language", "multimodal"):
        acc, ci = pooled(list(finals.values()), kind)
        entry.update({f"{kind}_accuracy": acc, f"{kind}_ci95": ci})
    entry["seeds"] = [{"seed": seed, **{k: v for k, v in finals[seed].items() if k.endswith("accuracy")},
                       "multimodal_batches": multimodal_batches(h), "curve": [scores(r) for r in evals(h)]}
                      for seed, h in histories.items()]
    return entry


def label(share: float) -> str:
    return f"{round(100 * share)}:{round(100 * (1 - share))}"


def table(result: dict) -> str:
    def pct(acc, ci):
        return f"{100 * acc:5.1f} [{100 * ci[0]:4.1f}, {100 * ci[1]:5.1f}]"

    def batches(m):
        return f"{sum(s['multimodal_batches'] for s in m['seeds']) / len(m['seeds']):.0f}"

    b = result["before"]
    rows = [("before stage 2", pct(b["language_accuracy"], b["language_ci95"]),
             pct(b["multimodal_accuracy"], b["multimodal_ci95"]), "0")]
    rows += [(label(m["multimodal_share"]), pct(m["language_accuracy"], m["language_ci95"]),
              pct(m["multimodal_accuracy"], m["multimodal_ci95"]), batches(m)) for m in result["mixes"]]
    head = ("multimodal:language", "language acc % [95% CI]", "multimodal acc % [95% CI]", "multimodal batches")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [head, *rows])


def plot(result: dict, path: Path) -> Path:
    """Accuracy vs mix (both sets), and accuracy vs step for 100:0 and 30:70 (first seed)."""
    from mlx_dsvl.train.callbacks import EVAL_COLORS, plot_panels  # (MLX: after main's BLAS re-execution)

    lang, mm = EVAL_COLORS[0], EVAL_COLORS[1]
    mixes = sorted(result["mixes"], key=lambda m: m["multimodal_share"])
    by_mix = [(f"{kind} (held-out)", color, [(100 * m["multimodal_share"], m[f"{kind}_accuracy"]) for m in mixes],
               True) for kind, color in (("language", lang), ("multimodal", mm))]
    by_step = []
    for m in (m for m in mixes if m["multimodal_share"] in (1.0, 0.3)):
        curve, light = m["seeds"][0]["curve"], m["multimodal_share"] < 1
        for kind, color in (("language", lang), ("multimodal", mm)):
            shade = tuple(int(c + (255 - c) * 0.5) for c in color) if light else color
            by_step.append((f"{kind} {label(m['multimodal_share'])}", shade,
                            [(c["step"], c[f"{kind}_accuracy"]) for c in curve], True))
    return plot_panels(path, [("accuracy after stage 2 vs multimodal share (%)", by_mix, (0.0, 1.0), (),
                               "multimodal share of stage-2 batches (%)"),
                              ("accuracy during stage 2 (light: 30:70)", by_step, (0.0, 1.0), (), "step")])


# -- main --------------------------------------------------------------------------------------------


def run(plan: Plan, work: Path, say=print) -> dict:
    t0 = time.perf_counter()
    tasks = write_tasks(work / "data", plan)
    model_dir = build_model(work / "model")
    t = time.perf_counter()
    taught = teach(model_dir, tasks, plan, work / "teach")
    taught_scores = scores(evals(taught)[-1])
    say(f"taught: held-out language accuracy {taught_scores['language_accuracy']:.1%} after "
        f"{plan.teach_steps} steps ({time.perf_counter() - t:.0f}s)")
    mixes, before = [], None
    for share in plan.mixes:
        histories = {}
        for seed in range(plan.seeds):
            t = time.perf_counter()
            histories[seed] = stage2(model_dir, work / "teach", tasks, plan, share, seed,
                                     work / f"mix-{round(100 * share)}-seed{seed}")
            before = before or scores(evals(histories[seed])[0])
            last = scores(evals(histories[seed])[-1])
            say(f"{label(share)} seed {seed}: language {last['language_accuracy']:.1%}, multimodal "
                f"{last['multimodal_accuracy']:.1%} ({time.perf_counter() - t:.0f}s)")
        mixes.append(mix_entry(share, histories))
    b = {}
    for kind in ("language", "multimodal"):
        acc, ci = pooled([before], kind)
        b.update({f"{kind}_accuracy": acc, f"{kind}_ci95": ci})
    return {"before": b, "mixes": mixes, "plan": asdict(plan), "llm": LLM, "image_size": IMAGE_SIZE,
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="100:0 and 30:70 only, one seed, 90 steps")
    p.add_argument("--seeds", type=int, default=None, help="stage-2 seeds per mix (default: the plan's)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--plot", default=None, help="draw the figure here (PNG)")
    p.add_argument("--work", default=None, help="keep the runs in this folder (default: a temporary one)")
    args = p.parse_args(argv)
    ensure_fast_blas()
    plan = PLANS["quick" if args.quick else "default"]
    if args.seeds is not None:
        plan = Plan(**{**asdict(plan), "seeds": args.seeds})
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="modality-ratio-"))
    try:
        result = run(plan, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    result["machine"] = f"{platform.machine()} {platform.processor()}".strip()
    print(table(result))
    print(f"{result['seconds']:.0f}s in all")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot(result, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
