"""``python -m mlx_dsvl.train``: the options are built from :class:`~mlx_dsvl.train.config.TrainConfig`'s fields."""

from __future__ import annotations

import argparse
import sys
import textwrap
import typing
from collections.abc import Sequence
from dataclasses import MISSING, fields

from ..device import DEVICES
from .config import DATA, DIST, EVAL, GUARD, OPTIM, OUTPUT, THIS_COMMAND, TRAIN, TrainConfig, as_flags
from .stages import STAGES

EPILOG = """\
stages:
{stages}

data (JSONL, image paths relative to the file):
  chat       {{"messages": [{{"role": "user", "content": "<image_placeholder>..."}},
                           {{"role": "assistant", "content": "..."}}], "images": ["a.jpg"]}}
             loss on the assistant answers (+ their end-of-sentence token) only
  pair       {{"image": "a.jpg", "text": "..."}}    loss on the text (+ EOS)
  text-only  {{"text": "..."}} or "messages" without images

outputs in --out: adapters.safetensors + adapter_config.json (use with --adapter, or
python -m mlx_dsvl.fuse), checkpoints/step-N/ (resume with --resume OUT), metrics.jsonl,
loss.png, run_config.json.  A folder that holds an earlier run is never written into unless
--resume continues it or --force replaces it.

Ctrl-C, SIGTERM or SIGHUP: the current step ends, a checkpoint is saved, then exit (once more:
exit at once); resume with --resume OUT.

several processes, data-parallel (each takes its share of every global batch of
--batch-size x processes; rank 0 writes):
  mlx.launch -n 2 -- python -m mlx_dsvl.train ...            two processes on this machine
  mlx.launch --hostfile hosts.json -- python -m mlx_dsvl.train ...   one per host (ring, NCCL, MPI)

exit status: 0 done, 1 bad input or set-up, 2 bad option, 3 stopped on a non-finite loss or by
--guard-stop, 4 another process of the run failed or stopped answering, 128+N stopped by signal N
(130 Ctrl-C, 143 SIGTERM, 129 SIGHUP; with several processes rank 0 says how the run ended, the
others exit 0).
"""
GROUPS = (TRAIN, DATA, OPTIM, OUTPUT, EVAL, GUARD, DIST)


def _help(f) -> str:
    m = f.metadata
    text = m["help"]
    if m["default_text"] is not None:
        said = m["default_text"]
        text += f" ({said})" if said.startswith("required") else f" (default: {said})"
    elif f.default is not None and not isinstance(f.default, bool):
        text += f" (default: {f.default})"
    return as_flags(text)


def _add(group, f, hints) -> None:
    """One option, built from a TrainConfig field (every default stays in TrainConfig)."""
    kind = hints[f.name]
    args = typing.get_args(kind)
    if args and type(None) in args:  # Optional[X] -> X
        kind = next(a for a in args if a is not type(None))
    kw = dict(dest=f.name, default=argparse.SUPPRESS, help=_help(f))
    flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
    if kind is bool:
        kw["action"] = "store_false" if f.default else "store_true"
        if not f.metadata["structural"] and f.name not in THIS_COMMAND:  # a resumed run's may change
            undo = flag.replace("--no-", "--", 1) if flag.startswith("--no-") else flag.replace("--", "--no-", 1)
            kw["help"] += f"; {undo} undoes it (e.g. a resumed run's)"
            group.add_argument(undo, dest=f.name, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                               action="store_true" if f.default else "store_false")
    elif typing.get_origin(kind) is list:  # repeatable: --flag A --flag B
        kw.update(action="append", type=typing.get_args(kind)[0], metavar=f.metadata["metavar"])
    else:
        kw.update(type=kind, choices=f.metadata["choices"], metavar=f.metadata["metavar"])
    group.add_argument(flag, **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlx_dsvl.train",
        description="Train DeepSeek-VL with the paper's three-stage recipe (LoRA, DoRA, QLoRA or full).",
        epilog=EPILOG.format(stages="\n".join(
            textwrap.fill(as_flags(s.describe()), 96, initial_indent=f"  {s.number}  ", subsequent_indent=" " * 5)
            for s in STAGES)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    groups["what to train"].add_argument(
        "--device", choices=DEVICES, default=argparse.SUPPRESS,
        help="auto (default): the GPU when MLX has one (Metal or CUDA), else the CPU")
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        assert f.default is not MISSING
        _add(groups[f.metadata["group"]], f, hints)
    return p


def parse_args(argv: Sequence[str] | None = None) -> tuple[TrainConfig, list[str], str]:
    """(the run's configuration, the options given explicitly, the device to run on)."""
    given = vars(build_parser().parse_args(argv))
    device = given.pop("device", "auto")  # where to run, not part of a run's set-up
    return TrainConfig(**given), sorted(given), device


def main(argv: Sequence[str] | None = None) -> int:
    from ..blas import ensure_fast_blas

    ensure_fast_blas()
    cfg, explicit, device = parse_args(argv)
    import mlx.core as mx

    from .report import as_process, option_style

    group = mx.distributed.init()  # the processes that mlx.launch started (or this one alone)
    with option_style(as_flags), as_process(group.rank(), group.size()):
        return run(cfg, explicit, device)


def run(cfg: TrainConfig, explicit: list[str], device: str) -> int:
    """Train; errors as one line (with several processes, prefixed by the rank) and a status."""
    # Imported here, after main()'s BLAS re-execution: the re-executed process loads them once.
    from ..adapters import AdapterError
    from ..device import select_device
    from ..loading import ModelLoadError
    from .checkpoint import ResumeError
    from .config import ConfigError
    from .data import DataError
    from .distributed import EXIT_LOST, ProcessLost
    from .loop import TrainingStopped
    from .report import error as say_error
    from .report import who
    from .run import train
    from .stages import StageError

    def error(e) -> None:
        say_error(str(e))

    if cfg.resume is None:
        missing = [f"--{k}" for k in ("stage", "model", "data", "out") if getattr(cfg, k) is None]
        if missing:
            error(f"{', '.join(missing)} required (or --resume DIR)")
            return 2
    try:
        select_device(device)
        result = train(cfg, explicit)
    except ConfigError as e:
        error(e)
        return 2
    except ProcessLost as e:
        error(e)
        return EXIT_LOST
    except TrainingStopped as e:
        error(e)
        return 3
    except KeyboardInterrupt:
        print(f"{who()}interrupted", file=sys.stderr)
        return 130
    except (DataError, ModelLoadError, ResumeError, StageError, AdapterError, ValueError, OSError) as e:
        error(e)
        return 1
    return 128 + result.stopped_by if result.stopped_by and result.rank == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
