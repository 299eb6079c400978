"""File side of the converter: a streaming safetensors writer (a shard holds about one tensor in
memory, not the shard) and sharded output."""

from __future__ import annotations

import json
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..faults import fault_point
from ..model_folder import ModelLoadError, plan_shards, shard_names
from ..outputs import human_bytes, log


class ConvertError(ValueError):
    """A conversion that cannot be done; the message (one line) says what and where."""


@contextmanager
def as_convert_error() -> Iterator[None]:
    """The folder reader's errors as this tool's."""
    try:
        yield
    except ModelLoadError as e:
        raise ConvertError(str(e)) from None


# -- safetensors ------------------------------------------------------------------------------
_ST_DTYPES = {
    mx.float16: "F16", mx.bfloat16: "BF16", mx.float32: "F32", mx.float64: "F64",
    mx.uint8: "U8", mx.int8: "I8", mx.uint16: "U16", mx.int16: "I16",
    mx.uint32: "U32", mx.int32: "I32", mx.uint64: "U64", mx.int64: "I64", mx.bool_: "BOOL",
}


def write_safetensors(path: Path, tensors: dict[str, mx.array], metadata: dict[str, str] | None = None) -> int:
    """Write lazy ``tensors``, emptying the dict: the header comes from shapes and dtypes alone,
    then each tensor is evaluated, written and dropped before the next; returns the data bytes."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    names = list(tensors)
    for name in names:
        a = tensors[name]
        if a.dtype not in _ST_DTYPES:
            raise ConvertError(f"{name}: dtype {a.dtype} cannot be stored in safetensors")
        n = a.nbytes
        header[name] = {"dtype": _ST_DTYPES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            a = mx.contiguous(tensors.pop(name))
            mx.eval(a)
            if a.dtype == mx.bfloat16:  # numpy has no bfloat16: write its bits
                a = a.view(mx.uint16)
            buf = np.asarray(a)
            if not buf.flags.c_contiguous:
                buf = np.ascontiguousarray(buf)
            if buf.nbytes != header[name]["data_offsets"][1] - header[name]["data_offsets"][0]:
                raise ConvertError(f"{name}: wrote {buf.nbytes} bytes, expected a different size")
            f.write(memoryview(buf.reshape(-1)).cast("B"))
            del a, buf
            mx.clear_cache()
            fault_point("tensor")
    return offset


def write_shards(
    folder: Path,
    tensors: dict[str, mx.array],
    max_bytes: int,
    metadata: dict[str, str],
    always_index: bool,
    progress: Callable[[str], None] = log,
) -> tuple[list[str], int]:
    """Write ``tensors`` as shards, emptying the dict; returns (file names, data bytes)."""
    groups = plan_shards({k: v.nbytes for k, v in tensors.items()}, max_bytes)
    names = shard_names(len(groups))
    weight_map: dict[str, str] = {}
    total = 0
    for i, (fname, keys) in enumerate(zip(names, groups)):
        t0 = time.perf_counter()
        shard = {k: tensors.pop(k) for k in keys}
        n = write_safetensors(folder / fname, shard, metadata)
        total += n
        weight_map.update({k: fname for k in keys})
        progress(f"  [{i + 1}/{len(names)}] {fname}: {len(keys)} tensors, {human_bytes(n)}, "
                 f"{time.perf_counter() - t0:.1f} s")
    if len(names) > 1 or always_index:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names, total


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def copy_files(files: list[Path], folder: Path) -> None:
    for f in files:
        shutil.copyfile(f, folder / f.name)  # follows symlinks (hub cache snapshots)
