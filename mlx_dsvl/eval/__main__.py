"""``python -m mlx_dsvl.eval``: score a model on a benchmark file (see --help)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from ..blas import ensure_fast_blas
from ..device import select_device
from ..loading import resolve_dtype
from ..model_options import add_model_arguments, load_from_args
from ..utils import files_digest
from .greedy import DEFAULT_MAX_TOKENS
from .items import EvalDataError
from .readers import data_digest, read
from .report import SUMMARY, OutputError, PredictionLog, Progress, table, write_json_atomic
from .runner import DEFAULT_BATCH_SIZE, evaluate, prepare_items

EPILOG = """\
data (by extension; a folder reads every such file in it):
  .tsv    MMBench as OpenCompass publishes it (index, question, hint, A-D, answer, category,
          l2-category, image as base64); the dev files ship their circular rotations
  .jsonl  {"images": [...], "question": ..., "choices": [...], "answer": ..., "category": ...}
          (images relative to the file; without "choices": a short answer, or a list of them)
  .csv    text multiple choice, MMLU style (question, A, B, C, D, answer; header optional)

outputs in --out: predictions.jsonl (one line per question, appended as it goes: rerun the same
command to resume), summary.json (accuracy overall and per category with 95% Wilson intervals),
run.json (the settings, the data and adapters by SHA-256: another run is refused unless
--overwrite); the table is printed at the end.

exit status: 0 done, 1 bad input, 2 bad arguments, 130 interrupted (rerun to resume).
"""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m mlx_dsvl.eval", epilog=EPILOG,
               description="Evaluate DeepSeek-VL on multiple-choice and short-answer benchmarks.",
               formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, "model", "adapter")
    p.add_argument("--data", required=True, help="benchmark file or folder (.tsv, .jsonl, .csv)")
    p.add_argument("--out", default=None,
                   help="output folder (default: evals/<data name>-<method>[-circular])")
    p.add_argument("--method", choices=["likelihood", "generate"], default="likelihood",
                   help="multiple choice by option log-likelihood, or by greedy generation and "
                        "answer extraction (default: likelihood); short answers are always generated")
    p.add_argument("--target", choices=["letter", "text"], default=None,
                   help="likelihood of the option's letter (' A') or of its text (default: letter; "
                        "--method likelihood only)")
    p.add_argument("--circular", action="store_true",
                   help="MMBench circular evaluation: right only if every rotation of the options is")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"questions per forward pass (default: {DEFAULT_BATCH_SIZE})")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"longest generated reply (generation only; default: {DEFAULT_MAX_TOKENS})")
    p.add_argument("--system", default=None,
                   help="system prompt (default: DeepSeek-VL's; '' for none)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip malformed rows and undecodable images (counted in the summary)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of another run in --out instead of refusing")
    add_model_arguments(p, "device", "dtype", "quantize", "quantize_vision")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def check_args(args) -> None:
    for name, lo in (("limit", 1), ("batch_size", 1), ("max_tokens", 1)):
        v = getattr(args, name)
        if v is not None and v < lo:
            raise SystemExit(_fail(f"--{name.replace('_', '-')} must be >= {lo}, got {v}", 2))
    if args.target is not None and args.method != "likelihood":
        raise SystemExit(_fail(f"--target applies to --method likelihood only (--method {args.method} "
                               "reads the option out of the reply)", 2))
    args.target = args.target or "letter"
    if not Path(args.data).exists():
        raise SystemExit(_fail(f"--data {args.data}: no such file or folder", 2))
    if args.adapter and not Path(args.adapter).is_dir():
        raise SystemExit(_fail(f"--adapter {args.adapter}: not a folder", 2))


def _fail(msg: str, code: int) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def run_settings(args, dtype: str, generates: bool) -> dict:
    """What the predictions depend on (a resumed run must match): files by content, the model by
    its folder or hub id; the reply length only when replies are generated."""
    model = Path(args.model).expanduser()
    adapter = args.adapter and Path(args.adapter).resolve()
    return {"--model": str(model.resolve()) if model.exists() else args.model,
            "--adapter": adapter and str(adapter),
            "--adapter content (SHA-256)": adapter and files_digest(
                adapter / n for n in (ADAPTER_WEIGHTS, ADAPTER_CONFIG) if (adapter / n).is_file()),
            "--data": str(Path(args.data).resolve()),
            "--data content (SHA-256)": data_digest(args.data),
            "--method": args.method, "--target": args.target if args.method == "likelihood" else None,
            "--max-tokens": args.max_tokens if generates else None,
            "--circular": args.circular, "--system": args.system, "--dtype": dtype,
            "--skip-bad": args.skip_bad,
            # (only when set: runs recorded before these flags existed still resume)
            **{flag: bits for flag, bits in (("--quantize", args.quantize),
                                             ("--quantize-vision", args.quantize_vision)) if bits}}


def default_out(args) -> str:
    name = Path(args.data).stem
    return str(Path("evals") / f"{name}-{args.method}{'-circular' if args.circular else ''}")


def main(argv=None) -> int:
    ensure_fast_blas()
    args = build_parser().parse_args(argv)
    check_args(args)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    except (EvalDataError, OutputError, ValueError, OSError) as e:
        return _fail(str(e), 1)


def _run(args: argparse.Namespace) -> int:
    data = read(args.data, skip_bad=args.skip_bad)
    for msg in data.warnings:
        print(f"warning: {msg}", file=sys.stderr)
    for msg in data.skipped[:5]:
        print(f"skipped: {msg}", file=sys.stderr)
    if len(data.skipped) > 5:
        print(f"skipped: ... {len(data.skipped) - 5} more", file=sys.stderr)
    items, left_out = prepare_items(data, args.circular, args.limit)
    if not items:
        return _fail(f"{args.data}: no questions to score", 1)
    out = Path(args.out or default_out(args))
    select_device(args.device)
    dtype = str(resolve_dtype(args.dtype)).rsplit(".", 1)[-1]
    generates = args.method == "generate" or not all(it.is_mc for it in items)
    log = PredictionLog(out, run_settings(args, dtype, generates), overwrite=args.overwrite)
    done = {it.id: log.done[it.id] for it in items if it.id in log.done}
    if not args.quiet:
        print(f"{len(items)} rows to score ({len(done)} already in {log.path}) -> {out}", file=sys.stderr)
    model, processor = load_from_args(args)
    progress = Progress(len(items), quiet=args.quiet)
    try:
        summary = evaluate(model, processor, items, method=args.method, batch_size=args.batch_size,
                           circular=args.circular, target=args.target, system_prompt=args.system,
                           max_tokens=args.max_tokens, skip_bad=args.skip_bad, done=done,
                           on_records=log.append, progress=progress)
    finally:
        log.close()
    summary = {"model": args.model, "adapter": args.adapter, "data": str(args.data),
               "limit": args.limit, "skipped_rows_in_file": len(data.skipped), **summary,
               "rotations_left_out": left_out}
    write_json_atomic(out / SUMMARY, summary)
    print(table(summary))
    print(f"wrote {log.path} and {out / SUMMARY}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
