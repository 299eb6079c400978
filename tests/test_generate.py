"""Generation: CLI, greedy parity with transformers, sessions, batches, streaming, bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

import mlx_dsvl
from mlx_dsvl.session import ChatSession
from mlx_dsvl.streaming import StopStringFilter, make_detokenizer

GREEDY = dict(temperature=0.0, repetition_penalty=1.0)


def make_image(path, seed=0, size=(90, 60)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return str(path)


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mlx_dsvl.generate", *args],
                          capture_output=True, text=True, timeout=timeout)


# -- CLI ------------------------------------------------------------------------------------
def test_importing_the_cli_module_keeps_the_generate_function():
    """``mlx_dsvl.generate`` is the function and the CLI module's name: importing the module
    (first, in a fresh process) must not rebind the package's attribute to it, and importing
    the package must not import MLX."""
    code = ("import sys, mlx_dsvl; assert 'mlx.core' not in sys.modules; "
            "from mlx_dsvl.generate import main; import mlx_dsvl.generate; "
            "from mlx_dsvl.generation import generate; "
            "assert mlx_dsvl.generate is generate, mlx_dsvl.generate; "
            "from mlx_dsvl import generate as g; assert g is generate; "
            "assert callable(main) and sys.modules['mlx_dsvl.generate'].main is main")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("ckpt", ["tiny_dir", "tiny_hybrid_dir"])
def test_cli_generates_with_verbose_figures(ckpt, request, tmp_path):
    model_dir = request.getfixturevalue(ckpt)
    img = make_image(tmp_path / "a.png")
    r = run_cli("--model", str(model_dir), "--image", img, "--prompt", "Describe.",
                "--max-tokens", "8", "--verbose", "--seed", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip(), "no text produced"
    for label in ("Prompt:", "tokens-per-sec", "Time to first token:", "Generation:", "Peak memory:"):
        assert label in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_cli_chat_mode_two_turns(tiny_dir, tmp_path):
    img = make_image(tmp_path / "a.png")
    p = subprocess.run(
        [sys.executable, "-m", "mlx_dsvl.generate", "--model", str(tiny_dir), "--chat",
         "--max-tokens", "4", "--temperature", "0"],
        input=f"/image {img}\nWhat is it?\nAnd now?\n/new\nHello\n/exit\n",
        capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("Assistant:") == 3
    assert "(new conversation)" in p.stderr


@pytest.mark.slow
def test_cli_chat_survives_bad_turns_and_lists_commands(tiny_dir, tmp_path):
    """A bad /image path, an unknown /command, a placeholder mismatch and a too-long message each
    print one line; the chat goes on and answers the next question."""
    img = make_image(tmp_path / "a.png")
    lines = [f"/image {tmp_path / 'nope.png'}", "/imagine a cat", "/image",
             f"/image {img}", "<image_placeholder><image_placeholder>Two?", "word " * 300,
             "What now?", "/exit"]
    p = subprocess.run(
        [sys.executable, "-m", "mlx_dsvl.generate", "--model", str(tiny_dir), "--chat", "--max-tokens", "3",
         "--temperature", "0", "--max-context", "200"],
        input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    err = [l for l in p.stderr.splitlines() if l.strip()]
    assert "nope.png" in err[1] and err[1].startswith("error: ")
    assert err[2].startswith("unknown command '/imagine a cat'") and "/image PATH" in err[2] and "/new" in err[2]
    assert err[3] == "error: /image needs a path: /image PATH"
    assert err[4].startswith("(attached ")
    assert err[5].startswith("error: ") and "2 image placeholder(s)" in err[5]
    assert err[6].startswith("error: ") and "200-token context" in err[6]
    assert len(err) == 7 and "Traceback" not in p.stderr
    # the model answered only the last question: the unknown command never reached it
    assert p.stdout.count("Assistant:") == 3 and "imagine" not in p.stdout


@pytest.mark.slow
def test_cli_tells_when_the_context_limit_stops_the_reply(tiny_dir):
    r = run_cli("--model", str(tiny_dir), "--prompt", "Hi", "--max-tokens", "80", "--max-context", "100",
                "--temperature", "0", "--repetition-penalty", "1")
    assert r.returncode == 0, r.stderr
    notes = [l for l in r.stderr.splitlines() if "context limit" in l]
    assert len(notes) == 1 and notes[0].startswith("[mlx-dsvl] the reply stopped at the 100-token context limit")


@pytest.mark.parametrize("args, message", [
    (["--max-tokens", "0"], "--max-tokens must be an integer >= 1, got 0"),
    (["--max-tokens", "-5"], "--max-tokens must be an integer >= 1, got -5"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.01"], "--top-p must be in (0, 1]"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be > 0"),
    (["--max-context", "0"], "--max-context must be an integer >= 2"),
])
def test_cli_rejects_out_of_range_options(args, message, capsys):
    from mlx_dsvl.generate import main

    assert main(["--model", "/nowhere", "--prompt", "Hi", *args]) == 2  # before loading anything
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {message}" + err[0][len(message) + 7:]] and message in err[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", ["missing_image", "corrupt_image", "too_many_images", "hub_offline", "too_long", "latin1_prompt"]
)
def test_cli_bad_input_one_clear_line(case, tiny_dir, tmp_path, monkeypatch):
    img = make_image(tmp_path / "ok.png")
    args = ["--model", str(tiny_dir), "--prompt", "<image_placeholder>Hi", "--max-tokens", "2"]
    expect = None
    env = None
    if case == "missing_image":
        args += ["--image", str(tmp_path / "nope.png")]
        expect = "nope.png"
    elif case == "corrupt_image":
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"\x89PNG garbage" * 10)
        args += ["--image", str(bad)]
        expect = "bad.png"
    elif case == "too_many_images":
        args += ["--image", img, "--image", img]
        expect = "1 image placeholder"
    elif case == "hub_offline":
        args = ["--model", "deepseek-ai/no-such-model-xyz", "--prompt", "Hi"]
        env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
        expect = "deepseek-ai/no-such-model-xyz"
    elif case == "too_long":
        args = ["--model", str(tiny_dir), "--prompt", "word " * 300, "--max-context", "200"]
        expect = "context"
    elif case == "latin1_prompt":  # typed in a Latin-1 terminal: Python keeps the byte as \udce9
        args = ["--model", str(tiny_dir), "--prompt", os.fsdecode(b"caf\xe9 au lait")]
        expect = "the prompt is not UTF-8 text: '\\udce9' in 'User: caf\\udce9 au lait'"
    r = subprocess.run([sys.executable, "-m", "mlx_dsvl.generate", *args],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode != 0
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and expect in lines[0], lines[0]
    assert "Traceback" not in r.stderr


# -- greedy parity with transformers ----------------------------------------------------------
def hf_llama_from(model):
    """transformers' LlamaForCausalLM holding exactly our LLM weights (float32)."""
    import torch
    from mlx.utils import tree_flatten
    from transformers import LlamaConfig, LlamaForCausalLM

    a = model.config.language
    cfg = LlamaConfig(
        vocab_size=a["vocab_size"], hidden_size=a["hidden_size"],
        intermediate_size=a["intermediate_size"], num_hidden_layers=a["num_hidden_layers"],
        num_attention_heads=a["num_attention_heads"], num_key_value_heads=a["num_key_value_heads"],
        max_position_embeddings=a["max_position_embeddings"], rms_norm_eps=a["rms_norm_eps"],
        rope_theta=a["rope_theta"], attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
        bos_token_id=100000, eos_token_id=100001, pad_token_id=100001,
    )
    hf = LlamaForCausalLM(cfg).eval()
    state = {k: torch.from_numpy(np.array(v, dtype=np.float32))
             for k, v in tree_flatten(model.language_model.parameters())}
    hf.load_state_dict(state, strict=True)
    return hf


@pytest.mark.slow
@pytest.mark.parametrize("fixture,size", [("tiny_model", 384), ("tiny_hybrid_model", 1024)])
def test_greedy_tokens_match_transformers(fixture, size, request, tmp_path):
    import torch

    model, processor = request.getfixturevalue(fixture)
    conv = [{"role": "user", "content": "<image_placeholder>What is in the picture?"}]
    imgs = [make_image(tmp_path / "p.png", seed=7)]
    chunks = list(mlx_dsvl.stream_generate(model, processor, conv, imgs, max_tokens=20, **GREEDY))
    session_tokens = [c.token for c in chunks if c.token is not None]

    batch = processor(conv, imgs)
    embeds = model.get_input_embeddings(batch["input_ids"], batch["pixel_values"])
    hf = hf_llama_from(model)
    with torch.no_grad():
        out = hf.generate(inputs_embeds=torch.from_numpy(np.array(embeds)), max_new_tokens=20,
                          min_new_tokens=20, do_sample=False,
                          attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long))
    ref = out[0].tolist()[-20:]
    # ours, token by token from the same prompt (no stop rules): generate_step directly
    from mlx_lm.generate import generate_step

    ours = [t for t, _ in generate_step(batch["input_ids"][0], model.language_model, max_tokens=20,
                                        input_embeddings=embeds[0])]
    assert ours == ref
    assert session_tokens == ref[: len(session_tokens)] and session_tokens


# -- sessions ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_session_matches_from_scratch_and_encodes_each_image_once(tiny_hybrid_model, tmp_path):
    model, processor = tiny_hybrid_model
    a, b = make_image(tmp_path / "a.png", 1), make_image(tmp_path / "b.png", 2, (40, 100))
    chat = ChatSession(model, processor)
    calls = []
    real_encode = model.encode_images

    def counting(px):
        calls.append(px.shape[0])
        return real_encode(px)

    model.encode_images = counting
    try:
        list(chat.send("<image_placeholder>What is this?", [a], max_tokens=6, **GREEDY))
        cached_before = len(chat.cached_ids)
        turn2 = list(chat.send("And this one <image_placeholder>?", [b], max_tokens=6, **GREEDY))
        turn3 = list(chat.send("Compare them.", [], max_tokens=6, **GREEDY))
    finally:
        model.encode_images = real_encode
    assert calls == [1, 1] and chat.encode_calls == 2  # each image encoded once
    # turn 2 prefilled only its new tokens
    assert turn2[-1].prompt_tokens < len(chat._prompt_ids()) - cached_before + 50
    assert turn2[-1].prompt_tokens < 600 + 40
    # from scratch: the whole conversation so far, fresh cache, both images encoded again
    conv = chat.conversation[:-1]  # up to the last user message
    scratch = list(mlx_dsvl.stream_generate(model, processor, conv, [a, b], max_tokens=6, **GREEDY))
    assert [c.token for c in turn3] == [c.token for c in scratch]
    assert "".join(c.text for c in turn3) == "".join(c.text for c in scratch)


def test_context_limit_drops_oldest_turns(tiny_model):
    model, processor = tiny_model
    told = []
    chat = ChatSession(model, processor, max_context=160, on_truncate=told.append)
    for i in range(6):
        list(chat.send(f"Question number {i} about things", max_tokens=8, **GREEDY))
        assert chat.cache[0].offset == len(chat.cached_ids) <= 160  # never past the context
    assert told and "dropped the oldest" in told[0]
    assert chat.messages[0]["content"] != "Question number 0 about things"


def test_a_turn_refused_for_length_leaves_the_conversation_unchanged(tiny_model):
    """The oldest turns are dropped only when the new turn then fits; else nothing changes."""
    model, processor = tiny_model
    told = []
    chat = ChatSession(model, processor, max_context=160, on_truncate=told.append)
    list(chat.send("First question", max_tokens=4, **GREEDY))
    list(chat.send("Second question", max_tokens=4, **GREEDY))
    before = [dict(m) for m in chat.messages]
    with pytest.raises(mlx_dsvl.session.PromptTooLongError, match="160-token context"):
        list(chat.send("word " * 200, max_tokens=4, **GREEDY))
    assert chat.messages == before and told == []
    assert "".join(c.text for c in chat.send("Third", max_tokens=4, **GREEDY)) is not None
    assert [m["content"] for m in chat.messages[::2]] == ["First question", "Second question", "Third"]


def test_context_limit_is_reported_as_finish_reason_and_notice(tiny_model):
    model, processor = tiny_model
    told = []
    chat = ChatSession(model, processor, max_context=100, on_truncate=told.append)
    prompt_len = len(processor.tokenize(processor.format([{"role": "user", "content": "Hi"}])))
    chunks = list(chat.send("Hi", max_tokens=500, temperature=0.0, repetition_penalty=1.0))
    if chunks[-1].finish_reason == "stop":  # EOS or "User:" came first: nothing to report
        pytest.skip("the random model stopped before the context limit")
    assert chunks[-1].finish_reason == "context"
    assert chunks[-1].generation_tokens == 100 - prompt_len
    assert told == [f"the reply stopped at the 100-token context limit after {100 - prompt_len} of 500 tokens"]
    # max_tokens within the context: "length", nothing to tell
    told.clear()
    chat.reset()
    assert list(chat.send("Hi", max_tokens=3, **GREEDY))[-1].finish_reason == "length" and told == []


@pytest.mark.parametrize("bad, match", [
    (dict(max_tokens=0), "max_tokens must be an integer >= 1, got 0"),
    (dict(max_tokens=-5), "max_tokens must be an integer >= 1, got -5"),
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(repetition_penalty=-1.0), "repetition_penalty must be > 0"),
])
def test_api_rejects_out_of_range_sampling(bad, match, tiny_model):
    model, processor = tiny_model
    conv = [{"role": "user", "content": "Hi"}]
    chat = ChatSession(model, processor)
    for call in (lambda: list(chat.send("Hi", **bad)),
                 lambda: mlx_dsvl.generate(model, processor, conv, **bad),
                 lambda: mlx_dsvl.generate_batch(model, processor, [conv], **bad)):
        with pytest.raises(ValueError, match=match):
            call()
    assert chat.messages == []


# -- batches ----------------------------------------------------------------------------------
def test_batch_equals_one_by_one(tiny_model, tmp_path):
    model, processor = tiny_model
    a, b = make_image(tmp_path / "a.png", 3), make_image(tmp_path / "b.png", 4)
    convs = [
        [{"role": "user", "content": "<image_placeholder>Describe it in detail please."}],
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "<image_placeholder> and <image_placeholder>?"}],
    ]
    imgs = [[a], [], [b, a]]
    batched = mlx_dsvl.generate_batch(model, processor, convs, imgs, max_tokens=10)
    single = [mlx_dsvl.generate(model, processor, c, i, max_tokens=10, **GREEDY)
              for c, i in zip(convs, imgs)]
    assert batched == single


# -- streaming --------------------------------------------------------------------------------
def test_streaming_detokenizer_multibyte_round_trip(tiny_model):
    _, processor = tiny_model
    text = "naïve 中文字符 and emoji 🙂👍🏽 mixed — ok"
    ids = processor.tokenizer.encode(text, add_special_tokens=False)
    detok = make_detokenizer(processor)
    pieces = []
    for t in ids:
        detok.add_token(t)
        pieces.append(detok.last_segment)
        assert "\ufffd" not in pieces[-1]
    detok.finalize()
    pieces.append(detok.last_segment)
    assert "".join(pieces) == text


def test_stop_string_never_reaches_output():
    f = StopStringFilter()
    out = "".join(f.push(p) for p in ["The answer", " is 4.\n", "Us", "er", ": next"]) + f.flush()
    assert out == "The answer is 4.\n"
    g = StopStringFilter()
    assert g.push("Use") == "" and g.push("ful") == "Useful" and g.flush() == ""


@pytest.mark.slow
def test_cli_adapter_changes_the_reply_logits(tiny_dir, tmp_path):
    """--adapter applies a training run's output: greedy tokens differ from the base model's."""
    from mlx_dsvl.testing.synthetic import write_shapes_dataset
    from mlx_dsvl.train import TrainConfig, train

    data = write_shapes_dataset(tmp_path / "d", 2, seed=5)
    run = tmp_path / "run"
    train(TrainConfig(stage=3, model=str(tiny_dir), data=str(data["chat"]), out=str(run), iters=3,
                      lr=5e-2, batch_size=2, save_every=0, quiet=True, plot=False, warmup=0))
    img = make_image(tmp_path / "a.png")
    common = ["--model", str(tiny_dir), "--image", img, "--prompt", "Describe.", "--max-tokens", "6",
              "--temperature", "0", "--repetition-penalty", "1", "--verbose"]
    base = run_cli(*common)
    tuned = run_cli(*common, "--adapter", str(run))
    assert base.returncode == 0 and tuned.returncode == 0, tuned.stderr
    missing = run_cli(*common, "--adapter", str(tmp_path / "nope"))
    assert missing.returncode == 1 and missing.stderr.strip().startswith("error: ")
    assert "nope" in missing.stderr and "Traceback" not in missing.stderr
    # same base, same prompt: the adapters must change what the model computes
    from mlx_dsvl.train import load_adapters

    model, processor = mlx_dsvl.load(tiny_dir, dtype="float32")
    batch = processor([{"role": "user", "content": "<image_placeholder>Describe."}], [img])
    before = model(batch["input_ids"], pixel_values=batch["pixel_values"])
    load_adapters(model, run)
    after = model(batch["input_ids"], pixel_values=batch["pixel_values"])
    assert float(mx.abs(before - after).max()) > 0
