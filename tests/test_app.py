"""The Streamlit chat app (apps/chat.py) under ``streamlit.testing.v1.AppTest``, on a tiny random
checkpoint.  AppTest runs the real script on a script thread (a new one per run, as the server
does), with real widgets; files go through ``st.chat_input(accept_file=...)`` via
``ChatInput.upload`` (what the browser would send, minus the browser: the browser side is
tests/test_app_browser.py).  The tiny model writes garbage ("!!!"): the tests look at structure
and counts, not words.
"""

from __future__ import annotations

import io
import ipaddress
import socket
import subprocess
import sys
from pathlib import Path

import pytest

st = pytest.importorskip("streamlit", minversion="1.64",
                         reason="the app needs streamlit>=1.64 (pip install -e '.[app]')")
from streamlit.testing.v1 import AppTest  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "apps" / "chat.py"
sys.path.insert(0, str(APP.parent))
import chat_logic  # noqa: E402

TIMEOUT = 120


def png(color=(200, 10, 10), size=(64, 48)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def app(tiny_dir, monkeypatch):
    """A factory of started AppTests on the tiny checkpoint (passed like ``-- --model DIR``)."""
    monkeypatch.setattr(sys, "argv", ["apps/chat.py", "--model", str(tiny_dir)])

    def make(max_tokens: int = 6) -> AppTest:
        at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
        at.session_state["max_tokens"] = max_tokens
        at.run()
        assert not at.exception, at.exception
        return at

    return make


def send(at: AppTest, text: str, files=()) -> AppTest:
    box = at.chat_input[0]
    for name, data, mime in files:
        box.upload(name, data, mime)
    box.set_value(text).run()
    assert not at.exception, at.exception
    return at


def shown(at: AppTest):
    """The chat window: [(role, markdown texts, number of images, error texts)]."""
    out = []
    for m in at.chat_message:
        kids = list(m.children.values())
        out.append((m.name, [k.value for k in kids if k.type == "markdown"],
                    sum(k.type == "image" for k in kids),
                    [k.value for k in kids if k.type == "error"]))
    return out


def conversation(at: AppTest) -> chat_logic.Conversation:
    return at.session_state["conversation"]


def test_image_turn_streams_a_reply_and_the_next_turn_reuses_image_and_cache(app):
    at = app()
    send(at, "What is in this picture?", [("red.png", png(), "image/png")])
    view = shown(at)
    assert [v[0] for v in view] == ["user", "assistant"]
    assert view[0][1] == ["What is in this picture?"] and view[0][2] == 1  # text + thumbnail
    assert view[1][1][0].strip()  # a non-empty reply
    conv = conversation(at)
    msgs = conv.session.messages
    assert [m["role"] for m in msgs] == ["user", "assistant"]
    assert msgs[0]["content"] == "<image_placeholder>What is in this picture?"
    assert len(msgs[0]["images"]) == 1 and msgs[1]["content"] == view[1][1][0]
    assert conv.session.encode_calls == 1
    first = conv.last_stats
    assert first.prompt_tokens > 576 and first.generation_tokens >= 1
    assert any("tokens/s" in c.value for c in at.caption)  # per-reply statistics
    metrics = {m.label: m.value for m in at.sidebar.get("metric")}
    assert set(metrics) == {"First token (s)", "Tokens/s", "Peak memory (GB)", "Tokens"}
    assert metrics["Tokens"] == str(first.generation_tokens)

    send(at, "And the colours?")
    assert [v[0] for v in shown(at)] == ["user", "assistant"] * 2
    assert [m["role"] for m in conv.session.messages] == ["user", "assistant"] * 2
    assert conv.session.encode_calls == 1  # the first image was not encoded again
    assert conv.last_stats.prompt_tokens < 40  # only the new turn was prefilled (KV cache kept)

    send(at, "Same picture again?", [("again.png", png(), "image/png")])
    assert conv.session.encode_calls == 1  # same pixels: features from the cache
    send(at, "And this one?", [("blue.png", png((10, 10, 200)), "image/png")])
    assert conv.session.encode_calls == 2
    assert len(conv.session.messages) == 8 and len(shown(at)) == 8


def test_bad_uploads_show_an_error_in_the_chat_and_keep_the_history(app):
    at = app()
    send(at, "Describe.", [("red.png", png(), "image/png")])
    before = [dict(m) for m in conversation(at).session.messages]

    send(at, "What about this?", [("notes.txt", b"just some text", "text/plain")])
    view = shown(at)
    assert [v[0] for v in view] == ["user", "assistant", "assistant"]
    assert "not a recognised image file: notes.txt" in view[2][3][0] and "What about this?" in view[2][3][0]
    assert conversation(at).session.messages == before  # nothing was sent to the model

    fake = png()[:40]  # a PNG header and then nothing: corrupt
    send(at, "And this?", [("broken.png", fake, "image/png")])
    assert "broken.png" in shown(at)[-1][3][0]

    big = b"\0" * (chat_logic.MAX_UPLOAD_BYTES + 1)  # AppTest skips the browser's own limit
    send(at, "Huge", [("huge.png", big, "image/png")])
    assert "limited to 20 MB each" in shown(at)[-1][3][0]
    assert conversation(at).session.messages == before

    send(at, "Still there?")  # the conversation goes on
    assert [m["role"] for m in conversation(at).session.messages] == ["user", "assistant"] * 2
    assert conversation(at).session.encode_calls == 1


def test_regenerate_remove_last_turn_and_new_conversation(app):
    at = app()
    send(at, "One", [("red.png", png(), "image/png")])
    send(at, "Two")
    conv = conversation(at)
    old_reply = conv.turns[-1]
    [b for b in at.button if b.label == "Regenerate"][0].click().run()
    assert not at.exception
    assert len(conv.session.messages) == 4 and conv.turns[-1] is not old_reply
    assert conv.turns[-2].text == "Two" and conv.session.encode_calls == 1

    [b for b in at.button if b.label == "Remove last turn"][0].click().run()
    assert [m["content"] for m in conv.session.messages][::2] == ["<image_placeholder>One"]
    assert [v[0] for v in shown(at)] == ["user", "assistant"]

    [b for b in at.button if b.label == "Regenerate"][0].click().run()  # the image turn again
    assert len(conv.session.messages) == 2 and conv.session.encode_calls == 1
    assert shown(at)[0][2] == 1

    [b for b in at.sidebar.button if b.label == "New conversation"][0].click().run()
    assert conv.session.messages == [] and shown(at) == []
    assert any("Drop one or more images" in i.value for i in at.info)


def test_widgets_reach_the_session_and_never_reload_the_model(app, tiny_dir):
    st.cache_resource.clear()
    calls = chat_logic.load_calls
    at = app(max_tokens=3)
    assert chat_logic.load_calls == calls + 1
    at.sidebar.slider(key="temperature").set_value(0.0)
    at.sidebar.slider(key="top_p").set_value(0.5)
    at.sidebar.slider(key="repetition_penalty").set_value(1.0)
    at.sidebar.text_area(key="system_prompt").set_value("Be brief.")
    at.run()
    send(at, "Hello")
    conv = conversation(at)
    assert chat_logic.load_calls == calls + 1  # sampling and prompt widgets: no reload
    assert conv.session.system_prompt == "Be brief."
    assert conv.last_stats.generation_tokens <= 3
    assert conv.session.processor.format(conv.session.conversation).startswith("Be brief.\n\nUser: Hello")

    at.sidebar.toggle(key="quantize").set_value(True).run()  # 4-bit: a new model, a new conversation
    assert not at.exception and chat_logic.load_calls == calls + 2
    q = conversation(at)
    assert q is not conv and q.turns == [] and q.loaded.quantized
    import mlx.nn as nn

    assert isinstance(q.session.model.language_model.model.embed_tokens, nn.QuantizedEmbedding)
    assert isinstance(q.session.model.language_model.model.layers[0].mlp.up_proj, nn.QuantizedLinear)
    send(at, "Quantized?", [("red.png", png(), "image/png")])
    assert [m["role"] for m in q.session.messages] == ["user", "assistant"]

    at.sidebar.toggle(key="quantize").set_value(False).run()  # back: still cached
    assert chat_logic.load_calls == calls + 2


def test_vision_choice_reaches_load(tiny_dir, monkeypatch):
    """``--quantize-vision 8`` starts the sidebar's vision choice at 8-bit and the model's towers
    quantized; choosing full precision loads a new model, with a new conversation."""
    import mlx.nn as nn

    monkeypatch.setattr(sys, "argv", ["apps/chat.py", "--model", str(tiny_dir), "--quantize-vision", "8"])
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert not at.exception and at.session_state["vision"] == "8-bit"
    conv = conversation(at)
    aligner = conv.session.model.aligner.layers[0]
    assert conv.loaded.vision_bits == 8 and isinstance(aligner, nn.QuantizedLinear) and aligner.bits == 8
    assert not isinstance(conv.session.model.language_model.lm_head, nn.QuantizedLinear)
    assert "8-bit vision" in at.caption[0].value
    at.sidebar.selectbox(key="vision").set_value("full precision").run()
    plain = conversation(at)
    assert not at.exception and plain is not conv and plain.loaded.vision_bits is None
    assert not isinstance(plain.session.model.aligner.layers[0], nn.QuantizedLinear)


def test_every_sampling_control_reaches_the_session(app, monkeypatch):
    """Each option with an app control (all but the seed): the sidebar's value is what
    ChatSession.send gets (tests/test_sampling_walk.py: each then changes the reply)."""
    from dataclasses import fields

    from mlx_dsvl.sampling import DEFAULTS, SamplingOptions, controls

    sent = {}

    def record(self, text, images=(), sampling=None, **options):
        sent.update(options)
        return iter(())

    monkeypatch.setattr("mlx_dsvl.session.ChatSession.send", record)
    assert set(controls()) == {f.name for f in fields(SamplingOptions)} - {"seed"}
    at = app()
    changed = {name: c.high if c.high != getattr(DEFAULTS, name) else c.low for name, c in controls().items()}
    for name, value in changed.items():
        (at.sidebar.number_input if isinstance(value, int) else at.sidebar.slider)(key=name).set_value(value)
    at.run()
    send(at, "Hi")
    assert {k: sent.get(k) for k in changed} == changed


def test_a_model_that_fails_to_load_shows_the_reason(app, tmp_path):
    at = app()
    at.sidebar.text_input(key="model_path").set_value(str(tmp_path / "nowhere")).run()
    assert not at.exception  # no traceback
    assert len(at.error) == 1 and "no such model folder" in at.error[0].value
    assert str(tmp_path / "nowhere") in at.error[0].value
    assert len(at.chat_input) == 0  # nothing to chat with

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    at.sidebar.text_input(key="model_path").set_value(str(tmp_path / "broken")).run()
    assert not at.exception and "invalid JSON" in at.error[0].value


def test_arguments_after_the_double_dash_set_the_sidebar(tiny_dir, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["apps/chat.py", "--model", str(tiny_dir), "--4bit", "--max-tokens", "9",
                                      "--temperature", "1.2", "--top-p", "0.5", "--system", ""])
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert not at.exception
    s = at.session_state
    assert (s["model_path"], s["quantize"], s["max_tokens"]) == (str(tiny_dir), True, 9)
    assert (s["temperature"], s["top_p"], s["system_prompt"]) == (1.2, 0.5, "")
    assert conversation(at).loaded.quantized
    # a starting value the sidebar cannot hold is refused, not silently changed
    monkeypatch.setattr(sys, "argv", ["apps/chat.py", "--model", str(tiny_dir), "--temperature", "5"])
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert not at.exception and len(at.chat_input) == 0
    assert at.error[0].value == "--temperature must be in [0.0, 1.5] (the sidebar's range), got 5.0"


def test_several_images_in_one_turn(app):
    at = app()
    send(at, "Compare them.", [("red.png", png(), "image/png"), ("blue.png", png((10, 10, 200)), "image/png")])
    assert shown(at)[0][:3] == ("user", ["Compare them."], 1)  # one st.image with both thumbnails
    assert len(at.chat_message[0].children[0].proto.imgs) == 2
    msgs = conversation(at).session.messages
    assert msgs[0]["content"] == "<image_placeholder><image_placeholder>Compare them."
    assert len(msgs[0]["images"]) == 2 and conversation(at).session.encode_calls == 2


def test_launch_argv_splits_streamlit_and_app_options():
    argv = chat_logic.launch_argv("/x/chat.py", ["--model", "m", "--server.port", "8600", "--4bit",
                                                 "--server.address=0.0.0.0", "--system", "be brief"])
    assert argv[:3] == ["streamlit", "run", "/x/chat.py"]
    st_part, app_part = argv[3:argv.index("--")], argv[argv.index("--") + 1:]
    assert app_part == ["--model", "m", "--4bit", "--system", "be brief"]
    assert st_part == ["--server.port", "8600", "--server.address=0.0.0.0"]
    # nothing added: the settings come from apps/.streamlit/config.toml, so STREAMLIT_* variables still count
    assert chat_logic.launch_argv("c.py", []) == ["streamlit", "run", "c.py", "--"]


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/folder"], "error: /no/such/folder: no such model folder"),
    (["--temperature", "-1"], "error: --temperature must be in [0.0, 1.5] (the sidebar's range), got -1.0"),
    (["--max-tokens", "0"], "error: --max-tokens must be in [1, 4096] (the sidebar's range), got 0"),
    (["--top-p", "abc"], "error: argument --top-p: invalid float value: 'abc'"),
    (["--modle", "x"], "error: unrecognized arguments: --modle x"),
    (["--adapter", "/no/run"], "error: /no/run: no adapter_config.json (not an adapter folder)"),
    (["--device", "gpu"], "error: no GPU available to MLX"),
    (["--model", "BROKEN"], "config.json: invalid JSON in config.json"),
])
def test_python_apps_chat_py_refuses_bad_options_in_one_line(args, message, tiny_dir, tmp_path):
    """Before any server starts: one ``error:`` line and exit status 2."""
    from mlx_dsvl.device import gpu_available

    if args == ["--device", "gpu"] and gpu_available():
        pytest.skip("this machine has a GPU: --device gpu is not an error here")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{oops")
    args = [str(broken) if a == "BROKEN" else a for a in args]
    if "--model" not in args:
        args += ["--model", str(tiny_dir)]
    r = subprocess.run([sys.executable, str(APP), *args, "--server.port", "1"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr


def listening(port: int):
    """The local addresses with a socket listening on ``port`` (/proc/net/tcp and tcp6)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(addr)
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # per-word little endian
                found.append(str(ipaddress.ip_address(words)))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the listening sockets from /proc/net (Linux)")
@pytest.mark.parametrize("how", ["streamlit run", "python apps/chat.py"])
def test_from_any_folder_loopback_only_and_no_usage_statistics(how, tiny_dir, tmp_path):
    """Started from another folder, with no user config: the server listens on loopback only and
    Streamlit does not announce (or turn on) usage statistics."""
    import os
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HOME": str(tmp_path)}  # no ~/.streamlit/config.toml or credentials
    env.pop("STREAMLIT_SERVER_ADDRESS", None)
    server = ["--server.port", str(port), "--server.headless", "true"]
    cmd = ([sys.executable, "-m", "streamlit", "run", str(APP), *server, "--", "--model", str(tiny_dir)]
           if how == "streamlit run" else [sys.executable, str(APP), "--model", str(tiny_dir), *server])
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, ok = time.time() + 90, False
        while time.time() < deadline and proc.poll() is None and not ok:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    ok = r.status == 200
            except OSError:
                time.sleep(0.3)
        assert ok, f"server did not come up (exit {proc.poll()})"
        addresses = listening(port)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert addresses and all(ipaddress.ip_address(a).is_loopback for a in addresses), addresses
    assert "Collecting usage statistics" not in out, out


def test_streamlit_reads_the_apps_settings_from_any_folder(tmp_path):
    """What ``streamlit run apps/chat.py`` loads (Streamlit's own loader, as its CLI calls it),
    from a folder without a .streamlit/ of its own."""
    code = (f"import json; from streamlit import config; config._main_script_path = {str(APP)!r}; "
            "config.get_config_options(force_reparse=True); "
            "print(json.dumps([config.get_option(k) for k in "
            "('server.address', 'browser.gatherUsageStats', 'server.maxUploadSize')]))")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("STREAMLIT_")}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**env, "HOME": str(tmp_path)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert __import__("json").loads(r.stdout.strip().splitlines()[-1]) == ["127.0.0.1", False, 20]


@pytest.mark.slow
def test_python_apps_chat_py_starts_the_server_with_openblas(tiny_dir, tmp_path):
    """``python apps/chat.py``: re-executed with OpenBLAS preloaded (when the system has one),
    then a Streamlit server on 127.0.0.1 serving this app."""
    import os
    import socket
    import subprocess
    import time
    import urllib.request

    from mlx_dsvl.blas import find_openblas

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "MLX_DSVL_BLAS_REEXECUTED", "MLX_DSVL_NO_BLAS_REEXEC")}  # a user's shell
    env["HOME"] = str(tmp_path)  # no user-level streamlit config or credentials prompt
    proc = subprocess.Popen(
        [sys.executable, str(APP), "--model", str(tiny_dir), "--server.port", str(port),
         "--server.headless", "true"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, ok = time.time() + 90, False
        while time.time() < deadline and proc.poll() is None and not ok:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                    ok = r.read().decode().strip() == "ok"
            except OSError:
                time.sleep(0.5)
        assert ok, f"server did not come up (exit {proc.poll()})"
        maps = Path(f"/proc/{proc.pid}/maps").read_text() if sys.platform.startswith("linux") else ""
        if find_openblas():
            assert "libopenblas" in maps  # the same process (execve keeps the pid), now preloaded
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "127.0.0.1" in out or "localhost" in out, out[-2000:]


def test_kv_cache_setting(tiny_dir, tmp_path, monkeypatch):
    """The sidebar's KV cache choice reaches the session (a change empties the cache, the
    conversation stays); a model whose head size the groups do not divide gets a warning."""
    import json
    import shutil

    from mlx_lm.models.cache import QuantizedKVCache

    one_head = tmp_path / "one-head"  # head size 64: groups of 64 fit
    shutil.copytree(tiny_dir, one_head)
    config = json.loads((one_head / "config.json").read_text())
    config["language_config"].update(num_attention_heads=1, num_key_value_heads=1)
    (one_head / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(sys, "argv", ["apps/chat.py", "--model", str(one_head), "--kv-bits", "8"])
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.session_state["max_tokens"] = 4
    at.run()
    assert at.sidebar.selectbox(key="kv_cache").value == "8-bit"
    send(at, "Hello", [("red.png", png(), "image/png")])
    conv = conversation(at)
    assert conv.session.kv["kv_bits"] == 8 and all(isinstance(c, QuantizedKVCache) for c in conv.session.cache)
    at.sidebar.selectbox(key="kv_cache").set_value("full precision").run()
    assert conv.session.kv is None and conv.session.cached_ids == []
    send(at, "And now?")
    assert [m["role"] for m in conv.session.messages] == ["user", "assistant"] * 2
    assert not any(isinstance(c, QuantizedKVCache) for c in conv.session.cache)

    at.sidebar.text_input(key="model_path").set_value(str(tiny_dir)).run()  # head size 16
    at.sidebar.selectbox(key="kv_cache").set_value("4-bit").run()
    assert not at.exception and any("does not divide" in w.value for w in at.sidebar.warning)


@pytest.mark.slow
def test_speculative_decoding_toggle_reaches_the_session(tiny_dir, tiny_hybrid_dir, monkeypatch):
    """Without ``--draft-model`` the toggle starts off and turns prompt lookup on; with it, the
    toggle starts on and the draft model (loaded once, with the model) drafts the greedy reply."""
    monkeypatch.setattr(sys, "argv", ["apps/chat.py", "--model", str(tiny_dir)])
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert not at.exception and at.sidebar.toggle(key="speculative").value is False
    assert conversation(at).session.draft is None
    at.sidebar.toggle(key="speculative").set_value(True).run()
    assert not at.exception and conversation(at).session.draft == "ngram"

    monkeypatch.setattr(sys, "argv", ["apps/chat.py", "--model", str(tiny_hybrid_dir), "--draft-model", str(tiny_dir),
                                      "--temperature", "0", "--repetition-penalty", "1", "--max-tokens", "8"])
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert not at.exception and at.sidebar.toggle(key="speculative").value is True
    session = conversation(at).session
    assert session.draft == "model" and session.draft_model.model.source_folder == tiny_dir
    send(at, "Hello", [("red.png", png(), "image/png")])
    assert session.draft_model.drafted > 0 and session.draft_model.encode_calls == 1
    at.sidebar.toggle(key="speculative").set_value(False).run()
    assert not at.exception and session.draft is None
