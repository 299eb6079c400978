"""Speculative decoding with a draft model (``draft_model=``, ``--draft-model``): the tiny
1.3B-layout checkpoint drafting for the tiny 7B-layout one (the same random tokenizer), and a
drafter identical to the target (every draft accepted); greedy replies identical token for token
to no drafting, over two chat turns with an image, with and without a quantized KV cache; a
drafter of another vocabulary refused."""

from __future__ import annotations

import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

import mlx_dsvl
from mlx_dsvl import drafting
from mlx_dsvl.drafting import ModelDrafter, draft_mismatch
from mlx_dsvl.processing.chat import ChatProcessor
from mlx_dsvl.session import ChatSession

GREEDY = dict(temperature=0.0, repetition_penalty=1.0)
TURNS = ("<image_placeholder>Tell me a story about this picture", "And again, the same story?")


def picture() -> Image.Image:
    return Image.linear_gradient("L").convert("RGB").resize((96, 64))


def with_renamed_token(src, out):
    """A copy of checkpoint ``src`` whose tokenizer calls one reserved token otherwise."""
    shutil.copytree(src, out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        text = (out / name).read_text(encoding="utf-8")
        assert "<｜reserved▁13｜>" in text
        (out / name).write_text(text.replace("<｜reserved▁13｜>", "<｜reserved▁99｜>"), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def kv_dirs(text_ckpt, text_hybrid_ckpt, tmp_path_factory):
    """Both text checkpoints with 2 heads of 32 (a KV quantization group must divide the head)."""
    from mlx_dsvl.random_checkpoint import with_language_config

    out = tmp_path_factory.mktemp("draft-model-kv")
    return {name: with_language_config(src, out / name, num_attention_heads=2, num_key_value_heads=2)
            for name, src in (("tiny", text_ckpt), ("tiny-hybrid", text_hybrid_ckpt))}


def chat(target, draft_model, kv_bits=None, max_tokens=40):
    """Two turns of a session, an image in the first: each turn's tokens, finish reason, last chunk."""
    session = ChatSession(*target, draft_model=draft_model, kv_bits=kv_bits, kv_group_size=32)
    turns = []
    for q, images in zip(TURNS, ([picture()], [])):
        chunks = list(session.send(q, images, max_tokens=max_tokens, **GREEDY))
        turns.append(([c.token for c in chunks], chunks[-1].finish_reason, chunks[-1]))
    assert session.cache[0].offset == len(session.cached_ids)
    return session, turns


def same_replies(plain, drafted) -> None:
    for (want, reason, _), (got, got_reason, _) in zip(plain, drafted):
        assert (got, got_reason) == (want, reason)


# -- the check at load ----------------------------------------------------------------------------
def test_draft_mismatch_names_what_differs(text_ckpt, text_hybrid_ckpt, tmp_path):
    target, draft = mlx_dsvl.load(text_hybrid_ckpt), mlx_dsvl.load(text_ckpt)
    assert draft_mismatch(target, draft) is None  # the two tiny families pair
    model, proc = draft
    fewer = ChatProcessor(proc.tokenizer, proc.image_processor, num_image_tokens=100)
    assert draft_mismatch(target, (model, fewer)) == "its image tokens per image is 100 (the target's: 576)"
    renamed = mlx_dsvl.load(with_renamed_token(text_ckpt, tmp_path / "renamed"))
    found = draft_mismatch(target, renamed)
    assert found.startswith("its token -> id map differs (2 tokens, first '<｜reserved▁13｜>': None, the target's: 100013)")
    with pytest.raises(ValueError, match=r"^the draft model cannot draft for this model: its token -> id map differs"):
        ChatSession(*target, draft_model=renamed)
    with pytest.raises(ValueError, match="exclusive"):
        ChatSession(*target, draft="ngram", draft_model=draft)


# -- the drafter ----------------------------------------------------------------------------------
def test_model_drafter_rolls_its_cache_back_to_the_accepted_drafts(text_ckpt):
    model, proc = mlx_dsvl.load(text_ckpt)
    d = ModelDrafter(model, proc, num_draft_tokens=4).start([100000, 5, 6, 7], [])
    draft = d.propose([], 10)
    assert len(draft) == 4 and d.probs is None
    assert d.cache[0].offset == 4 + 3 == len(d.cached_ids)  # the last draft is not fed
    d.record(4, 1)
    assert d.cache[0].offset == 5 and d.cached_ids == [100000, 5, 6, 7, draft[0]]
    assert (d.drafted, d.accepted) == (4, 1)
    # the target kept one draft and chose its own token after it: both are fed next time
    again = d.propose([draft[0], 9], 2)
    assert len(again) == 2 and d.cached_ids == [100000, 5, 6, 7, draft[0], 9, again[0]]
    d.record(2, 0)
    assert not d.wants() and d.wants()  # backed off one step
    assert d.propose([draft[0], 9], 0) == []


def test_model_drafter_draws_sampled_drafts_from_the_probabilities_it_reports(text_ckpt):
    model, proc = mlx_dsvl.load(text_ckpt)
    d = ModelDrafter(model, proc, num_draft_tokens=3).start([100000, 5, 6, 7], [], temperature=0.7, seed=1)
    draft = d.propose([], 10)
    assert d.probs.shape == (3, model.language_model.args.vocab_size) and d.probs.dtype == mx.float32
    assert np.allclose(np.array(d.probs).astype(np.float64).sum(axis=-1), 1.0, atol=1e-5)  # (MLX's CPU sum drifts)
    assert all(d.probs[i, t].item() > 0 for i, t in enumerate(draft))
    # the first draft's distribution is the temperature-scaled softmax of the prompt's logits
    ref = ModelDrafter(model, proc).start([100000, 5, 6, 7], [])
    logits = ref._catch_up([100000, 5, 6, 7])[0]
    x = np.array(logits).astype(np.float64) / 0.7
    want = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    assert np.allclose(np.array(d.probs[0]), want, rtol=1e-4, atol=1e-9)
    again = ModelDrafter(model, proc, num_draft_tokens=3).start([100000, 5, 6, 7], [], temperature=0.7, seed=1)
    assert again.propose([], 10) == draft  # seeded: the same draws


# -- exactness ------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("kv_bits", [None, 8])
def test_greedy_replies_are_the_same_with_the_draft_model(kv_dirs, text_ckpt, text_hybrid_ckpt, kv_bits,
                                                          monkeypatch):
    src = kv_dirs if kv_bits else {"tiny": text_ckpt, "tiny-hybrid": text_hybrid_ckpt}
    target, draft = mlx_dsvl.load(src["tiny-hybrid"]), mlx_dsvl.load(src["tiny"])
    _, plain = chat(target, None, kv_bits)
    fed = []
    real_prefill = drafting.prefill
    monkeypatch.setattr(drafting, "prefill", lambda lm, ids, *a, **k: fed.append(ids.size) or real_prefill(lm, ids, *a, **k))
    session, drafted = chat(target, draft, kv_bits)
    same_replies(plain, drafted)
    assert all(t[2].drafted_tokens > 0 and t[2].drafted_tokens >= t[2].accepted_tokens for t in drafted)
    drafter = session.draft_model
    assert drafter.encode_calls == 1 and session.encode_calls == 1  # the image once, through each model
    assert drafter.cache[0].offset == len(drafter.cached_ids)
    # only the first turn's prompt brings the image's tokens; the second turn feeds the new ids only
    per_image = session.processor.image_tokens.per_image
    assert fed[0] > per_image and all(n < per_image for n in fed[1:]), fed


@pytest.mark.slow
def test_a_drafter_identical_to_the_target_is_always_accepted(text_hybrid_ckpt):
    target = mlx_dsvl.load(text_hybrid_ckpt)
    _, plain = chat(target, None, max_tokens=30)
    session, drafted = chat(target, target, max_tokens=30)  # the same weights: not loaded twice
    same_replies(plain, drafted)
    for _, _, last in drafted:
        assert last.drafted_tokens > 0 and last.accepted_tokens == last.drafted_tokens
    assert session.draft_model.model is target[0]


@pytest.mark.slow
def test_sampled_replies_with_an_identical_drafter_keep_nearly_every_draft(text_hybrid_ckpt):
    """A sampled reply (temperature 1, no top-p: the drafter's q equals the target's p) drafted by
    the same weights: speculative sampling accepts with min(1, p/q) = 1, so every draft is kept but
    for float rounding; seeded, the reply repeats."""
    target = mlx_dsvl.load(text_hybrid_ckpt)
    replies = []
    for _ in range(2):
        session = ChatSession(*target, draft_model=target)
        chunks = list(session.send(TURNS[1], [], max_tokens=30, temperature=1.0, top_p=1.0,
                                   repetition_penalty=1.0, seed=5))
        replies.append([c.token for c in chunks])
        last = chunks[-1]
        assert last.drafted_tokens >= 8 and last.accepted_tokens >= 0.9 * last.drafted_tokens
    assert replies[0] == replies[1]


# -- the command line -------------------------------------------------------------------------------
def cli(*args):
    return subprocess.run([sys.executable, "-m", "mlx_dsvl.generate", "--prompt", TURNS[1], "--max-tokens", "30",
                           "--temperature", "0", "--repetition-penalty", "1", "--verbose", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_draft_model_gives_the_same_reply(text_ckpt, text_hybrid_ckpt):
    import re

    plain = cli("--model", str(text_hybrid_ckpt))
    drafted = cli("--model", str(text_hybrid_ckpt), "--draft-model", str(text_ckpt), "--num-draft-tokens", "3")
    assert plain.returncode == 0 and drafted.returncode == 0, drafted.stderr
    assert drafted.stdout == plain.stdout
    found = re.search(r"Drafted: (\d+) tokens, accepted (\d+)", drafted.stderr)
    assert found and int(found[1]) > 0, drafted.stderr


@pytest.mark.slow
def test_cli_refuses_a_draft_model_of_another_vocabulary(text_ckpt, text_hybrid_ckpt, tmp_path):
    bad = with_renamed_token(text_ckpt, tmp_path / "renamed")
    run = cli("--model", str(text_hybrid_ckpt), "--draft-model", str(bad))
    assert run.returncode == 1 and run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --draft-model {bad} cannot draft for {text_hybrid_ckpt}: "
                                                   "its token -> id map differs"), run.stderr
    both = cli("--model", str(text_hybrid_ckpt), "--draft", "ngram", "--draft-model", str(text_ckpt))
    assert both.returncode == 2
    assert both.stderr.strip() == "error: --draft ngram and --draft-model are exclusive: choose one drafter"
