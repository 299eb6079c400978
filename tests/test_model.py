"""Model structure, the image merge, padded batches and sanitize (MLX side, no reference)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_dsvl.config import ModelConfig
from mlx_dsvl.model_folder import CONV_SUFFIXES, sanitize
from mlx_dsvl.models.deepseek_vl import (
    ImagePositionError,
    check_image_positions,
    merge_image_embeddings,
)
from mlx_dsvl.random_checkpoint import ARCHS, checkpoint_shapes
from mlx_dsvl.random_tokenizer import IMAGE_ID as IMG  # the test checkpoints' tokenizer id


def loop_merge(ids, text, images):
    """Reference merge written as the obvious loop: k-th image token of row b <- flat image k."""
    ids, text, images = np.array(ids), np.array(text).copy(), np.array(images)
    B, N, I, D = images.shape
    for b in range(B):
        flat = images[b].reshape(N * I, D)
        k = 0
        for t in range(ids.shape[1]):
            if ids[b, t] == IMG:
                text[b, t] = flat[k]
                k += 1
    return text


def test_merge_matches_loop_batch_and_several_images():
    rng = np.random.default_rng(0)
    I, D = 4, 8
    # row 0: two images; row 1: one image (second slot is padding), left padded with EOS
    ids = np.array([
        [100000, 5] + [IMG] * I + [6, 7] + [IMG] * I + [8],
        [100001] * 6 + [100000, 9] + [IMG] * I + [10],
    ])
    text = rng.standard_normal((2, ids.shape[1], D)).astype(np.float32)
    images = rng.standard_normal((2, 2, I, D)).astype(np.float32)
    # the images laid end to end; each row starts at its own first slot
    flat = mx.array(images.reshape(4, I, D))
    got = merge_image_embeddings(mx.array(ids), mx.array(text), flat, IMG, mx.array([0, 2 * I]))
    np.testing.assert_array_equal(np.array(got), loop_merge(ids, text, images))


@pytest.mark.parametrize("arch", ["1.3b", "7b"])
def test_real_sizes_parameter_count_and_keys(arch):
    """Full-size configs build with the released parameter counts and key names."""
    shapes = checkpoint_shapes(ARCHS[arch][0])
    total = sum(int(np.prod(s)) for s in shapes.values())
    # released safetensors: 3.95 GB (1.3B) and 14.7 GB (7B) of fp16
    expected_gb = {"1.3b": 3.95, "7b": 14.7}[arch]
    assert abs(total * 2 / 1e9 - expected_gb) < 0.05, total
    lm = "language_model.model."
    assert shapes[lm + "embed_tokens.weight"] == shapes["language_model.lm_head.weight"]
    if arch == "1.3b":
        assert shapes["vision_model.vision_tower.patch_embed.proj.weight"] == (1024, 3, 16, 16)
        assert shapes["vision_model.vision_tower.pos_embed"] == (1, 576, 1024)
        assert shapes["vision_model.vision_tower.blocks.23.attn.qkv.weight"] == (3072, 1024)
        assert shapes["aligner.layers.0.weight"] == (2048, 1024)
        assert shapes["aligner.layers.2.weight"] == (2048, 2048)
        assert shapes[lm + "layers.23.mlp.gate_proj.weight"] == (5632, 2048)
    else:
        sam = "vision_model.vision_tower_high.vision_tower."
        assert shapes[sam + "pos_embed"] == (1, 64, 64, 768)
        assert shapes[sam + "blocks.0.attn.rel_pos_h"] == (27, 64)
        assert shapes[sam + "blocks.2.attn.rel_pos_w"] == (127, 64)
        assert shapes[sam + "neck.0.weight"] == (256, 768, 1, 1)
        assert shapes[sam + "neck_hd.2.weight"] == (256, 256, 3, 3)
        assert shapes[sam + "downsamples.0.weight"] == (512, 256, 3, 3)
        assert shapes[sam + "downsamples.1.weight"] == (1024, 512, 3, 3)
        assert shapes[sam + "hd_alpha_downsamples"] == (1,)
        assert shapes["aligner.high_up_proj.weight"] == (2048, 1024)
        assert shapes["aligner.layers.1.weight"] == (4096, 4096)
        # sparse language_config completed with the HF Llama defaults
        assert shapes[lm + "layers.29.mlp.down_proj.weight"] == (4096, 11008)
        assert shapes["vision_model.high_layer_norm.weight"] == (1024,)


def test_sanitize_drops_unused_and_transposes_convs():
    w = {
        "vision_model.vision_tower.attn_pool.latent": mx.zeros((1, 1, 4)),
        "vision_model.high_layer_norm.weight": mx.zeros((4,)),
        "language_model.model.layers.0.self_attn.rotary_emb.inv_freq": mx.zeros((2,)),
        "vision_model.vision_tower.patch_embed.proj.weight": mx.zeros((8, 3, 16, 16)),
        "vision_model.vision_tower.blocks.0.attn.qkv.weight": mx.zeros((12, 4)),
    }
    out = sanitize(w)
    assert sorted(out) == [
        "vision_model.vision_tower.blocks.0.attn.qkv.weight",
        "vision_model.vision_tower.patch_embed.proj.weight",
    ]
    assert out["vision_model.vision_tower.patch_embed.proj.weight"].shape == (8, 16, 16, 3)


def test_loaded_parameters_are_the_files_values(tiny_hybrid_dir, tiny_hybrid_model):
    """Every parameter comes from the file (nothing left at init), conv layouts transposed."""
    from safetensors.numpy import load_file

    model, _ = tiny_hybrid_model
    raw = load_file(str(tiny_hybrid_dir / "model.safetensors"))
    params = dict(tree_flatten(model.parameters()))
    for k, v in params.items():
        ref = raw[k]
        if k.endswith(CONV_SUFFIXES):
            ref = ref.transpose(0, 2, 3, 1)
        np.testing.assert_array_equal(np.array(v), ref, err_msg=k)
        assert np.abs(ref).max() > 0, f"{k} is all zeros"


def test_image_positions_must_match_the_images():
    """Every row a whole number of runs, at most N; the fullest row exactly N (the rest: padding)."""
    I = 4
    two, one, none = [1] + [IMG] * 2 * I + [2], [1] * (I + 1) + [IMG] * I + [2], [1] * (2 * I + 2)
    check_image_positions(mx.array([two, one]), 2, I, IMG)  # a padded batch
    check_image_positions(mx.array([two, none]), 2, I, IMG)
    check_image_positions(mx.array([one]), 1, I, IMG)
    cases = [([one], 2, rf"4 image position\(s\) \(id {IMG}\), but 2 image\(s\) x 4 tokens"),
             ([none], 1, r"0 image position"),  # e.g. the ids use another image-token id
             ([one, one], 2, rf"4 image position\(s\) \(id {IMG}\) in row 0, but 2"),
             ([[1] + [IMG] * (I + 1)], 1, r"5 image position"),  # not a whole run
             ([two], 1, r"8 image position")]
    for rows, n, msg in cases:
        with pytest.raises(ImagePositionError, match=msg):
            check_image_positions(mx.array(rows), n, I, IMG)


def test_model_call_refuses_images_without_their_positions(tiny_model):
    model, _ = tiny_model
    px = mx.zeros((1, 1, 3, 384, 384))
    with pytest.raises(ImagePositionError, match="0 image position"):
        model(mx.array([[1, 2, 3]]), pixel_values=px)
    with pytest.raises(ImagePositionError, match="576 image position.*2 image"):
        model(mx.array([[1] + [IMG] * 576]), image_embeds=mx.zeros((1, 2, 576, 64)))
    assert model(mx.array([[1, IMG, 3]])).shape[:2] == (1, 3)  # no images: nothing to check


@pytest.mark.slow
def test_padded_batch_equals_unpadded(tiny_model):
    """Left padding + attention_mask gives each row exactly its unpadded logits."""
    model, _ = tiny_model
    rng = np.random.default_rng(3)
    I = 576
    px = mx.array(rng.random((2, 1, 3, 384, 384), dtype=np.float32))
    long = [100000, 11, 12] + [IMG] * I + [13, 14, 15, 16]
    short = [100000, 21] + [IMG] * I + [22]
    pad = len(long) - len(short)
    ids = mx.array([long, [100001] * pad + short])
    mask = mx.array([[1] * len(long), [0] * pad + [1] * len(short)])
    batched = model(ids, pixel_values=px, attention_mask=mask)
    one = model(mx.array([short]), pixel_values=px[1:2])
    zero = model(mx.array([long]), pixel_values=px[0:1])
    scale = float(mx.abs(one).max())
    assert float(mx.abs(batched[1, pad:] - one[0]).max()) < 1e-4 * scale
    assert float(mx.abs(batched[0] - zero[0]).max()) < 1e-4 * scale


@pytest.mark.slow
def test_logits_depend_on_every_image(tiny_hybrid_model):
    """Changing the second image changes logits only after its tokens (merge order, causality)."""
    model, _ = tiny_hybrid_model
    rng = np.random.default_rng(4)
    px = rng.random((1, 2, 3, 1024, 1024), dtype=np.float32)
    ids = [100000, 5] + [IMG] * 576 + [6, 7] + [IMG] * 576 + [8, 9]
    a = model(mx.array([ids]), pixel_values=mx.array(px))
    px[0, 1] = rng.random((3, 1024, 1024), dtype=np.float32)
    b = model(mx.array([ids]), pixel_values=mx.array(px))
    second = 2 + 576 + 2
    diff = mx.abs(a - b).max(axis=-1)[0]
    assert float(diff[:second].max()) == 0.0
    assert float(diff[second:].min()) > 0.0


def test_config_overrides_and_defaults():
    cfg = ModelConfig.from_dict(ARCHS["7b"][0])
    assert cfg.vision.hybrid and cfg.vision.high.global_attn_indexes == (2, 5, 8, 11)
    assert cfg.language["hidden_size"] == 4096 and cfg.language["rms_norm_eps"] == 1e-6
    assert cfg.language["tie_word_embeddings"] is False
    tiny = ModelConfig.from_dict(ARCHS["tiny-hybrid"][0])
    assert tiny.vision.high.width == 32 and tiny.vision.low.width == 64
    assert tiny.vision.num_image_tokens == 576


@pytest.mark.slow
def test_compiled_vision_equals_eager(tiny_hybrid_model):
    """The compiled vision path (default on GPUs) computes exactly what the eager one does."""
    model, _ = tiny_hybrid_model
    px = mx.random.uniform(shape=(1, 1, 3, 1024, 1024), key=mx.random.key(5))
    try:
        model.compile_vision(False)
        eager = model.encode_images(px)
        model.compile_vision(True)
        compiled = model.encode_images(px)
    finally:
        model.compile_vision(mx.default_device() == mx.gpu)
    assert eager.shape == (1, 1, 576, 64)
    assert float(mx.abs(eager - compiled).max()) <= 1e-5 * float(mx.abs(eager).max())


def test_cpu_attention_equals_fused_attention_values_and_gradients():
    """The vision towers' CPU attention (softmax through 2 ** x) against mx.fast's fused one."""
    from mlx_dsvl.models.attention import attention

    mx.random.seed(0)
    q, k, v = (mx.random.normal((2, 3, 40, 16)) for _ in range(3))
    bias = mx.random.normal((2, 3, 40, 40))
    before = mx.default_device()
    mx.set_default_device(mx.cpu)  # the path under test is the CPU one, also on a GPU machine
    try:
        for mask in (None, bias):
            ours = attention(q, k, v, 0.25, mask)
            ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
            assert mx.allclose(ours, ref, atol=1e-5).item()
        g_ours = mx.grad(lambda *a: (attention(*a[:3], 0.25, a[3]) ** 2).sum(), argnums=(0, 1, 2, 3))(q, k, v, bias)
        g_ref = mx.grad(lambda *a: (mx.fast.scaled_dot_product_attention(*a[:3], scale=0.25, mask=a[3]) ** 2).sum(),
                        argnums=(0, 1, 2, 3))(q, k, v, bias)
        for a, b in zip(g_ours, g_ref):
            assert mx.allclose(a, b, atol=1e-4).item()
    finally:
        mx.set_default_device(before)


@pytest.mark.slow
def test_training_accessors_match_the_forward_pass(tiny_hybrid_model):
    """hidden_states + lm_head give the forward pass's logits, per-row or flat images; towers."""
    model, proc = tiny_hybrid_model
    rng = np.random.default_rng(3)
    I, D = proc.num_image_tokens, model.config.language["hidden_size"]
    ids = np.array([[100000, 5] + [model.image_token_id] * I + [6, 7]] * 2)
    emb = mx.array(rng.standard_normal((2, 1, I, D)).astype(np.float32))
    want = model(mx.array(ids), image_embeds=emb)
    h = model.hidden_states(mx.array(ids), image_embeds=emb)
    np.testing.assert_array_equal(np.array(model.lm_head(h)), np.array(want))
    flat = model.hidden_states(mx.array(ids), image_embeds=emb.reshape(2, I, D))  # [M, I, D]
    np.testing.assert_array_equal(np.array(flat), np.array(h))
    towers = model.towers()
    assert set(towers) == {"siglip", "sam"}
    assert towers["siglip"] is model.vision_model.vision_tower_low.vision_tower
    assert towers["sam"] is model.vision_model.vision_tower_high.vision_tower
    assert not model.tied_embeddings
