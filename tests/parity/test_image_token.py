"""A checkpoint whose tokenizer puts ``<image_placeholder>``, BOS and EOS at ids other than
DeepSeek's (a re-trained or extended tokenizer): the model must look where the processor put the
images.  The reference (``transformers``' DeepseekVL, see :mod:`mlx_dsvl.testing.hf_reference`)
reads the image id from the folder's ``tokenizer.json`` itself and is fed the same ids.
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("transformers", minversion="5.0")
mx = pytest.importorskip("mlx.core")

import mlx_dsvl  # noqa: E402
from mlx_dsvl.models.deepseek_vl import ImagePositionError  # noqa: E402
from mlx_dsvl.random_tokenizer import write_tokenizer  # noqa: E402
from mlx_dsvl.testing import hf_reference as ref  # noqa: E402

BOS, EOS, IMAGE = 100700, 100701, 101234  # none of them DeepSeek's (100000, 100001, 100015)


@pytest.fixture(scope="module")
def other_ids_dir(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("other_ids") / "tiny"
    shutil.copytree(tiny_dir, out)
    write_tokenizer(out, bos_id=BOS, eos_id=EOS, image_id=IMAGE)
    return out


def test_tokenizer_fixture_uses_the_requested_ids(other_ids_dir):
    added = {t["content"]: t["id"] for t in json.loads((other_ids_dir / "tokenizer.json").read_text())["added_tokens"]}
    assert added["<image_placeholder>"] == IMAGE and 100015 not in added.values()
    assert (added["<｜begin▁of▁sentence｜>"], added["<｜end▁of▁sentence｜>"]) == (BOS, EOS)


@pytest.mark.slow
def test_logits_match_the_reference_with_other_token_ids(other_ids_dir, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # config.json names no id: nothing to warn about
        model, processor = mlx_dsvl.load(other_ids_dir, dtype="float32")
    assert processor.image_token_id == model.image_token_id == IMAGE
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    batch = processor([{"role": "user", "content": "<image_placeholder>What is it?"}], [str(tmp_path / "a.png")])
    ids = np.array(batch["input_ids"])
    assert ids[0, 0] == BOS and (ids == IMAGE).sum() == 576 and not (ids == 100015).any()

    ours = np.array(model(batch["input_ids"], pixel_values=batch["pixel_values"]))
    hf = ref.build_hf_model(other_ids_dir)
    assert hf.config.image_token_id == IMAGE
    pixels = torch.from_numpy(np.array(batch["pixel_values"])[0])
    with torch.no_grad():
        theirs = hf(input_ids=torch.from_numpy(ids.astype(np.int64)),
                    **ref.reference_inputs(pixels, other_ids_dir)).logits.numpy()
    rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
    print(f"\n[parity] other token ids: logits rel max diff {rel:.2e} (tol 1e-04)")
    assert rel <= 1e-4
    # the same prompt without the image differs: the image is really looked at
    blind = np.array(model(batch["input_ids"]))
    assert np.abs(blind - theirs).max() / np.abs(theirs).max() > 1e-2


def test_a_model_looking_for_another_id_refuses_the_images(other_ids_dir, tmp_path):
    model, processor = mlx_dsvl.load(other_ids_dir, dtype="float32")
    batch = processor([{"role": "user", "content": "<image_placeholder>Hi"}], [Image.new("RGB", (20, 20))])
    model.image_token_id = 100015  # what config.json's default used to give this model
    with pytest.raises(ImagePositionError, match=r"0 image position\(s\) \(id 100015\), but 1 image\(s\) x 576"):
        model(batch["input_ids"], pixel_values=batch["pixel_values"])


def test_config_image_token_id_that_disagrees_warns(other_ids_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(other_ids_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "image_token_id": 100015}))
    with pytest.warns(UserWarning, match=r"image_token_id 100015 differs from the tokenizer's id 101234"):
        model, _ = mlx_dsvl.load(folder, dtype="float32")
    assert model.image_token_id == IMAGE
    (folder / "config.json").write_text(json.dumps({**cfg, "image_token_id": IMAGE}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mlx_dsvl.load(folder, dtype="float32")[0].image_token_id == IMAGE


def test_chat_and_training_paths_use_the_tokenizer_ids(other_ids_dir):
    """ChatSession (EOS from the tokenizer) and the training loss's merge (model.image_token_id)."""
    model, processor = mlx_dsvl.load(other_ids_dir, dtype="float32")
    chat = mlx_dsvl.ChatSession(model, processor)
    img = Image.new("RGB", (30, 30), (200, 10, 10))
    chunks = list(chat.send("<image_placeholder>Describe.", images=[img], max_tokens=3, temperature=0))
    assert chat.encode_calls == 1 and chunks[-1].finish_reason in ("stop", "length")
    batch = processor([{"role": "user", "content": "<image_placeholder>Describe."}], [img])
    ids = batch["input_ids"]
    emb = model.encode_images(batch["pixel_values"])  # [1, 1, 576, D]
    ours = model.hidden_states(ids, emb[0])  # the training loss's path: [M, I, D]
    want = model.language_model.model(ids, input_embeddings=model.get_input_embeddings(ids, image_embeds=emb))
    assert float(mx.abs(ours - want).max()) < 1e-5
    assert float(mx.abs(model.hidden_states(ids, None) - want).max()) > 1e-3
