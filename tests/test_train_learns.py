"""It learns: stage 1 then stage 3 (LoRA) teach a tiny random model to caption synthetic images.

A synthetic captioning task is generated on the fly (mlx_dsvl.testing.synthetic: a red, green,
blue or yellow circle or square on a white, black or grey background, with random position and
colour jitter; captions like "red circle on white").  The recipe runs through the public
training API exactly as the CLI does:

* stage 1: aligner warm-up on image-text pairs, vision features cached;
* stage 3: LoRA on the LLM (attention, MLP and LM head) and on SigLIP, the aligner in full, on
  chat data, starting from stage 1's aligner;

then greedy decoding must caption >= 90% of freshly generated held-out images exactly.

The model is make_checkpoint's "tiny" (1.3B layout, random weights) with one change: SigLIP
reads 96 px images (a 6 x 6 patch grid: 36 image tokens instead of 576), so that the test fits
a CI budget on two CPU cores.  With 576 image tokens a random 2-layer LLM attends almost
uniformly over the image and needs many times more steps; the 576-token path (truncation,
caching, the hybrid tower, every stage) is covered by tests/test_train.py.  Stage 1 is short
and gentle: through a frozen *random* LM head the captions cannot be expressed, so a long
aligner warm-up on a random LLM only drifts the aligner; here it checks that the stage runs,
improves its loss and hands its aligner over.
"""

from __future__ import annotations

import copy
import json
import time

import mlx.core as mx
import numpy as np
import pytest

import mlx_dsvl
from mlx_dsvl.testing.synthetic import QUESTION, make_images, write_shapes_dataset
from mlx_dsvl.train import TrainConfig, load_adapters, train

pytestmark = pytest.mark.slow

IMAGE_SIZE = 96
TASK = dict(shapes=("circle", "square"), sizes={"square": 0.40, "circle": 0.30}, jitter=0.05,
            template="{fg} {shape} on {bg}")
STAGE1_STEPS, STAGE3_STEPS = 20, 300
N_TRAIN, N_TEST, BATCH = 800, 72, 8


def small_grid_checkpoint(out, monkeypatch, seed=1):
    """make_checkpoint's "tiny" arch with a 96 px SigLIP input (36 image tokens)."""
    from mlx_dsvl import random_checkpoint as mc

    config, (_, mean, std, do_norm), dtype = mc.ARCHS["tiny"]
    config = copy.deepcopy(config)
    config["vision_config"]["params"]["image_size"] = IMAGE_SIZE
    monkeypatch.setitem(mc.ARCHS, "tiny-96px", (config, (IMAGE_SIZE, mean, std, do_norm), dtype))
    path = mc.make_checkpoint("tiny-96px", out, seed=seed)
    proc_cfg = json.loads((path / "processor_config.json").read_text())
    proc_cfg["num_image_tokens"] = (IMAGE_SIZE // 16) ** 2
    (path / "processor_config.json").write_text(json.dumps(proc_cfg))
    return path


def greedy_captions(model, processor, images, max_tokens=24):
    """Batched greedy decoding with a KV cache (all prompts have the same length)."""
    conv = [{"role": "system", "content": ""}, {"role": "user", "content": QUESTION}]
    ids = processor.tokenize(processor.format(conv))
    pixels = mx.array(np.stack([processor.image_processor([im])[0] for im in images]))[:, None]
    input_ids = mx.array(np.tile(ids[None], (len(images), 1)))
    lm = model.language_model
    cache = model.make_cache()
    embeds = model.get_input_embeddings(input_ids, pixels)
    logits = lm.lm_head(lm.model(input_ids, cache=cache, input_embeddings=embeds)[:, -1:])
    eos = processor.tokenizer.eos_token_id
    out, done = [], np.zeros(len(images), bool)
    for _ in range(max_tokens):
        tok = mx.argmax(logits[:, -1], axis=-1)
        t = np.array(tok)
        out.append(t)
        done |= t == eos
        if done.all():
            break
        logits = lm(tok[:, None], cache=cache)
    texts = []
    for row in np.stack(out, 1).tolist():
        row = row[: row.index(eos)] if eos in row else row
        texts.append(processor.tokenizer.decode(row).strip())
    return texts


def test_stage1_then_stage3_lora_learns_to_caption(tmp_path, monkeypatch, capsys):
    t0 = time.perf_counter()
    ckpt = small_grid_checkpoint(tmp_path / "tiny-96px", monkeypatch)
    data = write_shapes_dataset(tmp_path / "data", N_TRAIN, seed=0, size=IMAGE_SIZE, **TASK)

    s1 = train(TrainConfig(stage=1, model=str(ckpt), data=str(data["pairs"]), out=str(tmp_path / "s1"),
                           iters=STAGE1_STEPS, batch_size=BATCH, lr=1e-4, warmup=0,
                           cache_vision_features=True, save_every=0, steps_per_report=5, quiet=True))
    s1_losses = [r["loss"] for r in s1.history]
    assert s1_losses[-1] < s1_losses[0]

    # Stage 3 starts from stage 1's aligner: the base model + stage 1's trained weights.
    model, processor = mlx_dsvl.load(ckpt)
    load_adapters(model, tmp_path / "s1")
    s3 = train(TrainConfig(stage=3, model=str(ckpt), data=str(data["chat"]), out=str(tmp_path / "s3"),
                           iters=STAGE3_STEPS, batch_size=BATCH, lr=1e-3, warmup=10,
                           lora_targets="attn,mlp,lm_head", save_every=0, steps_per_report=25,
                           quiet=True),
               loaded=(model, processor))
    assert any(".vision_tower.blocks." in k and k.endswith("lora_b")
               for k in mx.load(str(tmp_path / "s3" / "adapters.safetensors")))  # SigLIP trained too
    train_seconds = time.perf_counter() - t0

    # Held-out images: another seed, combinations drawn at random.
    model.eval()
    held_out = make_images(N_TEST, seed=12345, size=IMAGE_SIZE, balanced=False, **TASK)
    images, truth = [im for im, _ in held_out], [c for _, c in held_out]
    preds = greedy_captions(model, processor, images)
    acc = float(np.mean([p == t for p, t in zip(preds, truth)]))
    wrong = [(p, t) for p, t in zip(preds, truth) if p != t]

    # The untrained model captions none of them.
    base, _ = mlx_dsvl.load(ckpt)
    assert not any(p == t for p, t in zip(greedy_captions(base, processor, images[:8]), truth[:8]))

    with capsys.disabled():
        print(f"\n[it learns] stage 1: {STAGE1_STEPS} steps (loss {s1_losses[0]:.2f} -> {s1_losses[-1]:.2f}); "
              f"stage 3 LoRA: {STAGE3_STEPS} steps (loss {s3.history[0]['loss']:.2f} -> "
              f"{s3.history[-1]['loss']:.3f}); held-out exact-match accuracy {acc:.1%} of {N_TEST}; "
              f"{time.perf_counter() - t0:.0f}s ({train_seconds:.0f}s training)")
    assert acc >= 0.9, wrong[:10]
