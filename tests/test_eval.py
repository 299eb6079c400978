"""python -m mlx_dsvl.eval: readers, answer extraction, metrics, likelihood arithmetic, CLI, resume.

The option log-likelihoods (one batched prompt pass + one pass over every option on copies of the
prompt's cache rows) are checked against transformers' DeepseekVL on the same random weights,
each option scored as one plain full sequence.  The learning test is tests/test_eval_learns.py.
"""

from __future__ import annotations

import base64
import csv
import io
import json

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from mlx_dsvl.eval import answers, metrics
from mlx_dsvl.eval.__main__ import main
from mlx_dsvl.eval.items import EvalDataError, Item, circular, first_groups, prompt_text, select
from mlx_dsvl.eval.readers import read


def png(color, size=32) -> Image.Image:
    return Image.new("RGB", (size, size), color)


def b64png(color) -> str:
    buf = io.BytesIO()
    png(color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


TSV_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category",
              "image", "source", "split", "comment"]


def write_tsv(path, rows, header=TSV_HEADER):
    """As pandas' ``to_csv(sep="\\t")`` writes OpenCompass's files: minimal quoting, NaN empty."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        w.writerow(header)
        for r in rows:
            w.writerow(["" if r.get(h) is None else r[h] for h in header])


def mmbench_rows():
    """Two questions (one with only A/B, one with a 'nan' hint and a two-line question), and
    the circular copies the dev files ship (index k * 10**6 + i, image by reference)."""
    q0 = {"index": 0, "question": "What colour is it?", "hint": None, "A": "red", "B": "green",
          "C": "blue", "D": "yellow", "answer": "C", "category": "colour", "l2-category": "perception",
          "image": b64png("blue"), "source": "synthetic", "split": "dev"}
    q1 = {"index": 1, "question": "Is it bright?\nLook closely.", "hint": "nan", "A": "yes",
          "B": "no", "C": None, "D": "nan", "answer": "A", "category": "light",
          "l2-category": "perception", "image": b64png("white"), "split": "dev"}
    rot = [{**q0, "index": 1_000_000 + 0, "A": "green", "B": "blue", "C": "yellow", "D": "red",
            "answer": "B", "image": "0"},
           {**q1, "index": 1_000_000 + 1, "A": "no", "B": "yes", "answer": "B", "image": "1"}]
    return [q0, q1] + rot


# -- readers ----------------------------------------------------------------------------------


def test_mmbench_tsv_in_the_published_format(tmp_path):
    path = tmp_path / "MMBench_DEV_EN.tsv"
    write_tsv(path, mmbench_rows())
    res = read(path)
    assert res.rows == 4 and not res.skipped
    by_id = {it.id: it for it in res.items}
    q0, q1 = by_id["0"], by_id["1"]
    assert q0.choices == ["red", "green", "blue", "yellow"] and q0.answer_letter == "C"
    assert q0.hint is None and q0.category == "colour" and q0.l2_category == "perception"
    assert q1.choices == ["yes", "no"] and q1.hint is None  # C empty, D "nan": two options
    assert q1.question == "Is it bright?\nLook closely."  # a quoted multi-line cell
    r0 = by_id["1000000"]
    assert (r0.group, r0.rotation, r0.answer_letter) == ("0", 1, "B")
    # the copy's image is the referenced row's image
    assert r0.image_keys == q0.image_keys
    assert np.array_equal(np.array(Image.open(io.BytesIO(r0.images[0]()))), np.array(png("blue")))
    assert "Hint" not in prompt_text(q1)

    plain, left_out = select(res.items, use_circular=False)
    assert [it.id for it in plain] == ["0", "1"] and left_out == 2
    rotated, _ = select(res.items, use_circular=True)  # the shipped copies, not new ones
    assert [(it.group, it.rotation) for it in rotated] == [("0", 0), ("0", 1), ("1", 0), ("1", 1)]


def test_mmbench_tsv_written_by_pandas(tmp_path):
    pd = pytest.importorskip("pandas", reason="pandas writes the published files (pip install pandas)")
    path = tmp_path / "mmb.tsv"
    pd.DataFrame(mmbench_rows()).to_csv(path, sep="\t", index=False)  # None -> empty cell
    res = read(path)
    assert [it.id for it in res.items] == ["0", "1", "1000000", "1000001"]
    assert res.items[1].choices == ["yes", "no"] and res.items[1].question.endswith("Look closely.")


def test_mmbench_bad_rows_name_file_and_line(tmp_path):
    rows = mmbench_rows()
    rows[1] = {**rows[1], "answer": "D"}  # only A/B exist
    rows.append({**rows[0], "index": 7, "image": base64.b64encode(b"not an image" * 10).decode()})
    path = tmp_path / "bad.tsv"
    write_tsv(path, rows)
    with pytest.raises(EvalDataError, match=r"bad\.tsv:3: answer 'D' is not one of the options' letters A, B"):
        read(path)
    res = read(path, skip_bad=True)
    assert [it.id for it in res.items] == ["0", "1000000", "1000001"]
    assert len(res.skipped) == 2
    assert any("bad.tsv:8:" in m and "not a recognised image" in m for m in res.skipped)
    # a rotation whose question was skipped is not scored alone
    assert [it.id for it in select(res.items, use_circular=True)[0]] == ["0", "1000000"]


def test_tsv_without_answers_is_refused(tmp_path):
    path = tmp_path / "test.tsv"
    write_tsv(path, [{"index": 0, "question": "q", "A": "a", "B": "b", "image": b64png("red")}],
              header=[h for h in TSV_HEADER if h != "answer"])
    with pytest.raises(EvalDataError, match="no 'answer' column"):
        read(path)


def test_jsonl_and_csv_readers(tmp_path):
    png("red").save(tmp_path / "r.png")
    lines = [
        {"images": ["r.png"], "question": "Colour?", "choices": ["red", "blue"], "answer": "red",
         "category": "c"},
        {"question": "Capital of France?", "answer": ["Paris", "paris, france"], "id": "q2"},
        {"question": "2+2?", "A": "3", "B": "4", "answer": 1, "subject": "math"},
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    items = read(tmp_path / "d.jsonl").items
    assert items[0].answer == 0 and items[0].image_keys == [str(tmp_path / "r.png")]
    assert items[1].id == "q2" and items[1].answers == ["Paris", "paris, france"] and not items[1].is_mc
    assert items[2].choices == ["3", "4"] and items[2].answer == 1 and items[2].category == "math"

    # MMLU's own files: no header, question, A-D, answer; the category is the file name
    mmlu = tmp_path / "mmlu"
    mmlu.mkdir()
    with open(mmlu / "anatomy_test.csv", "w", newline="") as f:
        csv.writer(f).writerows([["Which is a bone?", "femur", "liver", "heart", "lung", "A"],
                                 ["A question, with a comma", "1", "2", "3", "4", "D"]])
    with open(mmlu / "astronomy_test.csv", "w", newline="") as f:
        csv.writer(f).writerows([["question", "A", "B", "C", "D", "answer"],
                                 ["Sun?", "star", "planet", "moon", "comet", "A"]])
    items = read(mmlu).items
    assert [it.id for it in items] == ["anatomy_test/1", "anatomy_test/2", "astronomy_test/2"]
    assert [it.category for it in items] == ["anatomy", "anatomy", "astronomy"]
    assert items[1].question == "A question, with a comma" and items[1].answer_letter == "D"


@pytest.mark.parametrize("line, expected", [
    ("{not json", r"d\.jsonl:2: malformed JSON"),
    ('{"question": "q", "choices": ["a", "b"]}', r"d\.jsonl:2: missing 'answer'"),
    ('{"question": "q", "choices": ["a", "b"], "answer": "C"}', r"d\.jsonl:2: answer 'C' is none of the options"),
    ('{"question": "q", "images": ["gone.png"], "answer": "x"}', r"d\.jsonl:2: image file not found: .*gone\.png"),
    ('{"question": "", "answer": "x"}', r"d\.jsonl:2: missing or empty 'question'"),
])
def test_jsonl_bad_rows(tmp_path, line, expected):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "ok", "answer": "x"}\n' + line + "\n")
    with pytest.raises(EvalDataError, match=expected):
        read(path)
    res = read(path, skip_bad=True)
    assert len(res.items) == 1 and len(res.skipped) == 1


def test_circular_rotations_and_limit():
    items = [Item(id="q", question="?", choices=["w", "x", "y"], answer=2),
             Item(id="s", question="?", answers=["a"])]
    rot = circular(items)
    assert [(it.id, it.choices, it.answer_letter) for it in rot[:3]] == [
        ("q", ["w", "x", "y"], "C"), ("q@1", ["x", "y", "w"], "B"), ("q@2", ["y", "w", "x"], "A")]
    assert rot[3].id == "s" and len(rot) == 4
    assert [it.id for it in first_groups(rot, 1)] == ["q", "q@1", "q@2"]


# -- answers and metrics ----------------------------------------------------------------------


@pytest.mark.parametrize("reply, expected", [
    ("B", 1), ("(C)", 2), ("D.", 3), ("B. green", 1), ("The answer is C.", 2), ("Answer: A", 0),
    ("green", 1), ("It is dark red.", 3), ("A red circle", 0), ("A", 0), ("I think D", 3),
    ("", None), ("no idea", None), ("Apple", None), ("red or green", None),
])
def test_extract_choice(reply, expected):
    assert answers.extract_choice(reply, ["red", "green", "blue", "dark red"]) == expected


def test_short_answer_scores():
    assert answers.exact_match("The Eiffel Tower!", ["eiffel tower"])
    assert not answers.exact_match("tower", ["eiffel tower"])
    assert answers.levenshtein("kitten", "sitting") == 3
    # DocVQA's ANLS: 1 - NL under the 0.5 threshold, else 0; best over the answers
    assert answers.anls("helo", ["hello"]) == pytest.approx(0.8)
    assert answers.anls("abc", ["xyz"]) == 0.0
    assert answers.anls(" Hello  World ", ["nothing", "hello world"]) == 1.0


def test_wilson_interval_and_circular_summary():
    lo, hi = metrics.wilson(8, 10)  # the textbook example: (0.490, 0.943)
    assert (round(lo, 3), round(hi, 3)) == (0.49, 0.943)
    recs = [{"id": "a", "group": "a", "rotation": 0, "correct": True, "category": "x", "type": "mc"},
            {"id": "a@1", "group": "a", "rotation": 1, "correct": False, "category": "x", "type": "mc"},
            {"id": "b", "group": "b", "rotation": 0, "correct": True, "category": "y", "type": "mc"},
            {"id": "b@1", "group": "b", "rotation": 1, "correct": True, "category": "y", "type": "mc"},
            {"id": "c", "group": "c", "rotation": 0, "skipped": "bad image", "type": "mc"}]
    s = metrics.summarize(recs, circular=True)
    assert (s["items"], s["correct"], s["skipped"], s["accuracy_first_rotation"]) == (2, 1, 1, 1.0)
    assert s["categories"]["x"]["accuracy"] == 0.0 and s["categories"]["y"]["accuracy"] == 1.0
    assert metrics.summarize(recs[:4])["items"] == 4


# -- likelihood arithmetic against transformers ----------------------------------------------


@pytest.mark.slow
def test_option_logprobs_match_transformers(tiny_dir, tiny_model):
    """Batched scoring (left padding, shared prompt cache, images shared, multi-token replies)
    == each option as one plain sequence through transformers' DeepseekVL in float32."""
    torch = pytest.importorskip("torch", reason="the reference needs torch (pip install torch)")
    from mlx_dsvl.eval import likelihood
    from mlx_dsvl.testing import hf_reference as ref

    model, processor = tiny_model
    pics = {"p": png((200, 30, 30), 60), "q": png((20, 20, 220), 90)}
    items = [
        Item(id="1", question="Which colour?", choices=["red", "blue and green", "yellow"], answer=0,
             hint="Look at the middle.", images=[lambda: pics["p"]], image_keys=["p"]),
        Item(id="2", question="Two pictures: same?", choices=["yes", "no"], answer=1,
             images=[lambda: pics["q"], lambda: pics["p"]], image_keys=["q", "p"]),
        Item(id="3", question="A text-only question with a longer prompt, to pad the others",
             choices=["one", "two", "three", "four"], answer=3),
    ]
    encode_rows = []
    real_encode = model.encode_images
    model.encode_images = lambda px: (encode_rows.append(px.shape[0]), real_encode(px))[1]
    try:
        enc = [likelihood.encode(processor, it, "text") for it in items]
        ours = likelihood.option_logprobs(model, processor, enc,
                                          likelihood.image_embeddings(model, processor, items, pics))
    finally:
        model.encode_images = real_encode
    assert encode_rows == [2]  # two distinct images in the batch, each encoded once
    assert max(len(o) for e in enc for o in e.options) > 1  # the second pass ran

    hf = ref.build_hf_model(tiny_dir)
    for it, e, got in zip(items, enc, ours):
        # one reference batch per item: its options as full sequences, right-padded (causal
        # attention: the padding comes after every position read)
        L, n = max(len(c) for c in e.options), len(e.options)
        ids = np.zeros((n, len(e.ids) + L), dtype=np.int64)
        mask = np.zeros_like(ids)
        for j, cont in enumerate(e.options):
            ids[j, : len(e.ids) + len(cont)] = np.concatenate([e.ids, cont])
            mask[j, : len(e.ids) + len(cont)] = 1
        kw = {}
        if it.images:
            px = np.concatenate([processor.image_processor([pics[k] for k in it.image_keys])] * n)
            kw = ref.reference_inputs(torch.from_numpy(px), tiny_dir)
        with torch.no_grad():  # logits at positions P-1 .. P+L-1
            logits = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                        logits_to_keep=L + 1, **kw).logits
        lp = torch.log_softmax(logits.double(), -1)
        for j, cont in enumerate(e.options):
            want = float(lp[j, torch.arange(len(cont)), torch.from_numpy(cont.astype(np.int64))].sum())
            assert got[j] == pytest.approx(want, abs=2e-3, rel=1e-4), (it.id, j)


@pytest.mark.slow
def test_option_logprobs_letters_match_plain_forward(tiny_model):
    """Letter replies (the default): the batched path == one plain full-sequence MLX forward
    per option (no cache, no padding) in float32."""
    from mlx_dsvl.eval import likelihood

    model, processor = tiny_model
    pic = png((30, 160, 60), 70)
    items = [Item(id="a", question="Colour?", choices=["green", "light purple"], answer=0,
                  images=[lambda: pic], image_keys=["g"]),
             Item(id="b", question="A longer text-only question here?", choices=["x", "y z", "w"], answer=2)]
    enc = [likelihood.encode(processor, it, "letter") for it in items]
    ours = likelihood.option_logprobs(model, processor, enc,
                                      likelihood.image_embeddings(model, processor, items, {"g": pic}))
    for it, e, got in zip(items, enc, ours):
        px = mx.array(processor.image_processor([pic]))[None] if it.images else None
        for j, cont in enumerate(e.options):
            ids = mx.array(np.concatenate([e.ids, cont])[None])
            logits = model(ids, pixel_values=px)[0, len(e.ids) - 1: -1].astype(mx.float32)
            lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            want = float(mx.take_along_axis(lp, mx.array(cont)[:, None], axis=-1).sum())
            assert got[j] == pytest.approx(want, abs=1e-3, rel=1e-5), (it.id, j)


# -- the command line -------------------------------------------------------------------------


@pytest.fixture
def small_set(tmp_path):
    """Twelve questions: multiple choice with images, text only, and two short answers."""
    colours = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220)}
    for name, rgb in colours.items():
        png(rgb, 48).save(tmp_path / f"{name}.png")
    lines = []
    for i in range(10):
        name = list(colours)[i % 3]
        lines.append({"images": [f"{name}.png"], "question": "Which colour is the square?",
                      "choices": list(colours), "answer": name, "category": f"cat{i % 2}"})
    lines.append({"question": "Say yes.", "answer": ["yes"]})
    lines.append({"question": "Name a colour.", "answer": "red", "category": "cat0"})
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def read_predictions(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_cli_writes_predictions_summary_and_table(tiny_dir, small_set, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--model", str(tiny_dir), "--data", str(small_set), "--out", str(out),
                 "--batch-size", "4", "--device", "cpu", "--max-tokens", "4", "--quiet"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[1].split()[:2] == ["overall", "12"] and "cat1" in table
    preds = read_predictions(out / "predictions.jsonl")
    assert [p["id"] for p in preds] == [str(i) for i in range(1, 13)]
    mc = preds[0]
    assert mc["method"] == "likelihood" and len(mc["scores"]) == 3 and mc["answer"] == "A"
    assert mc["correct"] == (mc["prediction"] == "A") and "Options:\nA. red" in mc["prompt"]
    assert preds[-1]["method"] == "generate" and "anls" in preds[-1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["items"] == 12 and summary["method"] == "likelihood" and summary["model"] == str(tiny_dir)
    assert summary["correct"] == sum(p["correct"] for p in preds)
    lo, hi = summary["ci95"]
    assert lo <= summary["accuracy"] <= hi and summary["seconds"] > 0
    assert set(summary["categories"]) == {"cat0", "cat1"} and summary["short_answers"] == 2


@pytest.mark.slow
def test_cli_resumes_after_an_interruption(tiny_dir, small_set, tmp_path, monkeypatch):
    from mlx_dsvl.eval import runner

    args = ["--model", str(tiny_dir), "--data", str(small_set), "--batch-size", "3",
            "--method", "generate", "--max-tokens", "3", "--device", "cpu", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "whole")]) == 0
    whole = {p["id"]: p for p in read_predictions(tmp_path / "whole" / "predictions.jsonl")}

    real, calls = runner.score_batch, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(runner, "score_batch", interrupted)
    out = tmp_path / "resumed"
    assert main(args + ["--out", str(out)]) == 130
    assert len(read_predictions(out / "predictions.jsonl")) == 6 and not (out / "summary.json").exists()
    with open(out / "predictions.jsonl", "a") as f:
        f.write('{"id": "7", "predic')  # a line torn by the interruption
    monkeypatch.setattr(runner, "score_batch", real)
    assert main(args + ["--out", str(out)]) == 0
    resumed = read_predictions(out / "predictions.jsonl")
    assert sorted(p["id"] for p in resumed) == sorted(whole)  # each once, the torn line gone
    assert {p["id"]: p for p in resumed} == whole
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed"] == 6 and summary["items"] == 12
    assert summary["correct"] == json.loads((tmp_path / "whole" / "summary.json").read_text())["correct"]

    # another method into the same folder is refused, not mixed in
    assert main(args[:6] + ["--method", "likelihood", "--out", str(out), "--quiet"]) == 1


@pytest.mark.parametrize("extra, code, message", [
    (["--batch-size", "0"], 2, "error: --batch-size must be >= 1, got 0"),
    (["--method", "guess"], 2, "error: argument --method: invalid choice"),
    (["--data", "/nonexistent.tsv"], 2, "error: --data /nonexistent.tsv: no such file or folder"),
])
def test_cli_bad_arguments_are_one_error_line(small_set, capsys, extra, code, message):
    assert main_exit(["--data", str(small_set)] + extra) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message)


def test_cli_bad_row_names_file_and_line(tiny_dir, tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "ok", "answer": "x"}\n{"question": "q", "choices": ["a"], "answer": "A"}\n')
    assert main(["--model", str(tiny_dir), "--data", str(path), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {path}:2: 'choices' must be a list of 2 to 26 option texts"]


def main_exit(argv):
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_cli_mmbench_tsv_plain_and_circular(tiny_dir, tmp_path, capsys):
    path = tmp_path / "MMBench_DEV_EN.tsv"
    write_tsv(path, mmbench_rows())
    base = ["--model", str(tiny_dir), "--data", str(path), "--device", "cpu", "--quiet"]
    assert main(base + ["--out", str(tmp_path / "plain")]) == 0
    plain = json.loads((tmp_path / "plain" / "summary.json").read_text())
    assert (plain["items"], plain["rows"], plain["rotations_left_out"]) == (2, 2, 2)
    assert "2 shipped rotations not scored" in capsys.readouterr().out
    assert main(base + ["--out", str(tmp_path / "circ"), "--circular"]) == 0
    circ = json.loads((tmp_path / "circ" / "summary.json").read_text())
    rows = read_predictions(tmp_path / "circ" / "predictions.jsonl")
    assert (circ["items"], circ["rows"], circ["rotations_left_out"]) == (2, 4, 0)
    assert {(r["group"], r["rotation"]) for r in rows} == {("0", 0), ("0", 1), ("1", 0), ("1", 1)}
    by_group = {g: all(r["correct"] for r in rows if r["group"] == g) for g in ("0", "1")}
    assert circ["correct"] == sum(by_group.values())
    assert set(circ["l2_categories"]) == {"perception"} and set(circ["categories"]) == {"colour", "light"}


def test_undecodable_image_at_scoring_time(tiny_model):
    """An image that fails when its batch is built: a row error, or skipped and counted."""
    from mlx_dsvl.eval import evaluate

    model, processor = tiny_model
    broken = Item(id="b", question="?", choices=["x", "y"], answer=0, images=[lambda: b"\x89PNG junk"],
                  image_keys=["junk"], source="set.jsonl:7")
    items = [Item(id="t", question="2+2?", choices=["4", "5"], answer=0), broken]
    with pytest.raises(EvalDataError, match=r"set\.jsonl:7: .*image"):
        evaluate(model, processor, items)
    rows = []
    s = evaluate(model, processor, items, skip_bad=True, on_records=rows.extend)
    assert (s["items"], s["skipped"]) == (1, 1) and "skipped" in rows[1] and "scores" in rows[0]


def test_progress_lines_without_a_terminal():
    from mlx_dsvl.eval.report import Progress

    buf = io.StringIO()
    p = Progress(20, stream=buf)
    for done in range(1, 21):
        p(done, done // 2, done)
    lines = buf.getvalue().splitlines()
    assert 5 <= len(lines) <= 11 and lines[-1].startswith("20/20 acc 50.0%")


# -- hardening: stale runs, option checks, labels, encodings ---------------------------------


def letter_set(path, answers):
    """Text-only multiple choice, one question per answer letter (A-C)."""
    lines = [{"question": f"Which number is {i}?", "choices": [str(i), str(i + 1), str(i + 2)],
              "answer": a, "id": f"q{i}"} for i, a in enumerate(answers)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_cli_same_size_edit_of_the_data_is_not_resumed(tiny_dir, tmp_path, capsys):
    """Every answer letter changed in place (the file keeps its size): the rerun is refused, not
    answered with the old accuracy; --overwrite scores the new answers."""
    path = letter_set(tmp_path / "d.jsonl", "ABCABC")
    out = tmp_path / "run"
    args = ["--model", str(tiny_dir), "--data", str(path), "--out", str(out), "--device", "cpu", "--quiet"]
    assert main(args) == 0
    size = path.stat().st_size
    letter_set(path, "BCABCA")  # every answer moved to the next letter
    assert path.stat().st_size == size
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {out} holds the results of another run (--data ")
    assert "content" in err[0] and "--overwrite" in err[0]
    assert main(args + ["--overwrite"]) == 0
    preds = read_predictions(out / "predictions.jsonl")
    assert [p["answer"] for p in preds] == list("BCABCA")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["correct"] == sum(p["prediction"] == a for p, a in zip(preds, "BCABCA"))


def test_cli_another_run_names_the_option_that_changed(tiny_dir, tmp_path, capsys):
    path = letter_set(tmp_path / "d.jsonl", "AB")
    out = tmp_path / "run"
    args = ["--model", str(tiny_dir), "--data", str(path), "--out", str(out), "--device", "cpu", "--quiet"]
    assert main(args + ["--method", "generate", "--max-tokens", "2"]) == 0
    capsys.readouterr()
    assert main(args) == 1  # likelihood now: --method changed (not max_tokens, not target)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"error: {out} holds the results of another run "
                             "(--method: 'generate', now 'likelihood'")
    assert err[0].endswith("use another --out, or --overwrite to replace them")


def test_run_settings_follow_content_not_names(tmp_path, monkeypatch):
    """The adapters' and the data's bytes identify a run; the model's folder however it is named."""
    from mlx_dsvl.eval.__main__ import build_parser, run_settings

    (tmp_path / "m").mkdir()
    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "adapter_config.json").write_text('{"rank": 8}')
    (ad / "adapters.safetensors").write_bytes(b"\x00" * 64)
    data = letter_set(tmp_path / "d.jsonl", "AB")
    monkeypatch.chdir(tmp_path)

    def settings(model):
        args = build_parser().parse_args(["--model", model, "--adapter", "ad", "--data", "d.jsonl"])
        return run_settings(args, "float32", generates=False)

    first = settings("m")
    assert settings(str(tmp_path / "m")) == first
    (ad / "adapters.safetensors").write_bytes(b"\x01" * 64)  # trained further, same size
    assert settings("m") != first
    again = settings("m")
    letter_set(data, "BA")
    assert settings("m") != again


@pytest.mark.parametrize("extra, message", [
    (["--method", "generate", "--target", "text"],
     "error: --target applies to --method likelihood only (--method generate reads the option "
     "out of the reply)"),
    (["--method", "generate", "--target", "letter"], "error: --target applies to --method likelihood only"),
])
def test_cli_target_with_generate_is_refused(small_set, tmp_path, capsys, extra, message):
    assert main_exit(["--data", str(small_set), "--out", str(tmp_path / "o")] + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message)


def test_summary_names_the_method_used(tiny_model):
    """Short answers are generated: a short-answer set's summary says so, a mixed one counts both."""
    from mlx_dsvl.eval import evaluate

    model, processor = tiny_model
    short = [Item(id="s1", question="Say yes.", answers=["yes"]),
             Item(id="s2", question="Hi?", answers=["hi"])]
    s = evaluate(model, processor, short, max_tokens=2)
    assert s["method"] == "generate" and s["methods"] == {"generate": 2} and "target" not in s
    mixed = [Item(id="m", question="2+2?", choices=["4", "5"], answer=0)] + short[:1]
    s = evaluate(model, processor, mixed, max_tokens=2)
    assert s["method"] == "likelihood" and s["target"] == "letter"
    assert s["methods"] == {"likelihood": 1, "generate": 1}
    with pytest.raises(ValueError, match="target applies to method='likelihood' only"):
        evaluate(model, processor, mixed, method="generate", target="text")


def test_cli_reply_length_of_short_answers_is_part_of_the_run(tiny_dir, small_set, tmp_path, capsys):
    """Under likelihood the short answers are still generated: --max-tokens matters to them."""
    out = tmp_path / "run"
    args = ["--model", str(tiny_dir), "--data", str(small_set), "--out", str(out), "--device", "cpu",
            "--quiet", "--limit", "2"]
    small_set.write_text("\n".join(small_set.read_text().splitlines()[-2:]) + "\n")  # the short answers
    assert main(args + ["--max-tokens", "2"]) == 0
    capsys.readouterr()
    assert main(args + ["--max-tokens", "3"]) == 1
    assert "(--max-tokens: 2, now 3)" in capsys.readouterr().err


def test_cli_tsv_without_an_image_column_says_so(tiny_dir, tmp_path, capsys):
    path = tmp_path / "noimg.tsv"
    rows = [{k: v for k, v in r.items() if k != "image"} for r in mmbench_rows()[:2]]
    write_tsv(path, rows, header=[h for h in TSV_HEADER if h != "image"])
    assert main(["--model", str(tiny_dir), "--data", str(path), "--out", str(tmp_path / "o"),
                 "--device", "cpu", "--quiet"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert f"warning: {path}: no 'image' column: its questions are scored as text only" in err
    assert read(path).warnings == [f"{path}: no 'image' column: its questions are scored as text only"]


def encoded_sets(tmp_path):
    """The same two questions as .jsonl, .csv and .tsv (name -> (path, text))."""
    jsonl = ('{"question": "Colour of the sky?", "choices": ["blue", "red"], "answer": "A"}\n'
             '{"question": "Café or tea?", "choices": ["café", "tea"], "answer": "B"}\n')
    csv_text = "question,A,B,answer\nColour of the sky?,blue,red,A\nCafé or tea?,café,tea,B\n"
    tsv = ("index\tquestion\tA\tB\tanswer\n0\tColour of the sky?\tblue\tred\tA\n"
           "1\tCafé or tea?\tcafé\ttea\tB\n")
    return {name: (tmp_path / f"d.{name}", text) for name, text in
            (("jsonl", jsonl), ("csv", csv_text), ("tsv", tsv))}


@pytest.mark.parametrize("kind", ["jsonl", "csv", "tsv"])
def test_utf8_bom_is_accepted(tmp_path, kind):
    path, text = encoded_sets(tmp_path)[kind]
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    items = read(path).items
    assert [it.question for it in items] == ["Colour of the sky?", "Café or tea?"]
    assert [it.answer_letter for it in items] == ["A", "B"] and items[1].choices == ["café", "tea"]


@pytest.mark.parametrize("kind", ["jsonl", "csv", "tsv"])
def test_non_utf8_file_names_file_line_and_byte(tmp_path, kind, capsys):
    path, text = encoded_sets(tmp_path)[kind]
    raw = text.encode("latin-1")  # é is the single byte 0xe9: not UTF-8
    offset = raw.index(b"\xe9")
    line = raw[:offset].count(b"\n") + 1
    path.write_bytes(raw)
    want = (f"{path}:{line}: not UTF-8 text (byte 0xe9 at byte offset {offset}); "
            "save the file as UTF-8")
    with pytest.raises(EvalDataError) as e:
        read(path)
    assert str(e.value) == want
    assert main_exit(["--data", str(path), "--out", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {want}"]


def test_inference_mode_puts_every_module_back_in_its_own_mode():
    """Eval mode inside the block; afterwards each module's mode as it was, a mix included (a
    parent in training mode over a child in eval mode and the other way round)."""
    import mlx.nn as nn

    from mlx_dsvl.eval.runner import inference_mode

    model = nn.Sequential(nn.Sequential(nn.Dropout(0.5), nn.Linear(2, 2)), nn.Dropout(0.5), nn.Linear(2, 2))
    model.train()
    model.layers[0].eval()
    model.layers[0].layers[1].train()
    model.layers[2].eval()
    before = {name: m.training for name, m in model.named_modules()}
    assert len(set(before.values())) == 2
    with inference_mode(model):
        assert not any(m.training for _, m in model.named_modules())
    assert {name: m.training for name, m in model.named_modules()} == before
