"""Every sampling option, walked through every way of asking for a reply: the command line, the
API, ChatSession and the server (the app's controls: tests/test_app.py).  Each changes the reply there (none is
accepted and silently ignored); the command line gives what the API gives for the same options,
and so does the server for greedy ones (a batch's cache rounds differently from a session's, which
near-ties in a sampled draw can show)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields

import pytest

import mlx_dsvl
from mlx_dsvl.sampling import SamplingOptions, flag
from mlx_dsvl.session import ChatSession

QUESTION = "Tell me a story about a cat."
BASE = dict(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0, max_tokens=12, seed=0)
# option -> (the base's changes that make its effect show, the changed value)
CHANGES = {
    "temperature": ({}, 0.0),
    "top_p": ({}, 0.1),
    "top_k": ({}, 1),
    "min_p": ({}, 0.9),
    "repetition_penalty": ({"temperature": 0.0}, 5.0),
    "max_tokens": ({"temperature": 0.0}, 3),
    "seed": ({}, 1),
}


def options(name: str, changed: bool) -> dict:
    opts = {**BASE, **CHANGES[name][0]}
    if changed:
        opts[name] = CHANGES[name][1]
    return opts


@pytest.fixture(scope="module")
def text_model(text_ckpt):
    return mlx_dsvl.load(text_ckpt, dtype="float32")


def api(text_model, opts: dict) -> str:
    model, processor = text_model
    return "".join(c.text for c in ChatSession(model, processor).send(QUESTION, [], **opts))


def test_every_option_is_walked():
    assert set(CHANGES) == {f.name for f in fields(SamplingOptions)}


@pytest.mark.parametrize("name", list(CHANGES))
def test_each_option_changes_the_reply_of_the_api_and_a_session(text_model, name):
    model, processor = text_model
    base, changed = api(text_model, options(name, False)), api(text_model, options(name, True))
    assert base != changed, name
    assert api(text_model, options(name, True)) == changed  # seeded: the same again
    conv = [{"role": "user", "content": QUESTION}]
    assert mlx_dsvl.generate(model, processor, conv, **options(name, True)) == changed
    chat = ChatSession(model, processor)  # a session's second turn takes its options too
    list(chat.send("Hello.", [], max_tokens=2, temperature=0))
    follow = ["".join(c.text for c in chat.send(QUESTION, [], **options(name, v))) for v in (False, True)]
    assert follow[0] != follow[1], name


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CHANGES))
def test_each_option_reaches_the_command_line(text_ckpt, text_model, name):
    opts = options(name, True)
    argv = [a for k, v in opts.items() for a in (flag(k), str(v))]
    r = subprocess.run([sys.executable, "-m", "mlx_dsvl.generate", "--model", str(text_ckpt),
                        "--dtype", "float32", "--prompt", QUESTION, *argv],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout[:-1] == api(text_model, opts)  # the reply, then a newline
    assert r.stdout[:-1] != api(text_model, options(name, False))


def test_each_option_changes_the_servers_reply(text_model):
    pytest.importorskip("fastapi", reason="the server's test needs fastapi: pip install -e '.[server]'")
    from starlette.testclient import TestClient

    from mlx_dsvl.server.app import ServerConfig, create_app
    from mlx_dsvl.server.scheduler import Scheduler

    model, processor = text_model
    sched = Scheduler(model, processor)
    sched.start()
    try:
        c = TestClient(create_app(sched, processor, ServerConfig(model_name="tiny")), base_url="http://localhost")

        def ask(opts):
            r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": QUESTION}], **opts})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

        for name in CHANGES:
            opts = options(name, True)
            changed = ask(opts)
            assert changed != ask(options(name, False)), name
            assert changed == ask(opts), name  # seeded: the same again
            if opts["temperature"] == 0:  # one engine: greedy, the batch's reply is the session's
                assert changed == api(text_model, opts), name
    finally:
        sched.stop()
