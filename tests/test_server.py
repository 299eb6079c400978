"""python -m mlx_dsvl.server: the real server in a subprocess, driven by the ``openai`` package
and by raw HTTP; replies checked against ``mlx_dsvl.generate`` on the same weights."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

for _name in ("fastapi", "uvicorn", "httpx"):
    pytest.importorskip(_name, reason=f"the server tests need {_name}: pip install -e '.[server,test]'")

import httpx  # noqa: E402

import mlx_dsvl  # noqa: E402

if TYPE_CHECKING:
    from openai import OpenAI

KEY = "test-key-123"
GREEDY = {"temperature": 0, "extra_body": {"repetition_penalty": 1.1}}


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local(text_ckpt):
    return mlx_dsvl.load(text_ckpt, dtype="float32")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir, image_dir, log_path, *extra, env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_dsvl.server", "--model", str(model_dir), "--port",
             str(self.port), "--allow-local-images", str(image_dir), "--max-batch", "4",
             "--log-level", "warning", *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def output(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, f"server exited:\n{self.output()}"
            if "listening on" in self.output():
                return
            time.sleep(0.1)
        raise TimeoutError(self.output())

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        finally:
            self.log.close()


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("allowed")
    make_png(d / "inside.png", seed=3)
    return d


@pytest.fixture(scope="module")
def server(text_ckpt, image_dir, tmp_path_factory):
    env = {**os.environ, "MLX_DSVL_API_KEY": KEY}  # the key from the documented variable
    s = Server(text_ckpt, image_dir, tmp_path_factory.mktemp("log") / "server.log", env=env)
    s.wait_ready()
    yield s
    code = s.stop()
    out = s.output()
    assert code == 0, out
    assert "Traceback" not in out, out
    assert "shutting down" in out


def client(server) -> OpenAI:
    openai = pytest.importorskip("openai", reason="the server tests need openai: pip install -e '.[server,test]'")
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def http(server, **kw) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                        timeout=120, **kw)


def make_png(path=None, seed=0, size=(60, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    if path is not None:
        path.write_bytes(buf.getvalue())
    return buf.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def stats(server) -> dict:
    with http(server) as h:
        return h.get("/stats").json()


def reference(local, conversation, images, max_tokens):
    model, processor = local
    pictures = [Image.open(io.BytesIO(p)) for p in images]
    return mlx_dsvl.generate(model, processor, conversation, pictures, max_tokens=max_tokens,
                             temperature=0.0, repetition_penalty=1.1)


# -- the openai client --------------------------------------------------------------------------
def test_startup_messages(server):
    out = server.output()
    assert "loading" in out and f"listening on http://127.0.0.1:{server.port}" in out, out
    assert "API key required" in out


def test_openai_client_image_reply_equals_generate(server, local):
    png = make_png(seed=1)
    messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": [{"type": "text", "text": "What is in"},
                                     {"type": "image_url", "image_url": {"url": data_url(png)}},
                                     {"type": "text", "text": "this picture?"}]},
    ]
    r = client(server).chat.completions.create(model="tiny-text", messages=messages, max_tokens=20,
                                               **GREEDY)
    # the image part stands where it was sent: between the two text parts
    expected_conv = [{"role": "system", "content": "You answer briefly."},
                     {"role": "user", "content": "What is in<image_placeholder>this picture?"}]
    expected = reference(local, expected_conv, [png], 20)
    assert len(expected) > 5
    assert r.choices[0].message.content == expected
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
    _, processor = local
    n_prompt = processor(expected_conv, [Image.open(io.BytesIO(png))])["input_ids"].shape[1]
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.total_tokens == n_prompt + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 20


def test_openai_client_stream_equals_non_stream(server):
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(make_png(seed=2))}},
        {"type": "text", "text": "Describe the colours."}]}]
    c = client(server)
    whole = c.chat.completions.create(model="tiny-text", messages=messages, max_tokens=16, **GREEDY)
    chunks = list(c.chat.completions.create(model="tiny-text", messages=messages, max_tokens=16,
                                            stream=True, stream_options={"include_usage": True},
                                            **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])


def test_stop_strings_and_length(server, local):
    c = client(server)
    messages = [{"role": "user", "content": "Tell me a story."}]
    full = c.chat.completions.create(model="tiny-text", messages=messages, max_tokens=30, **GREEDY)
    text = full.choices[0].message.content
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 30
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = c.chat.completions.create(model="tiny-text", messages=messages, max_tokens=30, stop=[stop],
                                    **GREEDY)
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]


# -- several clients --------------------------------------------------------------------------
def stream_text(server, body) -> str:
    pieces = []
    with http(server) as h, h.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                pieces += [c["delta"].get("content") or "" for c in chunk["choices"]]
    return "".join(pieces)


@pytest.mark.slow
def test_four_concurrent_streams_each_equal_to_alone(server):
    bodies = [
        {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(make_png(seed=10 + i))}},
            {"type": "text", "text": f"Question {i}: what is this?"}]}]} if i % 2 else
        {"messages": [{"role": "user", "content": f"Say something about number {i}."}]}
        for i in range(4)
    ]
    bodies = [{**b, "max_tokens": 48, "temperature": 0, "repetition_penalty": 1.1} for b in bodies]
    alone = [stream_text(server, b) for b in bodies]
    assert len(set(alone)) == 4 and all(alone)
    before = stats(server)
    results = [None] * 4
    barrier = threading.Barrier(4)

    def run(i):
        barrier.wait()
        results[i] = stream_text(server, bodies[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = stats(server)
    assert results == alone
    tokens = after["generated_tokens"] - before["generated_tokens"]
    steps = after["decode_steps"] - before["decode_steps"]
    assert steps < tokens, "the four requests were never decoded in one batch"


def test_client_hanging_up_mid_stream_frees_its_slot(server):
    before = stats(server)
    body = {"messages": [{"role": "user", "content": "Go on and on."}], "max_tokens": 3000,
            "ignore_eos": True, "temperature": 0, "stream": True}
    with http(server) as h, h.stream("POST", "/v1/chat/completions", json=body) as r:
        lines, events = r.iter_lines(), 0  # (kept referenced: a dropped iterator hangs up)
        for line in lines:
            events += line.startswith("data: ")
            if events == 3:
                break
        assert stats(server)["active"] == 1  # streaming
        r.close()  # hang up
    deadline = time.time() + 10
    while (s := stats(server))["active"] and time.time() < deadline:
        time.sleep(0.05)
    assert s["active"] == 0 and s["cancelled"] == before["cancelled"] + 1
    assert s["generated_tokens"] - before["generated_tokens"] < 3000
    assert stream_text(server, {**body, "max_tokens": 3}), "server unusable after the hang-up"


def test_client_giving_up_on_a_plain_request_frees_its_slot(server):
    before = stats(server)
    body = {"messages": [{"role": "user", "content": "Wait for it."}], "max_tokens": 3000,
            "ignore_eos": True, "temperature": 0}
    with http(server) as h, pytest.raises(httpx.ReadTimeout):
        h.post("/v1/chat/completions", json=body, timeout=1.0)
    deadline = time.time() + 10
    while (s := stats(server))["active"] and time.time() < deadline:
        time.sleep(0.05)
    assert s["active"] == 0 and s["cancelled"] == before["cancelled"] + 1


def test_scheduler_stop_ends_every_request_and_queue_limit(local):
    import queue as q

    from mlx_dsvl.server.scheduler import Busy, Failed, Job, Scheduler
    from mlx_dsvl.server.schema import SamplingParams

    model, processor = local
    ids = processor.tokenize(processor.format(USER)).tolist()
    events = q.Queue()
    sched = Scheduler(model, processor, max_batch=1, max_queue=1)
    jobs = [Job(f"j{i}", ids, [], {}, SamplingParams(max_tokens=3000, ignore_eos=True), events.put)
            for i in range(3)]
    sched.submit(jobs[0])
    sched.submit(jobs[1])  # waits for the one slot
    with pytest.raises(Busy):
        sched.submit(jobs[2])
    sched.start()
    while sched.counters["generated_tokens"] < 2:
        time.sleep(0.01)
    sched.stop()
    failed = []
    while not events.empty():
        e = events.get()
        failed += [e.status] if isinstance(e, Failed) else []
    assert failed == [503, 503] and sched.stats()["active"] == 0


# -- caches -----------------------------------------------------------------------------------
def test_follow_up_reuses_prefix_and_image(server, local):
    _, processor = local
    png = make_png(seed=21)
    turn1 = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png)}},
        {"type": "text", "text": "Describe it."}]}]
    c = client(server)
    s0 = stats(server)
    r1 = c.chat.completions.create(model="tiny-text", messages=turn1, max_tokens=12, **GREEDY)
    s1 = stats(server)
    assert s1["images_encoded"] == s0["images_encoded"] + 1
    reply = r1.choices[0].message.content
    turn2 = turn1 + [{"role": "assistant", "content": reply},
                     {"role": "user", "content": "And what colours?"}]
    r2 = c.chat.completions.create(model="tiny-text", messages=turn2, max_tokens=12, **GREEDY)
    s2 = stats(server)
    conv1 = [{"role": "user", "content": "<image_placeholder>Describe it."}]
    n1 = processor(conv1, [Image.open(io.BytesIO(png))])["input_ids"].shape[1]
    assert r2.usage.prompt_tokens_details.cached_tokens >= n1  # turn 1's prompt and more
    assert s2["images_encoded"] == s1["images_encoded"]  # the image was not encoded again
    assert s2["prefilled_tokens"] - s1["prefilled_tokens"] == r2.usage.prompt_tokens - r2.usage.prompt_tokens_details.cached_tokens
    conv2 = conv1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And what colours?"}]
    assert r2.choices[0].message.content == reference(local, conv2, [png], 12)
    # the same image in a new conversation: features from the image cache, not the tower
    other = [{"role": "user", "content": [{"type": "text", "text": "New chat."},
                                          {"type": "image_url", "image_url": {"url": data_url(png)}}]}]
    c.chat.completions.create(model="tiny-text", messages=other, max_tokens=2, **GREEDY)
    s3 = stats(server)
    assert s3["images_encoded"] == s2["images_encoded"] and s3["image_cache_hits"] > s2["image_cache_hits"]


def test_same_text_other_image_reuses_no_image_kv(server, local):
    """Image tokens share one id: the prefix cache must stop at the first differing image."""
    _, processor = local
    a, b = make_png(seed=31), make_png(seed=32)
    conv = [{"role": "user", "content": "<image_placeholder>What is this?"}]
    c = client(server)

    def ask(png):
        return c.chat.completions.create(model="tiny-text", max_tokens=10, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png)}},
                                         {"type": "text", "text": "What is this?"}]}], **GREEDY)

    ask(a)
    rb = ask(b)
    ids = processor(conv, [Image.open(io.BytesIO(b))])["input_ids"][0].tolist()
    first_image = ids.index(processor.image_token_id)
    assert rb.usage.prompt_tokens_details.cached_tokens <= first_image
    assert rb.choices[0].message.content == reference(local, conv, [b], 10)


# -- errors -----------------------------------------------------------------------------------
USER = [{"role": "user", "content": "hi"}]


def image_msg(url):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "hi"}]}]


def bomb_png() -> bytes:
    """More pixels than Pillow's decompression-bomb limit, in a few kilobytes."""
    side = int((Image.MAX_IMAGE_PIXELS * 2.1) ** 0.5)
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


ERROR_CASES = {
    "malformed json": (b'{"messages": [', 400, None),
    "not an object": ([1, 2], 400, None),
    "empty messages": ({"messages": []}, 400, "messages"),
    "no messages": ({"model": "x"}, 400, "messages"),
    "wrong role": ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
    "system not first": ({"messages": USER + [{"role": "system", "content": "x"}] + USER}, 400,
                         "messages[1].role"),
    "ends with assistant": ({"messages": USER + [{"role": "assistant", "content": "x"}]}, 400,
                            "messages[1].role"),
    "unknown part": ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, 400,
                     "messages[0].content[0]"),
    "typed placeholder": ({"messages": [{"role": "user", "content": "<image_placeholder>hi"}]}, 400,
                          "messages[0].content"),
    "n=2": ({"messages": USER, "n": 2}, 400, "n"),
    "tools": ({"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    "json_schema without one": ({"messages": USER, "response_format": {"type": "json_schema"}}, 400,
                                "response_format.json_schema"),
    "temperature < 0": ({"messages": USER, "temperature": -1}, 400, "temperature"),
    "top_p 0": ({"messages": USER, "top_p": 0}, 400, "top_p"),
    "max_tokens 0": ({"messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    "max_completion_tokens 0": ({"messages": USER, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    "too long": ({"messages": [{"role": "user", "content": "word " * 5000}]}, 400, "messages"),
    "unknown model": ({"messages": USER, "model": "gpt-4"}, 404, "model"),
    "remote image": ({"messages": image_msg("http://127.0.0.1:9/cat.png")}, 400, "messages[0].content[0]"),
    "path outside": ({"messages": image_msg("/etc/hostname")}, 400, "messages[0].content[0]"),
    "file url outside": ({"messages": image_msg("file:///etc/hostname")}, 400, "messages[0].content[0]"),
    "dot-dot path": ({"messages": image_msg("../../../../etc/hostname")}, 400, "messages[0].content[0]"),
    "bad base64": ({"messages": image_msg("data:image/png;base64,@@@@")}, 400, "messages[0].content[0]"),
    "not an image": ({"messages": image_msg("data:image/png;base64," + base64.b64encode(b"x" * 99).decode())},
                     400, "messages[0].content[0]"),
    "decompression bomb": ({"messages": image_msg(data_url(bomb_png()))}, 400, "messages[0].content[0]"),
    "lone surrogate": ({"messages": [{"role": "user", "content": "a\ud800b"}]}, 400, "messages[0].content"),
    "lone surrogate, system": ({"messages": [{"role": "system", "content": "\udfff"}, *USER]}, 400,
                               "messages[0].content"),
    "lone surrogate, stop": ({"messages": USER, "stop": ["\ud800"]}, 400, "stop[0]"),
    "temperature Infinity": (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}',
                             400, None),
    "temperature 1e999": (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}',
                          400, "temperature"),
    "repetition_penalty 1e999": (b'{"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 1e999}',
                                 400, "repetition_penalty"),
    "max_tokens true": ({"messages": USER, "max_tokens": True}, 400, "max_tokens"),
    "stream 'yes'": ({"messages": USER, "stream": "yes"}, 400, "stream"),
    "empty stop": ({"messages": USER, "stop": ["x", ""]}, 400, "stop"),
    "file url on another host": ({"messages": image_msg("file://otherhost/inside.png")}, 400,
                                 "messages[0].content[0]"),
    "image over 20 MB": ({"messages": image_msg("data:image/png;base64," + "A" * (28 * 2**20))}, 413,
                         "messages[0].content[0]"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_requests_get_openai_errors(server, case):
    body, status, param = ERROR_CASES[case]
    with http(server) as h:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = h.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param, err
    assert err["type"] == "invalid_request_error"
    words = err["message"].split()
    assert not any(a == b for a, b in zip(words, words[1:])), err  # not "stop stop strings ..."


def test_local_images_only_inside_the_allowed_folder(server, image_dir, tmp_path):
    outside = tmp_path / "outside.png"
    make_png(outside, seed=4)
    link = image_dir / "link.png"
    link.symlink_to(outside)
    big = image_dir / "big.png"
    big.write_bytes(make_png(seed=5) + b"\0" * (21 * 2**20))
    with http(server) as h:
        def post(url):
            return h.post("/v1/chat/completions", json={"messages": image_msg(url), "max_tokens": 2})

        for url in ("inside.png", f"file://{image_dir / 'inside.png'}", str(image_dir / "inside.png"),
                    f"file://localhost{image_dir / 'inside.png'}"):
            assert post(url).status_code == 200, url
        r = post(f"file://otherhost{image_dir / 'inside.png'}")  # not this machine's file
        assert r.status_code == 400 and r.json()["error"]["code"] == "path_not_allowed"
        r = post("link.png")  # a symbolic link out of the folder
        assert r.status_code == 400 and r.json()["error"]["code"] == "path_not_allowed"
        assert post(str(outside)).json()["error"]["code"] == "path_not_allowed"
        assert post("missing.png").status_code == 400
        r = post("big.png")
        assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large"


def test_api_key_and_body_limit(server):
    with httpx.Client(base_url=server.url, timeout=60) as h:
        assert h.get("/health").status_code == 200  # open
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/stats")):
                r = h.request(method, path, headers=headers, json={"messages": USER})
                assert r.status_code == 401, (headers, path)
                assert r.json()["error"]["code"] == "invalid_api_key"
        auth = {"Authorization": f"Bearer {KEY}"}
        models = h.get("/v1/models", headers=auth).json()
        assert models["object"] == "list" and models["data"][0]["id"] == "tiny-text"
        big = b"x" * (51 * 2**20)
        r = h.post("/v1/chat/completions", content=big, headers=auth)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunks():  # no Content-Length: refused once the running size passes the limit
            for _ in range(51):
                yield b"x" * 2**20

        r = h.post("/v1/chat/completions", content=chunks(), headers={**auth, "content-type": "application/json"})
        assert r.status_code == 413
        assert h.get("/health").status_code == 200  # still serving


def test_the_door_host_origin_and_content_type(server):
    """DNS rebinding (a foreign Host), other web pages (Origin), cross-site "simple" requests
    (text/plain or form bodies need no CORS preflight): refused before the key is even checked."""
    ok = json.dumps({"messages": USER, "max_tokens": 2})
    with http(server) as h:
        def post(**headers):
            return h.post("/v1/chat/completions", content=ok, headers=headers)

        for host in (f"localhost:{server.port}", f"[::1]:{server.port}", "127.0.0.2", "app.localhost"):
            assert post(**{"content-type": "application/json", "host": host}).status_code == 200, host
        assert post(**{"content-type": "application/json; charset=utf-8"}).status_code == 200
        for host in (f"evil.example:{server.port}", "192.168.1.10", "localhost.evil.example"):
            r = post(**{"content-type": "application/json", "host": host})
            assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed", host
        r = post(**{"content-type": "application/json", "origin": "https://evil.example"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
        assert "access-control-allow-origin" not in r.headers
        r = h.options("/v1/chat/completions", headers={"origin": "https://evil.example",
                                                         "access-control-request-method": "POST"})
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
        for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None):
            r = post(**({"content-type": kind} if kind else {}))
            assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", kind
        assert h.head("/health").status_code == 200


def test_mime_base64_with_line_breaks(server):
    """What plain `base64` prints (76-character lines) is the same image."""
    png = make_png(seed=8)
    replies = []
    with http(server) as h:
        for b64 in (base64.b64encode(png).decode(), base64.encodebytes(png).decode()):
            r = h.post("/v1/chat/completions", json={
                "messages": image_msg("data:image/png;base64," + b64), "max_tokens": 4, "temperature": 0})
            assert r.status_code == 200, r.text
            replies.append(r.json()["choices"][0]["message"]["content"])
    assert replies[0] == replies[1]


@pytest.mark.slow
@pytest.mark.parametrize("flags,says", [
    (["--max-batch", "0"], "--max-batch: must be >= 1, got 0"),
    (["--max-queue", "-1"], "--max-queue: must be >= 0, got -1"),
    (["--cache-mb", "-5"], "--cache-mb: must be a finite number >= 0, got -5"),
    (["--image-cache-mb", "nan"], "--image-cache-mb: must be a finite number >= 0, got nan"),
    (["--max-body-mb", "0"], "--max-body-mb: must be a finite number > 0, got 0"),
    (["--remote-timeout", "-1"], "--remote-timeout: must be a finite number > 0, got -1"),
    (["--port", "70000"], "--port: must be >= 0 and <= 65535, got 70000"),
    (["--max-context", "1"], "--max-context: must be >= 2, got 1"),
])
def test_bad_server_options_are_one_line_before_loading(flags, says):
    r = subprocess.run([sys.executable, "-m", "mlx_dsvl.server", "--model", "/nonexistent", *flags],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.slow
def test_port_0_listens_on_a_free_port_and_says_which(text_ckpt, tmp_path):
    import re

    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlx_dsvl.server", "--model", str(text_ckpt), "--port", "0",
                                 "--log-level", "warning"], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not (m := re.search(r"listening on http://127\.0\.0\.1:(\d+)", log.read_text())):
            assert proc.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.1)
        port = int(m.group(1))
        assert port != 0 and httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_a_context_that_cannot_hold_an_image_is_refused(text_ckpt):
    r = subprocess.run([sys.executable, "-m", "mlx_dsvl.server", "--model", str(text_ckpt),
                        "--max-context", "10"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "error: --max-context 10 cannot hold one image (576 tokens)" in r.stderr


# -- the image policy on its own (remote fetching) -------------------------------------------
def test_remote_images_size_limit_and_timeout(tmp_path):
    import asyncio
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from mlx_dsvl.server.images import ImagePolicy
    from mlx_dsvl.server.schema import APIError

    png = make_png(seed=6)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/slow.png":
                time.sleep(1.5)
            if self.path == "/trickle.png":  # every read within the timeout, the whole far past it
                self.send_response(200)
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                for i in range(8):
                    self.wfile.write(png[i:i + 1])
                    self.wfile.flush()
                    time.sleep(0.3)
                return
            if self.path == "/missing.png":
                self.send_response(404)
                self.end_headers()
                return
            data = png + (b"\0" * 5000 if self.path == "/big.png" else b"")
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        policy = ImagePolicy(allow_remote=True, max_bytes=len(png) + 100, timeout=0.5)
        assert asyncio.run(policy.fetch(base + "/ok.png", "p")) == png
        for path, status, code in (("/big.png", 413, "image_too_large"),
                                   ("/slow.png", 400, "image_fetch_failed"),
                                   ("/trickle.png", 400, "image_fetch_failed"),
                                   ("/missing.png", 400, "image_fetch_failed")):
            tic = time.monotonic()
            with pytest.raises(APIError) as e:
                asyncio.run(policy.fetch(base + path, "p"))
            assert (e.value.status, e.value.code) == (status, code), path
            assert time.monotonic() - tic < 1.5, path  # the timeout is 0.5 s for the whole fetch
        with pytest.raises(APIError) as e:
            asyncio.run(ImagePolicy().fetch(base + "/ok.png", "p"))
        assert e.value.code == "remote_images_disabled"
    finally:
        httpd.shutdown()


# -- pieces -----------------------------------------------------------------------------------
def test_prompt_embeddings_from_inside_an_image(local):
    """A cached prefix may end inside an image: the rest's embeddings equal the full ones."""
    import hashlib

    import mlx.core as mx

    from mlx_dsvl.server.scheduler import Job, Scheduler
    from mlx_dsvl.server.schema import SamplingParams

    model, processor = local
    pics = [Image.open(io.BytesIO(make_png(seed=s))) for s in (41, 42)]
    conv = [{"role": "user", "content": "A<image_placeholder>B<image_placeholder>C"}]
    batch = processor(conv, pics)
    full = model.get_input_embeddings(batch["input_ids"], batch["pixel_values"])[0]
    px = np.array(batch["pixel_values"][0])
    keys = [hashlib.sha256(p.tobytes()).hexdigest() for p in px]
    job = Job("j", batch["input_ids"][0].tolist(), keys, dict(zip(keys, px)), SamplingParams(), print)
    sched = Scheduler(model, processor)
    first = job.ids.index(processor.image_token_id)
    for start, end in ((0, len(job.ids)), (first + 100, len(job.ids)), (first + 600, first + 700)):
        _, emb = sched.embeddings(job, start, end)
        assert mx.allclose(emb[0], full[start:end], atol=1e-6).item(), (start, end)
    assert sched.counters["images_encoded"] == 2  # each image once, then from the cache


def test_full_image_cache_evicts_no_image_a_request_needs(local):
    """Cache room for two images; X, then Y, then [Z, X]: caching Z evicts the least recently
    used entry, which must not be X, counted as cached for this very request."""
    import hashlib

    import mlx.core as mx

    from mlx_dsvl.server.scheduler import Job, Scheduler
    from mlx_dsvl.server.schema import SamplingParams

    model, processor = local
    pics = {name: Image.open(io.BytesIO(make_png(seed=s))) for name, s in (("x", 51), ("y", 52), ("z", 53))}
    per_image = processor.num_image_tokens * model.language_model.model.embed_tokens.weight.shape[1] * 4
    sched = Scheduler(model, processor, cache_bytes=0, image_cache_bytes=2 * per_image + 16)

    def embed(*names):
        conv = [{"role": "user", "content": "<image_placeholder>" * len(names) + "What?"}]
        batch = processor(conv, [pics[n] for n in names])
        px = np.array(batch["pixel_values"][0])
        keys = [hashlib.sha256(p.tobytes()).hexdigest() for p in px]
        job = Job("j", batch["input_ids"][0].tolist(), keys, dict(zip(keys, px)), SamplingParams(), print)
        _, emb = sched.embeddings(job, 0, len(job.ids))
        full = model.get_input_embeddings(batch["input_ids"], batch["pixel_values"])[0]
        assert mx.allclose(emb[0], full, atol=1e-6).item(), names

    embed("x")
    embed("y")
    embed("z", "x")
    assert sched.counters["images_encoded"] == 3 and sched.counters["image_cache_hits"] == 1
    assert len(sched.features) == 2  # still within its budget


@pytest.mark.slow
def test_port_in_use_is_one_clear_error(server, text_ckpt, image_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "mlx_dsvl.server", "--model", str(text_ckpt),
                        "--port", str(server.port), "--log-level", "critical"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert f"error: could not listen on 127.0.0.1:{server.port}" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_loading_options(text_ckpt):
    """--4bit (= --quantize 4) quantizes the language model while loading (as the app's toggle); the served name defaults to
    the folder's name."""
    import mlx.nn as nn

    from mlx_dsvl.model_options import load_from_args
    from mlx_dsvl.server.__main__ import build_parser, served_name

    args = build_parser().parse_args(["--model", str(text_ckpt), "--4bit", "--dtype", "float32"])
    model, _ = load_from_args(args)
    kinds = {type(m).__name__ for _, m in model.language_model.named_modules()}
    assert "QuantizedLinear" in kinds and not any(
        isinstance(m, nn.QuantizedLinear) for _, m in model.vision_model.named_modules())
    assert served_name(args) == "tiny-text"
    assert args.quantize == 4 and build_parser().parse_args(["--quantize", "8"]).quantize == 8
    assert served_name(build_parser().parse_args(["--model", "org/some-model"])) == "org/some-model"
    assert build_parser().parse_args([]).host == "127.0.0.1"
