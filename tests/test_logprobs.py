"""Log-probabilities: the engine's (each row's own, in a mixed batch) and the server's
``logprobs``/``top_logprobs`` (OpenAI's shape, plain and streamed), against greedy decoding
written out here: a whole forward pass over the prompt and the reply so far at each step, mlx-lm's
repetition penalty formula, a log-softmax."""

from __future__ import annotations

import json
import os

import mlx.core as mx
import numpy as np
import pytest

for _name in ("fastapi", "uvicorn", "httpx"):
    pytest.importorskip(_name, reason=f"the server tests need {_name}: pip install -e '.[server,test]'")

from test_server import KEY, Server, client, http  # noqa: E402

import mlx_dsvl  # noqa: E402
from mlx_dsvl.sampling import GREEDY  # noqa: E402
from mlx_dsvl.streaming import Batch, Row, prefill  # noqa: E402

WINDOW = 20  # mlx-lm's repetition context (the engine's PROCESSOR_CONTEXT)
TOL = 1e-5
QUESTION = [{"role": "user", "content": "Tell me a story about the sea."}]


def gpt2_byte_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the others for 256 + n."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(rest)}}


BYTE_OF = gpt2_byte_table()


@pytest.fixture(scope="module")
def local(text_ckpt):
    return mlx_dsvl.load(text_ckpt, dtype="float32")


@pytest.fixture(scope="module")
def server(text_ckpt, tmp_path_factory):
    s = Server(text_ckpt, tmp_path_factory.mktemp("images"), tmp_path_factory.mktemp("log") / "server.log",
               env={**os.environ, "MLX_DSVL_API_KEY": KEY})
    s.wait_ready()
    yield s
    assert s.stop() == 0
    assert "Traceback" not in s.output(), s.output()


def prompt_ids(local, messages) -> list[int]:
    _, processor = local
    return processor.tokenize(processor.format(messages)).tolist()


def expected(local, ids: list[int], steps: int, penalty: float = 1.0,
             follow: list[int] | None = None) -> list[tuple[int, np.ndarray]]:
    """Greedy decoding from scratch (or along the tokens ``follow``): ``(token, log-probabilities
    over the vocabulary)`` per step."""
    model, processor = local
    seq, out = list(ids), []
    for _ in range(steps):
        logits = np.array(model.language_model(mx.array([seq]))[0, -1], dtype=np.float64)
        for t in set(seq[-WINDOW:]):  # mlx-lm: negative logits times the penalty, others divided
            logits[t] = logits[t] * penalty if logits[t] < 0 else logits[t] / penalty
        logprobs = logits - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
        token = int(np.argmax(logprobs)) if follow is None else follow[len(out)]
        if token == processor.tokenizer.eos_token_id:
            break
        out.append((token, logprobs))
        seq.append(token)
    return out


def token_bytes(local, token: int) -> bytes:
    """The tokenizer's piece, its byte-level characters mapped back to bytes (GPT-2's table)."""
    piece = local[1].tokenizer.convert_ids_to_tokens(token) or ""
    return b"".join(bytes([BYTE_OF[c]]) if c in BYTE_OF else c.encode() for c in piece)


def check_top(top: list[float], logprobs: np.ndarray, k: int) -> None:
    """The k largest log-probabilities, largest first."""
    assert len(top) == k
    np.testing.assert_allclose(top, np.sort(logprobs)[::-1][:k], atol=TOL, rtol=0)


# -- the engine -----------------------------------------------------------------------------------
def decode(local, rows: list[tuple[str, object, int | None]], max_tokens: int = 6) -> dict:
    """Rows ``(prompt, options, logprobs)`` decoded in one Batch -> tag -> its Outputs."""
    model, processor = local
    lm, batch = model.language_model, Batch(model.language_model, processor.tokenizer.eos_token_id)
    for i, (text, options, k) in enumerate(rows):
        ids = mx.array(prompt_ids(local, [{"role": "user", "content": text}]))
        embeds = model.get_input_embeddings(ids[None])[0]
        cache = model.make_cache()
        logits = prefill(lm, ids, lambda s, e, x=embeds: x[s:e], cache)
        batch.add(Row.start(processor, options.with_(max_tokens=max_tokens), ids.tolist(), tag=i, logprobs=k),
                  cache, logits)
    outs: dict = {i: [] for i in range(len(rows))}
    while batch.rows:
        for out in batch.step():
            outs[out.row.tag].append(out)
    return outs


@pytest.mark.parametrize("penalised", [False, True], ids=["all greedy", "one row penalised"])
def test_engine_rows_that_ask_get_the_log_softmax_the_sampler_saw(local, penalised):
    """A batch of rows asking for 3, none and 0 alternatives (with a penalised row, and a sampled
    one, each row is sampled on its own; without, one argmax for all): each asking row's values
    are its own, before temperature (a sampled row's along the tokens it drew)."""
    rows = [("Tell me a story.", GREEDY, 3), ("What is the weather like today?", GREEDY, None),
            ("Name three colours.", GREEDY.with_(repetition_penalty=1.3 if penalised else 1.0), 0)]
    if penalised:
        rows.append(("Count to ten.", GREEDY.with_(temperature=1.5, seed=7), 4))
    outs = decode(local, rows)
    for i, (text, options, k) in enumerate(rows):
        got = [o for o in outs[i] if o.token != local[1].tokenizer.eos_token_id]
        drawn = [o.token for o in got] if options.temperature else None
        want = expected(local, prompt_ids(local, [{"role": "user", "content": text}]), len(got) if drawn else 6,
                        options.repetition_penalty, follow=drawn)
        assert [o.token for o in got] == [t for t, _ in want]
        for o, (token, logprobs) in zip(got, want):
            if k is None:
                assert o.logprobs is None
                continue
            assert o.logprobs.token == token
            assert o.logprobs.logprob == pytest.approx(logprobs[token], abs=TOL)
            if not drawn:
                assert [t for t, _ in o.logprobs.top][:1] == [token][:k]  # greedy: the likeliest
            check_top([v for _, v in o.logprobs.top], logprobs, k)


def test_stream_generate_chunks_carry_their_tokens_logprobs(local):
    """The Python API: ``logprobs=2``; each chunk lists the tokens whose text it holds."""
    chunks = list(mlx_dsvl.stream_generate(*local, QUESTION, temperature=0.0, repetition_penalty=1.0,
                                           max_tokens=6, logprobs=2))
    listed = [lp for c in chunks for lp in c.logprobs]
    want = expected(local, prompt_ids(local, QUESTION), 6)
    assert [lp.token for lp in listed] == [t for t, _ in want]
    for lp, (token, logprobs) in zip(listed, want):
        assert lp.logprob == pytest.approx(logprobs[token], abs=TOL)
        check_top([v for _, v in lp.top], logprobs, 2)
    for c in chunks:
        spelt = b"".join(token_bytes(local, lp.token) for lp in c.logprobs).decode("utf-8", "replace")
        assert spelt.lstrip(" ") == c.text.lstrip(" ")
    off = list(mlx_dsvl.stream_generate(*local, QUESTION, temperature=0.0, max_tokens=2))
    assert all(c.logprobs is None for c in off)


# -- the server -----------------------------------------------------------------------------------
def ask(server, **kw):
    return client(server).chat.completions.create(model="tiny-text", messages=QUESTION, max_tokens=8,
                                                  temperature=0, logprobs=True, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_server_logprobs_equal_a_direct_forward_pass(server, local, penalty):
    """Each generated token: its bytes, its log-probability and the 5 likeliest alternatives
    (the chosen one first: greedy) equal the written-out decoding's, the penalty applied."""
    r = ask(server, top_logprobs=5, extra_body={"repetition_penalty": penalty})
    content = r.choices[0].logprobs.content
    want = expected(local, prompt_ids(local, QUESTION), 8, penalty)
    assert len(content) == len(want) == r.usage.completion_tokens
    if penalty != 1.0:  # the penalty changes the values looked for
        unpenalised = expected(local, prompt_ids(local, QUESTION), 8, follow=[t for t, _ in want])
        assert max(abs(a[t] - b[t]).max() for (t, a), (_, b) in zip(want, unpenalised)) > 0.05
    for entry, (token, logprobs) in zip(content, want):
        assert bytes(entry.bytes) == token_bytes(local, token)
        assert entry.token == token_bytes(local, token).decode("utf-8", "replace")
        assert entry.logprob == pytest.approx(logprobs[token], abs=TOL)
        check_top([t.logprob for t in entry.top_logprobs], logprobs, 5)
        assert (entry.top_logprobs[0].token, entry.top_logprobs[0].bytes) == (entry.token, entry.bytes)
    text = b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace")
    assert text.lstrip(" ") == r.choices[0].message.content  # (the reply's leading space is dropped)


@pytest.mark.slow
def test_server_streamed_logprobs_equal_plain_chunk_by_chunk(server):
    """The streamed entries, in order, are the plain reply's; each chunk's tokens spell its text."""
    plain = ask(server, top_logprobs=2).choices[0].logprobs.content
    chunks = list(ask(server, top_logprobs=2, stream=True))
    streamed = []
    for ch in chunks:
        if ch.choices and ch.choices[0].logprobs is not None:
            entries = ch.choices[0].logprobs.content
            streamed += entries
            spelt = b"".join(bytes(e.bytes) for e in entries).decode("utf-8", "replace")
            assert spelt.lstrip(" ") == (ch.choices[0].delta.content or "").lstrip(" ")
    assert plain and [e.model_dump() for e in streamed] == [e.model_dump() for e in plain]
    assert chunks[0].choices[0].logprobs is None  # the role chunk


@pytest.mark.slow
def test_server_logprobs_off_and_zero_alternatives(server):
    c = client(server)
    off = c.chat.completions.create(model="tiny-text", messages=QUESTION, max_tokens=4, temperature=0)
    assert off.choices[0].logprobs is None
    zero = ask(server, top_logprobs=0).choices[0].logprobs.content
    alone = ask(server).choices[0].logprobs.content  # logprobs without top_logprobs: none
    assert zero and all(e.top_logprobs == [] for e in zero)
    assert [e.model_dump() for e in alone][:4] == [e.model_dump() for e in zero][:4]


REFUSED = {
    "top_logprobs without logprobs": ({"top_logprobs": 2}, "top_logprobs"),
    "top_logprobs with logprobs false": ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    "top_logprobs 21": ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    "top_logprobs -1": ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    "top_logprobs 2.5": ({"logprobs": True, "top_logprobs": 2.5}, "top_logprobs"),
    "logprobs 'yes'": ({"logprobs": "yes"}, "logprobs"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(REFUSED))
def test_server_refuses_bad_logprobs_fields(server, case):
    fields, param = REFUSED[case]
    with http(server) as h:
        r = h.post("/v1/chat/completions", content=json.dumps({"messages": QUESTION, **fields}),
                   headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"], err
