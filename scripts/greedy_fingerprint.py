"""Greedy replies of every way of producing tokens, as JSON: run it on two commits and diff.

    python scripts/greedy_fingerprint.py --out /tmp/after.json [--work /tmp/fp]

A refactor of the generation path proves itself by printing the same file before and after:
one-shot ``generate``, a three-turn ``ChatSession`` (images, follow-ups from the cache),
``generate_batch``, the server's scheduler (each request alone, then four at once) and eval's
generate method, on tiny random checkpoints of both families (the 1.3B layout and the 7B hybrid),
with a float KV cache and with 8- and 4-bit ones.  The checkpoints' LM heads are zeroed on the
ids their tiny tokenizer does not define, so replies are prompt-dependent text.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import queue
import sys
from pathlib import Path

import numpy as np
from PIL import Image

QUESTIONS = ["Describe this picture.", "What colours are in it?", "Tell me a story about it."]


def text_checkpoint(arch: str, seed: int, work: Path) -> Path:
    from safetensors.numpy import load_file, save_file

    from mlx_dsvl.random_checkpoint import make_checkpoint, with_language_config

    out = work / f"{arch}-text"
    if out.exists():
        return out
    src = make_checkpoint(arch, work / arch, seed=seed)
    with_language_config(src, out, num_attention_heads=2, num_key_value_heads=2)  # head size 32: KV bits
    tok = json.loads((out / "tokenizer.json").read_text())
    defined = sorted({*tok["model"]["vocab"].values(), *(t["id"] for t in tok["added_tokens"])})
    for f in out.glob("*.safetensors"):
        weights = load_file(str(f))
        if "language_model.lm_head.weight" in weights:
            head = weights["language_model.lm_head.weight"]
            head[np.setdiff1d(np.arange(head.shape[0]), defined)] = 0
            save_file(weights, str(f), metadata={"format": "pt"})
    return out


def picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8))


def server_replies(model, processor, convs, images, kv, together: bool, max_tokens: int):
    from mlx_dsvl.server.scheduler import Delta, Finished, Job, Scheduler
    from mlx_dsvl.server.schema import SamplingParams

    sched = Scheduler(model, processor, max_batch=4, kv=kv)
    if together:
        queues = [queue.Queue() for _ in convs]
    else:
        sched.start()
    out = []
    for i, (conv, imgs) in enumerate(zip(convs, images)):
        batch = processor(conv, imgs)
        px = np.array(batch["pixel_values"][0]) if batch["pixel_values"] is not None else np.zeros((0,))
        keys = [hashlib.sha256(p.tobytes()).hexdigest() for p in px] if imgs else []
        events = queues[i] if together else queue.Queue()
        sched.submit(Job(f"j{i}", batch["input_ids"][0].tolist(), keys, dict(zip(keys, px)) if imgs else {},
                         SamplingParams(temperature=0, repetition_penalty=1.1, max_tokens=max_tokens), events.put))
        if not together:
            out.append(collect(events, Delta, Finished))
    if together:
        sched.start()
        out = [collect(q, Delta, Finished) for q in queues]
    sched.stop()
    return out


def collect(events, Delta, Finished) -> str:
    text = ""
    while not isinstance(e := events.get(timeout=300), Finished):
        text += e.text if isinstance(e, Delta) else ""
    return text


def fingerprint(path: Path, kv_bits) -> dict:
    import mlx_dsvl
    from mlx_dsvl.eval import greedy
    from mlx_dsvl.eval.items import Item
    from mlx_dsvl.session import ChatSession
    from mlx_dsvl.streaming import kv_cache_options

    model, processor = mlx_dsvl.load(path, dtype="float32")
    greedy_opts = dict(temperature=0, repetition_penalty=1.1, max_tokens=12)
    tag = processor.image_tag
    one = [{"role": "user", "content": f"{tag}{QUESTIONS[0]}"}]
    res = {"generate": mlx_dsvl.generate(model, processor, one, [picture(1)], kv_bits=kv_bits, kv_group_size=32,
                                         **greedy_opts)}
    chat = ChatSession(model, processor, kv_bits=kv_bits, kv_group_size=32)
    turns = []
    for i, q in enumerate(QUESTIONS):
        imgs = [picture(2)] if i != 1 else []
        turns.append("".join(c.text for c in chat.send((tag if imgs else "") + q, imgs, **greedy_opts)))
    res["chat"], res["chat_cached_ids"] = turns, chat.cached_ids
    convs = [one, [{"role": "user", "content": QUESTIONS[1]}], [{"role": "user", "content": f"{tag}{tag}{QUESTIONS[2]}"}]]
    images = [[picture(1)], [], [picture(3), picture(4)]]
    if kv_bits is None:
        res["generate_batch"] = mlx_dsvl.generate_batch(model, processor, convs, images, max_tokens=12)
        items = [Item(id=str(i), question=q, answers=[q[:4]]) for i, q in enumerate(QUESTIONS)]
        items.append(Item(id="mc", question="Which one?", choices=["a cat", "a dog"], answer=0,
                          images=[lambda: picture(5)], image_keys=["p"]))
        res["eval_generate"] = [r["prediction"] for r in
                                greedy.score(model, processor, items, {"p": picture(5)}, max_tokens=12)]
    kv = kv_cache_options(kv_bits, 32) if kv_bits else None
    res["server_alone"] = server_replies(model, processor, convs, images, kv, False, 12)
    res["server_four"] = server_replies(model, processor, convs + [one], images + [[picture(1)]], kv, True, 12)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--work", default="/tmp/mlx-dsvl-fingerprint")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    res = {}
    for arch, seed in (("tiny", 1), ("tiny-hybrid", 2)):
        path = text_checkpoint(arch, seed, work)
        for bits in (None, 8, 4):
            res[f"{arch} kv={bits}"] = fingerprint(path, bits)
            print(f"{arch} kv={bits}: done", file=sys.stderr, flush=True)
    Path(args.out).write_text(json.dumps(res, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
