"""The frame every conversion shares (MLX <- original/transformers, and back).

Argument checks, the source resolved and opened once, the output staged in a temporary folder
next to ``out`` (with a scratch folder for files a source needs to unpack) and renamed into place
only when everything was written, the config/tokenizer/processor files, and the closing line.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from ..loading import DTYPES
from ..model_folder import resolve_model_path
from .files import ConvertError, as_convert_error, copy_files, folder_bytes, human_bytes, write_json
from .sources import Source, hub_patterns, open_source
from .staging import check_output, staged_output


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


@contextmanager
def conversion(model: str, out: str, dtype: str | None, force: bool, allow_pickle: bool,
               shard_gb: float, progress: Callable[[str], None]) -> Iterator[Job]:
    """Check the common arguments, open ``model`` and stage ``out``; the body writes into
    ``job.tmp``.  An exception anywhere leaves no trace next to ``out``; the folder reader's
    errors (:mod:`mlx_dsvl.model_folder`, the body's strict checks too) come out as ConvertError."""
    with as_convert_error():
        with _conversion(model, out, dtype, force, allow_pickle, shard_gb, progress) as job:
            yield job


@contextmanager
def _conversion(model: str, out: str, dtype: str | None, force: bool, allow_pickle: bool,
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
