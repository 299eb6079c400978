"""GET /metrics: the in-process server (Starlette's test client over the real app, scheduler and
tiny model) after a conversation of two requests, read back with prometheus-client's parser."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

for _name in ("fastapi", "httpx", "prometheus_client"):
    pytest.importorskip(_name, reason=f"these tests need {_name}: pip install -e '.[server,test]'")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from mlx_dsvl.server.app import ServerConfig, create_app  # noqa: E402
from mlx_dsvl.server.scheduler import Scheduler  # noqa: E402
from mlx_dsvl.server.schema import SamplingParams  # noqa: E402

KEY = "metrics-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = "/v1/chat/completions"


def data_url(seed: int) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def scheduler(tiny_model):
    model, processor = tiny_model
    s = Scheduler(model, processor, max_batch=4, max_queue=4, cache_bytes=64 << 20)
    s.start()
    yield s
    s.stop()


def make_client(tiny_model, scheduler, **config) -> TestClient:
    config = ServerConfig(model_name="tiny", max_context=700, defaults=SamplingParams(max_tokens=4), **config)
    app = create_app(scheduler, tiny_model[1], config)
    return TestClient(app, base_url="http://localhost:8080", raise_server_exceptions=False)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, for every sample of every family."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict, name: str, **labels) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def test_metrics_after_a_conversation_with_an_image(tiny_model, scheduler):
    """A turn with an image, its follow-up (the whole first turn's KV reused, so the image is
    not read again), a new chat with the same image after new text, and a bad request."""
    c = make_client(tiny_model, scheduler, api_key=KEY)
    image = {"type": "image_url", "image_url": {"url": data_url(5)}}
    turn1 = [{"role": "user", "content": [image, {"type": "text", "text": "Describe it."}]}]
    r1 = c.post(CHAT, json={"messages": turn1, "temperature": 0, "max_tokens": 5}, headers=AUTH)
    assert r1.status_code == 200, r1.text
    turn2 = turn1 + [{"role": "assistant", "content": r1.json()["choices"][0]["message"]["content"]},
                     {"role": "user", "content": "And the colours?"}]
    r2 = c.post(CHAT, json={"messages": turn2, "temperature": 0, "max_tokens": 3}, headers=AUTH)
    assert r2.status_code == 200, r2.text
    other = [{"role": "user", "content": [{"type": "text", "text": "Look:"}, image]}]
    r3 = c.post(CHAT, json={"messages": other, "temperature": 0, "max_tokens": 2}, headers=AUTH)
    assert r3.status_code == 200, r3.text
    usages = [r.json()["usage"] for r in (r1, r2, r3)]
    cached = [u["prompt_tokens_details"]["cached_tokens"] for u in usages]
    assert cached[0] == 0 and cached[1] > r1.json()["usage"]["prompt_tokens"] // 2
    # the template's head only (the system prompt): the image comes after new text
    assert 0 < cached[2] < usages[2]["prompt_tokens"] - tiny_model[1].num_image_tokens
    assert c.post(CHAT, json={"messages": []}, headers=AUTH).status_code == 400

    r = c.get("/metrics", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = samples(r.text)
    assert value(m, "mlx_dsvl_requests_total", endpoint=CHAT, status="200") == 3
    assert value(m, "mlx_dsvl_requests_total", endpoint=CHAT, status="400") == 1
    prompt = sum(u["prompt_tokens"] for u in usages)
    completion = sum(u["completion_tokens"] for u in usages)
    assert value(m, "mlx_dsvl_prompt_tokens_total") == prompt
    assert value(m, "mlx_dsvl_generation_tokens_total") == completion
    assert value(m, "mlx_dsvl_prompt_tokens_cached_total") == sum(cached)
    assert value(m, "mlx_dsvl_time_to_first_token_seconds_count") == 3
    assert value(m, "mlx_dsvl_time_to_first_token_seconds_bucket", le="+Inf") == 3
    assert value(m, "mlx_dsvl_time_to_first_token_seconds_sum") > 0
    # every token after a reply's first is one inter-token interval
    assert value(m, "mlx_dsvl_time_per_output_token_seconds_count") == completion - 3
    # the rows of all steps are the tokens generated, one per row per step
    assert value(m, "mlx_dsvl_batch_rows_per_step_sum") == completion
    # once per request, though the image's 576 tokens span two prefill passes on a CPU
    assert value(m, "mlx_dsvl_cache_misses_total", cache="image") == 1  # turn 1 encodes it
    assert value(m, "mlx_dsvl_cache_hits_total", cache="image") == 1  # the new chat finds it
    assert value(m, "mlx_dsvl_cache_misses_total", cache="prefix") == 1  # turn 1
    assert value(m, "mlx_dsvl_cache_hits_total", cache="prefix") == 2
    assert value(m, "mlx_dsvl_cache_bytes", cache="prefix") == scheduler.prefixes.nbytes > 0
    assert value(m, "mlx_dsvl_cache_bytes", cache="image") == scheduler.features.nbytes > 0
    assert value(m, "mlx_dsvl_cache_max_bytes", cache="prefix") == 64 << 20
    assert value(m, "mlx_dsvl_queue_length") == 0  # at rest
    assert value(m, "mlx_dsvl_batch_rows") == 0
    assert value(m, "mlx_dsvl_max_batch") == 4


def test_metrics_behind_the_door_like_stats(tiny_model, scheduler):
    """The API key, the Host and Origin checks apply to /metrics as to /stats; each app counts
    its own responses (a registry per app), refusals included."""
    c = make_client(tiny_model, scheduler, api_key=KEY)
    for path in ("/stats", "/metrics"):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = c.get(path, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
        assert c.get(path, headers={**AUTH, "origin": "https://evil.example"}).status_code == 403
        assert c.get(path, headers={**AUTH, "host": "evil.example"}).status_code == 403
    assert c.get("/no/such/path", headers=AUTH).status_code == 404
    m = samples(c.get("/metrics", headers=AUTH).text)
    assert value(m, "mlx_dsvl_requests_total", endpoint="/metrics", status="401") == 2
    assert value(m, "mlx_dsvl_requests_total", endpoint="/stats", status="403") == 2
    assert value(m, "mlx_dsvl_requests_total", endpoint="other", status="404") == 1  # no label per path
    assert ("mlx_dsvl_requests_total", (("endpoint", CHAT), ("status", "200"))) not in m
    open_app = make_client(tiny_model, scheduler)  # no key: open, like /stats
    assert open_app.get("/metrics").status_code == 200
