"""Numerical parity with ``transformers``' independent PyTorch ports, on random tiny checkpoints.

Both layouts (``tiny`` = 1.3B: SigLIP + ``mlp_gelu``; ``tiny-hybrid`` = 7B: SAM + SigLIP +
hybrid aligner) are written once per module in the original deepseek-ai format; our model loads
the folder, and ``transformers``' ``DeepseekVL[Hybrid]ForConditionalGeneration`` is built from
the same folder (see :mod:`mlx_dsvl.testing.hf_reference`: explicit config, strict weight load,
every parameter from the file).  Both sides see identical pixels: ours the [0, 1] images, the
reference exactly what the original model feeds each tower.  Each stage must agree within
1e-4 of the reference's largest magnitude; ``pytest -s`` prints the measured differences.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", minversion="5.0")
mx = pytest.importorskip("mlx.core")

from mlx_dsvl.loading import load_model  # noqa: E402
from mlx_dsvl.models.resize import antialias_bilinear_resize, bilinear_resize  # noqa: E402
from mlx_dsvl.random_checkpoint import make_checkpoint  # noqa: E402
from mlx_dsvl.random_tokenizer import BOS_ID as BOS  # noqa: E402  the checkpoints' ids
from mlx_dsvl.random_tokenizer import IMAGE_ID as IMAGE_TOKEN
from mlx_dsvl.testing import hf_reference as ref  # noqa: E402

TOL = 1e-4
TOKENS_PER_IMAGE = 576


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def rel_max_diff(ours, reference) -> float:
    """max |ours - reference| / max |reference|; arrays, or a precomputed (max diff, max ref) pair."""
    if isinstance(ours, tuple):
        diff, scale = ours
        return diff / scale
    ours = np.asarray(ours, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def logits_stats(ours, reference) -> tuple:
    """(max |diff|, max |reference|) row by row, in place in float32: logits are [B, T, 102400]."""
    assert tuple(ours.shape) == tuple(reference.shape), (ours.shape, reference.shape)
    diff = scale = 0.0
    for b in range(reference.shape[0]):
        r = reference[b].float().numpy()
        o = to_np(ours[b])  # a fresh copy: work in place
        np.subtract(o, r, out=o)
        diff = max(diff, float(o.max()), float(-o.min()))
        scale = max(scale, float(r.max()), float(-r.min()))
    return diff, scale


def check(layout: str, stage: str, ours, reference=None, tol: float = TOL) -> None:
    r = rel_max_diff(ours, reference)
    print(f"\n[parity] {layout:6s} {stage:30s} rel max diff {r:.2e} (tol {tol:.0e})")
    assert r <= tol, f"{layout} {stage}: relative max diff {r:.3e} > {tol:.0e}"


def prompt_ids(rng: np.random.Generator, batch: int) -> np.ndarray:
    """BOS, text, 576 image tokens, text, 576 image tokens, text -- per row, 2 images each."""
    rows = []
    for _ in range(batch):
        text = lambda n: rng.integers(0, 100000, size=n).tolist()  # noqa: E731
        rows.append([BOS] + text(5) + [IMAGE_TOKEN] * TOKENS_PER_IMAGE + text(3)
                    + [IMAGE_TOKEN] * TOKENS_PER_IMAGE + text(4))
    return np.array(rows, dtype=np.int64)


def to_np(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().float().numpy()
    return np.array(a.astype(mx.float32))


def run_case(folder, images: np.ndarray, ids: np.ndarray) -> dict:
    """Everything both sides compute for images [B, N, 3, S, S] in [0, 1] and the prompt ids."""
    B, N = images.shape[:2]
    flat = images.reshape(B * N, *images.shape[2:])
    out = {}

    hf = ref.build_hf_model(folder)
    inputs = ref.reference_inputs(torch.from_numpy(flat), folder)
    with torch.no_grad():
        res = hf(input_ids=torch.from_numpy(ids), **inputs)
        img = getattr(res, "image_outputs", None)  # transformers >= 5.2x
        if img is None:  # earlier 5.x: the same features through the model's own method
            img = hf.model.get_image_features(**inputs)
    out["hf_siglip"] = to_np(img.last_hidden_state)
    out["hf_aligned"] = to_np(img.pooler_output)
    hf_logits = res.logits
    if hasattr(img, "high_res_vision_last_hidden_state"):
        out["hf_sam"] = to_np(img.high_res_vision_last_hidden_state)
        size = inputs["pixel_values"].shape[-1]
        out["low_input"] = torch.nn.functional.interpolate(  # the reference's 384 image, in [0, 1]
            torch.from_numpy(flat), size=(size, size), mode="bilinear", align_corners=False,
            antialias=True).numpy()
    del hf, res, img

    model = load_model(folder, dtype="float32")
    px = mx.array(images)
    feats = model.vision_features(px.reshape(B * N, *images.shape[2:]))
    if isinstance(feats, tuple):
        out["our_sam"], out["our_siglip"] = to_np(feats[0]), to_np(feats[1])
        nhwc = mx.array(flat).transpose(0, 2, 3, 1)
        out["our_sam_tower"] = to_np(model.vision_model.vision_tower_high(nhwc))
        low = mx.array(out["low_input"]).transpose(0, 2, 3, 1)
        out["our_siglip_tower"] = to_np(model.vision_model.vision_tower_low(low))
    else:
        out["our_siglip"] = to_np(feats)
    aligned = to_np(model.encode_images(px))
    assert aligned.shape == (B, N) + out["hf_aligned"].shape[1:], aligned.shape  # HF: [B*N, 576, D]
    out["our_aligned"] = aligned.reshape(out["hf_aligned"].shape)
    logits = model(mx.array(ids.astype(np.int32)), pixel_values=px)
    out["logits_stats"] = logits_stats(logits, hf_logits)  # [B, T, 102400]: no copies kept
    return out


@pytest.fixture(scope="module")
def case_13b(tmp_path_factory):
    folder = make_checkpoint("tiny", tmp_path_factory.mktemp("parity") / "tiny")
    rng = np.random.default_rng(1)
    images = rng.random((2, 2, 3, 384, 384), dtype=np.float32)  # a batch of 2, 2 images each
    return run_case(folder, images, prompt_ids(rng, 2))


@pytest.fixture(scope="module")
def case_hybrid(tmp_path_factory):
    folder = make_checkpoint("tiny-hybrid", tmp_path_factory.mktemp("parity") / "tiny-hybrid")
    rng = np.random.default_rng(2)
    images = rng.random((1, 2, 3, 1024, 1024), dtype=np.float32)  # one sample, 2 images
    return run_case(folder, images, prompt_ids(rng, 1))


# -- 1.3B layout ------------------------------------------------------------------------------
def test_13b_siglip(case_13b):
    check("1.3B", "SigLIP features", case_13b["our_siglip"], case_13b["hf_siglip"])


def test_13b_aligner(case_13b):
    check("1.3B", "aligner (encode_images)", case_13b["our_aligned"], case_13b["hf_aligned"])


def test_13b_logits(case_13b):
    check("1.3B", "logits (B=2, 2 images each)", case_13b["logits_stats"])


# -- 7B (hybrid) layout -----------------------------------------------------------------------
@pytest.mark.slow
def test_hybrid_siglip_tower(case_hybrid):
    """The SigLIP tower alone, fed the reference's own 384 resize."""
    check("hybrid", "SigLIP tower (same 384 input)", case_hybrid["our_siglip_tower"], case_hybrid["hf_siglip"])


@pytest.mark.slow
def test_hybrid_siglip(case_hybrid):
    """Through ``vision_features``: our in-model antialiased resize + normalization included."""
    check("hybrid", "SigLIP features (in-model)", case_hybrid["our_siglip"], case_hybrid["hf_siglip"])


@pytest.mark.slow
def test_hybrid_sam_tower(case_hybrid):
    check("hybrid", "SAM tower (vision_tower_high)", case_hybrid["our_sam_tower"], case_hybrid["hf_sam"])


@pytest.mark.slow
def test_hybrid_sam(case_hybrid):
    check("hybrid", "SAM features (in-model)", case_hybrid["our_sam"], case_hybrid["hf_sam"])


@pytest.mark.slow
def test_hybrid_aligner(case_hybrid):
    check("hybrid", "aligner (encode_images)", case_hybrid["our_aligned"], case_hybrid["hf_aligned"])


@pytest.mark.slow
def test_hybrid_logits(case_hybrid):
    check("hybrid", "logits (2 images)", case_hybrid["logits_stats"])


# -- resizes ----------------------------------------------------------------------------------
def test_antialias_resize_matches_torch():
    rng = np.random.default_rng(3)
    x = rng.random((2, 3, 1024, 1024), dtype=np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(x), size=(384, 384), mode="bilinear",
                                               align_corners=False, antialias=True).numpy()
    ours = to_np(antialias_bilinear_resize(mx.array(x).transpose(0, 2, 3, 1), 384)).transpose(0, 3, 1, 2)
    diff = float(np.abs(ours - expected).max())
    print(f"\n[parity] resize antialias 1024->384 abs max diff {diff:.2e} (tol 1e-05)")
    assert diff <= 1e-5


def test_bilinear_resize_matches_torch():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 16, 64, 64), dtype=np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(x), size=(96, 96), mode="bilinear",
                                               align_corners=False).numpy()
    ours = to_np(bilinear_resize(mx.array(x).transpose(0, 2, 3, 1), 96)).transpose(0, 3, 1, 2)
    # SAM's neck output (LayerNorm'd, ~N(0, 1)): 1e-5 of its scale.  torch computes the source
    # coordinate with one rounding (FMA), a plain float32 formula with two: weights then differ
    # by ~2e-6, hence up to ~1e-5 here; a wrong formula is off by ~1e-1.
    diff = float(np.abs(ours - expected).max())
    scale = float(np.abs(expected).max())
    print(f"\n[parity] resize bilinear 64->96 abs max diff {diff:.2e}, rel {diff / scale:.2e} (tol 1e-05 rel)")
    assert diff <= 1e-5 * scale
