"""Speculative decoding with prompt lookup (``draft="ngram"``): the drafter's guesses and back-off,
and greedy replies identical token for token to no drafting (both families, a quantized KV
cache, two chat turns, a repetition penalty, a token budget that ends inside a draft)."""

from __future__ import annotations

import pytest

import mlx_dsvl
from mlx_dsvl.drafting import MAX_PAUSE, NgramDrafter, make_drafter
from mlx_dsvl.session import ChatSession

GREEDY = dict(temperature=0.0, repetition_penalty=1.0)
# the text checkpoints' greedy replies to these loop (random weights), so drafts are accepted
TURNS = ("Tell me a story about a cat and a dog", "And again, the same story?")


# -- the drafter --------------------------------------------------------------------------------
def test_ngram_drafter_copies_what_followed_the_longest_latest_match():
    d = NgramDrafter([1, 2, 3, 9, 9, 5, 2, 3, 7, 8], num_draft_tokens=2)
    # last tokens (.., 2, 3): 3-gram (x, 2, 3) unseen, the 2-gram (2, 3) last seen before 7, 8
    assert d.propose([5, 2, 3], 10) == [7, 8]
    assert d.propose([5, 2, 3, 4], 10) == []  # 4 never seen
    d = NgramDrafter([4, 5, 6, 1, 5], num_draft_tokens=3)
    assert d.propose([], 10) == [6, 1, 5]  # the 1-gram (5)
    assert d.propose([], 2) == [6, 1]  # the limit (budget) first


def test_ngram_drafter_repeats_a_loop_shorter_than_the_draft():
    d = NgramDrafter([7, 1, 2, 1, 2], num_draft_tokens=5)
    assert d.propose([], 10) == [1, 2, 1, 2, 1]


def test_ngram_drafter_backs_off_after_rejections_and_resets_on_acceptance():
    d = NgramDrafter([1, 2, 1], num_draft_tokens=4)
    pauses = []
    for _ in range(8):
        assert d.wants()
        d.record(4, 0)
        skipped = 0
        while not d.wants():
            skipped += 1
        pauses.append(skipped)
    assert pauses == [1, 2, 4, 8, 16, 32, MAX_PAUSE, MAX_PAUSE]
    d.record(4, 2)
    assert d.wants() and (d.drafted, d.accepted) == (36, 2)
    d.record(4, 0)
    assert not d.wants() and d.wants()  # back to a pause of 1


def test_make_drafter_refuses_an_unknown_kind_and_a_bad_count():
    assert make_drafter(None, [1]) is None
    with pytest.raises(ValueError, match="draft must be one of"):
        make_drafter("model", [1])
    with pytest.raises(ValueError, match="num_draft_tokens must be >= 1"):
        make_drafter("ngram", [1], 0)


# -- exactness -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kv_text_dirs(text_ckpt, text_hybrid_ckpt, tmp_path_factory):
    """Both text checkpoints with 2 heads of 32 (a KV quantization group must divide the head)."""
    from mlx_dsvl.random_checkpoint import with_language_config

    out = tmp_path_factory.mktemp("draft-kv")
    return {name: with_language_config(src, out / name, num_attention_heads=2, num_key_value_heads=2)
            for name, src in (("tiny", text_ckpt), ("tiny-hybrid", text_hybrid_ckpt))}


def chat(model, processor, draft, max_tokens=80, **options):
    """Two turns of a session: each turn's tokens, finish reason and the last chunk."""
    session = ChatSession(model, processor, draft=draft, **options)
    turns = []
    for q in TURNS:
        chunks = list(session.send(q, [], max_tokens=max_tokens, **GREEDY))
        turns.append(([c.token for c in chunks], chunks[-1].finish_reason, chunks[-1]))
    assert session.cache[0].offset == len(session.cached_ids)  # the cache holds what it says
    return turns


@pytest.mark.slow
@pytest.mark.parametrize("family", ["tiny", "tiny-hybrid"])
@pytest.mark.parametrize("kv_bits", [None, 8])
def test_greedy_replies_are_the_same_with_prompt_lookup(kv_text_dirs, text_ckpt, text_hybrid_ckpt,
                                                        family, kv_bits):
    src = kv_text_dirs[family] if kv_bits else {"tiny": text_ckpt, "tiny-hybrid": text_hybrid_ckpt}[family]
    model, processor = mlx_dsvl.load(src, dtype="float32")
    kv = dict(kv_bits=kv_bits, kv_group_size=32)
    plain, drafted = chat(model, processor, None, **kv), chat(model, processor, "ngram", **kv)
    for (want, reason, _), (got, got_reason, _) in zip(plain, drafted):
        assert (got, got_reason) == (want, reason)
    accepted = sum(t[2].accepted_tokens for t in drafted)
    assert accepted > 0 and all(t[2].drafted_tokens >= t[2].accepted_tokens for t in drafted)
    assert all(t[2].drafted_tokens == 0 for t in plain)


@pytest.mark.slow
def test_prompt_lookup_with_a_repetition_penalty_and_a_budget_inside_a_draft(text_ckpt):
    """The penalty sees every kept token in order; a budget that ends mid-draft is kept."""
    model, processor = mlx_dsvl.load(text_ckpt, dtype="float32")
    for opts in (dict(repetition_penalty=1.05), dict(max_tokens=23), dict(max_tokens=2)):
        max_tokens = opts.pop("max_tokens", 80)
        session_opts = dict(max_tokens=max_tokens)
        runs = []
        for draft in (None, "ngram"):
            session = ChatSession(model, processor, draft=draft, num_draft_tokens=5)
            turns, accepted = [], 0
            for q in TURNS:
                chunks = list(session.send(q, [], **{**GREEDY, **opts, **session_opts}))
                turns.append(([c.token for c in chunks], chunks[-1].finish_reason))
                accepted += chunks[-1].accepted_tokens
            assert session.cache[0].offset == len(session.cached_ids)
            runs.append((turns, accepted))
        assert runs[1][0] == runs[0][0], opts
        if max_tokens > 2:
            assert runs[1][1] > 0, opts


# -- the command line ------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_draft_ngram_gives_the_same_reply_and_reports_acceptance(text_ckpt):
    import re
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "mlx_dsvl.generate", "--model", str(text_ckpt), "--prompt",
                               TURNS[1], "--max-tokens", "60", "--temperature", "0", "--repetition-penalty", "1",
                               "--verbose", *args], capture_output=True, text=True, timeout=300)

    plain, drafted = cli(), cli("--draft", "ngram", "--num-draft-tokens", "3")
    assert plain.returncode == 0 and drafted.returncode == 0, drafted.stderr
    assert drafted.stdout == plain.stdout and "Drafted:" not in plain.stderr
    found = re.search(r"Drafted: (\d+) tokens, accepted (\d+) \(\d+%\)", drafted.stderr)
    assert found and 0 < int(found[2]) <= int(found[1]), drafted.stderr
    bad = cli("--draft", "ngram", "--num-draft-tokens", "0")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --num-draft-tokens must be an integer >= 1, got 0"
    assert cli("--draft", "model").returncode == 2  # argparse's choices


def test_the_generation_api_takes_a_drafter(text_ckpt):
    model, processor = mlx_dsvl.load(text_ckpt, dtype="float32")
    conv = [{"role": "user", "content": TURNS[1]}]
    chunks = list(mlx_dsvl.stream_generate(model, processor, conv, max_tokens=40, draft="ngram",
                                           num_draft_tokens=3, **GREEDY))
    assert "".join(c.text for c in chunks) == mlx_dsvl.generate(model, processor, conv, max_tokens=40, **GREEDY)
    assert chunks[-1].accepted_tokens > 0
