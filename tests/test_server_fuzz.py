"""The server in-process (Starlette's test client over the real app, scheduler and tiny model):
no request of any shape gets a 500 (a bounded, deterministic fuzz over the request schema), the
door's host, origin and content-type checks with their options, and 503's Retry-After."""

from __future__ import annotations

import base64
import ctypes
import io
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

for _name in ("fastapi", "httpx", "hypothesis"):
    pytest.importorskip(_name, reason=f"these tests need {_name}: pip install -e '.[server,test]'")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st
from starlette.testclient import TestClient  # noqa: E402

from mlx_dsvl.server.app import ServerConfig, create_app  # noqa: E402
from mlx_dsvl.server.images import ImagePolicy  # noqa: E402
from mlx_dsvl.server.scheduler import Scheduler  # noqa: E402
from mlx_dsvl.server.schema import SamplingParams  # noqa: E402
from mlx_dsvl.server.security import allowed_hosts  # noqa: E402

CONTEXT = 700  # one image (576 tokens) and a short conversation: every reply ends quickly
JSON = {"content-type": "application/json"}
USER = [{"role": "user", "content": "hi"}]


def png(seed: int, size=(24, 16)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    (d / "a.png").write_bytes(png(1))
    (d / "broken.png").write_bytes(png(2)[:40])
    return d


@pytest.fixture(scope="module")
def scheduler(tiny_model):
    model, processor = tiny_model
    per_image = processor.num_image_tokens * model.language_model.model.embed_tokens.weight.shape[1] * 4
    s = Scheduler(model, processor, max_batch=4, max_queue=8, cache_bytes=32 << 20,
                  image_cache_bytes=int(2.5 * per_image))  # full soon: evictions while serving
    s.start()
    yield s
    s.stop()


def make_client(tiny_model, scheduler, **config) -> TestClient:
    _, processor = tiny_model
    config = ServerConfig(model_name="tiny", max_context=CONTEXT, defaults=SamplingParams(max_tokens=4), **config)
    app = create_app(scheduler, processor, config)
    return TestClient(app, base_url="http://localhost:8080", raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(tiny_model, scheduler, image_dir):
    return make_client(tiny_model, scheduler, images=ImagePolicy(local_dir=str(image_dir)))


# -- the fuzz ---------------------------------------------------------------------------------
FIELDS = ["messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p",
          "stop", "seed", "stream", "stream_options", "repetition_penalty", "ignore_eos", "n",
          "tools", "logprobs", "response_format", "presence_penalty", "user", "role", "content",
          "type", "text", "image_url", "url", "detail", "include_usage"]
WORDS = ["", "\ud800", "\udfff x", "<image_placeholder>", "User:", "user", "system", "assistant",
         "tool", "text", "image_url", "tiny", "a.png", "broken.png", "../a.png", "/etc/hostname",
         "file:///etc/passwd", "file://otherhost/a.png", "http://127.0.0.1:9/x.png",
         "data:image/png;base64,", "data:image/png;base64,@@", "data:;base64,AAAA", "\x00", "é" * 30]
IMAGES = ["data:image/png;base64," + base64.b64encode(png(3)).decode(),
          "data:image/png;base64," + base64.encodebytes(png(4)).decode(),  # MIME line breaks
          "data:image/png;base64," + base64.b64encode(b"not an image").decode(), "a.png", "broken.png"]

leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                 st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                 st.sampled_from(WORDS))
anything = st.recursive(leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), inner, max_size=3)),
    max_leaves=8)
url = st.sampled_from(IMAGES + WORDS)
part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=30) | st.sampled_from(WORDS)}),
    st.fixed_dictionaries({"type": st.just("image_url"),
                           "image_url": st.fixed_dictionaries({"url": url}) | url | anything}),
    anything)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool"]) | anything,
     "content": st.one_of(st.text(max_size=40), st.sampled_from(WORDS), st.lists(part, max_size=3), anything)},
    optional={"name": anything, "tool_calls": anything})
# mostly well-formed conversations (ending with the user's turn), so that odd values get as far
# as the tokenizer, the image decoder and the scheduler
text = st.sampled_from(WORDS) | st.text(max_size=30)
good_part = st.one_of(st.fixed_dictionaries({"type": st.just("text"), "text": text}),
                      st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": url})}))
turn = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                              "content": text | st.lists(good_part, max_size=2)})
last = st.fixed_dictionaries({"role": st.just("user"), "content": text | st.lists(good_part, min_size=1, max_size=2)})
conversation = st.tuples(st.lists(turn, max_size=2), last).map(lambda t: [*t[0], t[1]])
small_int = st.integers(-3, 12)
number = st.one_of(st.floats(-2, 3), st.sampled_from([0, 1, float("inf"), float("nan"), 1e999]), st.booleans())
request = st.fixed_dictionaries(
    {"messages": st.one_of(conversation, conversation, st.lists(message, max_size=4), anything)},
    optional={"model": st.sampled_from(["tiny", "other", ""]) | anything,
              "max_tokens": small_int | anything, "max_completion_tokens": small_int | anything,
              "temperature": number | anything, "top_p": number, "repetition_penalty": number,
              "seed": st.integers(-2**70, 2**70) | anything, "stop": st.lists(st.sampled_from(WORDS), max_size=3) | anything,
              "stream": st.booleans() | anything, "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | anything,
              "ignore_eos": st.booleans(), "n": small_int, "logprobs": anything,
              "response_format": anything, "presence_penalty": number})
body = st.one_of(request.map(json.dumps), request.map(json.dumps), request.map(json.dumps),
                 anything.map(json.dumps), st.binary(max_size=40),
                 st.sampled_from([b"", b"{", b'{"messages": [{"role": "user", "content": "x"}], "top_p": NaN}']))


@pytest.mark.slow
@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(content=body)
def test_no_request_gets_a_500(client, content):
    if isinstance(content, str):
        content = content.encode()
    r = client.post("/v1/chat/completions", content=content, headers=JSON)
    assert r.status_code < 500, (content[:300], r.text[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert "server_error" not in r.text and r.text.endswith("data: [DONE]\n\n"), r.text[-300:]
    else:
        assert r.json()["choices"][0]["message"]["role"] == "assistant"


# -- the door's options -----------------------------------------------------------------------
def test_allowed_hosts_defaults():
    assert allowed_hosts("127.0.0.1") == () and allowed_hosts("localhost") == ()
    assert allowed_hosts("::1", ["api.example"]) == ("api.example",)
    assert allowed_hosts("0.0.0.0") is None  # an open server answers to any name ...
    assert allowed_hosts("0.0.0.0", ["Box.LAN"]) == ("box.lan",)  # ... unless told which
    assert allowed_hosts("127.0.0.1", ["*"]) is None


def test_allowed_hosts_and_origins_open_the_door_for_them_only(tiny_model, scheduler):
    c = make_client(tiny_model, scheduler, hosts=("api.example",), origins=("https://app.example",))
    ok = {"messages": USER, "max_tokens": 2}
    assert c.post("/v1/chat/completions", json=ok, headers={"host": "api.example"}).status_code == 200
    r = c.post("/v1/chat/completions", json=ok, headers={"host": "other.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
    assert "--allowed-hosts other.example" in r.json()["error"]["message"]
    # the allowed page: its preflight is answered, its request served with CORS headers
    pre = c.options("/v1/chat/completions", headers={
        "origin": "https://app.example", "access-control-request-method": "POST",
        "access-control-request-headers": "content-type,authorization"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://app.example"
    r = c.post("/v1/chat/completions", json=ok, headers={"origin": "https://app.example"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    # any other page: neither
    for method in ("OPTIONS", "POST"):
        r = c.request(method, "/v1/chat/completions", json=ok, headers={
            "origin": "https://evil.example", "access-control-request-method": "POST"})
        assert r.status_code in (400, 403) and "access-control-allow-origin" not in r.headers, method


def test_busy_is_a_503_with_retry_after(tiny_model):
    model, processor = tiny_model
    idle = Scheduler(model, processor, max_batch=1, max_queue=0)  # not started: the first waits
    c = make_client(tiny_model, idle)
    first = threading.Thread(target=lambda: c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1}))
    first.start()
    try:
        for _ in range(200):
            if idle.stats()["waiting"]:
                break
            threading.Event().wait(0.01)
        r = c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1})
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_busy"
        assert int(r.headers["retry-after"]) >= 1
    finally:
        idle.start()
        first.join(timeout=60)
        idle.stop()


MEMORY_PROBE = """
import io, sys
from concurrent.futures import ThreadPoolExecutor
from PIL import Image
import mlx_dsvl
from mlx_dsvl.server.app import PromptBuilder

def resident_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

_, processor = mlx_dsvl.load(sys.argv[1], dtype="float32")
buf = io.BytesIO()
Image.new("RGB", (9000, 9000), (200, 30, 90)).save(buf, format="JPEG")  # 81 megapixels
prompts = PromptBuilder(processor, 4096)
before = resident_mb()
with ThreadPoolExecutor(1) as pool:  # as the server does: on a worker thread
    pool.submit(prompts.build, [{"role": "user", "content": "<image_placeholder>hi"}],
                [(buf.getvalue(), "p")]).result()
print(resident_mb() - before)
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm") or not hasattr(ctypes.CDLL(None), "malloc_trim"),
                    reason="measures glibc's resident memory through /proc (Linux with glibc only)")
def test_a_huge_image_leaves_no_memory_behind(tiny_dir):
    """An 81-megapixel image (243 MB decoded) left ~640 MB resident after its request (glibc keeps
    the freed blocks)."""
    r = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tiny_dir)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.split()[-1]) < 120, r.stdout  # MB still resident after the request
