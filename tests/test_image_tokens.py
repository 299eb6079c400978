"""The image-token layout (processing/image_tokens.py) against hand-built ids, and the model's
merge of a piece of a prompt (a range that may begin inside an image)."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from mlx_dsvl.models.deepseek_vl import merge_image_embeddings
from mlx_dsvl.processing.image_tokens import ImageSpan, ImageTokens

IMG, PER = 9, 3
LAYOUT = ImageTokens(token_id=IMG, per_image=PER)
# BOS, image 0, text, image 1 and image 2 side by side, text
IDS = np.array([1, IMG, IMG, IMG, 5, IMG, IMG, IMG, IMG, IMG, IMG, 6])
OWNER = [-1, 0, 0, 0, -1, 1, 1, 1, 2, 2, 2, -1]  # the image each position belongs to


def test_expand_replaces_each_tag_by_its_run():
    got = LAYOUT.expand(np.array([1, IMG, 5, IMG, IMG, 6], dtype=np.int64))
    np.testing.assert_array_equal(got, IDS)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(LAYOUT.expand(np.array([1, 2])), [1, 2])


def test_counting_runs_and_starts():
    np.testing.assert_array_equal(LAYOUT.positions(IDS), [1, 2, 3, 5, 6, 7, 8, 9, 10])
    assert LAYOUT.count(IDS) == 3 and LAYOUT.count([1, IMG, IMG, IMG, IMG]) == 1
    assert LAYOUT.runs(IDS) == [(1, 4), (5, 8), (8, 11)]  # adjacent images apart
    assert [LAYOUT.start_of(IDS, k) for k in range(4)] == [1, 5, 8, None]
    np.testing.assert_array_equal(LAYOUT.image_index(IDS), OWNER)
    assert LAYOUT.keyed(IDS, ["a", "b", "c"]) == [1, *[("image", "a")] * 3, 5, *[("image", "b")] * 3,
                                                    *[("image", "c")] * 3, 6]


@pytest.mark.parametrize("start, end, want", [
    (0, 12, ImageSpan(0, 3, 0)),   # the whole prompt
    (2, 12, ImageSpan(0, 3, 1)),   # begins inside image 0: its second token first
    (6, 9, ImageSpan(1, 3, 1)),    # inside image 1 to the first token of image 2
    (9, 11, ImageSpan(2, 3, 1)),
    (8, 9, ImageSpan(2, 3, 0)),
    (4, 5, ImageSpan(0, 0, 0)),    # text only
    (11, 12, ImageSpan(0, 0, 0)),
])
def test_overlap(start, end, want):
    assert LAYOUT.overlap(IDS, start, end) == want
    images = {k for k in OWNER[start:end] if k >= 0}  # the hand-written owners agree
    assert set(range(want.first, want.stop)) == images


def test_overlap_with_more_positions_than_images():
    """Positions past the last image belong to it (the merge gives them its last token)."""
    assert LAYOUT.overlap(IDS, 9, 12, num_images=2) == ImageSpan(1, 2, 4)
    assert LAYOUT.overlap(IDS, 0, 12, num_images=2) == ImageSpan(0, 2, 0)
    assert LAYOUT.overlap(IDS, 0, 12, num_images=0) == ImageSpan(0, 0, 0)


def test_merging_any_range_gives_the_whole_prompts_rows():
    """Embeddings of ids[start:end] from the images it overlaps (``skip`` tokens into the first)
    equal rows start:end of the whole prompt's, for every range."""
    rng = np.random.default_rng(0)
    D = 4
    text = rng.standard_normal((len(IDS), D)).astype(np.float32)
    feats = rng.standard_normal((3, PER, D)).astype(np.float32)
    want = text.copy()  # by hand: image k's j-th position takes feats[k, j]
    for t, k in enumerate(OWNER):
        if k >= 0:
            want[t] = feats[k, (t - LAYOUT.start_of(IDS, k))]
    for start in range(len(IDS)):
        for end in range(start + 1, len(IDS) + 1):
            span = LAYOUT.overlap(IDS, start, end)
            piece = mx.array(text[None, start:end])
            if span.first < span.stop:
                piece = merge_image_embeddings(mx.array(IDS[None, start:end]), piece,
                                               mx.array(feats[span.first:span.stop]), IMG, span.skip)
            np.testing.assert_array_equal(np.array(piece[0]), want[start:end], err_msg=f"{start}:{end}")


def test_merge_per_row_offsets():
    """Rows of a batch each start at their own row of the features (``skip`` per row)."""
    ids = mx.array([[IMG, IMG, 1], [2, IMG, IMG]])
    text = mx.zeros((2, 3, 1))
    feats = mx.arange(8, dtype=mx.float32).reshape(4, 2, 1)  # 4 images of 2 tokens
    got = merge_image_embeddings(ids, text, feats, IMG, mx.array([2, 6]))
    np.testing.assert_array_equal(np.array(got)[..., 0], [[2, 3, 0], [0, 6, 7]])


def test_add_special_token_is_refused(processor_dir, tmp_path):
    from mlx_dsvl.processing import ChatProcessor

    folder = tmp_path / "proc"
    shutil.copytree(processor_dir, folder)
    cfg = json.loads((folder / "processor_config.json").read_text())
    (folder / "processor_config.json").write_text(json.dumps({**cfg, "add_special_token": True}))
    with pytest.raises(ValueError, match=r"processor_config\.json: add_special_token true is not supported"):
        ChatProcessor.from_pretrained(folder)


def test_processor_uses_the_layout(chat_processor):
    layout = chat_processor.image_tokens
    assert (layout.token_id, layout.per_image) == (chat_processor.image_token_id, chat_processor.num_image_tokens)
