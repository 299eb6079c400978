"""The frame every conversion shares: argument checks, the source opened once, the output staged
beside ``out`` and renamed into place only when everything was written."""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from ..loading import DTYPES
from ..model_folder import resolve_model_path
from ..outputs import FULL, Staged, folder_bytes, human_bytes, log, output_path, reclaim_stale
from .files import ConvertError, as_convert_error, copy_files, write_json
from .sources import Source, hub_patterns, open_source


@dataclass
class Job:
    src: Path  # the resolved source folder or file
    source: Source  # its weights, configs and side files
    out: Path  # the final output folder
    tmp: Path  # the staged output folder (renamed to ``out`` at the end)
    target: mx.Dtype | None  # the requested dtype; None keeps each tensor's

    def write_configs(self, config: dict) -> None:
        """``config.json``, then the source's tokenizer/processor files and generated ones."""
        write_json(self.tmp / "config.json", config)
        copy_files(self.source.side_files, self.tmp)
        for name, obj in self.source.generated.items():
            write_json(self.tmp / name, obj)


def check_output(out: Path, source: Path | None, force: bool) -> None:
    """Refuse an existing ``out`` without ``force``, a file, and any overlap with the source."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConvertError(f"{out}: exists and is not a folder")
    if out.exists() and not force:
        raise ConvertError(f"{out}: already exists (use --force to replace it)")
    if source is not None:
        src, dst = Path(source).resolve(), out.resolve()
        if src == dst or src in dst.parents or dst in src.parents:
            raise ConvertError(f"{out}: the output folder must not be, contain or lie inside the input {source}")


@contextmanager
def staged_output(out: Path, force: bool = False, progress: Callable[[str], None] = log) -> Iterator[Path]:
    """A folder staged beside ``out``, put in its place when the block succeeds. On failure (also
    Ctrl-C, SIGTERM/SIGHUP) it and the parents made for it go; after ``kill -9`` the next run does it."""
    out = output_path(out)
    created: list[Path] = []
    parent = out.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    if not parent.is_dir():
        raise ConvertError(f"{out}: {parent} is a file, not a folder")

    def remove_created() -> None:  # innermost first; only if still empty
        for d in created:
            with contextlib.suppress(OSError):
                d.rmdir()

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        reclaim_stale(out, progress, f"interrupted conversions into {out.name}")
        staged = Staged(out)
    except OSError as e:
        remove_created()
        raise ConvertError(f"{out}: cannot write there ({e.strerror or e})") from None
    try:
        staged.partial.mkdir(mode=0o700)
        yield staged.partial
        staged.partial.chmod(0o755)  # a model folder is an ordinary one
        for p in staged.partial.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        if out.exists() and not force:
            raise ConvertError(f"{out}: already exists (use --force to replace it)")
        staged.publish()
    except BaseException as e:
        staged.abandon()
        remove_created()
        if isinstance(e, OSError) and e.errno in FULL:
            raise ConvertError(f"{out.parent}: no space left on the device while writing {out.name} "
                               "(the partial output was removed; free some space and run again)") from None
        raise
    finally:
        staged.release()


@contextmanager
def conversion(model: str, out: str, *, dtype: str | None, force: bool, allow_pickle: bool,
               shard_gb: float, progress: Callable[[str], None]) -> Iterator[Job]:
    """Check the common arguments, open ``model`` and stage ``out`` (the body writes into
    ``job.tmp``); an exception anywhere leaves no trace next to ``out``."""
    with as_convert_error():
        with _conversion(model, out, dtype=dtype, force=force, allow_pickle=allow_pickle, shard_gb=shard_gb,
                         progress=progress) as job:
            yield job


@contextmanager
def _conversion(model: str, out: str, *, dtype: str | None, force: bool, allow_pickle: bool,
                shard_gb: float, progress: Callable[[str], None]) -> Iterator[Job]:
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    if shard_gb <= 0:
        raise ConvertError("--shard-gb must be positive")
    out_path = Path(out).expanduser()
    t0 = time.perf_counter()
    src = resolve_model_path(model, hub_patterns(allow_pickle))
    check_output(out_path, src, force)
    with staged_output(out_path, force, progress) as tmp:
        scratch_dir = tmp / ".scratch"

        def scratch() -> Path:
            scratch_dir.mkdir(exist_ok=True)
            return scratch_dir

        source = open_source(src, allow_pickle=allow_pickle, scratch=scratch, log=progress)
        yield Job(src, source, out_path, tmp, DTYPES[dtype] if dtype else None)
        if scratch_dir.exists():
            shutil.rmtree(scratch_dir)
        size = folder_bytes(tmp)
    progress(f"done: {out_path} ({human_bytes(size)}) in {time.perf_counter() - t0:.1f} s")
