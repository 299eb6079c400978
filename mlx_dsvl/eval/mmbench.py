"""MMBench-style TSV files as OpenCompass publishes them (columns: docs/EVAL.md), read by the
rules of the published reader, VLMEvalKit's: pandas' missing-value words (``nan``, ``None``,
``N/A``, ...) are empty cells; an ``image`` cell of at most 64 characters is the ``index`` of the
row whose image it shares; row ``k * 1_000_000 + i`` is rotation ``k`` of question ``i``.
"""

from __future__ import annotations

import ast
import base64
import csv
import sys
from functools import partial
from pathlib import Path

from .items import LETTERS, EvalDataError, Item
from .readers import text_lines

# pandas.read_csv's default missing-value strings (what the published reader sees as NaN).
NA_VALUES = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
})
REQUIRED = ("index", "question", "A", "B")
ROTATION = 1_000_000
REFERENCE_MAX = 64  # an image cell this short names another row's index


def _raise_field_limit() -> None:
    """Base64 images are far longer than the csv module's 128 KiB default field limit."""
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 2


def missing(v: str | None) -> bool:
    return v is None or v.strip() in NA_VALUES


def read_tsv(path: Path, rows, prefix: str | None) -> None:
    """Append the file's questions to ``rows`` (a :class:`~mlx_dsvl.eval.readers.RowReader`)."""
    _raise_field_limit()
    header, records = _records(path)
    if "image" not in header:
        rows.result.warnings.append(f"{path}: no 'image' column: its questions are scored as text only")
    images = {r["index"]: r.get("image") for _, r in records if r.get("index")}
    for where, r in records:
        rows.add(where, partial(_item, r, where, path, images, prefix))


def _records(path: Path) -> tuple[list[str], list[tuple]]:
    """The header and ``(where, {column: cell})`` per data row; the header is checked first."""
    out = []
    reader = csv.reader(text_lines(path), delimiter="\t")
    header = next(reader, None)
    if header is None:
        raise EvalDataError(f"{path}: empty file")
    header = [h.strip() for h in header]
    absent = [c for c in REQUIRED if c not in header]
    if absent:
        raise EvalDataError(
            f"{path}:1: missing column(s) {', '.join(absent)}; an MMBench TSV has "
            "index, question, hint, A, B, C, D, answer, category, l2-category, image"
        )
    if "answer" not in header:
        raise EvalDataError(f"{path}: no 'answer' column: a test split cannot be scored locally "
                            "(MMBench's test answers are kept by its evaluation server)")
    start = 2
    for record in reader:
        where = f"{path}:{start}"
        start = reader.line_num + 1
        if not record or (len(record) == 1 and not record[0].strip()):
            continue
        if len(record) != len(header):
            out.append((where, {"__error__": f"{len(record)} tab-separated cells, the header "
                                              f"has {len(header)} (an unquoted tab or newline?)"}))
            continue
        out.append((where, dict(zip(header, record))))
    return header, out


def _rotation_of(index: str, images: dict[str, str | None]):
    """``(group, rotation)`` of a row: rotations are ``k * 10**6 + i`` with ``i`` in the file."""
    if index.isdigit() and int(index) >= ROTATION:
        base = str(int(index) % ROTATION)
        if base in images:
            return base, int(index) // ROTATION
    return index, 0


def _item(r: dict[str, str], where: str, path: Path, images: dict[str, str | None],
          prefix: str | None) -> Item:
    if "__error__" in r:
        raise EvalDataError(f"{where}: {r['__error__']}")
    index = r["index"].strip()
    if missing(index):
        raise EvalDataError(f"{where}: empty 'index'")
    if missing(r["question"]):
        raise EvalDataError(f"{where}: empty 'question'")
    choices = _options(r, where)
    answer = (r.get("answer") or "").strip()
    if not answer or answer not in LETTERS[: len(choices)]:
        raise EvalDataError(f"{where}: answer {answer!r} is not one of the options' letters "
                            f"{', '.join(LETTERS[: len(choices)])}")
    group, rotation = _rotation_of(index, images)
    cells, keys = _image_cells(index, images, where, path)
    return Item(
        id=f"{prefix}/{index}" if prefix else index,
        question=r["question"].strip(), choices=choices, answer=LETTERS.index(answer),
        hint=None if missing(r.get("hint")) else r["hint"].strip(),
        category=None if missing(r.get("category")) else r["category"].strip(),
        l2_category=None if missing(r.get("l2-category")) else r["l2-category"].strip(),
        images=[_b64_loader(c) for c in cells], image_keys=keys, source=where,
        group=(f"{prefix}/{group}" if prefix else group) if rotation else None, rotation=rotation,
    )


def _options(r: dict[str, str], where: str) -> list[str]:
    present = [c for c in LETTERS if c in r and not missing(r[c])]
    n = len(present)
    if present != list(LETTERS[:n]) or n < 2:
        raise EvalDataError(f"{where}: options must be consecutive from A with at least A and B; "
                            f"found {', '.join(present) or 'none'}")
    return [r[c].strip() for c in present]


def _image_cells(index: str, images: dict[str, str | None], where: str, path: Path):
    """The row's base64 images (references followed) and keys naming them."""
    cell = images.get(index)
    if missing(cell):
        return [], []
    owner = index
    if len(cell.strip()) <= REFERENCE_MAX:
        owner = cell.strip()
        if owner not in images:
            raise EvalDataError(f"{where}: 'image' {owner!r} is neither base64 image data nor the "
                                "index of another row")
        cell = images[owner]
        if missing(cell) or len(cell.strip()) <= REFERENCE_MAX:
            raise EvalDataError(f"{where}: 'image' refers to row index {owner!r}, which has no image")
    cell = cell.strip()
    if cell.startswith("["):
        try:
            cells = ast.literal_eval(cell)
        except (ValueError, SyntaxError):
            raise EvalDataError(f"{where}: 'image' starts with '[' but is not a list of base64 "
                                "strings") from None
        if not isinstance(cells, list) or not all(isinstance(c, str) for c in cells):
            raise EvalDataError(f"{where}: 'image' must be a list of base64 strings")
    else:
        cells = [cell]
    return cells, [f"{path}#{owner}/{k}" for k in range(len(cells))]


def _b64_loader(cell: str):
    return lambda: base64.b64decode(cell, validate=False)
