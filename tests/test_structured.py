"""Structured output (``response_format``): on random weights of both families every sampled
reply parses and validates with ``jsonschema``; rows of one batch follow their own formats; a
cut-off reply says "length"; a schema llguidance cannot follow is refused before decoding, by
the API, the command line and the server (driven by the ``openai`` client)."""

from __future__ import annotations

import json
import math
import os
import queue
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import pytest

import mlx_dsvl
from mlx_dsvl.grammar import ResponseFormatError, compile_format, grammar_source
from mlx_dsvl.sampling import PROCESSOR_CONTEXT, SamplingOptions
from mlx_dsvl.session import ChatSession
from mlx_dsvl.streaming import Batch, Row, prefill

jsonschema = pytest.importorskip("jsonschema", reason="pip install -e '.[test]'")
for _name in ("fastapi", "uvicorn", "httpx"):
    pytest.importorskip(_name, reason=f"the server tests need {_name}: pip install -e '.[server,test]'")

from test_server import KEY, Server, client, http  # noqa: E402

# required properties, a bounded string, an enum, an integer, an array (bounded: random weights
# rarely close a string of their own accord)
PET = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
    },
    "required": ["name", "kind", "age", "tags"],
    "additionalProperties": False,
}
PET_FORMAT = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET, "strict": True}}
CONV = [{"role": "user", "content": "Describe a pet as JSON."}]
SEEDS = range(4)


def reply(model, processor, conv=CONV, **options) -> tuple[str, str]:
    """(text, finish_reason) of ``stream_generate``."""
    chunks = list(mlx_dsvl.stream_generate(model, processor, conv, **options))
    return "".join(c.text for c in chunks), chunks[-1].finish_reason


@pytest.fixture(scope="module", params=["text", "hybrid"])
def family(request):
    """Random weights of the 1.3B layout (its LM head zeroed where the tokenizer has no token)
    and of the 7B hybrid layout (untouched: its head favours undefined ids, which the mask bars)."""
    ckpt = request.getfixturevalue("text_ckpt" if request.param == "text" else "tiny_hybrid_dir")
    return mlx_dsvl.load(ckpt, dtype="float32")


# -- the API ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sampled_replies_validate_against_the_schema(family):
    model, processor = family
    replies = set()
    for seed in SEEDS:
        text, reason = reply(model, processor, temperature=1.0, seed=seed, max_tokens=200,
                             response_format=PET_FORMAT)
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), PET)
        replies.add(text)
    assert len(replies) > 1  # sampled, not one forced answer
    again, _ = reply(model, processor, temperature=1.0, seed=SEEDS[-1], max_tokens=200,
                     response_format=PET_FORMAT)
    assert again == text  # same seed, same reply


@pytest.mark.slow
def test_json_object_replies_are_objects(family):
    """Any object: a random model's strings may run past the budget ("length"); those that end
    parse as objects."""
    model, processor = family
    ended = 0
    for seed in range(6):
        text, reason = reply(model, processor, temperature=1.0, seed=seed, max_tokens=48,
                             response_format={"type": "json_object"})
        assert text.startswith("{")
        if reason == "stop":
            assert isinstance(json.loads(text), dict)
            ended += 1
        else:
            assert reason == "length"
            with pytest.raises(json.JSONDecodeError):
                json.loads(text)
    assert ended >= 1


def test_a_cut_off_reply_says_length(tiny_model):
    model, processor = tiny_model
    text, reason = reply(model, processor, temperature=1.0, seed=0, max_tokens=5, response_format=PET_FORMAT)
    assert reason == "length"
    assert text.startswith("{") and ('{"name": '.startswith(text) or text.startswith('{"name": '))
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_text_format_is_no_constraint(tiny_model):
    model, processor = tiny_model
    plain = reply(model, processor, temperature=0.0, max_tokens=12)
    assert reply(model, processor, temperature=0.0, max_tokens=12, response_format={"type": "text"}) == plain


@pytest.mark.slow
def test_mixed_batch_each_row_gets_its_format(text_ckpt):
    """One Batch: a schema row, a free row and a json_object row (all sampled); each gets what it
    asked for, the free row exactly its reply alone."""
    model, processor = mlx_dsvl.load(text_ckpt, dtype="float32")
    formats = [PET_FORMAT, None, {"type": "json_object"}, PET_FORMAT]
    opts = SamplingOptions(temperature=1.0, seed=3, max_tokens=60)
    inputs = processor(CONV, None)
    ids = inputs["input_ids"]
    embeds = model.get_input_embeddings(ids)[0]
    batch = Batch(model.language_model, processor.tokenizer.eos_token_id)
    texts, reasons = [""] * len(formats), [None] * len(formats)
    for i, fmt in enumerate(formats):
        cache = model.make_cache()
        logits = prefill(model.language_model, ids[0], lambda s, e: embeds[s:e], cache)
        row = Row.start(processor, opts.with_(seed=i), ids[0, -PROCESSOR_CONTEXT:].tolist(), tag=i,
                        grammar=compile_format(processor, fmt))
        batch.add(row, cache, logits)
    while batch.rows:
        for out in batch.step():
            texts[out.row.tag] += out.text + out.tail
            reasons[out.row.tag] = out.finish_reason or reasons[out.row.tag]
    for i in (0, 3):
        assert reasons[i] == "stop", texts[i]
        jsonschema.validate(json.loads(texts[i]), PET)
    assert texts[0] != texts[3]  # seeds of their own
    alone, reason = reply(model, processor, temperature=1.0, seed=1, max_tokens=60)
    assert (texts[1], reasons[1]) == (alone, reason)
    assert texts[2].startswith("{")
    if reasons[2] == "stop":
        assert isinstance(json.loads(texts[2]), dict)


@pytest.fixture(scope="module")
def kv_ckpt(text_ckpt, tmp_path_factory):
    """The text checkpoint with 2 heads of 32 (a KV quantization group must divide the head)."""
    from mlx_dsvl.random_checkpoint import with_language_config

    return with_language_config(text_ckpt, tmp_path_factory.mktemp("kv") / "tiny-kv",
                                num_attention_heads=2, num_key_value_heads=2)


def test_session_with_kv_bits_and_a_follow_up(kv_ckpt):
    """A quantized cache, two turns (the second reuses the first's cache), a stop string."""
    model, processor = mlx_dsvl.load(kv_ckpt, dtype="float32")
    chat = ChatSession(model, processor, kv_bits=8, kv_group_size=32)
    for question in ("A pet?", "Another one?"):
        chunks = list(chat.send(question, [], temperature=1.0, seed=5, max_tokens=200,
                                response_format=PET_FORMAT))
        text = "".join(c.text for c in chunks)
        assert chunks[-1].finish_reason == "stop", text
        jsonschema.validate(json.loads(text), PET)
    assert chat.timings["cached_tokens"] > 0
    assert chat.messages[-1]["content"] == text


@pytest.mark.parametrize("fmt, param, says", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}},
     "response_format.json_schema.schema", 'Unimplemented keys: ["not"]'),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}},
     "response_format.json_schema.schema", "Invalid type: strin"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}},
     "response_format.json_schema.schema", "does not exist"),
    ({"type": "json_schema"}, "response_format.json_schema", "must be an object"),
    ({"type": "xml"}, "response_format.type", "must be one of text, json_object, json_schema"),
    ({"type": "regex", "regex": "(?<=a)b"}, "response_format.regex", "look-around"),
    ("json", "response_format", "must be an object"),
])
def test_a_format_that_cannot_be_followed_is_refused_before_decoding(tiny_model, fmt, param, says):
    model, processor = tiny_model
    with pytest.raises(ResponseFormatError, match="^" + param.replace(".", r"\.")) as e:
        grammar_source(fmt)
    assert e.value.param == param and says in e.value.problem
    chat = ChatSession(model, processor)
    with pytest.raises(ValueError, match=param.replace(".", r"\.")):
        next(chat.send("Hi", [], response_format=fmt))
    assert chat.messages == [] and chat.cache[0].offset == 0  # nothing was run


def test_a_schema_compiles_once(chat_processor):
    a = compile_format(chat_processor, PET_FORMAT)
    same = json.loads(json.dumps(PET_FORMAT))  # an equal schema, another object
    assert compile_format(chat_processor, same) is a
    reordered = {**PET, "properties": dict(reversed(PET["properties"].items()))}  # key order is output order
    other = compile_format(chat_processor, {"type": "json_schema", "json_schema": {"name": "p", "schema": reordered}})
    assert other is not a


def test_regex_format(tiny_model):
    model, processor = tiny_model
    text, reason = reply(model, processor, temperature=1.0, seed=2, max_tokens=20,
                         response_format={"type": "regex", "regex": "(yes|no), [0-9]{3}"})
    assert reason == "stop"
    assert text[:-5] in ("yes", "no") and text[-5:-3] == ", " and text[-3:].isdigit()


# -- the command line ---------------------------------------------------------------------------
def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mlx_dsvl.generate", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_cli_json_schema_and_json(text_ckpt, tmp_path):
    path = tmp_path / "pet.json"
    path.write_text(json.dumps(PET))
    base = ["--model", str(text_ckpt), "--prompt", "A pet?", "--temperature", "1", "--seed", "1",
            "--max-tokens", "200"]
    r = run_cli(*base, "--json-schema", str(path))
    assert r.returncode == 0, r.stderr
    jsonschema.validate(json.loads(r.stdout), PET)
    r = run_cli(*base, "--json", "--seed", "4", "--max-tokens", "300")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("{")


@pytest.mark.parametrize("content, says", [
    (None, "cannot read it"),
    ("{not json", "not a JSON file"),
    ('{"type": "object", "properties": {"a": {"not": {}}}}', 'Unimplemented keys: ["not"]'),
])
def test_cli_bad_schema_file_is_one_line_before_loading(tmp_path, capsys, content, says):
    from mlx_dsvl.generate import main

    path = tmp_path / "schema.json"
    if content is not None:
        path.write_text(content)
    assert main(["--model", "/nowhere", "--prompt", "Hi", "--json-schema", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --json-schema {path}: ") and says in err[0], err


# -- the server ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(text_ckpt, tmp_path_factory):
    env = {**os.environ, "MLX_DSVL_API_KEY": KEY}
    s = Server(text_ckpt, tmp_path_factory.mktemp("images"), tmp_path_factory.mktemp("log") / "server.log", env=env)
    s.wait_ready()
    yield s
    assert s.stop() == 0
    assert "Traceback" not in s.output()


@pytest.mark.slow
def test_server_json_schema_plain_streamed_and_cached(server):
    c = client(server)
    messages = [{"role": "user", "content": "Describe a pet."}]
    kw = dict(model="tiny-text", messages=messages, max_tokens=200, temperature=1.0, response_format=PET_FORMAT)
    for seed in SEEDS:
        r = c.chat.completions.create(seed=seed, **kw)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), PET)
    chunks = list(c.chat.completions.create(seed=seed, stream=True, **kw))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == r.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices[0].finish_reason] == ["stop"]
    again = c.chat.completions.create(seed=seed, **kw)  # its prompt now in the prefix cache
    assert again.choices[0].message.content == r.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    obj = c.chat.completions.create(seed=2, **{**kw, "response_format": {"type": "json_object"}, "max_tokens": 300})
    assert obj.choices[0].message.content.startswith("{")
    cut = c.chat.completions.create(seed=0, **{**kw, "max_tokens": 4})
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 4
    stopped = c.chat.completions.create(seed=0, stop=['"kind"'], **kw)
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == c.chat.completions.create(seed=0, **kw).choices[0] \
        .message.content.split('"kind"')[0]


@pytest.mark.slow
def test_server_refuses_a_bad_schema_before_decoding(server):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "not": {}}}}
    with http(server) as h:
        before = h.get("/stats").json()["requests"]
        r = h.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                 "response_format": bad})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "response_format.json_schema.schema" and 'Unimplemented keys: ["not"]' in err["message"]
        assert h.get("/stats").json()["requests"] == before  # never admitted


def test_logprobs_are_those_of_the_masked_logits(family):
    """A constrained reply's log-probabilities are read after the grammar mask: every listed
    alternative is a token the grammar allowed at that step (a fresh matcher walked along the
    reply says which), and the chosen token is among them."""
    model, processor = family
    chunks = list(mlx_dsvl.stream_generate(model, processor, CONV, temperature=1.0, seed=1, max_tokens=60,
                                           response_format=PET_FORMAT, logprobs=5))
    entries = [e for c in chunks for e in c.logprobs or ()]
    assert entries
    walk = compile_format(processor, PET_FORMAT).constraint()
    for e in entries:
        allowed = walk.apply(mx.zeros((1, model.language_model.args.vocab_size)))[0]
        top = [t for t, _ in e.top]
        assert top and all(allowed[t].item() == 0 and lp > -math.inf for t, lp in e.top), e
        assert e.token in top or e.logprob <= min(lp for _, lp in e.top)
        walk.advance(e.token)


@pytest.mark.slow
def test_server_mixed_batch_of_formats_on_the_hybrid_family(tiny_hybrid_dir, tmp_path):
    """Requests decoded together by the server on the 7B layout, one with a schema, one without a
    format, one with json_object: each reply is what its request asked for, and the one it gets alone."""
    s = Server(tiny_hybrid_dir, tmp_path, tmp_path / "server.log", env={**os.environ, "MLX_DSVL_API_KEY": KEY})
    try:
        s.wait_ready()
        c = client(s)
        formats = [PET_FORMAT, None, {"type": "json_object"}, PET_FORMAT]

        def ask(i: int):
            extra = {} if formats[i] is None else {"response_format": formats[i]}
            return c.chat.completions.create(model="tiny-hybrid", messages=CONV, temperature=1.0, seed=i,
                                             max_tokens=150, **extra)

        with ThreadPoolExecutor(len(formats)) as pool:
            together = list(pool.map(ask, range(len(formats))))
        with http(s) as h:
            assert h.get("/stats").json()["peak_batch"] >= 2  # decoded side by side
        for i, (fmt, r) in enumerate(zip(formats, together)):
            text, reason = r.choices[0].message.content, r.choices[0].finish_reason
            assert text == ask(i).choices[0].message.content, i
            if fmt is PET_FORMAT:
                assert reason == "stop", text
                jsonschema.validate(json.loads(text), PET)
            elif fmt is not None:
                assert text.startswith("{") and (reason == "length" or isinstance(json.loads(text), dict)), text
            else:
                with pytest.raises(ValueError):  # random weights, no mask: not JSON
                    json.loads(text)
    finally:
        assert s.stop() == 0
    assert "Traceback" not in s.output()


def test_a_grammar_failing_midway_ends_its_request_only(text_ckpt, monkeypatch):
    """llguidance refusing a token midway (it should not, for a token its mask allowed) fails that
    request with a 500 naming it; the request decoded beside it finishes, valid; a session raises."""
    from mlx_dsvl import session as session_module
    from mlx_dsvl.server.scheduler import Delta, Failed, Finished, Job, Scheduler
    from mlx_dsvl.server.schema import SamplingParams
    from mlx_dsvl.streaming import GrammarError

    model, processor = mlx_dsvl.load(text_ckpt, dtype="float32")
    grammar = compile_format(processor, PET_FORMAT)

    class FailsAtThirdToken:
        def constraint(self):
            c, taken = grammar.constraint(), []
            advance = c.advance

            def fail_third(token):
                taken.append(token)
                if len(taken) == 3:
                    raise GrammarError("llguidance gave up")
                advance(token)

            c.advance = fail_third
            return c

    ids = processor.tokenize(processor.format(CONV)).tolist()
    sched = Scheduler(model, processor, max_batch=2, cache_bytes=0)
    events = [queue.Queue(), queue.Queue()]
    for i, g in enumerate((FailsAtThirdToken(), grammar)):
        sched.submit(Job(f"j{i}", ids, [], {}, SamplingParams(temperature=1.0, seed=i, repetition_penalty=1.0,
                                                               max_tokens=200), events[i].put, grammar=g))
    sched.start()
    try:
        got = []
        for q in events:
            text = ""
            while not isinstance(e := q.get(timeout=120), (Finished, Failed)):
                text += e.text if isinstance(e, Delta) else ""
            got.append((text, e))
    finally:
        sched.stop()
    assert isinstance(got[0][1], Failed) and got[0][1].status == 500, got[0]
    assert "structured output failed: llguidance gave up" in got[0][1].message
    assert isinstance(got[1][1], Finished) and got[1][1].finish_reason == "stop", got[1]
    jsonschema.validate(json.loads(got[1][0]), PET)
    assert sched.counters["peak_batch"] == 2
    monkeypatch.setattr(session_module, "compile_format", lambda *_: FailsAtThirdToken())
    with pytest.raises(GrammarError, match="gave up"):
        list(ChatSession(model, processor).send("A pet?", temperature=1.0, seed=0, max_tokens=50,
                                                response_format=PET_FORMAT))
