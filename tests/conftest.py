"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def processor_dir(tmp_path_factory):
    """A 1.3B-style processor folder: tiny tokenizer + 384 px preprocessor (mean/std 0.5)."""
    from mlx_dsvl.random_tokenizer import write_processor_configs, write_tokenizer

    out = tmp_path_factory.mktemp("dsvl_processor")
    write_tokenizer(out)
    half = (0.5, 0.5, 0.5)
    write_processor_configs(out, image_size=384, image_mean=half, image_std=half, do_normalize=True)
    return out


@pytest.fixture(scope="session")
def chat_processor(processor_dir):
    """A ChatProcessor loaded from :func:`processor_dir`."""
    from mlx_dsvl.processing import ChatProcessor

    return ChatProcessor.from_pretrained(processor_dir)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A random 1.3B-layout checkpoint (SigLIP only) in the original deepseek-ai layout."""
    from mlx_dsvl.random_checkpoint import make_checkpoint

    return make_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny", seed=1)


@pytest.fixture(scope="session")
def tiny_hybrid_dir(tmp_path_factory):
    """A random 7B-layout checkpoint (SAM-B + SigLIP hybrid) in the original layout."""
    from mlx_dsvl.random_checkpoint import make_checkpoint

    return make_checkpoint("tiny-hybrid", tmp_path_factory.mktemp("ckpt") / "tiny-hybrid", seed=2)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    import mlx_dsvl

    return mlx_dsvl.load(tiny_dir, dtype="float32")  # float32 on any device (GPU default: bf16)


@pytest.fixture(scope="session")
def tiny_hybrid_model(tiny_hybrid_dir):
    import mlx_dsvl

    return mlx_dsvl.load(tiny_hybrid_dir, dtype="float32")


def _text_only(src, out):
    """A copy of checkpoint ``src`` at ``out`` with LM-head rows zeroed for the ids its tiny
    tokenizer does not define: replies are then real, prompt-dependent text (otherwise the random
    head favours undefined ids, which all print as "!")."""
    import json
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, out)
    weights = load_file(str(out / "model.safetensors"))
    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    defined = {*vocab.values(), *(t["id"] for t in json.loads((out / "tokenizer.json").read_text())["added_tokens"])}
    head = weights["language_model.lm_head.weight"]
    head[np.setdiff1d(np.arange(head.shape[0]), sorted(defined))] = 0
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="session")
def text_ckpt(tiny_dir, tmp_path_factory):
    """The tiny random checkpoint, its replies real text (:func:`_text_only`)."""
    return _text_only(tiny_dir, tmp_path_factory.mktemp("ckpt") / "tiny-text")


@pytest.fixture(scope="session")
def text_hybrid_ckpt(tiny_hybrid_dir, tmp_path_factory):
    """The tiny 7B-layout checkpoint, its replies real text (:func:`_text_only`)."""
    return _text_only(tiny_hybrid_dir, tmp_path_factory.mktemp("ckpt") / "tiny-hybrid-text")
