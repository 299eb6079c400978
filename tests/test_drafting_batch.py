"""Speculative decoding inside a batched decode (the server's scheduler): each greedy row gives the
tokens it gives without drafting and alone, with rows joining mid-draft, a row stopping inside a
draft while others go on, float and quantized batch caches, both families; the server's
``--draft`` and its usage report."""

from __future__ import annotations

import io
import subprocess
import sys
import threading

import mlx.core as mx
import pytest
from test_drafting import GREEDY, TURNS, kv_text_dirs  # noqa: F401 (a fixture)

import mlx_dsvl
from mlx_dsvl.batch_cache import BatchQuantizedKVCache
from mlx_dsvl.drafting import make_drafter
from mlx_dsvl.grammar import compile_format
from mlx_dsvl.sampling import SamplingOptions
from mlx_dsvl.streaming import Batch, Row, kv_cache_options, make_detokenizer, prefill, range_embeddings

# the text checkpoints' greedy replies to these loop (random weights), so drafts are accepted
PROMPTS = (TURNS[0], TURNS[1], "Count from one to ten, then again.", "Say it twice: the cat sat.")
BUDGETS = (40, 60, 31, 20)  # replies of different lengths: rows leave one by one


def decode(model, processor, prompts, budgets, *, draft, kv=None, join=None, batched=True, stops=None):
    """Greedy rows decoded in one Batch, row i joining before step ``join[i]`` (default 0), with
    the stop strings ``stops[i]``: (each row's tokens and finish reason, each step's outputs as
    (row, token, finish_reason), each row's drafted and accepted counts, each row's KV cache when
    it finished)."""
    lm, join, stops = model.language_model, join or [0] * len(prompts), stops or [()] * len(prompts)
    batch = Batch(lm, processor.tokenizer.eos_token_id, kv, batched=batched,
                  on_finish=lambda row, cache: caches.__setitem__(row.tag, cache))
    caches = {}
    waiting, rows, steps = list(range(len(prompts))), {}, []
    while waiting or batch.rows:
        for i in [i for i in waiting if join[i] <= len(steps) or not batch.rows]:
            ids = processor.tokenize(processor.format([{"role": "user", "content": prompts[i]}])).tolist()
            cache = model.make_cache()
            logits = prefill(lm, mx.array(ids), lambda a, b, ids=ids: range_embeddings(
                model, ids, a, b, layout=processor.image_tokens, image_keys=[], features=None), cache, kv)
            rows[i] = Row.start(processor, SamplingOptions(**GREEDY), ids, max_tokens=budgets[i], tag=i,
                                stops=stops[i], drafter=make_drafter(draft, ids, 4))
            batch.add(rows[i], cache, logits)
            waiting.remove(i)
        steps.append([(o.row.tag, o.token, o.finish_reason) for o in batch.step()])
    replies = [(rows[i].generated, rows[i].finish_reason) for i in range(len(prompts))]
    counts = [(r.drafter.drafted, r.drafter.accepted) if r.drafter else (0, 0) for r in rows.values()]
    return replies, steps, counts, [caches[i] for i in range(len(prompts))]


def same_kv(a: list, b: list) -> bool:
    """Whether two rows' finished caches hold the same keys and values (dequantized) where both hold some."""
    n = min(a[0].offset, b[0].offset)
    for x, y in zip(a, b):
        for s, t in zip(x.state[:2], y.state[:2]):
            if isinstance(s, tuple):
                s, t = (mx.dequantize(*q, group_size=x.group_size, bits=x.bits) for q in (s, t))
            if not mx.allclose(s[..., :n, :], t[..., :n, :], atol=1e-4).item():
                return False
    return True


def alone(model, processor, budgets, kv=None, stops=None):
    """Each prompt's greedy reply decoded alone, no drafting (a Batch of one on its own cache)."""
    stops = stops or [()] * len(PROMPTS)
    runs = [decode(model, processor, [p], [n], draft=None, kv=kv, batched=False, stops=[s])
            for p, n, s in zip(PROMPTS, budgets, stops)]
    return [r[0][0] for r in runs], [r[3][0] for r in runs]


def stop_inside_a_draft(processor, steps, tag: int) -> str:
    """A stop string that row ``tag``'s reply in ``steps`` first holds at the first draft token
    it kept: the shortest end of its text there that its text before did not hold."""
    tokens = []
    for outs in steps:
        mine = [o[1] for o in outs if o[0] == tag]
        tokens += mine[:2]
        if len(mine) >= 2:
            break
    detok = make_detokenizer(processor)
    for t in tokens[:-1]:
        detok.add_token(t)
    before = detok.text
    detok.add_token(tokens[-1])
    text = detok.text
    return next(text[-n:] for n in range(1, len(text) + 1) if text[-n:] not in before)


def stopped_inside_a_draft(steps) -> bool:
    """Whether some step gave a row several tokens, the last one ending it, while another row went on."""
    for outs in steps:
        for tag in {o[0] for o in outs}:
            mine = [o for o in outs if o[0] == tag]
            if len(mine) > 1 and mine[-1][2] and any(o[0] != tag and not o[2] for o in outs):
                return True
    return False


@pytest.mark.slow
@pytest.mark.parametrize("family", ["tiny", "tiny-hybrid"])
@pytest.mark.parametrize("kv_bits", [None, 8])
def test_a_drafting_batch_gives_each_row_its_reply_alone(kv_text_dirs, text_ckpt, text_hybrid_ckpt,  # noqa: F811
                                                         family, kv_bits):
    src = kv_text_dirs[family] if kv_bits else {"tiny": text_ckpt, "tiny-hybrid": text_hybrid_ckpt}[family]
    model, processor = mlx_dsvl.load(src, dtype="float32")
    kv = kv_cache_options(kv_bits, 32) if kv_bits else None
    want, want_kv = alone(model, processor, BUDGETS, kv)
    plain, _, none, _ = decode(model, processor, PROMPTS, BUDGETS, draft=None, kv=kv)
    # rows 2 and 3 join while the first two are drafting
    join = [0, 0, 3, 9]
    got, steps, counts, got_kv = decode(model, processor, PROMPTS, BUDGETS, draft="ngram", kv=kv, join=join)
    assert plain == want
    assert got == want
    # what a finished row hands on (the server's prefix cache): its keys and values, rolled back
    # in the batch, as alone; all of its prompt and reply but at most the last token
    assert all(same_kv(a, b) for a, b in zip(got_kv, want_kv))
    prompts = [len(processor.tokenize(processor.format([{"role": "user", "content": p}]))) for p in PROMPTS]
    assert all(c[0].offset >= n + len(r) - 1 for c, (r, _), n in zip(got_kv, got, prompts))
    assert none == [(0, 0)] * len(PROMPTS)
    assert sum(a > 0 for _, a in counts) >= 2 and all(d >= a for d, a in counts), counts
    assert len(steps) < sum(BUDGETS) / 2  # several tokens per step, rows together

    # row 0 now stops on a stop string inside one of its drafts, while row 1 goes on
    stops = [(stop_inside_a_draft(processor, steps, 0),), (), (), ()]
    got, steps, _, _ = decode(model, processor, PROMPTS, BUDGETS, draft="ngram", kv=kv, join=join, stops=stops)
    assert stopped_inside_a_draft(steps)
    row0 = decode(model, processor, PROMPTS[:1], BUDGETS[:1], draft=None, kv=kv, batched=False, stops=stops[:1])
    assert got == [row0[0][0], *want[1:]] and got[0][1] == "stop"


@pytest.mark.slow
def test_rows_that_do_not_draft_decode_beside_drafting_ones(text_ckpt):
    """Two drafting greedy rows and a drafting JSON row with log-probabilities beside a seeded
    sampled row without a drafter: the greedy rows' replies as alone, the JSON row's tokens and
    log-probabilities and the sampled row's tokens as in the same batch without drafting."""
    model, processor = mlx_dsvl.load(text_ckpt, dtype="float32")
    want = alone(model, processor, BUDGETS)[0]
    lm, grammar = model.language_model, compile_format(processor, {"type": "json_object"})
    kinds = [dict(), dict(options=dict(temperature=0.8, seed=3)), dict(),
             dict(grammar=grammar, logprobs=2)]
    runs = {}
    for draft in (None, "ngram"):
        batch, rows, outs = Batch(lm, processor.tokenizer.eos_token_id), [], []
        for i, (p, n, kind) in enumerate(zip(PROMPTS, BUDGETS, kinds)):
            ids = processor.tokenize(processor.format([{"role": "user", "content": p}])).tolist()
            cache = model.make_cache()
            logits = prefill(lm, mx.array(ids), lambda a, b, ids=ids: range_embeddings(
                model, ids, a, b, layout=processor.image_tokens, image_keys=[], features=None), cache)
            rows.append(Row.start(processor, SamplingOptions(**{**GREEDY, **kind.get("options", {})}), ids,
                                  max_tokens=n, tag=i, grammar=kind.get("grammar"), logprobs=kind.get("logprobs"),
                                  drafter=make_drafter(draft if i != 1 else None, ids)))
            batch.add(rows[-1], cache, logits)
        while batch.rows:
            outs += batch.step()
        logprobs = [(o.logprobs.token, o.logprobs.logprob) for o in outs if o.logprobs is not None]
        runs[draft] = [(r.generated, r.finish_reason) for r in rows], logprobs, rows
    (plain, plain_logprobs, _), (got, got_logprobs, rows) = runs[None], runs["ngram"]
    assert [got[0], got[2]] == [want[0], want[2]]
    assert [got[1], got[3]] == [plain[1], plain[3]] and plain[1] != want[1]  # (sampled: not the greedy reply)
    assert [t for t, _ in got_logprobs] == [t for t, _ in plain_logprobs] and len(got_logprobs) > 3
    assert max(abs(a - b) for (_, a), (_, b) in zip(got_logprobs, plain_logprobs)) < 1e-4
    assert rows[0].drafter.accepted > 0 and rows[1].drafter is None and rows[3].drafter.drafted > 0


# -- the quantized batch cache's roll ------------------------------------------------------------
def test_quantized_batch_cache_moves_right_padding_into_left_padding():
    """prepare(right_padding=) + finalize() on the quantized batch cache: as on mlx-lm's float one,
    each row's last tokens dropped, what it keeps ending at the batch's end, offsets adjusted."""
    from mlx_lm.models.cache import BatchKVCache, KVCache, QuantizedKVCache

    H, D, group = 2, 32, 32
    mx.random.seed(1)
    lengths, new = (3, 7), mx.random.normal((2, H, 4, D))
    floats, quants = [], []
    for n in lengths:
        k = mx.random.normal((1, H, n, D))
        f, q = KVCache(), QuantizedKVCache(group_size=group, bits=8)
        f.update_and_fetch(k, k)
        q.update_and_fetch(k, k)
        floats.append(f)
        quants.append(q)
    fb, qb = BatchKVCache.merge(floats), BatchQuantizedKVCache.merge(quants)
    for c in (fb, qb):
        c.update_and_fetch(new, new)
        c.trim(1)
        c.prepare(right_padding=[2, 0])  # row 0 keeps 1 of the 4 new positions, row 1 keeps 3
        c.finalize()
    assert qb.offset.tolist() == fb.offset.tolist() == [4, 10]
    assert qb.left_padding.tolist() == fb.left_padding.tolist() == [6, 0]
    for i in range(2):
        f, q = fb.extract(i), qb.extract(i)
        keys = mx.dequantize(*q.keys, group_size=group, bits=8)
        assert q.offset == f.offset and mx.allclose(keys, f.keys, atol=0.05).item(), i


# -- the server ------------------------------------------------------------------------------------
def at_once(calls: list) -> list:
    """Each of ``calls`` made in its own thread, all released together; their results in order."""
    results, barrier = [None] * len(calls), threading.Barrier(len(calls))

    def run(i):
        barrier.wait()
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.slow
@pytest.mark.parametrize("kv_bits", [None, 8])
def test_the_scheduler_drafts_inside_its_batch(kv_text_dirs, text_ckpt, kv_bits):  # noqa: F811
    """Four greedy requests decoded together with ``draft="ngram"``: the replies without drafting,
    each one's drafted and accepted counts on its Finished event and summed in the counters."""
    pytest.importorskip("fastapi", reason="the server tests need fastapi: pip install -e '.[server,test]'")
    from test_server_kv import reply, submit

    from mlx_dsvl.server.scheduler import Scheduler

    model, processor = mlx_dsvl.load(kv_text_dirs["tiny"] if kv_bits else text_ckpt, dtype="float32")
    kv = kv_cache_options(kv_bits, 32) if kv_bits else None
    runs = {}
    for draft in (None, "ngram"):
        sched = Scheduler(model, processor, max_batch=4, kv=kv, cache_bytes=0, draft=draft)
        pending = [submit(sched, processor, [{"role": "user", "content": p}], n) for p, n in zip(PROMPTS, BUDGETS)]
        sched.start()  # all four wait: one batch
        runs[draft] = [reply(events) for events in pending], dict(sched.counters)
        sched.stop()
    (plain, plain_counts), (drafted, counts) = runs[None], runs["ngram"]
    assert [(t, f.finish_reason, f.completion_tokens) for t, f in drafted] == \
           [(t, f.finish_reason, f.completion_tokens) for t, f in plain]
    assert counts["peak_batch"] == 4 and counts["decode_steps"] < plain_counts["decode_steps"]
    assert all(f.drafted_tokens == f.accepted_tokens == 0 for _, f in plain)
    assert sum(f.accepted_tokens > 0 for _, f in drafted) >= 2
    assert counts["drafted_tokens"] == sum(f.drafted_tokens for _, f in drafted)
    assert counts["accepted_tokens"] == sum(f.accepted_tokens for _, f in drafted) > 0
    with pytest.raises(ValueError, match="num_draft_tokens must be >= 1"):
        Scheduler(model, processor, draft="ngram", num_draft_tokens=0)


@pytest.mark.slow
def test_server_draft_ngram_keeps_batching_and_reports_predicted_tokens(text_ckpt, tmp_path):
    """python -m mlx_dsvl.server --draft ngram, over the openai client: replies as generate's,
    four at once in one batch, usage's accepted and rejected prediction tokens in the body and
    the streamed usage chunk, the counts in /metrics (rows per step counting rows, not tokens); a
    bad --num-draft-tokens is refused before loading."""
    import os
    import re
    pytest.importorskip("openai", reason="the server tests need openai: pip install -e '.[server,test]'")
    from test_server import KEY, Server, client, http, stats

    bad = subprocess.run([sys.executable, "-m", "mlx_dsvl.server", "--model", "/nonexistent", "--draft", "ngram",
                          "--num-draft-tokens", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--num-draft-tokens: must be >= 1, got 0" in bad.stderr, bad.stderr

    model, processor = mlx_dsvl.load(text_ckpt, dtype="float32")
    convs = [[{"role": "user", "content": p}] for p in PROMPTS]
    want = [mlx_dsvl.generate(model, processor, c, max_tokens=n, **GREEDY) for c, n in zip(convs, BUDGETS)]
    server = Server(text_ckpt, tmp_path, tmp_path / "server.log", "--draft", "ngram", "--num-draft-tokens", "3",
                    env={**os.environ, "MLX_DSVL_API_KEY": KEY})
    server.wait_ready()
    try:
        c = client(server)
        ask = dict(model="tiny-text", messages=convs[1], max_tokens=BUDGETS[1], temperature=0,
                   extra_body={"repetition_penalty": 1.0})
        whole = c.chat.completions.create(**ask)
        details = whole.usage.completion_tokens_details
        assert whole.choices[0].message.content == want[1]
        assert details.accepted_prediction_tokens > 0 and details.rejected_prediction_tokens >= 0
        chunks = list(c.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want[1]
        assert chunks[-1].usage.completion_tokens_details == details  # the same drafts, the same counts

        before = stats(server)
        results = at_once([lambda i=i: c.chat.completions.create(**{**ask, "messages": convs[i],
                                                                    "max_tokens": BUDGETS[i]})
                           for i in range(len(convs))])
        after = stats(server)
        assert [r.choices[0].message.content for r in results] == want
        assert after["peak_batch"] > 1
        accepted = sum(r.usage.completion_tokens_details.accepted_prediction_tokens for r in results)
        assert after["accepted_tokens"] - before["accepted_tokens"] == accepted > 0
        with http(server) as h:
            metrics = h.get("/metrics").text

        def metric(name: str) -> float:
            found = re.search(rf"^mlx_dsvl_{name} (\S+)$", metrics, re.M)
            assert found, name
            return float(found[1])

        assert metric("draft_tokens_accepted_total") == after["accepted_tokens"]
        assert metric("draft_tokens_total") == after["drafted_tokens"]
        # rows per step: one a row, however many tokens it gave
        assert metric("batch_rows_per_step_sum") < metric("generation_tokens_total") == after["generated_tokens"]
    finally:
        assert server.stop() == 0
    assert "Traceback" not in server.output()


@pytest.mark.slow
def test_server_draft_model_drafts_inside_its_batch_with_images(text_ckpt, text_hybrid_ckpt, tmp_path):
    """python -m mlx_dsvl.server --model <7B layout> --draft-model <1.3B layout>, over the openai
    client: three requests with images at once, each reply the one generate gives without drafting,
    the drafter's tokens counted in usage (it sees the images through its own towers); --draft with
    --draft-model refused."""
    import os

    pytest.importorskip("openai", reason="the server tests need openai: pip install -e '.[server,test]'")
    from PIL import Image
    from test_server import KEY, Server, client, data_url, make_png, stats

    bad = subprocess.run([sys.executable, "-m", "mlx_dsvl.server", "--model", "/nonexistent", "--draft", "ngram",
                          "--draft-model", "/nonexistent"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "exclusive" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr

    pngs = [make_png(seed=21), make_png(seed=22), make_png(seed=21)]  # the third repeats the first
    model, processor = mlx_dsvl.load(text_hybrid_ckpt, dtype="float32")
    want = [mlx_dsvl.generate(model, processor, [{"role": "user", "content": f"<image_placeholder>{p}"}],
                              [Image.open(io.BytesIO(png))], max_tokens=n, **GREEDY)
            for p, n, png in zip(PROMPTS, BUDGETS, pngs)]
    server = Server(text_hybrid_ckpt, tmp_path, tmp_path / "server.log", "--draft-model", str(text_ckpt),
                    "--num-draft-tokens", "3", env={**os.environ, "MLX_DSVL_API_KEY": KEY})
    server.wait_ready()
    try:
        c = client(server)
        results = at_once([lambda i=i: c.chat.completions.create(
            model=text_hybrid_ckpt.name, max_tokens=BUDGETS[i], temperature=0, extra_body={"repetition_penalty": 1.0},
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(pngs[i])}},
                                                   {"type": "text", "text": PROMPTS[i]}]}]) for i in range(len(pngs))])
        counts = stats(server)
        assert [r.choices[0].message.content for r in results] == want
        details = [r.usage.completion_tokens_details for r in results]
        assert counts["drafted_tokens"] == sum(d.accepted_prediction_tokens + d.rejected_prediction_tokens
                                               for d in details) > 0
        assert counts["peak_batch"] > 1
    finally:
        assert server.stop() == 0
    assert "Traceback" not in server.output()
