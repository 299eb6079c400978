"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def processor_dir(tmp_path_factory):
    """A 1.3B-style processor folder: tiny tokenizer + 384 px preprocessor (mean/std 0.5)."""
    from mlx_dsvl.testing.tokenizer import write_processor_configs, write_tokenizer

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
    from mlx_dsvl.testing.make_checkpoint import make_checkpoint

    return make_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny", seed=1)


@pytest.fixture(scope="session")
def tiny_hybrid_dir(tmp_path_factory):
    """A random 7B-layout checkpoint (SAM-B + SigLIP hybrid) in the original layout."""
    from mlx_dsvl.testing.make_checkpoint import make_checkpoint

    return make_checkpoint("tiny-hybrid", tmp_path_factory.mktemp("ckpt") / "tiny-hybrid", seed=2)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    import mlx_dsvl

    return mlx_dsvl.load(tiny_dir, dtype="float32")  # float32 on any device (GPU default: bf16)


@pytest.fixture(scope="session")
def tiny_hybrid_model(tiny_hybrid_dir):
    import mlx_dsvl

    return mlx_dsvl.load(tiny_hybrid_dir, dtype="float32")
