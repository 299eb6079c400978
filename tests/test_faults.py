"""Faults: a conversion killed part-way (SIGKILL, SIGTERM, SIGHUP) and run again, a full disk,
damaged files in a model folder.  Nothing a user made is lost; leftovers are reclaimed and
reported; every refusal is one line that names the file.

The kills happen at a known point: ``MLX_DSVL_FAULT=tensor:N:ACTION`` (:mod:`mlx_dsvl.faults`)
makes the converter signal itself after writing its N-th tensor (``STOP``: it freezes there).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import mlx_dsvl
from mlx_dsvl.loading import ModelLoadError
from mlx_dsvl.testing.damage import damage_file

ROOT = Path(__file__).resolve().parents[1]


def listing(path: Path):
    return sorted(p.name for p in Path(path).iterdir())


def start_convert(src, out, *extra, fault=None):
    """``fault``: ``(N, ACTION)``, the signal the converter sends itself after its N-th tensor."""
    env = dict(os.environ)
    if fault is not None:
        env["MLX_DSVL_FAULT"] = "tensor:{}:{}".format(*fault)
    return subprocess.Popen([sys.executable, "-m", "convert", "--model", str(src), "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)


def wait_until_stopped(proc) -> None:
    """Until a ``STOP`` fault has frozen the process mid-write."""
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), f"the converter ended instead (status {status})"


def run_convert(src, out, *extra):
    return subprocess.run([sys.executable, "-m", "convert", "--model", str(src), "--out", str(out), *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


# -- kill during convert --------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_leaves_a_partial_folder_that_the_next_run_reclaims(tiny_dir, tmp_path):
    out = tmp_path / "models" / "out"
    proc = start_convert(tiny_dir, out, fault=(20, "KILL"))
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    left = listing(out.parent)
    assert len(left) == 2 and left[0].startswith(".out.partial-") and left[1] == left[0] + ".lock", left
    partial_bytes = sum(f.stat().st_size for f in (out.parent / left[0]).rglob("*"))
    assert partial_bytes > 0

    r = run_convert(tiny_dir, out)
    assert r.returncode == 0, r.stderr
    assert "removed 1 partial folder(s) of interrupted conversions into out" in r.stderr
    assert listing(out.parent) == ["out"]
    model, _ = mlx_dsvl.load(out)
    assert model.image_token_id == 100015


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_clean_up_like_ctrl_c(sig, tiny_dir, tmp_path):
    out = tmp_path / "new" / "deeper" / "out"  # parent folders made for --out go too
    proc = start_convert(tiny_dir, out, fault=(5, sig[3:]))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + getattr(signal, sig)
    assert err.strip().splitlines()[-1] == f"error: stopped by {sig} (nothing was written)"
    assert listing(tmp_path) == []


@pytest.mark.slow
def test_a_live_writers_partial_folder_is_never_removed(tiny_dir, tmp_path):
    out = tmp_path / "out"
    first = start_convert(tiny_dir, out, fault=(5, "STOP"))
    try:
        wait_until_stopped(first)
        partial = [p for p in listing(tmp_path) if not p.endswith(".lock")]
        r = run_convert(tiny_dir, out)  # a second conversion into the same --out meanwhile
        assert r.returncode == 0, r.stderr
        assert "removed" not in r.stderr
        assert set(partial) <= set(listing(tmp_path)) and "out" in listing(tmp_path)
    finally:
        first.terminate()  # delivered once it runs again
        first.send_signal(signal.SIGCONT)
        first.communicate(timeout=60)
    assert listing(tmp_path) == ["out"]  # the first one cleaned up after itself


# -- a full disk --------------------------------------------------------------------------------
def test_full_disk_one_error_nothing_half_written_old_output_intact(tiny_dir, tmp_path, monkeypatch, capsys):
    """ENOSPC in the middle of a shard (injected at write time): the old --out (--force) stays."""
    import mlx_dsvl.convert.files as files
    from mlx_dsvl.convert.__main__ import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    real = files.write_safetensors

    def full_disk(path, tensors, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files, "write_safetensors", full_disk)
    assert main(["--model", str(tiny_dir), "--out", str(out), "--force"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {tmp_path}: no space left on the device while writing out")
    assert sum(line.startswith("error:") for line in err) == 1
    assert listing(tmp_path) == ["out"] and listing(out) == ["mine.txt"]
    assert (out / "mine.txt").read_text() == "keep me"
    monkeypatch.setattr(files, "write_safetensors", real)


# -- damaged files in a model folder -------------------------------------------------------------
@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    from mlx_dsvl.random_checkpoint import make_checkpoint

    return make_checkpoint("tiny", tmp_path_factory.mktemp("sharded") / "tiny", seed=1, shard_gb=0.02)


FILES = ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
         "processor_config.json", "model.safetensors.index.json", "model-00002-of-00005.safetensors"]


@pytest.mark.parametrize("how", ["truncated", "zeroed", "random"])
@pytest.mark.parametrize("name", FILES)
def test_damaged_file_one_error_naming_it(name, how, tiny_dir, sharded_dir, tmp_path, capsys):
    from mlx_dsvl.convert.__main__ import main

    src = sharded_dir if "0000" in name or "index" in name else tiny_dir
    assert (src / name).is_file(), listing(src)
    folder = tmp_path / "model"
    shutil.copytree(src, folder)
    damage_file(folder / name, how)
    with pytest.raises(ModelLoadError) as e:
        mlx_dsvl.load(folder)
    assert str(e.value).startswith(str(folder / name)), str(e.value)

    assert main(["--model", str(folder), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {folder / name}: "), err
    assert listing(tmp_path) == ["model"]


@pytest.mark.slow
def test_damaged_model_through_the_generate_cli(tiny_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    damage_file(folder / "tokenizer.json", "truncated")
    r = subprocess.run([sys.executable, "-m", "mlx_dsvl.generate", "--model", str(folder), "--prompt", "Hi"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        line for line in r.stderr.strip().splitlines() if line.startswith("error: ")]
    assert f"{folder / 'tokenizer.json'}: invalid JSON" in r.stderr


# -- bad input at every entry point ----------------------------------------------------------------
@pytest.mark.slow
def test_every_entry_point_refuses_bad_input_in_one_line(tiny_dir, tmp_path):
    """A handful of bad inputs per command: one ``error:`` line on stderr, a non-zero exit, and no
    traceback (the commands run side by side)."""
    from mlx_dsvl.device import gpu_available

    a_file = tmp_path / "a.txt"
    a_file.write_text("not a folder")
    existing = tmp_path / "existing"
    existing.mkdir()
    m = [sys.executable, "-m"]
    cases = {
        "bench json folder": (m + ["mlx_dsvl.bench", "--json", str(tmp_path / "no" / "x.json")], "no such folder"),
        "bench max tokens": (m + ["mlx_dsvl.bench", "--max-tokens", "0"], "--max-tokens must be >= 1"),
        "checkpoint file parent": (m + ["mlx_dsvl.random_checkpoint", "--arch", "tiny", "--out",
                                        str(a_file / "x")], str(a_file / "x")),
        "checkpoint exists": (m + ["mlx_dsvl.random_checkpoint", "--arch", "tiny", "--out", str(existing)],
                              "exists"),
        "checkpoint shards": (m + ["mlx_dsvl.random_checkpoint", "--arch", "tiny", "--out",
                                   str(tmp_path / "c"), "--shard-gb", "0"], "--shard-gb positive"),
        "convert file parent": (m + ["convert", "--model", str(tiny_dir), "--out", str(a_file / "x")],
                                f"{a_file} is a file, not a folder"),
        "fuse not an adapter": (m + ["mlx_dsvl.fuse", "--model", str(tiny_dir), "--adapter", str(tiny_dir),
                                     "--out", str(tmp_path / "f")], "no adapter_config.json"),
    }
    if not gpu_available():
        cases["bench no gpu"] = (m + ["mlx_dsvl.bench", "--device", "gpu"], "no GPU available")
        cases["generate no gpu"] = (m + ["mlx_dsvl.generate", "--model", str(tiny_dir), "--prompt", "Hi",
                                         "--device", "gpu"], "no GPU available")
    procs = {name: subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (cmd, _) in cases.items()}
    for name, p in procs.items():
        _, err = p.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert p.returncode != 0 and len(lines) == 1, (name, err)
        assert lines[0].startswith("error: ") and cases[name][1] in lines[0], (name, lines[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "existing"]
