"""The training CLI's output folder and option rules: an earlier run is never written into unless
``--resume`` continues it or ``--force`` replaces it; ``--resume RUN`` alone continues in RUN;
every bad option or input is one ``error:`` line and a non-zero exit, before anything is written."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from mlx_dsvl.train.__main__ import main as train_main

STEP = "step-{:07d}"


@pytest.fixture(scope="module", autouse=True)
def no_blas_hint():
    with pytest.MonkeyPatch.context() as mp:  # its hint line is not these tests' subject
        mp.setenv("MLX_DSVL_NO_BLAS_REEXEC", "1")
        yield


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    p = tmp_path_factory.mktemp("rundir_data") / "text.jsonl"
    p.write_text("".join(json.dumps({"text": f"Line {i} says {i * i}."}) + "\n" for i in range(8)))
    return p


def args_for(tiny_dir, data, out, iters=4, seed=0):
    return ["--stage", "3", "--model", str(tiny_dir), "--data", str(data), "--out", str(out),
            "--iters", str(iters), "--save-every", "2", "--batch-size", "2", "--seed", str(seed),
            "--steps-per-report", "1", "--no-compile", "--no-plot", "--quiet"]


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def snapshot(folder: Path):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def steps(out: Path):
    return sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())


def latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


@pytest.fixture(scope="module")
def earlier_run(tiny_dir, text_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("rundir_earlier") / "run"
    assert train_main(args_for(tiny_dir, text_data, out, iters=8, seed=5)) == 0
    return out


# -- an earlier run in --out -------------------------------------------------------------------------


def test_an_earlier_run_is_refused_and_left_untouched(tiny_dir, text_data, earlier_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(earlier_run, out)
    before = snapshot(out)
    assert train_main(args_for(tiny_dir, text_data, out, iters=2)) == 1
    err = one_error(capsys)
    assert err == (f"error: --out {out} holds an earlier training run (checkpoints up to step 8): "
                   f"continue it with --resume {out}, or replace it with --force (it is kept until "
                   f"the new run saves its first checkpoint)")
    assert snapshot(out) == before


def test_a_folder_that_is_not_a_run_is_never_replaced(tiny_dir, text_data, tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("mine")
    for extra in ([], ["--force"]):
        assert train_main(args_for(tiny_dir, text_data, out) + extra) == 1
        assert "is not empty and holds no training run; choose a new or empty folder" in one_error(capsys)
    assert snapshot(out) == {"todo.txt": b"mine"}
    f = tmp_path / "file"
    f.write_text("x")
    assert train_main(args_for(tiny_dir, text_data, f)) == 1
    assert one_error(capsys) == f"error: --out {f} is a file, not a folder"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train_main(args_for(tiny_dir, text_data, empty, iters=2)) == 0  # an empty folder is fine


def test_force_replaces_the_whole_earlier_run(tiny_dir, text_data, earlier_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(earlier_run, out)
    assert train_main(args_for(tiny_dir, text_data, out, iters=2) + ["--force"]) == 0
    assert steps(out) == [STEP.format(2)] and latest(out) == STEP.format(2)  # no step-4..8 left
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    assert json.loads((out / "run_config.json").read_text())["seed"] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no staging or old folder left
    plain = tmp_path / "plain.txt"
    plain.write_text("")  # files replaced atomically get the usual permissions, not mkstemp's 0600
    for f in ("run_config.json", "metrics.jsonl", "adapters.safetensors", "checkpoints/latest"):
        assert (out / f).stat().st_mode == plain.stat().st_mode, f


# -- --resume ----------------------------------------------------------------------------------------


def test_resume_alone_continues_in_the_run(tiny_dir, text_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(args_for(tiny_dir, text_data, out, iters=2)) == 0
    assert train_main(["--resume", str(out), "--iters", "4"]) == 0
    assert steps(out) == [STEP.format(2), STEP.format(4)] and latest(out) == STEP.format(4)
    # a checkpoint folder inside the run: continues in that run too
    assert train_main(["--resume", str(out / "checkpoints" / STEP.format(4)), "--iters", "6"]) == 0
    assert latest(out) == STEP.format(6)
    # a checkpoint copied out of its run needs to be told where to go
    lone = tmp_path / "lone"
    shutil.copytree(out / "checkpoints" / STEP.format(6), lone)
    assert train_main(["--resume", str(lone)]) == 1
    assert one_error(capsys) == f"error: --resume {lone}: this checkpoint is not inside a run folder; give --out"
    assert train_main(["--resume", str(lone), "--out", str(tmp_path / "branch"), "--iters", "8"]) == 0
    assert latest(tmp_path / "branch") == STEP.format(8)


def test_output_options_can_be_turned_back_on_when_resuming(tiny_dir, text_data, tmp_path, capsys):
    """A run started with --quiet --no-plot (and --no-compile) resumes verbose, with its plot."""
    out = tmp_path / "run"
    assert train_main(args_for(tiny_dir, text_data, out, iters=2)) == 0
    assert capsys.readouterr().out == "" and not (out / "loss.png").exists()
    assert train_main(["--resume", str(out), "--iters", "3", "--no-quiet", "--plot"]) == 0
    assert "step 3/3 | loss" in capsys.readouterr().out
    assert (out / "loss.png").is_file()
    assert json.loads((out / "run_config.json").read_text())["quiet"] is False
    assert train_main(["--resume", str(out), "--iters", "4", "--quiet"]) == 0  # and off again
    assert capsys.readouterr().out == ""


def test_resume_from_an_earlier_step_needs_force(tiny_dir, text_data, earlier_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(earlier_run, out)
    before = snapshot(out)
    ck4 = out / "checkpoints" / STEP.format(4)
    assert train_main(["--resume", str(ck4)]) == 1
    assert one_error(capsys) == (f"error: --out {out} has checkpoints after step 4 (up to step 8); "
                                 f"continuing from step 4 there drops them: add --force to do so, or "
                                 f"give another --out")
    assert snapshot(out) == before
    assert train_main(["--resume", str(ck4), "--iters", "6", "--force"]) == 0
    assert steps(out) == [STEP.format(s) for s in (2, 4, 6)] and latest(out) == STEP.format(6)
    # resuming elsewhere (a new folder) needs no --force and leaves the run alone
    assert train_main(["--resume", str(ck4), "--out", str(tmp_path / "branch"), "--iters", "6"]) == 0
    assert steps(out) == [STEP.format(s) for s in (2, 4, 6)]


def test_resume_on_smaller_data_continues_on_it(tiny_dir, text_data, tmp_path, capsys):
    """The data file changed (here: shorter than the checkpoint's position in its epoch): the
    resumed run says so and goes on over the new data from the next epoch, never an IndexError."""
    out = tmp_path / "run"
    assert train_main(args_for(tiny_dir, text_data, out, iters=3) + ["--save-every", "3"]) == 0
    state = json.loads((out / "checkpoints" / STEP.format(3) / "state.json").read_text())
    assert state["streams"]["main"] == {"epoch": 0, "index": 3}  # 8 lines, batches of 2
    small = tmp_path / "small.jsonl"
    small.write_text("".join(text_data.read_text().splitlines(keepends=True)[:2]))
    capsys.readouterr()
    assert train_main(["--resume", str(out), "--data", str(small), "--iters", "5"]) == 0
    err = capsys.readouterr().err
    assert "warning: the data files changed since the checkpoint" in err and "Traceback" not in err, err
    assert latest(out) == STEP.format(5)
    state = json.loads((out / "checkpoints" / STEP.format(5) / "state.json").read_text())
    # past the end of the new data's one batch: epoch 1 starts; steps 4 and 5 take epochs 1 and 2
    assert state["streams"]["main"] == {"epoch": 3, "index": 0}


def test_resume_refuses_another_run_in_out(tiny_dir, text_data, earlier_run, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(earlier_run, a)
    assert train_main(args_for(tiny_dir, text_data, b, iters=2)) == 0
    before = snapshot(b)
    assert train_main(["--resume", str(a), "--out", str(b)]) == 1
    assert f"--out {b} holds an earlier training run" in one_error(capsys)
    assert snapshot(b) == before


# -- bad options and inputs --------------------------------------------------------------------------


@pytest.mark.parametrize("opt,value,problem", [
    ("--lr", "-1", "must be > 0, got -1.0"),
    ("--lr", "0", "must be > 0, got 0.0"),
    ("--lr", "nan", "must be > 0, got nan"),
    ("--vision-lr", "-1e-5", "must be > 0, got -1e-05"),
    ("--warmup", "-1", "must be >= 0, got -1"),
    ("--epochs", "0", "must be > 0, got 0.0"),
    ("--iters", "0", "must be >= 1, got 0"),
    ("--batch-size", "0", "must be >= 1, got 0"),
    ("--grad-accum", "0", "must be >= 1, got 0"),
    ("--lora-rank", "0", "must be >= 1, got 0"),
    ("--lora-scale", "-2", "must be > 0, got -2.0"),
    ("--lora-dropout", "1", "must be within [0, 1), got 1.0"),
    ("--lora-layers", "0", "must be >= 1, got 0"),
    ("--text-ratio", "1.5", "must be within [0, 1], got 1.5"),
    ("--text-ratio", "-0.1", "must be within [0, 1], got -0.1"),
    ("--modality-warmup", "-3", "must be >= 0, got -3"),
    ("--min-lr-ratio", "2", "must be within [0, 1], got 2.0"),
    ("--weight-decay", "-0.1", "must be >= 0, got -0.1"),
    ("--max-grad-norm", "-1", "must be >= 0 (0 disables clipping), got -1.0"),
    ("--max-seq-len", "1", "must be >= 2, got 1"),
    ("--save-every", "-1", "must be >= 0, got -1"),
    ("--keep-checkpoints", "-1", "must be >= 0, got -1"),
    ("--val-every", "-5", "must be >= 0, got -5"),
    ("--val-batches", "0", "must be -1 (all) or >= 1, got 0"),
    ("--steps-per-report", "0", "must be >= 1, got 0"),
    ("--pad-to", "0", "must be >= 1, got 0"),
    ("--seed", "-1", "must be >= 0, got -1"),
])
def test_a_nonsensical_option_value_is_one_error_before_any_work(tiny_dir, text_data, tmp_path, capsys,
                                                                 opt, value, problem):
    out = tmp_path / "run"
    assert train_main(args_for(tiny_dir, text_data, out) + [f"{opt}={value}"]) == 2
    assert one_error(capsys) == f"error: {opt} {problem}"
    assert not out.exists()


def test_a_bad_option_on_resume_is_refused_too(tiny_dir, text_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(args_for(tiny_dir, text_data, out, iters=2)) == 0
    assert train_main(["--resume", str(out), "--iters", "-4"]) == 2
    assert one_error(capsys) == "error: --iters must be >= 1, got -4"


def test_every_bad_input_is_one_error_line(tiny_dir, text_data, earlier_run, tmp_path, capsys):
    """One ``error:`` line and a non-zero exit (1: input or set-up, 2: options) for each."""
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{oops}\n')
    cases = [
        (args_for(tiny_dir, tmp_path / "missing.jsonl", tmp_path / "o1"), 1, "no such data file"),
        (args_for(tiny_dir, bad_json, tmp_path / "o2"), 1, f"{bad_json}:2: malformed JSON"),
        (args_for(tiny_dir / "nope", text_data, tmp_path / "o3"), 1, "nope"),
        (["--resume", str(tmp_path / "nothing")], 1, "no such folder"),
        (["--resume", str(tmp_path)], 1, "not a training checkpoint"),
        (["--stage", "1", "--model", str(tiny_dir)], 2, "--data, --out required"),
        (args_for(tiny_dir, text_data, earlier_run), 1, "holds an earlier training run"),
        (args_for(tiny_dir, text_data, tmp_path / "o4") + ["--iters", "2", "--epochs", "1"], 1, "not both"),
        (args_for(tiny_dir, text_data, tmp_path / "o5") + ["--text-ratio", "0.5"], 1, "needs --text-data"),
    ]
    for argv, rc, text in cases:
        assert train_main(argv) == rc, argv
        assert text in one_error(capsys), argv


@pytest.mark.parametrize("content,expected", [
    ("", "no examples (the file is empty or has only blank lines)"),
    ("\n  \n", "no examples (the file is empty or has only blank lines)"),
    ('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]}\n',
     "no usable example in its 1 line(s): 1 with nothing to learn"),
])
def test_a_training_file_without_examples_says_why(tiny_dir, tmp_path, capsys, content, expected):
    data = tmp_path / "d.jsonl"
    data.write_text(content)
    assert train_main(args_for(tiny_dir, data, tmp_path / "o")) == 1
    err = one_error(capsys)
    assert err.startswith(f"error: {data}: {expected}"), err
    assert "warnings above" not in err


def test_a_max_seq_len_too_short_for_the_images_says_so(tiny_dir, tmp_path, capsys):
    """Truncating at --max-seq-len left no answer (the image's 576 tokens do not fit): the line is
    named with the length it needs, not blamed for having no answer."""
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(tmp_path / "red.png")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "<image_placeholder>Colour?"},
                                             {"role": "assistant", "content": "Red."}],
                                "images": ["red.png"]}) + "\n")
    assert train_main(args_for(tiny_dir, data, tmp_path / "o") + ["--max-seq-len", "300"]) == 1
    err = one_error(capsys)
    need = re.search(r"needs (\d+) tokens", err)
    assert err.startswith(f"error: {data}: no usable example in its 1 line(s): 1 longer than --max-seq-len "
                          f"300 (first: {data}:1 needs "), err
    assert need and int(need.group(1)) > 576 and "1 image of 576 tokens" in err, err
    assert "nothing to learn" not in err, err


def test_skipped_lines_are_counted_with_their_reasons(tiny_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{oops}\n{"text": "' + "word " * 50 + '"}\n')
    assert train_main(args_for(tiny_dir, data, tmp_path / "o") + ["--skip-bad", "--long-examples", "skip",
                                                                   "--max-seq-len", "8"]) == 1
    err = one_error(capsys)  # --quiet: no warnings, the error says it all
    assert err.startswith(f"error: {data}: no usable example in its 2 line(s): 1 bad (skipped by "
                          f"--skip-bad; first: {data}:1: malformed JSON"), err
    assert "; 1 longer than --max-seq-len 8 (first: " in err


def test_force_with_cached_vision_features_moves_the_cache_with_the_run(tiny_dir, earlier_run, tmp_path):
    """The cache of a --force run lives in its staging folder until the swap, then in --out."""
    from mlx_dsvl.testing.synthetic import write_shapes_dataset

    data = write_shapes_dataset(tmp_path / "shapes", 4, seed=4)
    out = tmp_path / "run"
    shutil.copytree(earlier_run, out)
    args = ["--stage", "1", "--model", str(tiny_dir), "--data", str(data["pairs"]), "--out", str(out),
            "--iters", "2", "--batch-size", "2", "--save-every", "1", "--cache-vision-features",
            "--no-compile", "--no-plot", "--quiet", "--force"]
    assert train_main(args) == 0  # step 1 encodes 2 images before the swap, step 2 the other 2 after
    assert steps(out) == [STEP.format(1), STEP.format(2)]
    assert len(list((out / "vision_cache").rglob("*.safetensors"))) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "shapes"]
