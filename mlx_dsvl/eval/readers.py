"""Evaluation files (``.tsv``, ``.jsonl``, ``.csv``; formats: docs/EVAL.md) -> items.

A folder reads every such file in it, sorted, its items' ids and default categories prefixed by
the file name. Images are decoded while reading, so a broken one is a row error before any model
time is spent.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from ..processing.image import ImageLoadError, load_image
from ..utils import file_digest, files_digest
from .items import IMAGE_TAG, LETTERS, EvalDataError, Item

SUFFIXES = (".tsv", ".jsonl", ".csv")


@dataclass
class ReadResult:
    items: list[Item] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # one message per skipped row
    rows: int = 0
    warnings: list[str] = field(default_factory=list)  # read, but maybe not as meant


class RowReader:
    """Collects items, turning a row's :class:`EvalDataError` into a skip when asked to."""

    def __init__(self, skip_bad: bool, check_images: bool):
        self.skip_bad, self.check_images = skip_bad, check_images
        self.result = ReadResult()
        self._ids: dict[str, str] = {}
        self._checked: set = set()  # image keys decoded already (rotations share images)

    def add(self, where: str, build: Callable[[], Item]) -> None:
        self.result.rows += 1
        try:
            item = build()
            if item.id in self._ids:
                raise EvalDataError(f"{where}: id {item.id!r} already used at {self._ids[item.id]}")
            if self.check_images:
                for get, key in zip(item.images, item.image_keys):
                    if key not in self._checked:
                        check_image(get, where)
                        self._checked.add(key)
        except EvalDataError as e:
            if not self.skip_bad:
                raise
            self.result.skipped.append(str(e))
            return
        self._ids[item.id] = where
        self.result.items.append(item)


def check_image(get, where: str):
    """Decode one image (a row error, naming the row, when it cannot be)."""
    try:
        return load_image(get())
    except (ImageLoadError, OSError, ValueError) as e:
        raise EvalDataError(f"{where}: {e}") from None


def data_files(path) -> list[Path]:
    """The files :func:`read` reads for ``path``: the file itself, or a folder's data files."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES)
        if not files:
            raise EvalDataError(f"{path}: no {'/'.join(SUFFIXES)} files in this folder")
        return files
    if not path.is_file():
        raise EvalDataError(f"{path}: no such file or folder")
    if path.suffix.lower() not in SUFFIXES:
        raise EvalDataError(f"{path}: unknown format; expected a {', '.join(SUFFIXES)} file")
    return [path]


def data_digest(path) -> str:
    """SHA-256 of what :func:`read` reads (a file as ``sha256sum`` prints it); not a JSONL's images."""
    files = data_files(path)
    return files_digest(files) if Path(path).is_dir() else file_digest(files[0])


def read(path, skip_bad: bool = False, check_images: bool = True) -> ReadResult:
    """Read an evaluation file or a folder of them."""
    folder = Path(path).is_dir()
    rows = RowReader(skip_bad, check_images)
    for f in data_files(path):
        _read_file(f, rows, prefix=f.stem if folder else None)
    return rows.result


def _read_file(path: Path, rows: RowReader, prefix: str | None) -> None:
    from .mmbench import read_tsv  # its own module: the published format has its own rules

    before = rows.result.rows
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        read_tsv(path, rows, prefix)
    elif suffix == ".jsonl":
        read_jsonl(path, rows, prefix)
    else:
        read_csv(path, rows, prefix)
    if rows.result.rows == before:
        raise EvalDataError(f"{path}: no rows")


def text_lines(path: Path) -> Iterator[str]:
    """UTF-8 lines, a leading byte-order mark dropped; a bad byte is named by line and offset."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise EvalDataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at "
                                    f"byte offset {offset + e.start}); save the file as UTF-8") from None
            offset += len(raw)


# -- JSONL ------------------------------------------------------------------------------------


def read_jsonl(path: Path, rows: RowReader, prefix: str | None) -> None:
    base = path.resolve().parent
    for lineno, line in enumerate(text_lines(path), 1):
        if line.strip():
            where = f"{path}:{lineno}"
            rows.add(where, partial(_jsonl_item, line, where, base, lineno, prefix))


def _jsonl_item(line: str, where: str, base: Path, lineno: int, prefix: str | None) -> Item:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise EvalDataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise EvalDataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    question = _text(obj.get("question"), where, "question", required=True)
    images = obj.get("images", obj.get("image", []))
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise EvalDataError(f"{where}: 'images' must be a list of image paths (relative to the file)")
    paths = [str(base / p) for p in images]
    tags = question.count(IMAGE_TAG)
    if tags and tags != len(paths):
        raise EvalDataError(f"{where}: the question has {tags} {IMAGE_TAG} but {len(paths)} image(s)")
    choices = obj.get("choices")
    if choices is None and "A" in obj:
        choices = [obj[k] for k in LETTERS if k in obj]
    rid = obj.get("id", lineno)
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise EvalDataError(f"{where}: 'id' must be a string or an integer")
    item = Item(
        id=_prefixed(prefix, str(rid)), question=question,
        hint=_text(obj.get("hint"), where, "hint"),
        category=_text(obj.get("category", obj.get("subject")), where, "category") or prefix,
        l2_category=_text(obj.get("l2_category", obj.get("l2-category")), where, "l2_category"),
        images=[_path_loader(p) for p in paths], image_keys=paths, source=where,
    )
    if "answer" not in obj:
        raise EvalDataError(f"{where}: missing 'answer'")
    if choices is not None:
        item.choices = _choices(choices, where)
        item.answer = _answer_index(obj["answer"], item.choices, where)
    else:
        item.answers = _short_answers(obj["answer"], where)
    return item


def _path_loader(path: str):
    return lambda: path


def _prefixed(prefix: str | None, rid: str) -> str:
    return f"{prefix}/{rid}" if prefix else rid


def _text(v, where: str, name: str, required: bool = False) -> str | None:
    if v is None or (isinstance(v, str) and not v.strip()):
        if required:
            raise EvalDataError(f"{where}: missing or empty '{name}' (a non-empty string)")
        return None
    if not isinstance(v, (str, int, float)) or isinstance(v, bool):
        raise EvalDataError(f"{where}: '{name}' must be a string, got {type(v).__name__}")
    return str(v)


def _choices(choices, where: str) -> list[str]:
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
        raise EvalDataError(f"{where}: 'choices' must be a list of 2 to 26 option texts")
    out = []
    for i, c in enumerate(choices):
        if isinstance(c, bool) or not isinstance(c, (str, int, float)) or not str(c).strip():
            raise EvalDataError(f"{where}: option {LETTERS[i]} must be a non-empty string, got {c!r}")
        out.append(str(c).strip())
    return out


def _answer_index(answer, choices: list[str], where: str) -> int:
    """A letter, the right option's text, or a 0-based index -> the option's index."""
    letters = LETTERS[: len(choices)]
    if isinstance(answer, int) and not isinstance(answer, bool):
        if 0 <= answer < len(choices):
            return answer
    elif isinstance(answer, str):
        a = answer.strip()
        if len(a) == 1 and a.upper() in letters:
            return letters.index(a.upper())
        if a in choices:
            return choices.index(a)
    raise EvalDataError(
        f"{where}: answer {answer!r} is none of the options: expected a letter {letters[0]}-{letters[-1]}, "
        f"an option's text or a 0-based index"
    )


def _short_answers(answer, where: str) -> list[str]:
    answers = answer if isinstance(answer, list) else [answer]
    out = [str(a).strip() for a in answers
           if isinstance(a, (str, int, float)) and not isinstance(a, bool) and str(a).strip()]
    if not out or len(out) != len(answers):
        raise EvalDataError(f"{where}: 'answer' must be a non-empty string or a list of them")
    return out


# -- CSV (text multiple choice) ---------------------------------------------------------------


def read_csv(path: Path, rows: RowReader, prefix: str | None) -> None:
    category = re.sub(r"_(test|dev|val|validation|train)$", "", path.stem)
    reader = csv.reader(text_lines(path))
    header, start, first = None, 1, True
    for record in reader:
        where = f"{path}:{start}"
        start = reader.line_num + 1
        if not record or not any(c.strip() for c in record):
            continue
        if first and _is_header(record):
            header = [c.strip() for c in record]
            _check_header(header, where)
            first = False
            continue
        first = False
        rows.add(where, partial(_csv_item, record, header, where, category, prefix))


def _is_header(record: list[str]) -> bool:
    names = {c.strip().lower() for c in record}
    return "question" in names and "answer" in names


def _check_header(header: list[str], where: str) -> None:
    names = [h.lower() for h in header]
    if "a" not in names or "b" not in names:
        raise EvalDataError(f"{where}: the header needs columns question, A, B[, C, D...], answer")


def _csv_item(record: list[str], header, where: str, category: str, prefix) -> Item:
    if header is not None:
        if len(record) != len(header):
            raise EvalDataError(f"{where}: {len(record)} columns, the header has {len(header)}")
        row = {h.lower(): v for h, v in zip(header, record)}
        options = [row[c.lower()] for c in LETTERS if c.lower() in row]
        while options and not options[-1].strip():
            options.pop()  # fewer options on this row
        question, answer = row["question"], row["answer"]
        category = row.get("category") or row.get("subject") or category
        rid = row.get("id") or row.get("index") or where.rsplit(":", 1)[1]
    else:
        if len(record) < 4:
            raise EvalDataError(
                f"{where}: expected question, at least two options and the answer letter "
                f"(MMLU's columns), got {len(record)} columns"
            )
        question, options, answer = record[0], record[1:-1], record[-1]
        rid = where.rsplit(":", 1)[1]
    if not question.strip():
        raise EvalDataError(f"{where}: empty question")
    choices = _choices(options, where)
    item = Item(id=_prefixed(prefix, str(rid)), question=question.strip(), choices=choices,
                category=category, source=where)
    item.answer = _answer_index(answer, choices, where)
    return item
