"""``python -m mlx_dsvl.train``: the DeepSeek-VL three-stage training recipe (see --help)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

if TYPE_CHECKING:
    from .loop import TrainConfig

EPILOG = """\
stages (REFERENCE.md, "Training recipe"):
  1  adaptor warm-up: the aligner only (vision towers and LLM frozen); image-text pairs
  2  joint pre-training: aligner + LLM (vision frozen), mixed with --text-data
     (--text-ratio, default 0.7 = the paper's 7:3, reached after --modality-warmup steps
     during which the text share moves linearly from 1.0)
  3  supervised fine-tuning: LLM + aligner + SigLIP (SAM-B frozen); chat data
     (--text-data optional, default ratio 0.48)

data (JSONL, image paths relative to the file):
  chat       {"messages": [{"role": "user", "content": "<image_placeholder>..."},
                           {"role": "assistant", "content": "..."}], "images": ["a.jpg"]}
             loss on the assistant answers (+ their end-of-sentence token) only
  pair       {"image": "a.jpg", "text": "..."}    loss on the text (+ EOS)
  text-only  {"text": "..."} or "messages" without images

outputs in --out: adapters.safetensors + adapter_config.json (use with --adapter, or
python -m mlx_dsvl.fuse), checkpoints/step-N/ (resume with --resume OUT), metrics.jsonl,
loss.png, run_config.json.  A folder that holds an earlier run is never written into unless
--resume continues it or --force replaces it.

Ctrl-C, SIGTERM or SIGHUP: the current step ends, a checkpoint is saved, then exit (once more:
exit at once); resume with --resume OUT.

exit status: 0 done, 1 bad input or set-up, 2 bad option, 3 stopped on a non-finite loss,
128+N stopped by signal N (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_dsvl.train",
        description="Train DeepSeek-VL with the paper's three-stage recipe (LoRA, DoRA, QLoRA or full).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    S = argparse.SUPPRESS  # every default lives in TrainConfig; --help states it
    g = p.add_argument_group("what to train")
    g.add_argument("--stage", type=int, choices=[1, 2, 3], default=S,
                   help="training stage (required unless --resume)")
    g.add_argument("--model", default=S, help="base model: folder or hub id (required unless --resume)")
    g.add_argument("--train", default=S, metavar="LIST",
                   help="override the stage's trainable set: comma list of aligner, llm, siglip, sam, "
                        "sam-neck (default: stage 1 aligner; 2 aligner,llm; 3 aligner,llm,siglip)")
    g.add_argument("--method", choices=["lora", "dora", "full"], default=S,
                   help="how the LLM and trained vision transformers train (default lora; QLoRA "
                        "when the loaded model is quantized); the aligner always trains in full")
    g.add_argument("--lora-rank", type=int, default=S, help="LoRA/DoRA rank (default 8)")
    g.add_argument("--lora-scale", type=float, default=S,
                   help="LoRA/DoRA scale, mlx-lm convention: update = scale * B A x (default 20.0)")
    g.add_argument("--lora-dropout", type=float, default=S, help="LoRA dropout (default 0.0)")
    g.add_argument("--lora-layers", type=int, default=S,
                   help="adapt only the last N LLM blocks (default: all)")
    g.add_argument("--lora-targets", default=S, metavar="LIST",
                   help="Linear layers that get adapters: comma list of attn, mlp, lm_head and/or "
                        "single layers (q_proj, v_proj, ..., qkv, fc1, ...) (default attn,mlp)")
    g.add_argument("--device", choices=["auto", "cpu", "gpu"], default=S,
                   help="auto (default): the GPU when MLX has one (Metal or CUDA), else the CPU")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=S,
                   help="model dtype (default: float32 on CPU, bfloat16 on a GPU)")

    g = p.add_argument_group("data")
    g.add_argument("--data", default=S, help="training JSONL (required unless --resume)")
    g.add_argument("--val-data", default=S, help="validation JSONL (multimodal and/or text)")
    g.add_argument("--text-data", default=S, help="text-only JSONL mixed in by --text-ratio")
    g.add_argument("--val-text-data", default=S, help="text-only validation JSONL")
    g.add_argument("--text-ratio", type=float, default=S,
                   help="share of text-only batches once warmed up (default 0.7 in stages 1-2, "
                        "0.48 in stage 3; needs --text-data)")
    g.add_argument("--modality-warmup", type=int, default=S,
                   help="steps over which the text share moves from 1.0 to --text-ratio "
                        "(default: a fifth of the run in stage 2, 0 otherwise)")
    g.add_argument("--max-seq-len", type=int, default=S,
                   help="longest sequence in tokens, 576 per image (default 2048)")
    g.add_argument("--long-examples", choices=["truncate", "skip"], default=S,
                   help="longer examples are truncated at a token boundary outside any image, or "
                        "skipped; a warning either way (default truncate)")
    g.add_argument("--skip-bad", action="store_true", default=S,
                   help="skip (and count) malformed lines and missing or unreadable images "
                        "instead of stopping")
    g.add_argument("--pad-to", type=int, default=S,
                   help="pad batch lengths to a multiple of N (fewer recompilations; default 32)")

    g = p.add_argument_group("optimization")
    g.add_argument("--iters", type=int, default=S, help="optimizer steps (default: one epoch)")
    g.add_argument("--epochs", type=float, default=S, help="epochs over --data instead of --iters")
    g.add_argument("--batch-size", type=int, default=S, help="examples per batch (default 4)")
    g.add_argument("--grad-accum", type=int, default=S,
                   help="micro-batches per optimizer step (default 1)")
    g.add_argument("--lr", type=float, default=S,
                   help="peak learning rate (default 1e-3 when only the aligner trains, "
                        "1e-4 for lora/dora, 2e-5 for full)")
    g.add_argument("--vision-lr", type=float, default=S,
                   help="peak learning rate of trained vision-tower weights (default --lr / 10: "
                        "the towers move more gently than the LLM)")
    g.add_argument("--warmup", type=int, default=S,
                   help="linear warm-up steps (default min(100, iters/20))")
    g.add_argument("--lr-schedule", choices=["cosine", "constant"], default=S,
                   help="after warm-up (default cosine)")
    g.add_argument("--min-lr-ratio", type=float, default=S,
                   help="cosine decays to lr x this at the last step (default 0.1)")
    g.add_argument("--weight-decay", type=float, default=S, help="AdamW weight decay (default 0.0)")
    g.add_argument("--max-grad-norm", type=float, default=S,
                   help="global gradient-norm clipping, 0 disables (default 1.0)")
    g.add_argument("--grad-checkpoint", action="store_true", default=S,
                   help="recompute transformer-block activations in the backward pass (less memory)")
    g.add_argument("--cache-vision-features", action="store_true", default=S,
                   help="frozen towers (stages 1-2): encode each image once, keyed by content hash "
                        "and model, and reuse the features")
    g.add_argument("--vision-cache-dir", default=S,
                   help="where cached features live (default OUT/vision_cache; share it across runs)")
    g.add_argument("--seed", type=int, default=S, help="random seed: data order, mixing, init (default 0)")
    g.add_argument("--no-compile", dest="compile", action="store_false", default=S,
                   help="do not compile the training step (debugging)")

    g = p.add_argument_group("output")
    g.add_argument("--out", default=S,
                   help="output folder: new or empty (required unless --resume, which continues in "
                        "the checkpoint's run folder by default)")
    g.add_argument("--force", action="store_true", default=S,
                   help="replace the earlier run in --out (kept until this run saves its first "
                        "checkpoint), or with --resume from an earlier step, drop the later ones")
    g.add_argument("--save-every", type=int, default=S,
                   help="checkpoint every N steps, and always at the end (default 100; 0 = end only)")
    g.add_argument("--keep-checkpoints", type=int, default=S,
                   help="keep only the newest N checkpoints (default 0 = all)")
    g.add_argument("--resume", default=S, metavar="DIR",
                   help="continue exactly from a checkpoint folder or a run's --out folder (its "
                        "latest checkpoint), in that run's folder unless --out is given (the "
                        "run's options are reused; --iters/--epochs, --out, --save-every, "
                        "validation and output options may change, the training set-up may not)")
    g.add_argument("--val-every", type=int, default=S,
                   help="validate every N steps and at the end (default 200)")
    g.add_argument("--val-batches", type=int, default=S,
                   help="validation batches per evaluation, -1 = all (default -1)")
    g.add_argument("--steps-per-report", type=int, default=S,
                   help="steps between progress lines / metrics.jsonl records (default 10)")
    g.add_argument("--no-plot", dest="plot", action="store_false", default=S,
                   help="do not draw loss.png")
    g.add_argument("--quiet", action="store_true", default=S, help="no progress output")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple["TrainConfig", List[str], str]:
    """(the run's configuration, the options given explicitly, the device to run on)."""
    from .loop import TrainConfig

    ns = build_parser().parse_args(argv)
    given = vars(ns)
    device = given.pop("device", "auto")  # where to run, not part of a run's set-up
    known = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in given.items() if k in known})
    return cfg, sorted(given), device


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..blas import ensure_fast_blas

    ensure_fast_blas()
    cfg, explicit, device = parse_args(argv)
    from ..device import select_device
    from ..loading import ModelLoadError
    from .adapters import AdapterError
    from .checkpoint import ResumeError
    from .data import DataError
    from .loop import ConfigError, TrainingStopped, train
    from .stages import StageError

    if cfg.resume is None:
        missing = [f"--{k}" for k in ("stage", "model", "data", "out") if getattr(cfg, k) is None]
        if missing:
            print(f"error: {', '.join(missing)} required (or --resume DIR)", file=sys.stderr)
            return 2
    try:
        select_device(device)
        result = train(cfg, explicit)
    except ConfigError as e:
        print(f"error: --{e.option.replace('_', '-')} {e.problem}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (DataError, ModelLoadError, ResumeError, StageError, AdapterError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 128 + result.stopped_by if result.stopped_by else 0


if __name__ == "__main__":
    sys.exit(main())
