"""Training under faults: ``python -m mlx_dsvl.train`` killed (SIGKILL, SIGTERM, SIGHUP) during a
step, during a checkpoint write and while ``--force`` replaces a run, then rerun; damaged
checkpoint files; a full disk at checkpoint time.  Nothing the user had is lost, ``latest``
always names an intact checkpoint, and resuming continues bit for bit.

Kill points come from ``MLX_DSVL_FAULT`` (:mod:`mlx_dsvl.faults`): the process signals itself at
an exact place, so each case is deterministic.  Runs use ``--no-compile`` to stay quick; exact
resume of the compiled step is tested in test_train.py.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_dsvl import faults
from mlx_dsvl.testing.damage import damage_file
from mlx_dsvl.train.__main__ import main as train_main
from mlx_dsvl.train.checkpoint import damage

ROOT = Path(__file__).resolve().parents[1]
STEP = "step-{:07d}"


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    p = tmp_path_factory.mktemp("faults_data") / "text.jsonl"
    p.write_text("".join(json.dumps({"text": f"Item {i} is {'even' if i % 2 == 0 else 'odd'}."}) + "\n"
                         for i in range(16)))
    return p


def args_for(tiny_dir, data, out, seed=0, iters=6):
    """6 steps, a checkpoint every 2, LoRA dropout (so the RNG state matters on resume)."""
    return ["--stage", "3", "--model", str(tiny_dir), "--data", str(data), "--out", str(out),
            "--iters", str(iters), "--save-every", "2", "--batch-size", "2", "--lora-dropout", "0.1",
            "--lr", "5e-3", "--warmup", "0", "--steps-per-report", "1", "--seed", str(seed),
            "--no-compile", "--no-plot", "--quiet"]


def run(args, fault=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "MLX_DSVL_NO_BLAS_REEXEC": "1"}  # no OpenBLAS hint line on machines without it
    env.pop(faults.ENV, None)
    if fault:
        env[faults.ENV] = fault
    return subprocess.run([sys.executable, "-m", "mlx_dsvl.train", *args], env=env, capture_output=True,
                          text=True, timeout=600)


def latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


def outcome(out: Path):
    """What a finished run leaves: its adapters and each step's loss."""
    w = mx.load(str(out / "adapters.safetensors"))
    losses = [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    return {k: np.array(v) for k, v in w.items()}, losses


def assert_same_run(out: Path, ref: Path):
    (wa, la), (wb, lb) = outcome(out), outcome(ref)
    assert la == lb and [s for s, _ in la] == [1, 2, 3, 4, 5, 6]
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)  # bit for bit


def snapshot(folder: Path):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def no_leftovers(out: Path):
    hidden = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    temps = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    return not hidden and not temps


@pytest.fixture(scope="module")
def reference(tiny_dir, text_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults_ref") / "run"
    r = run(args_for(tiny_dir, text_data, out))
    assert r.returncode == 0, r.stderr
    return out


# -- killed, then resumed -------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_during_a_step_then_resume_is_exact(tiny_dir, text_data, reference, tmp_path):
    out = tmp_path / "run"
    r = run(args_for(tiny_dir, text_data, out), fault="step:3:KILL")  # step 3 computed, not saved
    assert r.returncode == -signal.SIGKILL
    assert latest(out) == STEP.format(2)
    r = run(["--resume", str(out)])
    assert r.returncode == 0, r.stderr
    assert_same_run(out, reference)
    assert no_leftovers(out)


@pytest.mark.slow
@pytest.mark.parametrize("files_written", [1, 4])
def test_sigkill_during_a_checkpoint_write_keeps_latest_intact(tiny_dir, text_data, reference, tmp_path,
                                                               files_written):
    """Killed while step 4's checkpoint is half written (after the adapters; or after all but the
    rename): ``latest`` still names step 2, which is intact; the rerun removes the leftover."""
    out = tmp_path / "run"
    r = run(args_for(tiny_dir, text_data, out), fault=f"checkpoint-file:{4 + files_written}:KILL")
    assert r.returncode == -signal.SIGKILL
    ckpts = out / "checkpoints"
    assert latest(out) == STEP.format(2) and damage(ckpts / STEP.format(2)) is None
    assert not (ckpts / STEP.format(4)).exists()
    assert [p for p in ckpts.iterdir() if p.name.startswith(f".{STEP.format(4)}.")]  # the half-written one
    r = run(["--resume", str(out)])
    assert r.returncode == 0, r.stderr
    assert_same_run(out, reference)
    assert no_leftovers(out)


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["TERM", "HUP", "INT"])
def test_sigterm_or_sighup_saves_at_the_step_boundary_and_exits(tiny_dir, text_data, reference, tmp_path, sig):
    out = tmp_path / "run"
    r = run(args_for(tiny_dir, text_data, out), fault=f"step:3:{sig}")
    signum = getattr(signal, f"SIG{sig}")
    assert r.returncode == 128 + signum, r.stderr
    assert latest(out) == STEP.format(3)  # the step in progress finished and was saved
    assert f"SIG{sig}: stopped at step 3; resume with --resume {out}" in r.stderr
    r = run(["--resume", str(out)])
    assert r.returncode == 0, r.stderr
    assert_same_run(out, reference)


def test_a_second_signal_stops_at_once(capsys):
    from mlx_dsvl.train.run import StopSignals

    before = signal.getsignal(signal.SIGTERM)
    stop = StopSignals()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM and stop.name == "SIGTERM"
        assert "SIGTERM: stopping after this step to save a checkpoint" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGHUP)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
def test_sigterm_during_a_checkpoint_write_finishes_it_once(tiny_dir, text_data, reference, tmp_path):
    out = tmp_path / "run"
    r = run(args_for(tiny_dir, text_data, out), fault="checkpoint-file:6:TERM")  # inside step 4's
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    assert latest(out) == STEP.format(4) and damage(out / "checkpoints" / STEP.format(4)) is None
    assert "stopped at step 4" in r.stderr
    r = run(["--resume", str(out)])
    assert r.returncode == 0, r.stderr
    assert_same_run(out, reference)


# -- --force: the earlier run survives every kill point ----------------------------------------------


@pytest.fixture(scope="module")
def earlier_run(tiny_dir, text_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults_earlier") / "run"
    r = run(args_for(tiny_dir, text_data, out, seed=9))
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["step:1:KILL", "replace:1:KILL"])
def test_force_killed_before_the_swap_leaves_the_earlier_run(tiny_dir, text_data, reference, earlier_run,
                                                             tmp_path, fault):
    """Killed before its first checkpoint, or with it saved but before the swap: the earlier run
    is byte for byte as it was; the rerun removes the abandoned staging folder and replaces it."""
    out = tmp_path / "run"
    shutil.copytree(earlier_run, out)
    before = snapshot(out)
    r = run(args_for(tiny_dir, text_data, out) + ["--force"], fault=fault)
    assert r.returncode == -signal.SIGKILL
    assert snapshot(out) == before
    r = run(args_for(tiny_dir, text_data, out) + ["--force"])
    assert r.returncode == 0, r.stderr
    assert "unfinished replacement" in r.stderr
    assert_same_run(out, reference)
    assert no_leftovers(out)


@pytest.mark.slow
def test_force_killed_between_the_renames_is_completed_by_the_next_run(tiny_dir, text_data, reference,
                                                                       earlier_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(earlier_run, out)
    before = snapshot(out)
    r = run(args_for(tiny_dir, text_data, out) + ["--force"], fault="replace:2:KILL")
    assert r.returncode == -signal.SIGKILL
    old = next(tmp_path.glob(".run.old-*"))
    new = next(tmp_path.glob(".run.new-*"))
    assert not out.exists() and snapshot(old) == before  # both runs are on disk
    assert latest(new) == STEP.format(2)
    r = run(["--resume", str(out)])  # finishes the swap, then continues the new run
    assert r.returncode == 0, r.stderr
    assert "completed the interrupted replacement" in r.stderr
    assert_same_run(out, reference)
    assert no_leftovers(out)


# -- damaged checkpoint files --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tiny_dir, text_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults_finished") / "run"
    r = run(args_for(tiny_dir, text_data, out, iters=4))
    assert r.returncode == 0, r.stderr
    assert latest(out) == STEP.format(4)
    return out


def resume_error(args, monkeypatch, capsys):
    monkeypatch.setenv("MLX_DSVL_NO_BLAS_REEXEC", "1")
    rc = train_main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1, err
    return err


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated", "zeroed", "random"])
@pytest.mark.parametrize("name", ["adapters.safetensors", "adapter_config.json", "optimizer.safetensors",
                                  "rng.safetensors", "state.json"])
def test_a_damaged_checkpoint_file_is_named_with_the_intact_step(finished_run, tmp_path, monkeypatch,
                                                                 capsys, name, how):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    ck4 = out / "checkpoints" / STEP.format(4)
    damage_file(ck4 / name, how)
    hint = f"the newest intact checkpoint is step 2: continue from it with --resume " \
           f"{out / 'checkpoints' / STEP.format(2)} --force"
    for target in (out, ck4):  # the run (its latest) or the checkpoint itself
        err = resume_error(["--resume", str(target)], monkeypatch, capsys)
        assert err.startswith(f"error: {ck4 / name} is damaged ("), err
        assert hint in err, err
    if (name, how) == ("optimizer.safetensors", "random"):  # the named command works
        rc = train_main(["--resume", str(out / "checkpoints" / STEP.format(2)), "--force"])
        assert rc == 0 and latest(out) == STEP.format(4) and damage(ck4) is None


@pytest.mark.slow
def test_a_damaged_latest_pointer_or_no_intact_step(finished_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    (out / "checkpoints" / "latest").write_bytes(b"\x00\x00\x00")
    err = resume_error(["--resume", str(out)], monkeypatch, capsys)
    assert f"{out / 'checkpoints' / 'latest'} is damaged" in err
    # step 4 is intact and the newest: no --force needed
    assert err.endswith(f"continue from it with --resume {out / 'checkpoints' / STEP.format(4)}"), err
    for step in (2, 4):
        damage_file(out / "checkpoints" / STEP.format(step) / "optimizer.safetensors", "truncated")
    err = resume_error(["--resume", str(out)], monkeypatch, capsys)
    assert "no earlier checkpoint of this run is intact: start the run again" in err


@pytest.mark.slow
def test_a_checkpoint_without_recorded_digests_is_checked_by_loading(finished_run, tmp_path, monkeypatch,
                                                                     capsys):
    """Checkpoints written before sizes and digests were recorded: a file that does not load."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    ck4 = out / "checkpoints" / STEP.format(4)
    state = json.loads((ck4 / "state.json").read_text())
    del state["files"]
    (ck4 / "state.json").write_text(json.dumps(state))
    assert damage(ck4) is None
    damage_file(ck4 / "optimizer.safetensors", "truncated")
    err = resume_error(["--resume", str(out)], monkeypatch, capsys)
    assert err.startswith(f"error: {ck4 / 'optimizer.safetensors'} is damaged (unreadable"), err


# -- a full disk at checkpoint time -------------------------------------------------------------------


def full_disk(monkeypatch, fail_at: int, kind: str):
    """The ``fail_at``-th safetensors write stops half way, as on a full disk: MLX raises a
    RuntimeError (what it does when a write fails), or the OS an ENOSPC."""
    import mlx_dsvl.outputs as files

    real = files.mx.save_safetensors
    calls = [0]

    def save(path, arrays, metadata=None):
        calls[0] += 1
        if calls[0] == fail_at:
            Path(path).write_bytes(b"\x00" * 100)  # what made it to the disk
            if kind == "mlx":
                raise RuntimeError("[write] Unable to write 4096 bytes to file.")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, arrays, metadata=metadata)

    monkeypatch.setattr(files.mx, "save_safetensors", save)


@pytest.mark.parametrize("kind", ["mlx", "enospc"])
def test_a_full_disk_at_checkpoint_time(tiny_dir, text_data, tmp_path, monkeypatch, capsys, kind):
    monkeypatch.setenv("MLX_DSVL_NO_BLAS_REEXEC", "1")
    out = tmp_path / "run"
    full_disk(monkeypatch, fail_at=5, kind=kind)  # 3 writes per checkpoint: step 4's optimizer state
    rc = train_main(args_for(tiny_dir, text_data, out))
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: cannot write the checkpoint of step 4 into {out / 'checkpoints'} ("), err
    assert f"; nothing of it remains; the last good checkpoint is kept: {out / 'checkpoints' / STEP.format(2)}" in err
    if kind == "enospc":
        assert "No space left on device" in err
    ckpts = out / "checkpoints"
    assert latest(out) == STEP.format(2) and damage(ckpts / STEP.format(2)) is None
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", STEP.format(2)]  # nothing half-written
    monkeypatch.undo()
    assert train_main(["--resume", str(out)]) == 0 and latest(out) == STEP.format(6)


@pytest.mark.slow
def test_a_full_disk_during_force_leaves_the_earlier_run(tiny_dir, text_data, earlier_run, tmp_path,
                                                          monkeypatch, capsys):
    monkeypatch.setenv("MLX_DSVL_NO_BLAS_REEXEC", "1")
    out = tmp_path / "run"
    shutil.copytree(earlier_run, out)
    before = snapshot(out)
    full_disk(monkeypatch, fail_at=2, kind="enospc")  # the first checkpoint's optimizer state
    rc = train_main(args_for(tiny_dir, text_data, out) + ["--force"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert f"no checkpoint had been saved yet; {out} is unchanged" in err
    assert snapshot(out) == before and no_leftovers(out)
