"""Data-parallel training on two local processes: ``mlx.launch -n 2 --backend ring`` over
loopback, on the CPU, with tiny random checkpoints.

Two processes with ``batch_size`` B match one process with 2B (the same global batches) in every
logged loss and in the trained weights, for LoRA and full training, with and without cached
vision features (a short last batch leaves one process an empty share; a bad image is dropped by
the process that owns it).  A signal to one process stops both at the same step; a killed
process takes the run down at once, leaving the last checkpoint intact, and the run resumes
exactly; a frozen one is caught by the watchdog.  A checkpoint continues on one process with the
same global batch, and is refused with another.

The launches run several trainings each (tests/dist_worker.py) to keep the start-ups few.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_dsvl import faults
from mlx_dsvl.testing.synthetic import make_images, write_shapes_dataset
from mlx_dsvl.train import TrainConfig, train
from mlx_dsvl.train import run as run_module
from mlx_dsvl.train.batches import BatchStream, collate
from mlx_dsvl.train.callbacks import TrainingCallback
from mlx_dsvl.train.checkpoint import ResumeError, damage
from mlx_dsvl.train.distributed import World, fingerprint, global_batch_check, launcher
from mlx_dsvl.train.loop import TrainingStopped, make_loss

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("dist_worker.py")
TOL = 1e-5  # float32 sums in another order


# -- helpers ----------------------------------------------------------------------------------------


def free_ports() -> int:
    """A base port with the next one free too (the ring backend listens on one per process)."""
    for _ in range(100):
        base = random.randrange(20000, 60000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", base))
                b.bind(("127.0.0.1", base + 1))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports")


def launch_cmd(*args):
    return [*launcher(), "-n", "2", "--backend", "ring", "-p", str(free_ports()), "--", sys.executable, *args]


def launch_env(fault=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "MLX_DSVL_NO_BLAS_REEXEC": "1"}
    env.pop(faults.ENV, None)
    if fault:
        env[faults.ENV] = fault
    return env


def launch(*args, fault=None, timeout=300):
    t0 = time.perf_counter()
    res = subprocess.run(launch_cmd(*args), env=launch_env(fault), capture_output=True, text=True,
                         timeout=timeout)
    res.seconds = time.perf_counter() - t0
    return res


def train_records(out: Path):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"]


def weights(out: Path):
    return {k: np.array(v) for k, v in mx.load(str(out / "adapters.safetensors")).items()}


def differences(out: Path, ref: Path):
    """(max relative loss difference over the logged steps, max absolute weight difference)."""
    a, b = train_records(out), train_records(ref)
    assert [r["step"] for r in a] == [r["step"] for r in b] and a
    for key in ("tokens", "target_tokens", "batches", "text_batches", "skipped_examples"):
        assert [r.get(key) for r in a] == [r.get(key) for r in b], key
    loss = max(abs(x["loss"] - y["loss"]) / abs(y["loss"]) for x, y in zip(a, b))
    wa, wb = weights(out), weights(ref)
    assert wa.keys() == wb.keys()
    return loss, max(float(np.abs(wa[k] - wb[k]).max()) for k in wa)


# -- data -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """5 chat and 5 pair examples (global batches of 2: the last of an epoch has one example),
    pairs with a truncated image, text-only lines, a validation set and a benchmark."""
    root = tmp_path_factory.mktemp("dist")
    shapes = write_shapes_dataset(root, 6, seed=11)
    d = {}
    for kind in ("chat", "pairs"):
        d[kind] = root / f"{kind}5.jsonl"
        d[kind].write_text("".join(Path(shapes[kind]).read_text().splitlines(True)[:5]))
    good = (root / "images" / "11-00000.png").read_bytes()
    (root / "images" / "cut.png").write_bytes(good[: len(good) // 2])  # a header, half the data
    d["bad_pairs"] = root / "bad_pairs.jsonl"
    cut = json.dumps({"image": "images/cut.png", "text": "cut"}) + "\n"
    d["bad_pairs"].write_text(d["pairs"].read_text() + cut)
    d["text"] = root / "text.jsonl"
    d["text"].write_text("".join(json.dumps({"text": f"{i} and {i} make {2 * i}."}) + "\n" for i in range(6)))
    rows = []
    for i, (im, caption) in enumerate(make_images(2, seed=4)):
        im.save(root / f"q{i}.png")
        rows.append({"images": [f"q{i}.png"], "question": "What colour is the shape?",
                     "choices": ["red", "green", "blue", "yellow"], "answer": caption.split()[1]})
    d["bench"] = root / "bench.jsonl"
    d["bench"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def configs(tiny_dir, data, root: Path):
    """name -> TrainConfig fields of one process of the two (``batch_size`` 1: global batch 2)."""
    common = dict(model=str(tiny_dir), batch_size=1, steps_per_report=1, warmup=0, plot=False, quiet=True,
                  save_every=0)
    return {
        # LoRA, compiled; checkpoints for resuming on one process
        "lora": dict(common, stage=3, data=str(data["chat"]), iters=4, lr=1e-3, save_every=2),
        # LoRA with dropout (each process its own masks): the reference of the stop/kill/resume chain
        "lora-dropout": dict(common, stage=3, data=str(data["chat"]), iters=4, lr=1e-3, lora_dropout=0.1,
                             save_every=2),
        # LoRA + cached features (rank 0 in the run folder, rank 1 in memory), text mixing, accumulation
        "lora-cache": dict(common, stage=2, data=str(data["pairs"]), text_data=str(data["text"]), text_ratio=0.5,
                           modality_warmup=0, grad_accum=2, iters=3, lr=1e-3, cache_vision_features=True,
                           compile=False),
        # full + a cache folder both processes share, and a bad image skipped
        "full-cache": dict(common, stage=2, method="full", data=str(data["bad_pairs"]), skip_bad=True, iters=4,
                           lr=1e-4, cache_vision_features=True, vision_cache_dir=str(root / "shared-cache"),
                           compile=False),
        # full, vision tower trained, validation and a benchmark scored on the way
        "full": dict(common, stage=3, method="full", data=str(data["chat"]), iters=2, lr=1e-4,
                     val_data=str(data["chat"]), val_every=2, eval_data=[str(data["bench"])], eval_every=2,
                     eval_batch_size=2, compile=False),
    }


@pytest.fixture(scope="module")
def runs(tiny_dir, data, tmp_path_factory):
    """Every configuration on two processes (one launch) and on one with the global batch."""
    root = tmp_path_factory.mktemp("dist_runs")
    cfgs = configs(tiny_dir, data, root)
    two = {name: dict(kw, out=str(root / "two" / name)) for name, kw in cfgs.items()}
    spec = root / "runs.json"
    spec.write_text(json.dumps(list(two.values())))
    res = launch(str(WORKER), str(spec))
    done = [(Path(kw["out"]) / "adapters.safetensors").is_file() for kw in two.values()]
    assert all(done), res.stdout + res.stderr
    one = {}
    for name, kw in cfgs.items():
        if name == "lora-dropout":
            continue  # dropout masks are drawn per process: no one-process twin
        kw = dict(kw, batch_size=2, out=str(root / "one" / name))
        if "vision_cache_dir" in kw:
            kw["vision_cache_dir"] = str(root / "one-cache")
        train(TrainConfig(**kw))
        one[name] = Path(kw["out"])
    return {"two": {k: Path(v["out"]) for k, v in two.items()}, "one": one, "launch": res, "root": root}


# -- in one process -----------------------------------------------------------------------------------


def test_each_process_takes_a_disjoint_share_of_the_same_global_batches():
    lengths = np.random.default_rng(0).integers(5, 300, size=23)
    worlds = [World() for _ in range(3)]
    for r, w in enumerate(worlds):
        w.rank, w.size = r, 3
    one = BatchStream(lengths, 6, seed=4)  # one process with the global batch
    shares = [BatchStream(lengths, 6, seed=4) for _ in worlds]
    for _ in range(8):  # two epochs: 4 batches of 6, one of them of 5
        batch = one.next()
        parts = [list(w.shard(s.next())) for w, s in zip(worlds, shares)]
        assert sum(parts, []) == list(batch)  # in order, disjoint, nothing left out
        assert sorted(map(len, parts)) in ([6 // 3] * 3, [1, 2, 2])
    # A global batch shorter than the processes leaves some with an empty share.
    assert [list(w.shard(np.arange(1))) for w in worlds] == [[], [], [0]]


def test_an_empty_share_learns_nothing(tiny_model, chat_processor):
    model, _ = tiny_model
    b = collate([], chat_processor.pad_id)
    assert b.n_targets == 0 and b.label_w.sum() == 0 and not b.images
    loss_fn = make_loss(frozen_vision=True)
    args = [mx.array(x) for x in (b.input_ids, b.label_pos, b.label_ids, b.label_w, b.label_mm)]
    (loss, ntoks, _), grad = nn.value_and_grad(model, loss_fn)(model, args[0], None, *args[1:])
    assert float(loss.item()) == 0.0 and float(ntoks.item()) == 0.0
    assert all(float(mx.abs(g).max().item()) == 0.0 for _, g in tree_flatten(grad))


class OtherProcessNaN(World):
    """Rank 0 of two whose partner's loss becomes NaN at its second step."""

    def __init__(self):
        super().__init__()
        self.rank, self.size, self.calls = 0, 2, 0

    def sum(self, values, what, watched=True):
        self.calls += "losses" in what
        other = np.array(values, dtype=np.float64)
        if self.calls == 2:
            other[0] = np.nan
        return np.asarray(values, dtype=np.float64) + other

    def max(self, value, what):
        return value

    def gather(self, x, what):
        return mx.stack([x, x])

    def agree(self, facts):
        pass

    def average_gradients(self, grad):
        return grad


def trained(model):
    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


def test_a_non_finite_loss_on_another_process_stops_before_the_update(tiny_dir, data, tmp_path, monkeypatch):
    import mlx_dsvl

    world = OtherProcessNaN()
    monkeypatch.setattr(run_module.World, "init", classmethod(lambda cls, timeout=0: world))
    loaded = mlx_dsvl.load(tiny_dir, dtype="float32")
    after_step = {}

    class Snapshot(TrainingCallback):
        def on_step_end(self, state):
            after_step[state.step] = trained(loaded[0])

    out, four = tmp_path / "nan", tmp_path / "four.jsonl"  # global batches of 2: each share has one
    four.write_text("".join(l.replace('"images/', f'"{data["chat"].parent}/images/')
                            for l in data["chat"].read_text().splitlines(True)[:4]))
    with pytest.raises(TrainingStopped, match=r"loss became nan at step 2 \(on another process\); training stopped "
                                              r"without saving; the last good checkpoint is kept: .*step-0000001"):
        train(TrainConfig(stage=3, model=str(tiny_dir), data=str(four), out=str(out), iters=4,
                          batch_size=1, save_every=1, warmup=0, quiet=True, plot=False, compile=False),
              loaded=loaded, callbacks=[Snapshot()])
    # Every process sees the sum, so none applies the update of step 2.
    now = trained(loaded[0])
    assert list(after_step) == [1] and all(np.array_equal(now[k], v) for k, v in after_step[1].items())
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-0000001"


def test_a_step_left_without_examples_changes_nothing(tiny_dir, data, tmp_path, capsys):
    bad = Path(data["bad_pairs"]).parent / "all_bad.jsonl"
    shutil.copy(bad.parent / "images" / "cut.png", bad.parent / "images" / "cut2.png")
    bad.write_text(json.dumps({"image": "images/cut.png", "text": "a"}) + "\n"
                   + json.dumps({"image": "images/cut2.png", "text": "b"}) + "\n")
    res = train(TrainConfig(stage=2, method="full", model=str(tiny_dir), data=str(bad), out=str(tmp_path / "o"),
                            iters=2, batch_size=2, skip_bad=True, warmup=0, quiet=True, plot=False,
                            steps_per_report=1, compile=False))
    err = capsys.readouterr().err
    assert "step 1 had no example left" in err and "step 2 had no example left" in err
    recs = [r for r in res.history if r["type"] == "train"]
    assert [(r["target_tokens"], r["skipped_examples"]) for r in recs] == [(0, 2), (0, 2)]
    import mlx_dsvl

    base, _ = mlx_dsvl.load(tiny_dir, dtype="float32")
    ref = dict(tree_flatten(base.parameters()))
    saved = weights(tmp_path / "o")
    assert saved and all(np.array_equal(v, np.array(ref[k])) for k, v in saved.items())


def test_processes_that_set_up_different_runs_are_stopped_before_anything_is_written():
    class Rank0Of2(World):
        def __init__(self, other):
            super().__init__()
            self.rank, self.size, self.other = 0, 2, other

        def gather(self, x, what):
            return mx.stack([x, fingerprint(self.other)])

    facts = {"options": {"lr": 1e-4}, "data files": {"data": "ab12"}, "base model": {"weights": "cd"}}
    Rank0Of2(dict(facts)).agree(facts)  # the same: nothing to say
    with pytest.raises(ValueError, match=r"the processes of this run differ in data files: rank\(s\) 1 differ "
                                         r"from rank 0 \(every host needs the same options, model, data"):
        Rank0Of2({**facts, "data files": {"data": "ff00"}}).agree(facts)


def test_the_global_batch_decides_whether_a_checkpoint_can_continue():
    assert global_batch_check(2, 2, 4, 1) is None and global_batch_check(4, 1, 1, 4) is None
    assert "give `batch_size` 4" in global_batch_check(2, 2, 2, 1)
    assert "a number of processes that divides 4" in global_batch_check(2, 2, 1, 3)


# -- two processes ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora", "lora-cache", "full-cache", "full"])
def test_two_processes_match_one_with_the_global_batch(runs, name):
    loss, weight = differences(runs["two"][name], runs["one"][name])
    print(f"{name}: max relative loss difference {loss:.2e}, max weight difference {weight:.2e}")
    assert loss <= TOL and weight <= TOL


@pytest.mark.slow
def test_the_runs_share_out_work_and_output(runs):
    two, one = runs["two"], runs["one"]
    out = runs["launch"].stdout + runs["launch"].stderr
    assert "Traceback" not in out and "[rank 1]" not in out, out
    # A global batch of one example came (rank 0's share was empty) and still matched above ...
    tokens = [r["tokens"] for r in train_records(two["lora"])]
    assert min(tokens) < 0.75 * max(tokens)
    # ... and the bad image was dropped once, by the process that owned it.
    assert sum(r.get("skipped_examples", 0) for r in train_records(two["full-cache"])) == 1
    # Both processes wrote into the shared cache: one whole entry per image, nothing torn.
    entries = list((runs["root"] / "shared-cache").rglob("*"))
    files = [p for p in entries if p.is_file()]
    assert len(files) == 5 and not [p for p in files if ".tmp" in p.name]
    assert all(len(mx.load(str(p))) >= 1 for p in files)
    # Validation and benchmark records are the same as one process's.
    for kind in ("val", "eval"):
        a, b = ([r for r in map(json.loads, (run["full"] / "metrics.jsonl").read_text().splitlines())
                 if r["type"] == kind] for run in (two, one))
        assert len(a) == len(b) >= 1
        if kind == "val":
            np.testing.assert_allclose([r["val_loss"] for r in a], [r["val_loss"] for r in b], rtol=TOL)
        else:
            assert [r["eval_bench_acc"] for r in a] == [r["eval_bench_acc"] for r in b]
    # Rank 0 alone wrote: every checkpoint records the two processes and their random states.
    state = json.loads((two["lora"] / "checkpoints" / "step-0000002" / "state.json").read_text())
    assert state["processes"] == 2 and state["config"]["batch_size"] == 1
    rng = mx.load(str(two["lora-dropout"] / "checkpoints" / "step-0000002" / "rng.safetensors"))
    assert rng["ranks"].shape == (2, 2) and rng["ranks"][0].tolist() != rng["ranks"][1].tolist()


@pytest.mark.slow
def test_a_checkpoint_continues_on_one_process_with_the_same_global_batch(runs, tmp_path):
    two = runs["two"]["lora"]
    ck = two / "checkpoints" / "step-0000002"
    res = train(TrainConfig(resume=str(ck), out=str(tmp_path / "one"), batch_size=2),
                explicit=["resume", "out", "batch_size"])
    loss, weight = differences(tmp_path / "one", two)
    assert res.steps == 4 and loss <= TOL and weight <= TOL
    with pytest.raises(ResumeError, match=r"global batch of 2 \(2 process\(es\) x `batch_size` 1\), this run "
                                          r"would take 1 .*give `batch_size` 2"):
        train(TrainConfig(resume=str(ck), out=str(tmp_path / "refused")), explicit=["resume", "out"])
    assert not (tmp_path / "refused").exists()


def cli_args(tiny_dir, data, out, *flags):
    """The "lora-dropout" run through the command line."""
    return ["-m", "mlx_dsvl.train", "--stage", "3", "--model", str(tiny_dir), "--data", str(data["chat"]),
            "--out", str(out), "--iters", "4", "--batch-size", "1", "--lr", "1e-3", "--lora-dropout", "0.1",
            "--warmup", "0", "--steps-per-report", "1", "--no-plot", *flags]


@pytest.mark.slow
def test_stop_failure_and_resume_agree_across_processes(runs, tiny_dir, data, tmp_path):
    out = tmp_path / "run"
    # SIGTERM to rank 1 during step 2: both processes stop after it, rank 0 saves and says so.
    res = launch(*cli_args(tiny_dir, data, out, "--save-every", "0"), fault="step:2:TERM:1")
    log = res.stdout + res.stderr
    assert "[rank 1] SIGTERM: stopping after this step" in log, log
    assert "SIGTERM (sent to another process of the run): stopped at step 2; resume with --resume" in log, log
    assert log.count("step 1/4 |") == 1 and log.count("step 2/4 |") == 1  # rank 0 alone reports
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-0000002"
    # Rank 1 killed during step 4 (after the checkpoint of step 3): rank 0 says so within seconds.
    res = launch("-m", "mlx_dsvl.train", "--resume", str(out), "--save-every", "1", fault="step:2:KILL:1")
    log = res.stdout + res.stderr
    assert "[rank 0] error: lost the connection to another process of the run during the losses of step 4" \
        in log, log
    last = out / "checkpoints" / "step-0000003"
    assert f"the last good checkpoint is kept: {last}; resume with --resume {out}" in log
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-0000003"
    assert damage(out / "checkpoints" / "step-0000003") is None
    print(f"launch with a killed process: {res.seconds:.1f} s")
    # Resumed, it ends where the uninterrupted run ended, bit for bit.
    res = launch("-m", "mlx_dsvl.train", "--resume", str(out))
    assert (out / "adapters.safetensors").is_file(), res.stdout + res.stderr
    ref = runs["two"]["lora-dropout"]
    assert [(r["step"], r["loss"]) for r in train_records(out)] == \
        [(r["step"], r["loss"]) for r in train_records(ref)]
    wa, wb = weights(out), weights(ref)
    assert all(np.array_equal(wa[k], wb[k]) for k in wb)


@pytest.mark.slow
def test_a_frozen_process_is_caught_by_the_watchdog(tiny_dir, data, tmp_path):
    # 15 s, not less: on a busy 2-core machine a healthy process's first step can take seconds
    out, err_file = tmp_path / "run", tmp_path / "stderr.txt"
    cmd = launch_cmd(*cli_args(tiny_dir, data, out, "--save-every", "1", "--dist-timeout", "15", "--no-compile"))
    with open(err_file, "w") as err:
        proc = subprocess.Popen(cmd, env=launch_env("step:2:STOP:1"), stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
    try:
        deadline, said = time.monotonic() + 240, ""
        while time.monotonic() < deadline and "no answer" not in said:
            time.sleep(0.5)
            said = err_file.read_text()
        assert "[rank 0] error: no answer from the other processes of the run for 15 s while waiting for the " \
               "losses of step 2" in said, said
        assert f"the last good checkpoint is kept: {out / 'checkpoints' / 'step-0000001'}" in said
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher waits for the frozen process forever
        proc.wait()
    assert damage(out / "checkpoints" / "step-0000001") is None
