"""The server's --kv-bits: the quantized decode batch against mlx-lm's quantized cache of one
sequence, a follow-up request against ``ChatSession(kv_bits=...)``, the prefix cache's bytes,
and the command line's checks."""

from __future__ import annotations

import queue
import subprocess
import sys

import mlx.core as mx
import pytest

for _name in ("fastapi", "uvicorn", "httpx"):
    pytest.importorskip(_name, reason=f"the server tests need {_name}: pip install -e '.[server,test]'")

from test_server import KEY, Server, client, stats  # noqa: E402

import mlx_dsvl  # noqa: E402

GROUP = 32
Q1 = "Describe the weather today in a few words."
Q2 = "And tomorrow?"


@pytest.fixture(scope="module")
def kv_ckpt(text_ckpt, tmp_path_factory):
    """The text checkpoint with 2 heads of 32 (a KV quantization group must divide the head)."""
    from mlx_dsvl.random_checkpoint import with_language_config

    return with_language_config(text_ckpt, tmp_path_factory.mktemp("kv") / "tiny-kv",
                                num_attention_heads=2, num_key_value_heads=2)


@pytest.fixture(scope="module")
def kv_local(kv_ckpt):
    return mlx_dsvl.load(kv_ckpt, dtype="float32")


# -- the batch cache ----------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_batch_rows_decode_as_single_caches(bits):
    """Rows of different lengths joined (merge, extend), one decode step, a row dropped: each
    row's attention equals mlx-lm's on its own QuantizedKVCache; a row taken out holds the same
    packed keys."""
    from mlx_lm.models.base import scaled_dot_product_attention
    from mlx_lm.models.cache import QuantizedKVCache

    from mlx_dsvl.batch_cache import BatchQuantizedKVCache

    H, D = 2, 64
    mx.random.seed(0)
    singles = []
    for length in (5, 300, 0, 17):
        c = QuantizedKVCache(group_size=GROUP, bits=bits)
        if length:
            c.update_and_fetch(mx.random.normal((1, H, length, D)), mx.random.normal((1, H, length, D)))
        singles.append(c)
    batch = BatchQuantizedKVCache.merge(singles[:2])
    for c in singles[2:]:
        batch.extend(BatchQuantizedKVCache.merge([c]))
    assert batch.offset.tolist() == [5, 300, 0, 17]

    q, k, v = (mx.random.normal((4, H, 1, D)) for _ in range(3))

    def attend(rows, cache, mask):  # (mlx-lm scales the queries in place: a fresh array each time)
        kv = cache.update_and_fetch(k[rows], v[rows])
        return scaled_dot_product_attention(q[rows] + 0, *kv, cache=cache, scale=D ** -0.5, mask=mask)

    out = attend(slice(None), batch, batch.make_mask(1))
    for i, c in enumerate(singles):
        alone = attend(slice(i, i + 1), c, None)
        assert mx.allclose(out[i:i + 1], alone, atol=1e-5).item(), i

    batch.filter([1, 3])
    assert batch.offset.tolist() == [301, 18]
    row = batch.extract(1)
    want = singles[3].keys_and_values()
    assert row.offset == 18 and all(mx.array_equal(a, b).item() for a, b in zip(row.keys, want[0]))
    assert row.nbytes == sum(a.nbytes for t in want for a in t)


# -- the scheduler --------------------------------------------------------------------------------
def submit(sched, processor, conv, max_tokens) -> queue.Queue:
    from mlx_dsvl.server.scheduler import Job
    from mlx_dsvl.server.schema import SamplingParams

    events = queue.Queue()
    ids = processor.tokenize(processor.format(conv)).tolist()
    sched.submit(Job(f"j{len(conv)}-{len(ids)}", ids, [], {}, SamplingParams(
        temperature=0, repetition_penalty=1.0, max_tokens=max_tokens), events.put))
    return events


def reply(events: queue.Queue):
    """(the reply's text, its Finished event)."""
    from mlx_dsvl.server.scheduler import Delta, Failed, Finished

    text = ""
    while not isinstance(e := events.get(timeout=120), Finished):
        assert not isinstance(e, Failed), e
        text += e.text if isinstance(e, Delta) else ""
    return text, e


def ask(sched, processor, conv, max_tokens):
    return reply(submit(sched, processor, conv, max_tokens))


def test_quantized_batch_replies_equal_alone(kv_local):
    """Three requests of different lengths decoded together on the quantized batch cache (rows
    joining and leaving): each greedy reply is the one it gets alone."""
    from mlx_dsvl.server.scheduler import Scheduler
    from mlx_dsvl.streaming import kv_cache_options

    model, processor = kv_local
    convs = [[{"role": "user", "content": q}] for q in (Q1, Q2, "Count from one to five, then stop.")]
    lengths = (6, 14, 10)
    kv = kv_cache_options(8, GROUP)
    sched = Scheduler(model, processor, kv=kv, cache_bytes=0)
    sched.start()
    alone = [ask(sched, processor, c, n)[0] for c, n in zip(convs, lengths)]
    sched.stop()
    sched = Scheduler(model, processor, max_batch=3, kv=kv, cache_bytes=0)
    pending = [submit(sched, processor, c, n) for c, n in zip(convs, lengths)]  # all wait: one batch
    sched.start()
    together = [reply(events)[0] for events in pending]
    sched.stop()
    assert sched.counters["peak_batch"] == 3
    assert together == alone and all(alone)


def test_follow_up_logits_match_chat_session_and_cache_bytes(kv_local, monkeypatch):
    """A follow-up request on a quantized prefix: its first-token logits are those of
    ChatSession(kv_bits) (one engine: the same prefill passes, the same quantized decode
    steps), while quantization itself moves them; the prefix cache holds the bytes of the
    packed format."""
    from mlx_lm.models.cache import QuantizedKVCache

    import mlx_dsvl.streaming as streaming
    from mlx_dsvl.models.deepseek_vl import lm_head
    from mlx_dsvl.server.scheduler import Scheduler
    from mlx_dsvl.session import ChatSession
    from mlx_dsvl.streaming import kv_cache_options

    model, processor = kv_local
    seen = []

    def spy(lm, h):
        out = lm_head(lm, h)
        seen.append(out + 0)  # a copy (a repetition penalty writes into its input), evaluated
        mx.eval(seen[-1])  # on the thread whose stream made it
        return out

    monkeypatch.setattr(streaming, "lm_head", spy)
    server, chat, nbytes = {}, {}, {}
    for bits in (None, 8, 4):
        sched = Scheduler(model, processor, kv=kv_cache_options(bits, GROUP))
        sched.start()
        conv = [{"role": "user", "content": Q1}]
        reply, _ = ask(sched, processor, conv, 8)
        seen.clear()
        _, done = ask(sched, processor, conv + [{"role": "assistant", "content": reply},
                                                {"role": "user", "content": Q2}], 1)
        server[bits] = seen[0]
        assert done.cached_tokens > 20
        nbytes[bits] = sched.stats()["prefix_cache"]["bytes"]
        if bits:
            entries = [e.prompt_cache for e in _entries(sched.prefixes)]
            assert entries and all(isinstance(c, QuantizedKVCache) and c.bits == bits for e in entries for c in e)
        sched.stop()

        session = ChatSession(model, processor, kv_bits=bits, kv_group_size=GROUP)
        assert "".join(c.text for c in session.send(Q1, [], max_tokens=8, temperature=0)) == reply
        seen.clear()
        list(session.send(Q2, [], max_tokens=1, temperature=0))
        chat[bits] = seen[0]

    def gap(a, b):
        return mx.abs(a - b).max().item()

    assert gap(server[None], chat[None]) < 1e-4
    for bits in (8, 4):
        moved = gap(chat[bits], chat[None])  # what quantization does to the logits
        assert moved > 1e-3, bits
        assert gap(server[bits], chat[bits]) < 1e-4, (bits, gap(server[bits], chat[bits]), moved)
        # per float32 element (4 bytes): bits/8 packed + a float32 scale and bias per group
        assert nbytes[bits] / nbytes[None] == pytest.approx((bits / 8 + 8 / GROUP) / 4, rel=1e-6)


def _entries(prefixes):
    """Every entry of the prefix cache (the trie of mlx-lm's LRUPromptCache)."""
    lru = prefixes._lru
    return [lru._trie.get(model, tokens) for order in lru._lru._lrus.values() for model, tokens in order]


# -- the command line -------------------------------------------------------------------------------
@pytest.mark.slow
def test_server_kv_bits_follow_up_equals_chat_session(kv_ckpt, kv_local, tmp_path):
    """python -m mlx_dsvl.server --kv-bits 8: a conversation over the openai client, its
    follow-up from the (quantized) prefix cache, equals ChatSession(kv_bits=8) greedily."""
    from mlx_dsvl.session import ChatSession

    s = Server(kv_ckpt, tmp_path, tmp_path / "server.log", "--kv-bits", "8", "--kv-group-size", str(GROUP),
               "--api-key", KEY)
    try:
        s.wait_ready()
        c = client(s)
        opts = dict(model="tiny-kv", max_tokens=10, temperature=0, extra_body={"repetition_penalty": 1.1})
        turn1 = [{"role": "user", "content": Q1}]
        r1 = c.chat.completions.create(messages=turn1, **opts).choices[0].message.content
        turn2 = turn1 + [{"role": "assistant", "content": r1}, {"role": "user", "content": Q2}]
        r2 = c.chat.completions.create(messages=turn2, **opts)
        st = stats(s)
    finally:
        code = s.stop()
    assert code == 0 and "Traceback" not in s.output(), s.output()
    assert r2.usage.prompt_tokens_details.cached_tokens > 20
    assert st["kv_bits"] == 8 and st["prefix_cache"]["bytes"] > 0
    model, processor = kv_local
    session = ChatSession(model, processor, kv_bits=8, kv_group_size=GROUP)
    greedy = dict(max_tokens=10, temperature=0, repetition_penalty=1.1)
    want = ["".join(ch.text for ch in session.send(q, [], **greedy)) for q in (Q1, Q2)]
    assert [r1, r2.choices[0].message.content] == want


@pytest.mark.slow
def test_cli_kv_options_are_checked(text_ckpt):
    def serve(*args):
        return subprocess.run([sys.executable, "-m", "mlx_dsvl.server", "--model", str(text_ckpt),
                               "--port", "0", "--log-level", "critical", *args],
                              capture_output=True, text=True, timeout=120)

    bad = serve("--kv-bits", "3")
    assert bad.returncode == 2 and "--kv-bits: invalid choice: 3" in bad.stderr, bad.stderr
    bad = serve("--kv-bits", "8", "--kv-group-size", "48")
    assert bad.returncode == 2 and "--kv-group-size: invalid choice: 48" in bad.stderr, bad.stderr
    bad = serve("--kv-bits", "8", "--kv-group-size", "32")  # head size 16
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error")]
    assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr
    assert errors == ["error: kv_group_size 32 does not divide the LLM's head size 16"], bad.stderr
