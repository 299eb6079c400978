"""Outputs of an evaluation run: ``predictions.jsonl``, ``summary.json``, a table, progress.

``predictions.jsonl`` is appended one record per ``write``, flushed, so a kill leaves whole lines
(at worst one torn last line, cut off on resume). ``run.json`` holds the settings in the caller's
order, so a refused rerun names the first that changed.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

PREDICTIONS, SUMMARY, RUN = "predictions.jsonl", "summary.json", "run.json"


class OutputError(ValueError):
    """The output folder holds another run's results."""


def write_json_atomic(path: Path, obj) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class PredictionLog:
    """The run folder: earlier predictions (to resume from) and appending new ones."""

    def __init__(self, out: Path, run: dict, overwrite: bool = False):
        self.out = Path(out)
        self.path = self.out / PREDICTIONS
        if overwrite and self.out.exists():
            for name in (PREDICTIONS, SUMMARY, RUN):
                if (self.out / name).exists():
                    (self.out / name).unlink()
        self.out.mkdir(parents=True, exist_ok=True)
        run_path = self.out / RUN
        if run_path.exists():
            earlier = json.loads(run_path.read_text(encoding="utf-8"))
            keys = [*run, *(k for k in earlier if k not in run)]
            diff = [k for k in keys if run.get(k) != earlier.get(k)]
            if diff:
                change = _change(diff, earlier, run)
                raise OutputError(f"{self.out} holds the results of another run ({change}); "
                                  "use another --out, or --overwrite to replace them")
        elif self.path.exists() and self.path.stat().st_size:
            raise OutputError(f"{self.path} exists without {RUN}; use another --out, or "
                              "--overwrite to replace it")
        else:
            write_json_atomic(run_path, run)
        self.done: dict[str, dict] = self._read()
        self._f = open(self.path, "a", encoding="utf-8")

    def _read(self) -> dict[str, dict]:
        if not self.path.exists():
            return {}
        lines = self.path.read_bytes().splitlines(keepends=True)
        done, good = {}, 0
        for n, line in enumerate(lines, 1):
            try:
                rec = json.loads(line) if line.endswith(b"\n") else None
            except json.JSONDecodeError:
                rec = None
            if rec is None or not isinstance(rec, dict) or "id" not in rec:
                if n == len(lines):
                    break  # the last line, torn by an interruption: cut off below
                raise OutputError(f"{self.path}:{n}: not a prediction record; use another --out, "
                                  "or --overwrite to start over")
            done[rec["id"]] = rec
            good += len(line)
        if good != self.path.stat().st_size:
            with open(self.path, "r+b") as f:
                f.truncate(good)
        return done

    def append(self, records: list[dict]) -> None:
        for rec in records:
            self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self._f.flush()
            self.done[rec["id"]] = rec

    def close(self) -> None:
        self._f.close()


def _change(keys: list[str], earlier: dict, now: dict) -> str:
    """The first setting that changed, old and new value, then the names of the others."""
    k = keys[0]
    text = f"{k}: {earlier[k]!r}" if k in earlier else f"{k}: not recorded"
    text += f", now {now[k]!r}" if k in now else ", not a setting now"
    return text + (f"; also {', '.join(keys[1:])}" if keys[1:] else "")


class Progress:
    """A bar redrawn in place on a terminal; a plain line every 10% (or minute) otherwise."""

    def __init__(self, total: int, stream=None, quiet: bool = False):
        self.total, self.quiet = total, quiet
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = self._last_line = time.perf_counter()
        self._next_pct = 10

    def __call__(self, done: int, correct: int, new: int) -> None:
        if self.quiet:
            return
        elapsed = time.perf_counter() - self.start
        rate = new / elapsed if elapsed > 0 and new else 0.0
        left = (self.total - done) / rate if rate else 0.0
        acc = f"acc {correct / done:.1%}" if done else ""
        text = f"{done}/{self.total} {acc} {rate:.2f} rows/s eta {_fmt(left)}"
        pct = 100 * done // max(1, self.total)
        if self.tty:
            width = shutil.get_terminal_size((80, 20)).columns
            n = 24
            fill = n * done // max(1, self.total)
            line = f"[{'#' * fill}{'.' * (n - fill)}] {text}"[: width - 1]
            self.stream.write("\r" + line.ljust(width - 1))
            if done >= self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif pct >= self._next_pct or time.perf_counter() - self._last_line > 60 or done >= self.total:
            print(text, file=self.stream, flush=True)
            self._last_line = time.perf_counter()
            self._next_pct = pct - pct % 10 + 10


def _fmt(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def table(summary: dict) -> str:
    """Overall and per-category accuracy (with the 95% interval) as aligned text."""
    rows = [("overall", summary)]
    for name in ("categories", "l2_categories"):
        rows += [(f"  {k}", v) for k, v in (summary.get(name) or {}).items()]
    extra = "anls" if summary.get("anls") is not None else None
    head = ["", "items", "acc %", "95% CI"] + (["ANLS %"] if extra else [])
    body = []
    for label, s in rows:
        lo, hi = s["ci95"]
        line = [label, str(s["items"]), _pct(s["accuracy"]), f"{100 * lo:.1f}-{100 * hi:.1f}"]
        if extra:
            line.append(_pct(s.get("anls")))
        body.append(line)
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]

    def fmt(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    lines = [fmt(head)] + [fmt(r) for r in body]
    notes = []
    if summary.get("circular"):
        notes.append(f"circular: a question counts when all its rotations are right "
                     f"(first rotation alone: {_pct(summary.get('accuracy_first_rotation'))}%)")
    if summary.get("rotations_left_out"):
        notes.append(f"{summary['rotations_left_out']} shipped rotations not scored (use --circular)")
    if summary.get("unmatched"):
        notes.append(f"{summary['unmatched']} replies named no option (counted wrong)")
    if summary.get("accuracy_norm") is not None:
        notes.append(f"length-normalized choice: {_pct(summary['accuracy_norm'])}%")
    if summary.get("skipped"):
        notes.append(f"{summary['skipped']} questions skipped (undecodable images)")
    if summary.get("skipped_rows_in_file"):
        notes.append(f"{summary['skipped_rows_in_file']} malformed rows skipped while reading")
    return "\n".join(lines + notes)
