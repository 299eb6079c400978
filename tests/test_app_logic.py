"""apps/chat_logic.py without Streamlit: arguments, uploads, the server settings, and the
conversation wrapper under the conditions Streamlit creates (interruptions, fresh threads)."""

from __future__ import annotations

import io
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "apps"))
import chat_logic as logic  # noqa: E402


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def noise(size=(40, 30), seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8))


class Interrupt(BaseException):
    """Stands in for Streamlit's StopException / RerunException (BaseExceptions too)."""


def on_thread(fn, *args, **kwargs):
    """Run ``fn`` on a new thread (as Streamlit runs each script run) and return its result."""
    out = {}

    def run():
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out.get("value")


# -- arguments and settings -------------------------------------------------------------------
def test_parse_args(monkeypatch):
    monkeypatch.delenv(logic.MODEL_ENV, raising=False)
    a = logic.parse_args([])
    assert (a.model, a.quantize, a.max_tokens, a.device) == ("deepseek-ai/deepseek-vl-1.3b-chat", False, None, "auto")
    assert logic.parse_args(["--device", "cpu"]).device == "cpu"
    a = logic.parse_args(["--model", "/m", "--4bit", "--max-tokens", "64", "--unknown", "x",
                          "--temperature", "0", "--top-p", "0.5", "--repetition-penalty", "1.0", "--system", ""])
    assert (a.model, a.quantize, a.max_tokens) == ("/m", True, 64)
    assert (a.temperature, a.top_p, a.repetition_penalty, a.system) == (0.0, 0.5, 1.0, "")
    assert logic.parse_args(["--model"]).model == "deepseek-ai/deepseek-vl-1.3b-chat"
    monkeypatch.setenv(logic.MODEL_ENV, "/from/env")
    assert logic.parse_args([]).model == "/from/env"
    assert logic.parse_args(["--model", "/cli"]).model == "/cli"


def test_streamlit_config_listens_on_localhost_and_limits_uploads():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    cfg = tomllib.loads((ROOT / "apps" / ".streamlit" / "config.toml").read_text())
    assert cfg["server"]["address"] == "127.0.0.1"
    assert cfg["server"]["maxUploadSize"] == logic.MAX_UPLOAD_MB == 20
    assert cfg["browser"]["gatherUsageStats"] is False
    assert logic.address_warning("127.0.0.1") is None and logic.address_warning("localhost") is None
    assert "every network interface" in logic.address_warning(None)
    assert "0.0.0.0" in logic.address_warning("0.0.0.0")


# -- uploads ----------------------------------------------------------------------------------
def test_read_upload_decodes_like_load_image(tmp_path):
    from mlx_dsvl.processing.image import load_image

    images = {"rgb.png": noise(), "rgba.png": noise().convert("RGBA"), "pal.gif": noise().quantize(16),
              "grey.jpg": noise().convert("L"), "big.png": noise((900, 700))}
    for name, img in images.items():
        data = encode(img, "GIF" if name.endswith("gif") else "JPEG" if name.endswith("jpg") else "PNG")
        (tmp_path / name).write_bytes(data)
        att = logic.read_upload(name, data)
        assert att.name == name and att.data == data and att.size == img.size
        assert max(att.thumbnail.size) <= 320
        # the same pixels as the library's loader from a file: same features, same answers
        assert np.array_equal(np.asarray(att.image()), np.asarray(load_image(tmp_path / name)))


def test_read_upload_errors(monkeypatch):
    with pytest.raises(logic.UploadError, match="not a recognised image file: notes.txt"):
        logic.read_upload("notes.txt", b"hello")
    with pytest.raises(logic.UploadError, match="empty"):
        logic.read_upload("empty.png", b"")
    with pytest.raises(logic.UploadError, match="corrupt or unreadable image file: broken.png"):
        logic.read_upload("broken.png", encode(noise())[:60])
    with pytest.raises(logic.UploadError, match=r"too large \(20.00 MB\): images are limited to 20 MB each"):
        logic.read_upload("huge.png", b"\0" * (logic.MAX_UPLOAD_BYTES + 1))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(logic.UploadError, match="decompression-bomb limit"):
        logic.read_upload("bomb.png", encode(noise((200, 200))))


def test_read_uploads_collects_errors_and_checks_size_before_reading():
    class Upload:
        def __init__(self, name, data, size=None):
            self.name, self._data = name, data
            self.size = len(data) if size is None else size

        def getvalue(self):
            if self.size > logic.MAX_UPLOAD_BYTES:
                raise AssertionError("read an oversized upload")
            return self._data

    ok, bad, big = Upload("a.png", encode(noise())), Upload("b.txt", b"x"), Upload("c.png", b"", 21 * 2**20)
    atts, errors = logic.read_uploads([ok, bad, big])
    assert [a.name for a in atts] == ["a.png"]
    assert len(errors) == 2 and "not a recognised image file: b.txt" in errors[0] and "c.png is too large" in errors[1]
    assert logic.read_uploads(None) == ([], [])


# -- loading ----------------------------------------------------------------------------------
def test_load_errors_are_messages(tmp_path):
    with pytest.raises(Exception) as e:
        logic.load_model(str(tmp_path / "missing"))
    msg = logic.load_error_message(str(tmp_path / "missing"), e.value)
    assert msg.startswith("Could not load the model") and "no such model folder" in msg
    assert "Traceback" not in msg
    assert logic.load_error_message("x", OSError("disk on fire")) == "Could not load the model 'x': OSError: disk on fire"


# -- the conversation -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return logic.load_model(str(tiny_dir))


def red() -> logic.Attachment:
    return logic.read_upload("red.png", encode(Image.new("RGB", (64, 48), (200, 10, 10))))


def test_turns_on_fresh_threads_reuse_features_and_cache(loaded):
    conv = logic.Conversation(loaded)
    seen = []
    reply = on_thread(conv.send, "What is it?", [red()], on_chunk=lambda t: seen.append(t.text), max_tokens=6)
    assert reply is conv.turns[-1] and reply.text and seen[-1] == reply.text and not reply.stopped
    assert reply.stats.generation_tokens == 6 and reply.stats.finish_reason == "length"
    assert conv.session.messages[-1]["content"] == reply.text
    again = on_thread(conv.send, "More?", max_tokens=4)
    assert again.stats.prompt_tokens < 30 and conv.session.encode_calls == 1
    assert [t.role for t in conv.turns] == ["user", "assistant"] * 2
    assert on_thread(conv.regenerate, max_tokens=4).text
    assert conv.session.encode_calls == 1 and len(conv.session.messages) == 4


def test_an_interrupted_reply_is_kept_and_the_conversation_goes_on(loaded):
    """Streamlit stops a run by raising from its next st.* call: here, from on_chunk."""
    conv = logic.Conversation(loaded)
    calls = []

    def stop_after_three(turn):
        calls.append((turn.text, turn.stats.generation_tokens))
        if len(calls) == 3:
            raise Interrupt()

    with pytest.raises(Interrupt):
        on_thread(conv.send, "Tell me a story", [red()], on_chunk=stop_after_three, max_tokens=200)
    reply = conv.turns[-1]
    assert reply.role == "assistant" and reply.stopped and reply.text == calls[-1][0]
    # nothing generated after the interruption (a sampled token that ends inside a character
    # gives no text of its own, so three pieces of text may take more than three tokens)
    assert reply.stats.generation_tokens == calls[-1][1] >= 3
    msgs = conv.session.messages
    assert [m["role"] for m in msgs] == ["user", "assistant"] and msgs[-1]["content"] == reply.text
    assert not conv._busy.locked() and not loaded.lock.locked()

    nxt = on_thread(conv.send, "Go on", max_tokens=4)  # another thread, after the interruption
    assert nxt.text and not nxt.stopped and conv.session.encode_calls == 1
    assert nxt.stats.prompt_tokens < 40  # the KV cache of the stopped turn was reused
    on_thread(conv.regenerate, max_tokens=3)
    conv.remove_last_turn()
    assert [t.role for t in conv.turns] == ["user", "assistant"] and len(conv.session.messages) == 2


def test_interrupted_before_the_first_token_leaves_no_trace(loaded):
    conv = logic.Conversation(loaded)
    loaded.lock.acquire()  # another browser session is generating
    try:
        def give_up():
            raise Interrupt()

        with pytest.raises(Interrupt):
            on_thread(conv.send, "Hello", on_wait=give_up, max_tokens=3)
    finally:
        loaded.lock.release()
    assert conv.turns == [] and conv.session.messages == []

    conv.send("Hello", max_tokens=2)  # regenerate interrupted while waiting: nothing is lost
    kept = (list(conv.turns), [dict(m) for m in conv.session.messages])
    loaded.lock.acquire()
    try:
        with pytest.raises(Interrupt):
            on_thread(conv.regenerate, on_wait=give_up, max_tokens=3)
    finally:
        loaded.lock.release()
    assert (conv.turns, conv.session.messages) == kept


def test_errors_before_generation_become_notes(loaded):
    conv = logic.Conversation(loaded)
    assert conv.send("<image_placeholder><image_placeholder>two?", [red()]) is None
    assert [t.role for t in conv.turns] == ["error"] and "placeholder" in conv.turns[0].text
    assert conv.send("bad top-p", top_p=2.0) is None  # raised by the sampler, before any token
    assert [t.role for t in conv.turns] == ["error", "error"] and "top_p" in conv.turns[1].text
    assert conv.session.messages == []
    assert conv.send("fine", max_tokens=2).text
    assert [m["role"] for m in conv.session.messages] == ["user", "assistant"]


def test_a_failure_during_the_reply_is_noted_and_the_conversation_goes_on(loaded, monkeypatch, capsys):
    conv = logic.Conversation(loaded)
    real_send = conv.session.send

    def broken_send(*args, **kwargs):
        gen = real_send(*args, **kwargs)
        yield next(gen)
        gen.close()
        raise TypeError("detokenizer exploded")

    monkeypatch.setattr(conv.session, "send", broken_send)
    reply = on_thread(conv.send, "Hi", [red()], max_tokens=20)
    assert reply.stopped and conv.turns[-1].role == "error"
    assert "The reply broke off: TypeError: detokenizer exploded" in conv.turns[-1].text
    assert "Traceback" in capsys.readouterr().err  # for whoever runs the server
    assert [m["role"] for m in conv.session.messages] == ["user", "assistant"]
    monkeypatch.undo()
    assert on_thread(conv.send, "Again", max_tokens=3).text
    assert [t.role for t in conv.turns] == ["user", "assistant", "error", "user", "assistant"]

    def broken_encoder(*args, **kwargs):
        raise RuntimeError("vision tower on fire")

    monkeypatch.setattr(conv.session, "add_images", broken_encoder)
    assert on_thread(conv.send, "New image", [logic.read_upload("n.png", encode(noise()))]) is None
    assert conv.turns[-1].text == "RuntimeError: vision tower on fire"
    assert len(conv.session.messages) == 4


def test_wait_idle_waits_for_the_reply_in_progress(loaded):
    """Fast reruns: the new script run must not touch the conversation until the old one stops."""
    conv = logic.Conversation(loaded)
    started, release = threading.Event(), threading.Event()

    def slow(turn):
        started.set()
        release.wait(10)
        raise Interrupt()

    t = threading.Thread(target=lambda: pytest.raises(Interrupt, conv.send, "Hi", on_chunk=slow, max_tokens=50))
    t.start()
    assert started.wait(30)
    waits = []
    threading.Timer(0.6, release.set).start()
    conv.wait_idle(on_wait=lambda: waits.append(1))
    t.join()
    assert waits and conv.turns[-1].stopped
    assert [m["role"] for m in conv.session.messages] == ["user", "assistant"]


def test_truncation_is_noted(loaded):
    conv = logic.Conversation(loaded, max_context=700)
    conv.send("first", [red()], max_tokens=8)
    conv.send("second", max_tokens=8)
    conv.send("third", [logic.read_upload("n.png", encode(noise()))], max_tokens=8)
    assert conv.turns[-1].role == "notice" and "dropped the oldest" in conv.turns[-1].text


def test_quantize_language_model(tiny_dir):
    import mlx.nn as nn

    q = logic.load_model(str(tiny_dir), quantize=True)
    lm = q.model.language_model
    assert isinstance(lm.model.embed_tokens, nn.QuantizedEmbedding) and isinstance(lm.lm_head, nn.QuantizedLinear)
    assert lm.model.layers[0].self_attn.q_proj.bits == 4 and lm.model.layers[0].self_attn.q_proj.group_size == 64
    assert not isinstance(q.model.aligner.layers[0], nn.QuantizedLinear)  # only the LLM
    assert on_thread(logic.Conversation(q).send, "Hi", [red()], max_tokens=3).text


def test_blas_hint(monkeypatch):
    import mlx.core as mx

    import mlx_dsvl.blas as blas

    if not sys.platform.startswith("linux") or mx.default_device() != mx.cpu:
        assert logic.blas_hint() is None
        return
    monkeypatch.setattr(blas, "openblas_loaded", lambda: True)
    assert logic.blas_hint() is None
    monkeypatch.setattr(blas, "openblas_loaded", lambda: False)
    monkeypatch.setattr(blas, "find_openblas", lambda: "/x/libopenblas.so.0")
    assert "LD_PRELOAD=/x/libopenblas.so.0 streamlit run apps/chat.py" in logic.blas_hint()
    monkeypatch.setattr(blas, "find_openblas", lambda: None)
    assert "apt-get install libopenblas0-pthread" in logic.blas_hint()


def test_load_model_warms_up_on_a_gpu(tiny_dir, monkeypatch):
    """On a GPU the app's load runs a short chat (kernels compile behind the loading spinner,
    whose text says so); forced here on the CPU, where it is otherwise skipped."""
    from mlx_dsvl import generation, warmup

    assert logic.load_model(str(tiny_dir)).warmup_seconds == 0.0  # CPU: nothing to compile
    assert "GPU" not in logic.loading_message("m", False)
    for module in (warmup, generation):  # the spinner's text, the warm-up
        monkeypatch.setattr(module, "kernels_compile", lambda: True)
    loaded = logic.load_model(str(tiny_dir), quantize=True)
    assert 0 < loaded.warmup_seconds <= loaded.seconds
    assert "preparing its GPU kernels" in logic.loading_message("m", True)
    assert "later runs start faster" in logic.loading_message("m", True)
    assert logic.parse_args(["--kv-bits", "8"]).kv_bits == 8
