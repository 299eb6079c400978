"""``mlx_dsvl.model_folder``: the pieces the loader and the converter share, on hand-made inputs."""

from __future__ import annotations

import shutil

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import mlx_dsvl
from mlx_dsvl.model_folder import (
    ModelLoadError,
    check_weights,
    plan_shards,
    read_weights,
    resolve_model_path,
    sanitize,
    shard_names,
    split_unused,
    to_mlx_layout,
    to_pytorch_layout,
)


def test_layout_maps_are_inverse():
    rng = np.random.default_rng(0)
    conv = mx.array(rng.normal(size=(8, 3, 4, 5)).astype(np.float32))  # PyTorch [O, I, kH, kW]
    for name in ("vision_model.vision_tower.patch_embed.proj.weight",
                 "vision_model.vision_tower_high.vision_tower.neck.0.weight",
                 "vision_model.vision_tower_high.vision_tower.downsamples.1.weight"):
        mlx_side = to_mlx_layout(name, conv)
        assert mlx_side.shape == (8, 4, 5, 3)
        np.testing.assert_array_equal(np.array(mlx_side), np.transpose(np.array(conv), (0, 2, 3, 1)))
        np.testing.assert_array_equal(np.array(to_pytorch_layout(name, mlx_side)), np.array(conv))
    other = "language_model.model.layers.0.mlp.up_proj.weight"
    assert to_mlx_layout(other, conv) is conv and to_pytorch_layout(other, conv) is conv


def test_split_unused_and_sanitize():
    w = {"vision_model.vision_tower.attn_pool.q.weight": mx.zeros((2, 2)),
         "vision_model.low_layer_norm.bias": mx.zeros((2,)),
         "language_model.model.layers.0.self_attn.rotary_emb.inv_freq": mx.zeros((2,)),
         "aligner.layers.0.weight": mx.zeros((2, 2)),
         "vision_model.vision_tower.patch_embed.proj.weight": mx.zeros((4, 3, 2, 2))}
    used, unused = split_unused(w)
    assert list(used) == ["aligner.layers.0.weight", "vision_model.vision_tower.patch_embed.proj.weight"]
    assert len(unused) == 3 and not set(used) & set(unused)
    out = sanitize(w)
    assert list(out) == list(used) and out["vision_model.vision_tower.patch_embed.proj.weight"].shape == (4, 2, 2, 3)


def test_plan_shards():
    sizes = {"a.weight": 6, "a.bias": 1, "b.weight": 6, "b.scales": 2, "c.weight": 20, "d.weight": 1}
    assert plan_shards(sizes, 10) == [["a.weight", "a.bias"], ["b.weight", "b.scales"], ["c.weight"], ["d.weight"]]
    assert plan_shards(sizes, 100) == [list(sizes)]
    per_tensor = plan_shards(sizes, 8, group=lambda k: k)
    assert per_tensor == [["a.weight", "a.bias"], ["b.weight", "b.scales"], ["c.weight"], ["d.weight"]]
    assert plan_shards({"x.w": 5, "y.w": 5}, 9, group=lambda k: k) == [["x.w"], ["y.w"]]
    assert shard_names(1) == ["model.safetensors"]
    assert shard_names(2) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


def test_check_weights_messages(tmp_path):
    expected = {"a": mx.zeros((2, 3)), "b": mx.zeros((4,))}
    check_weights(tmp_path, {"a": mx.ones((2, 3)), "b": mx.ones((4,))}, expected)
    for weights, fragment in [({"a": mx.zeros((2, 3))}, "missing weight b"),
                              ({**expected, "c": mx.zeros(1)}, "unexpected weight c"),
                              ({"a": mx.zeros((3, 2)), "b": mx.zeros(4)}, "weight a has shape (3, 2), expected (2, 3)")]:
        with pytest.raises(ModelLoadError) as e:
            check_weights(tmp_path, weights, expected)
        assert str(e.value) == f"{tmp_path}: {fragment}"


def test_resolve_model_path(tmp_path):
    assert resolve_model_path(tmp_path) == tmp_path
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a folder"):
        resolve_model_path(f)
    with pytest.raises(ModelLoadError, match="no such model folder"):
        resolve_model_path(tmp_path / "nope")


def test_shards_without_an_index_are_all_read(tiny_dir, tmp_path):
    """A folder of several *.safetensors files and no index: every file's tensors are read (only
    the last file was, and the strict check then named a missing tensor)."""
    folder = tmp_path / "two-shards"
    shutil.copytree(tiny_dir, folder)
    weights = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(weights)
    half = len(names) // 2
    for i, part in enumerate((names[:half], names[half:])):
        save_file({k: weights[k] for k in part}, str(folder / f"part-{i}.safetensors"), metadata={"format": "pt"})
    assert sorted(read_weights(folder)) == names
    mlx_dsvl.load(folder, dtype="float32")  # the strict check passes
