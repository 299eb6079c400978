"""Follow-up turns of a ChatSession: what is reused, what a turn computes, KV-cache quantization,
the first-use notice."""

from __future__ import annotations

import hashlib
import time

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

import mlx_dsvl
from mlx_dsvl import warmup
from mlx_dsvl.models import llm
from mlx_dsvl.processing.chat import SEP2, PromptTokens
from mlx_dsvl.session import ChatSession
from mlx_dsvl.streaming import PROCESSOR_CONTEXT

GREEDY = dict(temperature=0.0, repetition_penalty=1.0)


def image(seed, size=(90, 60)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def tokens(chunks):
    return [c.token for c in chunks if c.token is not None]


def fresh(model, processor, chat, images, **opts):
    """The last turn of ``chat`` encoded from scratch: the conversation up to its last question."""
    conv = chat.conversation[:-1]
    return list(mlx_dsvl.stream_generate(model, processor, conv, images, **opts))


# -- what a follow-up turn encodes ------------------------------------------------------------
def test_prompt_tokens_equal_whole_encoding(chat_processor):
    """Re-encoding only what follows the last end-of-sentence token gives the ids of the whole."""
    p = chat_processor
    tok = PromptTokens(p)
    tag = p.image_tag
    replies = ["Sure.", "  spaces  around ", "中文 and 🙂", f"a literal {SEP2} inside", "x" * 300, "User"]
    conv = [{"role": "user", "content": tag + "What is this?"}]
    reused = 0
    for i, reply in enumerate(replies):
        conv += [{"role": "assistant", "content": reply},
                 {"role": "user", "content": f"question {i} {tag if i == 2 else ''}\n more"}]
        prompt = p.format(conv)
        before = tok._prefix
        got = tok(prompt)
        reused += bool(before) and prompt.startswith(before)
        np.testing.assert_array_equal(got, p.tokenize(prompt))
    assert reused >= 4  # the prefix was really reused, not re-encoded
    other = p.format([{"role": "user", "content": "something else"}])  # a new conversation
    np.testing.assert_array_equal(tok(other), p.tokenize(other))


def test_new_image_in_place_of_an_old_one_is_not_taken_from_the_cache(tiny_model):
    """Every image token has the same id: reuse must also compare the images themselves."""
    model, processor = tiny_model
    chat = ChatSession(model, processor)
    list(chat.send("<image_placeholder>What is this?", [image(1)], max_tokens=4, **GREEDY))
    chat.undo()  # the same question about another image: the same token ids
    turn = list(chat.send("<image_placeholder>What is this?", [image(2)], max_tokens=6, **GREEDY))
    scratch = fresh(model, processor, chat, [image(2)], max_tokens=6, **GREEDY)
    assert tokens(turn) == tokens(scratch)
    assert turn[-1].prompt_tokens > processor.num_image_tokens  # the new image was prefilled


@pytest.mark.slow
def test_image_features_stay_within_their_bound_and_come_back_when_needed(tiny_model):
    """Room for two images' features, four image turns: the cache keeps the two latest; the
    conversation keeps the features of its own images (a turn dropped past the context re-runs
    the rest), and an evicted image sent again is encoded again; every reply is a fresh one's."""
    model, processor = tiny_model
    pics = [image(61 + i) for i in range(4)]
    pixels = processor.image_processor(pics)
    by_key = {hashlib.sha256(px.tobytes()).hexdigest(): pic for px, pic in zip(pixels, pics)}
    per = model.encode_images(mx.array(pixels[:1]))[0].nbytes
    chat = ChatSession(model, processor, image_cache_bytes=2 * per + 16, on_truncate=None,
                       max_context=4 * (processor.num_image_tokens + 60))

    def same_as_fresh(turn):
        images = [by_key[k] for m in chat.messages for k in m["images"]]
        assert tokens(turn) == tokens(fresh(model, processor, chat, images, max_tokens=3, **GREEDY))
        assert chat.image_features.nbytes <= chat.image_features.max_bytes

    for i, pic in enumerate(pics):
        same_as_fresh(list(chat.send(f"<image_placeholder>Picture {i}?", [pic], max_tokens=3, **GREEDY)))
    assert len(chat.messages) == 8 and len(chat.image_features) == 2 and chat.encode_calls == 4
    # past the context: the first turn goes, the rest (one image evicted) is prefilled again
    turn = list(chat.send("And all of them? " + "Say more. " * 50, max_tokens=3, **GREEDY))
    kept = [k for m in chat.messages for k in m["images"]]
    assert len(kept) == 3 and kept[0] not in chat.image_features
    assert turn[-1].prompt_tokens > 3 * processor.num_image_tokens  # no cached prefix: all again
    same_as_fresh(turn)
    assert chat.encode_calls == 4  # held by the conversation, not encoded again
    # the first image, evicted and out of the conversation, comes back: encoded again
    chat.reset()
    same_as_fresh(list(chat.send("<image_placeholder>Picture 0?", [pics[0]], max_tokens=3, **GREEDY)))
    assert chat.encode_calls == 5


@pytest.mark.slow
def test_follow_up_encodes_only_its_new_tokens(tiny_hybrid_model):
    """A question after an image turn embeds only its own tokens (no image merge, no features)."""
    model, processor = tiny_hybrid_model
    chat = ChatSession(model, processor, profile=True)
    list(chat.send("<image_placeholder>Describe it.", [image(3)], max_tokens=5, **GREEDY))
    seen = []
    real = model.get_input_embeddings

    def spy(ids, pixel_values=None, image_embeds=None):
        seen.append((ids.shape[1], image_embeds is not None))
        return real(ids, pixel_values, image_embeds)

    model.get_input_embeddings = spy
    try:
        turn = list(chat.send("And the colours?", [], max_tokens=5, **GREEDY))
    finally:
        del model.get_input_embeddings
    t = chat.timings
    assert seen == [(t["new_tokens"], False)] and t["new_tokens"] == turn[-1].prompt_tokens
    assert t["new_tokens"] < 60 < processor.num_image_tokens < t["cached_tokens"]
    for stage in ("images_ms", "format_tokenize_ms", "prefix_match_ms", "embed_merge_ms", "prefill_ms",
                  "first_sample_ms"):
        assert t[stage] >= 0, stage
    assert t["prefill_ms"] > 0 and t["first_sample_ms"] > 0


def test_follow_up_penalty_context_is_the_prompts_tail(tiny_model, monkeypatch):
    """The logits processors (the repetition penalty) see the prompt's last tokens, as in a fresh
    encoding -- not only the few tokens new to the cache."""
    from mlx_dsvl.sampling import SamplingOptions

    model, processor = tiny_model
    seen = []

    def record(tokens, logits):
        seen.append(tokens.tolist())
        return logits

    monkeypatch.setattr(SamplingOptions, "make_sampler", lambda self: lambda lp: mx.argmax(lp, axis=-1))
    monkeypatch.setattr(SamplingOptions, "make_logits_processors", lambda self: [record])
    chat = ChatSession(model, processor)
    list(chat.send("<image_placeholder>Describe it.", [image(4)], max_tokens=4))
    seen.clear()
    turn = list(chat.send("Why?", [], max_tokens=4))
    session_context = seen[0]
    seen.clear()
    scratch = fresh(model, processor, chat, [image(4)], max_tokens=4)
    assert turn[-1].prompt_tokens < len(session_context) == PROCESSOR_CONTEXT  # more than the new tokens
    assert session_context == seen[0][-PROCESSOR_CONTEXT:] and tokens(turn) == tokens(scratch)


def test_unfused_attention_is_the_fused_kernels_fallback():
    """On the CPU mx.fast's attention is MLX's fallback: the unfused one must equal it."""
    rng = np.random.default_rng(0)
    q, k, v = (mx.array(rng.standard_normal(s).astype(np.float32)) for s in
               ((1, 4, 7, 16), (1, 4, 19, 16), (1, 4, 19, 16)))
    for mask in ("causal", None, mx.array(rng.standard_normal((7, 19)).astype(np.float32))):
        ours = llm.unfused_attention(q, k, v, 0.25, mask)
        ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
        np.testing.assert_array_equal(np.array(ours), np.array(ref))


def test_session_with_unfused_prefills_matches_fused(tiny_model, monkeypatch):
    """The GPU's path for short prefills, forced on the CPU: the same tokens and logits."""
    model, processor = tiny_model
    runs = []
    for forced in (False, True):
        monkeypatch.setattr(llm, "unfused_prefill", lambda n, c, f=forced: f and 1 < n <= 512 and c is not None)
        chat = ChatSession(model, processor)
        runs.append([tokens(chat.send(q, i, max_tokens=6, **GREEDY)) for q, i in
                     [("<image_placeholder>Describe it.", [image(5)]), ("And then?", [])]])
    assert runs[0] == runs[1]


# -- KV-cache quantization ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def kv_dir(tiny_dir, tmp_path_factory):
    """The tiny checkpoint with 2 heads of 32 (KV quantization groups need 32 | head size)."""
    from mlx_dsvl.random_checkpoint import with_language_config

    return with_language_config(tiny_dir, tmp_path_factory.mktemp("kv") / "tiny-2heads",
                                num_attention_heads=2, num_key_value_heads=2)


@pytest.fixture(scope="module")
def kv_model(kv_dir):
    return mlx_dsvl.load(kv_dir, dtype="float32")


def test_kv_bits_options_are_checked(tiny_model):
    model, processor = tiny_model  # head size 16
    for bad in (dict(kv_bits=3), dict(kv_bits=8, kv_group_size=48), dict(kv_bits=4, quantized_kv_start=-1),
                dict(kv_bits=8, kv_group_size=32)):
        with pytest.raises(ValueError, match="kv_"):
            ChatSession(model, processor, **bad)


@pytest.mark.parametrize("bits", [4, 8])
def test_kv_bits_session_quantizes_and_trims_its_cache(kv_model, bits):
    """The cache is quantized from the first turn; trimming it back (a question replaced after
    undo) leaves nothing stale: the same turn as in a session that never took the detour."""
    from mlx_lm.models.cache import QuantizedKVCache

    model, processor = kv_model
    opts = dict(max_tokens=6, **GREEDY)
    q1 = ("<image_placeholder>Describe it.", [image(6)])

    straight = ChatSession(model, processor, kv_bits=bits, kv_group_size=32)
    list(straight.send(*q1, **opts))
    want = list(straight.send("And the shape?", [], **opts))

    detour = ChatSession(model, processor, kv_bits=bits, kv_group_size=32)
    list(detour.send(*q1, **opts))
    assert all(isinstance(c, QuantizedKVCache) and c.bits == bits for c in detour.cache)
    list(detour.send("Something else entirely, with many more words than the other.", [], **opts))
    detour.undo()
    got = list(detour.send("And the shape?", [], **opts))
    assert tokens(got) == tokens(want) and got[-1].prompt_tokens < 30  # the cache was reused
    assert detour.cache[0].offset == len(detour.cached_ids)


def test_quantized_cache_prefill_on_the_cpu_matches_mlx_lm(kv_model, monkeypatch):
    """A prefill onto a quantized cache dequantizes it on the CPU: the same tokens as mlx-lm's
    quantized attention (forced back here)."""
    model, processor = kv_model
    turns = [("<image_placeholder>Describe it.", [image(11)]), ("And then, in more words than before?", [])]
    runs = []
    for ours in (True, False):
        if not ours:
            monkeypatch.setattr(llm, "unfused_prefill", lambda n, c: False)
        chat = ChatSession(model, processor, kv_bits=8, kv_group_size=32)
        runs.append([tokens(chat.send(q, i, max_tokens=6, **GREEDY)) for q, i in turns])
    assert runs[0] == runs[1]


def test_kv_bits_in_the_generation_api(kv_model):
    model, processor = kv_model
    conv = [{"role": "user", "content": "Hello there"}]
    out = mlx_dsvl.generate(model, processor, conv, max_tokens=4, kv_bits=8, kv_group_size=32, **GREEDY)
    assert isinstance(out, str)
    with pytest.raises(ValueError, match="kv_bits"):
        mlx_dsvl.generate(model, processor, conv, max_tokens=4, kv_bits=5)


@pytest.mark.slow
def test_cli_kv_bits_and_quantize(kv_dir, tiny_dir):
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "mlx_dsvl.generate", "--prompt", "Hi", "--max-tokens", "3",
                               "--temperature", "0", *args], capture_output=True, text=True, timeout=300)

    r = cli("--model", str(kv_dir), "--kv-bits", "4", "--kv-group-size", "32", "--quantize", "4", "--verbose")
    assert r.returncode == 0 and "Peak memory" in r.stderr, r.stderr
    bad = cli("--model", str(tiny_dir), "--kv-bits", "8", "--kv-group-size", "32")  # head size 16
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 1 and len(lines) == 1 and "kv_group_size 32 does not divide" in lines[0], bad.stderr


# -- the first forward of a process on a GPU ------------------------------------------------------
def test_slow_first_forward_says_what_is_happening(tiny_model, monkeypatch):
    """Forced GPU condition and an injected slow forward: the notice comes once, while waiting."""
    model, processor = tiny_model
    monkeypatch.setattr(warmup, "kernels_compile", lambda: True)
    monkeypatch.setattr(warmup, "NOTICE_DELAY_S", 0.05)
    monkeypatch.setattr(warmup, "_first_forward_done", False)
    real = model.encode_images

    def slow(px):
        time.sleep(0.3)
        return real(px)

    said = []
    monkeypatch.setattr(model, "encode_images", slow)
    chat = ChatSession(model, processor, on_slow_start=said.append)
    list(chat.send("<image_placeholder>Hi", [image(7)], max_tokens=2, **GREEDY))
    assert said == [warmup.MESSAGE]
    assert "later runs start faster" in warmup.MESSAGE
    list(ChatSession(model, processor, on_slow_start=said.append).send(
        "<image_placeholder>Hi", [image(8)], max_tokens=2, **GREEDY))
    assert said == [warmup.MESSAGE]  # once per process


def test_fast_first_forward_and_cpu_say_nothing(tiny_model, monkeypatch):
    model, processor = tiny_model
    monkeypatch.setattr(warmup, "_first_forward_done", False)
    monkeypatch.setattr(warmup, "NOTICE_DELAY_S", 0.05)
    said = []
    monkeypatch.setattr(model, "encode_images", lambda px, real=model.encode_images: (time.sleep(0.2), real(px))[1])
    list(ChatSession(model, processor, on_slow_start=said.append).send(
        "<image_placeholder>Hi", [image(9)], max_tokens=2, **GREEDY))
    assert said == [] and not warmup.kernels_compile()  # the CPU backend compiles nothing
    monkeypatch.setattr(warmup, "kernels_compile", lambda: True)
    monkeypatch.setattr(warmup, "NOTICE_DELAY_S", 30.0)
    list(ChatSession(model, processor, on_slow_start=said.append).send("Hi", [], max_tokens=2, **GREEDY))
    assert said == []


def test_cli_says_what_a_slow_first_forward_is_doing(tiny_dir, monkeypatch, capsys):
    import importlib

    from mlx_dsvl.models.deepseek_vl import DeepseekVL

    cli = importlib.import_module("mlx_dsvl.generate")
    monkeypatch.setenv("MLX_DSVL_NO_BLAS_REEXEC", "1")
    monkeypatch.setattr(warmup, "kernels_compile", lambda: True)
    monkeypatch.setattr(warmup, "NOTICE_DELAY_S", 0.05)
    monkeypatch.setattr(warmup, "_first_forward_done", False)
    real = DeepseekVL.encode_images
    monkeypatch.setattr(DeepseekVL, "encode_images", lambda self, px: (time.sleep(0.3), real(self, px))[1])
    image(10).save(tiny_dir.parent / "slow.png")
    assert cli.main(["--model", str(tiny_dir), "--image", str(tiny_dir.parent / "slow.png"), "--prompt", "Hi",
                     "--max-tokens", "2", "--dtype", "float32"]) == 0
    assert f"[mlx-dsvl] {warmup.MESSAGE}" in capsys.readouterr().err
