"""``mlx_dsvl.convert.keymaps``: original <-> ``transformers`` names, both directions, both layouts."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from mlx_dsvl.convert.keymaps import ORIGINAL_UNUSED, hf_to_original, original_to_hf
from mlx_dsvl.random_checkpoint import make_checkpoint

ARCHS = ["tiny", "tiny-hybrid"]


@pytest.fixture(scope="module", params=ARCHS)
def checkpoint(request, tmp_path_factory):
    folder = make_checkpoint(request.param, tmp_path_factory.mktemp("keymaps") / request.param)
    return folder, load_file(str(folder / "model.safetensors"))  # the tiny checkpoints: one file


def used(sd):
    return {k: v for k, v in sd.items() if not any(p.search(k) for p in ORIGINAL_UNUSED)}


def test_names_are_exactly_transformers_parameters(checkpoint):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers", minversion="5.0")
    from mlx_dsvl.testing import hf_reference as ref  # (imports torch)

    folder, sd = checkpoint
    model = ref.build_hf_model(folder)  # itself a strict load
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in original_to_hf(sd).items()}
    assert got == expected
    del torch


@pytest.mark.parametrize("nested", [False, True])
def test_round_trip_numpy(checkpoint, nested):
    _, sd = checkpoint
    hf = original_to_hf(sd, nested_siglip=nested)
    siglip = [k for k in hf if ".self_attn.q_proj." in k and "language_model" not in k]
    assert siglip and all(k.startswith("model.vision_model.vision_model." if nested else "model.vision_model.")
                          for k in siglip)
    assert all(".vision_model.vision_model." not in k for k in hf) or nested
    back = hf_to_original(hf)
    keep = used(sd)
    assert set(back) == set(keep)
    for k, v in keep.items():
        assert back[k].shape == v.shape and np.array_equal(np.asarray(back[k]), v), k


def test_round_trip_torch(checkpoint):
    torch = pytest.importorskip("torch")
    _, sd = checkpoint
    hf = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in original_to_hf(sd).items()}
    back = hf_to_original(hf)
    for k, v in used(sd).items():
        assert isinstance(back[k], torch.Tensor), k
        assert np.array_equal(back[k].numpy(), v), k


def test_tensor_changes(checkpoint):
    _, sd = checkpoint
    hybrid = any("vision_tower_high" in k for k in sd)
    hf = original_to_hf(sd)
    o = "vision_model.vision_tower_low.vision_tower." if hybrid else "vision_model.vision_tower."
    qkv = sd[o + "blocks.0.attn.qkv.weight"]
    d = qkv.shape[0] // 3
    for j, name in enumerate("qkv"):
        assert np.array_equal(hf[f"model.vision_model.encoder.layers.0.self_attn.{name}_proj.weight"],
                              qkv[j * d:(j + 1) * d])
    assert np.array_equal(hf["model.vision_model.embeddings.position_embedding.weight"], sd[o + "pos_embed"][0])
    if hybrid:
        s = "vision_model.vision_tower_high.vision_tower."
        assert np.array_equal(hf["model.high_res_vision_model.vision_encoder.layers.0.attn.qkv.weight"],
                              sd[s + "blocks.0.attn.qkv.weight"])  # SAM stays fused
        assert np.array_equal(hf["model.high_res_vision_alpha"], sd[s + "hd_alpha_downsamples"])
        assert np.array_equal(hf["model.high_res_vision_proj.conv2.weight"], sd[s + "downsamples.1.weight"])
        assert np.array_equal(hf["model.high_res_vision_neck.conv1.weight"], sd[s + "neck_hd.0.weight"])
        assert np.array_equal(hf["model.aligner.high_res_vision_proj.weight"], sd["aligner.high_up_proj.weight"])
        assert np.array_equal(hf["model.aligner.vision_proj.weight"], sd["aligner.low_up_proj.weight"])
    else:
        assert np.array_equal(hf["model.aligner.linear2.weight"], sd["aligner.layers.2.weight"])
    assert np.array_equal(hf["lm_head.weight"], sd["language_model.lm_head.weight"])
    assert not any(w in k for k in hf for w in ("attn_pool", "high_layer_norm", "low_layer_norm", "inv_freq"))


def test_errors_and_dropped_names(checkpoint):
    _, sd = checkpoint
    with pytest.raises(KeyError, match="no transformers name"):
        original_to_hf({**sd, "vision_model.something_new.weight": np.zeros(2)})
    hf = original_to_hf(sd)
    with pytest.raises(KeyError, match="no original name"):
        hf_to_original({**hf, "model.mystery.weight": np.zeros(2)})
    partial = {k: v for k, v in hf.items() if "layers.0.self_attn.k_proj.weight" not in k or "language" in k}
    with pytest.raises(KeyError, match="missing the k projection"):
        hf_to_original(partial)
    both = {**hf, **original_to_hf(sd, nested_siglip=True)}
    with pytest.raises(KeyError):
        hf_to_original(both)  # the two SigLIP generations at once
    # transformers' SigLIP pooling head (some converted files carry it) is dropped.
    assert set(hf_to_original({**hf, "model.vision_model.head.probe": np.zeros((1, 1, 4))})) == set(used(sd))
