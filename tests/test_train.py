"""Training: data and loss masks, freezing per stage, exact resume, stage-2 mixing, bad input,
adapters, fuse, QLoRA, CLI.  All on tiny random checkpoints, in-process."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from PIL import Image

import mlx_dsvl
from mlx_dsvl.testing.synthetic import write_shapes_dataset
from mlx_dsvl.train import TrainConfig, train
from mlx_dsvl.train.__main__ import build_parser
from mlx_dsvl.train.__main__ import main as train_main
from mlx_dsvl.train.batches import collate
from mlx_dsvl.train.checkpoint import ResumeError
from mlx_dsvl.train.data import IGNORE, DataError, load_jsonl, tokenize_chat, tokenize_text
from mlx_dsvl.train.schedule import ModalityMixer
from mlx_dsvl.train.stages import StageError

EOS_TEXT = "<｜end▁of▁sentence｜>"


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    """12 synthetic 384-px images with pairs.jsonl and chat.jsonl."""
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), 12, seed=3)


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    lines = [{"text": f"The number {i} is {'even' if i % 2 == 0 else 'odd'}."} for i in range(10)]
    lines += [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                            {"role": "assistant", "content": f"{2 * i}."}]} for i in range(6)]
    p = d / "text.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return p


def cfg(**kw):
    base = dict(batch_size=2, steps_per_report=1, save_every=0, quiet=True, plot=False, warmup=0)
    base.update(kw)
    return TrainConfig(**base)


def snapshot(model):
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


# -- data: labels ------------------------------------------------------------------------------


def test_chat_labels_cover_assistant_answers_and_eos_only(chat_processor):
    p = chat_processor
    conv = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "<image_placeholder>What is it?"},
            {"role": "assistant", "content": "A red circle."},
            {"role": "user", "content": "And the background?"},
            {"role": "assistant", "content": "Blue."}]
    ids, labels = tokenize_chat(p, conv)
    assert ids.tolist() == p.tokenize(p.format(conv)).tolist()  # the inference prompt, exactly
    target = labels != IGNORE
    # The labelled tokens decode to the two answers, each followed by the end-of-sentence token.
    assert p.tokenizer.decode(ids[target].tolist()) == f" A red circle.{EOS_TEXT} Blue.{EOS_TEXT}"
    assert not target[ids == p.image_token_id].any()
    # Everything before the first answer (system, user turn, image, "Assistant:") is masked.
    prefix = p.tokenize(p.format(conv[:2]))
    assert not target[: len(prefix)].any() and target[len(prefix)]
    assert (labels[target] == ids[target]).all()


def test_chat_roles_must_alternate(chat_processor, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                            {"role": "user", "content": "again"}]}) + "\n")
    with pytest.raises(DataError, match=rf"{bad}:1: .*alternate"):
        load_jsonl(bad, chat_processor, 2048, verbose=False)


def test_pair_and_text_labels(chat_processor, shapes_data):
    p = chat_processor
    ds = load_jsonl(shapes_data["pairs"], p, 2048, verbose=False)
    ex = ds[0]
    n_img = p.num_image_tokens
    assert ex.kind == "pair" and len(ex.images) == 1 and Path(ex.images[0]).is_file()
    assert ex.ids[0] == p.tokenizer.bos_token_id and (ex.ids[1 : 1 + n_img] == p.image_token_id).all()
    target = ex.labels != IGNORE
    assert not target[: 1 + n_img].any() and target[1 + n_img :].all()  # the text and the EOS
    text = json.loads(Path(shapes_data["pairs"]).read_text().splitlines()[0])["text"]
    assert p.tokenizer.decode(ex.ids[target].tolist()) == text + EOS_TEXT
    ids, labels = tokenize_text(p, "Just words.")
    assert labels[0] == IGNORE and (labels[1:] == ids[1:]).all() and ids[-1] == p.tokenizer.eos_token_id


def test_collate_points_each_target_at_the_previous_position(chat_processor, shapes_data):
    ds = load_jsonl(shapes_data["chat"], chat_processor, 2048, verbose=False)
    b = collate([ds[0], ds[1]], chat_processor.pad_id, pad_to=32, label_pad_to=16)
    B, T = b.input_ids.shape
    assert T % 32 == 0 and b.label_pos.shape[0] % 16 == 0
    n = b.n_targets
    assert n == ds[0].n_targets + ds[1].n_targets and b.label_w[:n].all() and not b.label_w[n:].any()
    flat = b.input_ids.reshape(-1)
    assert (flat[b.label_pos[:n] + 1] == b.label_ids[:n]).all()  # next token = target
    assert b.images == ds[0].images + ds[1].images


def test_truncation_never_cuts_inside_an_image(chat_processor, tmp_path):
    im = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(im)
    line = {"text": "Before. <image_placeholder> middle words <image_placeholder> after the second.",
            "images": ["a.png", "a.png"]}
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(line) + "\n")
    full = load_jsonl(f, chat_processor, 4096, verbose=False)[0]
    n = chat_processor.num_image_tokens
    starts = [i for i in range(full.length) if full.ids[i] == chat_processor.image_token_id
              and full.ids[i - 1] != chat_processor.image_token_id]
    cut_inside_second = starts[1] + n // 2
    ex = load_jsonl(f, chat_processor, cut_inside_second, verbose=False)[0]
    assert ex.length == starts[1] and len(ex.images) == 1  # cut before the split image
    assert (ex.ids == full.ids[: starts[1]]).all()
    assert (ex.labels == full.labels[: starts[1]]).all()
    cut_inside_first = starts[0] + 3
    ex = load_jsonl(f, chat_processor, cut_inside_first, verbose=False)[0]
    assert ex.length == starts[0] and ex.images == []


def test_long_examples_skip_policy_and_warning(chat_processor, shapes_data, tmp_path, capsys):
    lines = Path(shapes_data["chat"]).read_text().splitlines()
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    f = tmp_path / "mix.jsonl"
    f.write_text(lines[0].replace('"images/', f'"{Path(shapes_data["chat"]).parent}/images/') + "\n"
                 + json.dumps(short) + "\n")
    ds = load_jsonl(f, chat_processor, 100, long_policy="skip")
    assert len(ds) == 1 and ds[0].kind == "chat" and not ds[0].images
    assert "skipped 1 example(s) longer than `max_seq_len` 100" in capsys.readouterr().err
    ds = load_jsonl(f, chat_processor, 100, long_policy="truncate")
    # Truncated before the image, the image example has no answer left: skipped as too long.
    assert len(ds) == 1 and not ds.stats.skipped_empty and not ds.stats.truncated
    assert ds.stats.skipped_long == [f"{f}:1 needs {len(load_jsonl(f, chat_processor, 2048)[0].ids)} tokens, "
                                     f"1 image of 576 tokens"]
    assert "skipped 1 example(s) longer than `max_seq_len` 100" in capsys.readouterr().err


# -- data: bad input ---------------------------------------------------------------------------


def test_malformed_line_names_file_and_line(chat_processor, shapes_data, tmp_path):
    lines = Path(shapes_data["pairs"]).read_text().splitlines()
    base = Path(shapes_data["pairs"]).parent
    f = base / "broken.jsonl"
    f.write_text(lines[0] + "\n" + lines[1] + "\n" + '{"image": "x.png", "text": \n' + lines[2] + "\n")
    with pytest.raises(DataError, match=rf"^{f}:3: malformed JSON"):
        load_jsonl(f, chat_processor, 2048, verbose=False)
    ds = load_jsonl(f, chat_processor, 2048, skip_bad=True, verbose=False)
    assert len(ds) == 3 and len(ds.stats.skipped_bad) == 1


def test_missing_image_names_path_and_skip_bad_counts(chat_processor, shapes_data, tmp_path, capsys):
    base = Path(shapes_data["pairs"]).parent
    f = base / "missing.jsonl"
    lines = Path(shapes_data["pairs"]).read_text().splitlines()
    f.write_text(lines[0] + "\n" + json.dumps({"image": "images/nope.png", "text": "x"}) + "\n")
    with pytest.raises(DataError, match=r"missing\.jsonl:2: image not found: .*images/nope\.png"):
        load_jsonl(f, chat_processor, 2048, verbose=False)
    ds = load_jsonl(f, chat_processor, 2048, skip_bad=True)
    assert len(ds) == 1 and ds.stats.as_dict()["skipped_bad"] == 1
    assert "skipped 1 bad line(s)" in capsys.readouterr().err


def test_cli_reports_bad_input_with_exit_code(tiny_dir, shapes_data, tmp_path, capsys):
    base = Path(shapes_data["pairs"]).parent
    f = base / "bad_cli.jsonl"
    f.write_text('{"text": "ok"}\n{oops}\n')
    rc = train_main(["--stage", "1", "--model", str(tiny_dir), "--data", str(f), "--out",
                     str(tmp_path / "o"), "--iters", "1", "--quiet"])
    assert rc == 1
    assert f"{f}:2: malformed JSON" in capsys.readouterr().err
    rc = train_main(["--stage", "1", "--model", str(tiny_dir), "--out", str(tmp_path / "o")])
    assert rc == 2 and "--data" in capsys.readouterr().err


def test_cli_device_choice(tiny_dir, shapes_data, tmp_path, capsys):
    import mlx.core as mx

    from mlx_dsvl.device import gpu_available

    before = mx.default_device()
    try:
        args = ["--stage", "1", "--model", str(tiny_dir / "missing"), "--data", str(shapes_data["pairs"]),
                "--out", str(tmp_path / "o"), "--quiet"]
        assert train_main(args + ["--device", "cpu"]) == 1  # runs on the CPU, then the model is missing
        assert mx.default_device() == mx.cpu
        assert "missing" in capsys.readouterr().err
        rc = train_main(args + ["--device", "gpu"])
        err = capsys.readouterr().err
        assert rc == 1
        assert ("missing" in err) if gpu_available() else ("no GPU available to MLX" in err)
    finally:
        mx.set_default_device(before)


def test_help_documents_every_option_with_default(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--stage", "--model", "--data", "--val-data", "--out", "--iters", "--epochs",
                "--batch-size", "--lr", "--max-seq-len", "--train", "--method", "--text-data",
                "--text-ratio", "--modality-warmup", "--grad-checkpoint", "--grad-accum",
                "--cache-vision-features", "--seed", "--save-every", "--resume", "--skip-bad", "--device"):
        assert opt in out
    assert out.count("default") >= 20


# -- stages: exactly the intended parameters change ---------------------------------------------


def _changed_after_one_step(model_dir, data, out, **kw):
    model, proc = mlx_dsvl.load(model_dir)
    before = snapshot(model)
    train(cfg(model=str(model_dir), data=str(data), out=str(out), iters=1, weight_decay=0.01, lr=1e-3, **kw),
          loaded=(model, proc))
    after = snapshot(model)
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    changed, unchanged = set(), set()
    for k, v in after.items():
        base_key = k.replace(".linear.", ".")
        if k in before or base_key in before:
            old = before[k] if k in before else before[base_key]
            (changed if not np.array_equal(old, v) else unchanged).add(k)
        else:  # a new adapter tensor: it changed if it is not at its initial value any more
            changed.add(k)
    return model, trainable, changed, unchanged


@pytest.mark.parametrize("stage,method,expect", [
    (1, "lora", lambda k: k.startswith("aligner.")),
    (2, "full", lambda k: k.startswith(("aligner.", "language_model."))),
    (2, "lora", lambda k: k.startswith("aligner.") or k.endswith((".lora_a", ".lora_b"))),
    (3, "dora", lambda k: k.startswith("aligner.") or k.endswith((".lora_a", ".lora_b", ".m"))),
])
def test_one_step_changes_exactly_the_stage_parameters(tiny_dir, shapes_data, tmp_path, stage, method, expect):
    data = shapes_data["pairs"] if stage < 3 else shapes_data["chat"]
    model, trainable, changed, unchanged = _changed_after_one_step(
        tiny_dir, data, tmp_path, stage=stage, method=method)
    assert trainable and all(expect(k) for k in trainable)
    assert changed == trainable  # every trained tensor moved, nothing else did
    if stage == 3:
        assert any(".vision_tower.blocks." in k for k in trainable)  # SigLIP adapters
        assert any("language_model.model.layers." in k for k in trainable)
    if stage == 1:
        assert not any(k.startswith(("language_model.", "vision_model.")) for k in changed)


@pytest.mark.parametrize("method,train_set", [("full", "aligner,llm,sam,siglip"), ("lora", None)])
def test_parameter_counts_are_of_one_model(tiny_hybrid_dir, method, train_set):
    """Trainable and total count the same model (adapter factors and tensors held by non-leaf
    modules, like the towers' position embeddings, in both): the trainable part never exceeds it."""
    from mlx_dsvl.train.report import start_line
    from mlx_dsvl.train.stages import TrainSpec, count_parameters, parse_components, setup_trainable

    model, _ = mlx_dsvl.load(tiny_hybrid_dir)
    base = sum(v.size for _, v in tree_flatten(model.parameters()))
    if method == "lora":  # QLoRA: the quantized LLM counts as many parameters as before
        nn.quantize(model.language_model, group_size=32, bits=4)
    comps = parse_components(3, train_set, True)
    setup_trainable(model, TrainSpec(stage=3, components=comps, method=method, rank=4, scale=20.0, dropout=0.0,
                                     targets=("attn", "mlp"), llm_layers=None))
    trained = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    factors = sum(v.size for k, v in tree_flatten(model.parameters()) if k.endswith((".lora_a", ".lora_b")))
    every = base + factors
    assert count_parameters(model) == (trained, every)
    if method == "full":
        assert trained == every  # everything trains
    line = start_line(cfg(stage=3, iters=1, lr=1e-3, vision_lr=1e-4), components=comps, frozen_vision=False,
                      n_train=trained, n_total=every, n_main=4, n_text=None, resume=None, start_step=0)
    m = re.search(r"-- ([\d.]+)M trainable of ([\d.]+)M parameters", line)
    assert m and float(m.group(1)) <= float(m.group(2)), line
    assert (m.group(1) == m.group(2)) == (method == "full"), line


@pytest.mark.slow
def test_hybrid_stage3_keeps_sam_frozen_and_sam_neck_override(tiny_hybrid_dir, tmp_path):
    data = write_shapes_dataset(tmp_path / "d", 4, seed=1, size=256)
    _, trainable, changed, _ = _changed_after_one_step(tiny_hybrid_dir, data["chat"], tmp_path / "a", stage=3)
    assert changed == trainable
    assert any("vision_tower_low" in k for k in trainable)
    assert not any("vision_tower_high" in k for k in trainable)  # SAM-B frozen
    _, trainable, changed, _ = _changed_after_one_step(
        tiny_hybrid_dir, data["pairs"], tmp_path / "b", stage=1, train="aligner,sam-neck")
    assert changed == trainable
    high = {k for k in trainable if "vision_tower_high" in k}
    assert high and all(any(p in k for p in (".neck.", ".neck_hd.", ".downsamples.", "hd_alpha"))
                        for k in high)


def test_stage_errors(tiny_dir, shapes_data, tmp_path):
    with pytest.raises(StageError, match="no SAM-B tower"):
        train(cfg(stage=1, model=str(tiny_dir), data=str(shapes_data["pairs"]), out=str(tmp_path / "a"),
                  iters=1, train="aligner,sam-neck"))
    with pytest.raises(StageError, match="unknown component"):
        train(cfg(stage=1, model=str(tiny_dir), data=str(shapes_data["pairs"]), out=str(tmp_path / "a"),
                  iters=1, train="aligner,vision"))
    with pytest.raises(StageError, match="frozen vision"):
        train(cfg(stage=3, model=str(tiny_dir), data=str(shapes_data["chat"]), out=str(tmp_path / "a"),
                  iters=1, cache_vision_features=True))


# -- resume ------------------------------------------------------------------------------------


def _losses(history, lo, hi):
    return [r["loss"] for r in history if r.get("type") == "train" and lo <= r["step"] <= hi]


@pytest.mark.slow
def test_resume_is_exact(tiny_dir, shapes_data, tmp_path):
    common = dict(stage=3, model=str(tiny_dir), data=str(shapes_data["chat"]), iters=20,
                  lora_dropout=0.1, lr=5e-4, warmup=3, batch_size=3, save_every=10)
    straight = train(cfg(out=str(tmp_path / "straight"), **common))
    ck10 = tmp_path / "straight" / "checkpoints" / "step-0000010"
    assert (ck10 / "state.json").is_file() and (ck10 / "adapters.safetensors").is_file()
    resumed = train(cfg(out=str(tmp_path / "resumed"), resume=str(ck10), **common),
                    explicit=["out", "resume"])
    a, b = _losses(straight.history, 11, 20), _losses(resumed.history, 11, 20)
    assert len(a) == len(b) == 10
    assert a == b  # bit-identical: weights, optimizer, RNG (dropout) and data order restored
    assert _losses(resumed.history, 1, 10) == _losses(straight.history, 1, 10)
    wa = mx.load(str(tmp_path / "straight" / "adapters.safetensors"))
    wb = mx.load(str(tmp_path / "resumed" / "adapters.safetensors"))
    assert all(np.array_equal(np.array(wa[k]), np.array(wb[k])) for k in wa)
    # A run folder resumes from its latest checkpoint; the lines after it are replayed exactly.
    again = train(cfg(out=str(tmp_path / "straight"), resume=str(tmp_path / "straight"), **{**common, "iters": 20}),
                  explicit=["out", "resume"])
    assert again.steps == 20  # already finished: nothing to do


def test_resume_refuses_another_model_or_setup(tiny_dir, tiny_hybrid_dir, shapes_data, tmp_path):
    from mlx_dsvl.random_checkpoint import make_checkpoint

    out = tmp_path / "run"
    train(cfg(stage=1, model=str(tiny_dir), data=str(shapes_data["pairs"]), out=str(out), iters=2))
    with pytest.raises(ResumeError, match="another model architecture"):
        train(cfg(model=str(tiny_hybrid_dir), out=str(tmp_path / "r1"), resume=str(out)),
              explicit=["model", "out", "resume"])
    other = make_checkpoint("tiny", tmp_path / "other-tiny", seed=7)
    with pytest.raises(ResumeError, match="other base weights"):
        train(cfg(model=str(other), out=str(tmp_path / "r2"), resume=str(out)),
              explicit=["model", "out", "resume"])
    with pytest.raises(ResumeError, match="`stage` 2 differs"):
        train(cfg(stage=2, out=str(tmp_path / "r3"), resume=str(out)), explicit=["stage", "out", "resume"])
    with pytest.raises(ResumeError, match="not a training checkpoint"):
        train(cfg(out=str(tmp_path / "r4"), resume=str(tmp_path)), explicit=["out", "resume"])


# -- stage 2: modality mixing ------------------------------------------------------------------


def test_mixer_share_follows_the_warmup_schedule():
    mixer = ModalityMixer(ratio=0.3, warmup=400, seed=5)
    assert mixer.share(0) == 1.0 and mixer.share(200) == pytest.approx(0.65) and mixer.share(400) == 0.3
    assert mixer.share(10_000) == 0.3
    steps = np.arange(1200)
    draws = np.array([mixer.is_text(int(s)) for s in steps])
    for lo in range(0, 1200, 200):  # windowed observed share vs scheduled share
        window = steps[lo : lo + 200]
        expected = np.mean([mixer.share(int(s)) for s in window])
        observed = draws[lo : lo + 200].mean()
        sd = math.sqrt(max(expected * (1 - expected), 1e-3) / 200)
        assert abs(observed - expected) < 4 * sd + 1e-9, (lo, observed, expected)
    assert draws[:20].mean() > 0.9 and draws[800:].mean() < 0.45


@pytest.mark.slow
def test_stage2_logs_text_share_and_separate_losses(tiny_dir, shapes_data, text_data, tmp_path):
    res = train(cfg(stage=2, model=str(tiny_dir), data=str(shapes_data["pairs"]), out=str(tmp_path / "s2"),
                    text_data=str(text_data), val_data=str(shapes_data["pairs"]),
                    val_text_data=str(text_data), text_ratio=0.25, modality_warmup=12, iters=24,
                    batch_size=1, val_batches=2, val_every=0))
    mixer = ModalityMixer(0.25, 12, 0)
    train_recs = [r for r in res.history if r["type"] == "train"]
    # The logged modality of every step is the mixer's draw for that step.
    assert [r["text_batches"] for r in train_recs] == [int(mixer.is_text(s)) for s in range(24)]
    assert [r["text_share_scheduled"] for r in train_recs] == [mixer.share(s) for s in range(24)]
    assert all(("loss_text" in r) == bool(r["text_batches"]) for r in train_recs)
    assert all(("loss_mm" in r) == (not r["text_batches"]) for r in train_recs)
    val = [r for r in res.history if r["type"] == "val"]
    assert len(val) == 1 and math.isfinite(val[0]["val_loss_mm"]) and math.isfinite(val[0]["val_loss_text"])


# -- outputs -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_outputs_metrics_png_checkpoints_and_cache(tiny_dir, shapes_data, tmp_path):
    out = tmp_path / "s1"
    res = train(TrainConfig(stage=1, model=str(tiny_dir), data=str(shapes_data["pairs"]), out=str(out),
                            epochs=2, batch_size=4, steps_per_report=2, save_every=3, keep_checkpoints=2,
                            cache_vision_features=True, quiet=True))
    assert res.steps == 6  # 12 examples / 4 = 3 batches per epoch
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [2, 4, 6]
    for k in ("loss", "tokens_per_s", "lr", "peak_memory_gb", "grad_norm"):
        assert all(isinstance(r[k], float) and math.isfinite(r[k]) for r in recs)
    with Image.open(out / "loss.png") as im:
        assert im.format == "PNG" and im.size[0] > 100
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["step-0000003", "step-0000006"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-0000006"
    assert not list((out / "checkpoints").glob(".step-*"))  # no temporary leftovers
    cache_files = list((out / "vision_cache").rglob("*.safetensors"))
    assert len(cache_files) == 12  # each image encoded once, reused in epoch 2
    # The cached run computes the same losses as an uncached one.
    res2 = train(TrainConfig(stage=1, model=str(tiny_dir), data=str(shapes_data["pairs"]),
                             out=str(tmp_path / "nocache"), epochs=2, batch_size=4, steps_per_report=2,
                             save_every=0, quiet=True, plot=False))
    np.testing.assert_allclose(_losses(res.history, 1, 6), _losses(res2.history, 1, 6), rtol=1e-5)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_dir, shapes_data, tmp_path, capsys):
    out = tmp_path / "nan"
    args = ["--stage", "2", "--method", "full", "--model", str(tiny_dir), "--data", str(shapes_data["pairs"]),
            "--out", str(out), "--iters", "6", "--batch-size", "2", "--save-every", "1", "--lr", "1e30",
            "--warmup", "0", "--max-grad-norm", "0", "--quiet", "--no-plot"]
    rc = train_main(args)
    err = capsys.readouterr().err
    assert rc == 3, err
    saved = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert saved, err
    assert re.search(r"loss became (nan|inf|-inf) at step \d+", err), err
    assert f"training stopped without saving; the last good checkpoint is kept: " \
           f"{out / 'checkpoints' / saved[-1]}" in err
    assert (out / "checkpoints" / "latest").read_text().strip() == saved[-1]
    for p in (out / "checkpoints").iterdir():
        if p.is_dir():
            w = mx.load(str(p / "adapters.safetensors"))
            assert all(bool(mx.all(mx.isfinite(v)).item()) for v in w.values())
    assert not (out / "adapters.safetensors").exists()  # no final save of a broken model


@pytest.mark.slow
def test_grad_accum_and_checkpointing_match_plain_steps(tiny_dir, shapes_data, tmp_path):
    four = Path(shapes_data["chat"]).parent / "four.jsonl"
    four.write_text("".join(Path(shapes_data["chat"]).read_text().splitlines(True)[:4]))
    common = dict(stage=3, model=str(tiny_dir), data=str(four), iters=2, lr=1e-3)
    whole = train(cfg(out=str(tmp_path / "w"), batch_size=4, **common))
    accum = train(cfg(out=str(tmp_path / "a"), batch_size=2, grad_accum=2, **common))
    ckpt = train(cfg(out=str(tmp_path / "c"), batch_size=4, grad_checkpoint=True, **common))
    # Step 1 sees all four examples: one batch, or two token-weighted accumulated halves; the
    # loss and the (pre-clipping) norm of the gradient that the optimizer gets are the same.
    # (Later steps are not compared: Adam's first update is ~sign(g), so float noise in
    # near-zero gradient entries legitimately changes them.)
    def first(res):
        r = next(r for r in res.history if r["step"] == 1)
        return r["loss"], r["grad_norm"]

    ref = first(whole)
    assert ref[1] > 0
    np.testing.assert_allclose(first(accum), ref, rtol=1e-4)
    np.testing.assert_allclose(first(ckpt), ref, rtol=1e-5)


def test_corrupt_image_found_while_batching(tiny_dir, shapes_data, tmp_path, capsys):
    base = Path(shapes_data["pairs"]).parent
    good = (base / "images" / "3-00000.png").read_bytes()
    (base / "images" / "truncated.png").write_bytes(good[: len(good) // 2])  # header fine, data cut
    f = base / "corrupt.jsonl"
    lines = Path(shapes_data["pairs"]).read_text().splitlines()[:3]
    f.write_text("\n".join(lines + [json.dumps({"image": "images/truncated.png", "text": "broken"})]) + "\n")
    common = dict(stage=1, model=str(tiny_dir), data=str(f), iters=2, batch_size=4)
    with pytest.raises(DataError, match=r"corrupt\.jsonl:4: .*images/truncated\.png"):
        train(cfg(out=str(tmp_path / "a"), **common))
    res = train(cfg(out=str(tmp_path / "b"), skip_bad=True, **common))
    assert res.steps == 2 and sum(r.get("skipped_examples", 0) for r in res.history) == 2  # once per epoch
    assert "skipped an example with a bad image" in capsys.readouterr().err
