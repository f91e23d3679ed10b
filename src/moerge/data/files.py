"""Task sources for local data: `.jsonl`, `.csv`, `.parquet` files and saved `datasets` folders.

Every row needs `input` and `target`; `choices` (a list) makes it multiple-choice. An optional
`split` column (train/validation/test) fixes the splits instead of the seeded cut.
Errors name the file and the line (jsonl/csv) or 1-based row (parquet, datasets) at fault.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from moerge.data.sources import SPLITS, RawTask, task_source
from moerge.data.task import Example
from moerge.errors import MoergeError

Row = tuple[str, dict[str, Any]]  # (location for error messages, fields)


def _existing(spec: str) -> Path:
    path = Path(spec).expanduser()
    if not path.is_file():
        raise MoergeError(f"{spec}: file not found")
    return path


def _text(where: str, name: str, value: Any) -> str:
    """Accept strings and plain numbers (a jsonl target of 42 means "42"); refuse the rest."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise MoergeError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")


def _is_missing(value: Any) -> bool:
    """None, NaN (pandas/parquet) and blank text (an empty csv cell) all mean "not given"."""
    if isinstance(value, str):
        return not value.strip()
    return value is None or (isinstance(value, float) and math.isnan(value))


def _choices(where: str, value: Any) -> tuple[str, ...] | None:
    """A list, or (from csv) a JSON list string or `a|b|c`; blank means free-form."""
    if _is_missing(value):
        return None
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("["):
            try:
                value = json.loads(stripped)
            except json.JSONDecodeError as exc:
                raise MoergeError(f"{where}: field 'choices' is not a valid JSON list ({exc.msg})") from None
        else:
            value = stripped.split("|")
    if not isinstance(value, (list, tuple)):
        raise MoergeError(f"{where}: field 'choices' must be a list, got {type(value).__name__}")
    choices = tuple(_text(where, "choices", c) for c in list(value))
    if len(choices) < 2:
        raise MoergeError(f"{where}: field 'choices' needs at least 2 entries, got {len(choices)}")
    return choices


def _example(where: str, fields: dict[str, Any]) -> Example:
    for name in ("input", "target"):
        if _is_missing(fields.get(name)):
            raise MoergeError(f"{where}: missing field {name!r}")
    target = _text(where, "target", fields["target"])
    choices = _choices(where, fields.get("choices"))
    if choices is not None and target not in choices:
        raise MoergeError(f"{where}: target {target!r} is not one of the choices {list(choices)}")
    return Example(input=_text(where, "input", fields["input"]), target=target, choices=choices)


def read_rows(rows: Iterable[Row]) -> tuple[list[Example], list[str | None]]:
    """Validate rows into examples, with each row's `split` value (None when there is no column)."""
    examples: list[Example] = []
    splits: list[str | None] = []
    for where, fields in rows:
        if not isinstance(fields, dict):
            raise MoergeError(f"{where}: expected an object with 'input' and 'target'")
        examples.append(_example(where, fields))
        split = None if _is_missing(fields.get("split")) else fields["split"]
        if splits and (split is None) != (splits[0] is None):
            raise MoergeError(f"{where}: field 'split' must be set on every row or on none")
        if split is not None and split not in SPLITS:
            raise MoergeError(f"{where}: split {split!r} must be one of {', '.join(SPLITS)}")
        splits.append(split)
    return examples, splits


def rows_to_task(name: str, rows: Iterable[Row]) -> RawTask:
    """A `split` column keeps the data's own splits; without one the task is split by seed."""
    examples, splits = read_rows(rows)
    if not splits or splits[0] is None:
        return RawTask(name=name, examples=examples)
    presplit: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for split, ex in zip(splits, examples, strict=True):
        presplit[str(split)].append(ex)
    return RawTask(name=name, presplit=presplit)


def _text_lines(spec: str, path: Path, what: str) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of a text file; a NUL byte (a binary file) is refused at its line."""
    with path.open("rb") as fh:
        for number, line in enumerate(fh, start=1):
            if b"\x00" in line:
                raise MoergeError(f"{spec}:{number}: not a text file (NUL byte; expected {what})")
            yield number, line


def _decoded(spec: str, number: int, line: bytes, what: str) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MoergeError(f"{spec}:{number}: not UTF-8 text (byte {exc.start + 1}; expected {what})") from None


def _jsonl_rows(spec: str, path: Path) -> Iterator[Row]:
    for number, raw in _text_lines(spec, path, "JSON lines"):
        line = _decoded(spec, number, raw, "JSON lines")
        if not line.strip():
            continue
        try:
            yield f"{spec}:{number}", json.loads(line)
        except json.JSONDecodeError as exc:
            raise MoergeError(f"{spec}:{number}: invalid JSON ({exc.msg} at column {exc.colno})") from None


def _csv_rows(spec: str, path: Path) -> Iterator[Row]:
    lines = (_decoded(spec, n, raw, "CSV") for n, raw in _text_lines(spec, path, "CSV"))
    reader = csv.DictReader(lines)  # lines keep their endings, as a file opened with newline="" gives them
    try:
        for fields in reader:
            yield f"{spec}:{reader.line_num}", fields
    except csv.Error as exc:
        raise MoergeError(f"{spec}:{reader.line_num}: invalid CSV ({exc})") from None


@task_source("jsonl", usage="a .jsonl file", suffixes=(".jsonl",))
def load_jsonl(spec: str) -> RawTask:
    """One JSON object per line: {"input": ..., "target": ..., "choices": [...]?}."""
    path = _existing(spec)
    return rows_to_task(path.stem, _jsonl_rows(spec, path))


@task_source("csv", usage="a .csv file", suffixes=(".csv",))
def load_csv(spec: str) -> RawTask:
    """Header with input,target[,choices][,split]; choices as a JSON list or `a|b|c`."""
    path = _existing(spec)
    return rows_to_task(path.stem, _csv_rows(spec, path))


@task_source("parquet", usage="a .parquet file", suffixes=(".parquet",))
def load_parquet(spec: str) -> RawTask:
    """Columns input, target, optional choices (list) and split."""
    import pyarrow.parquet as pq

    path = _existing(spec)
    try:
        records = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise MoergeError(f"{spec}: not a readable parquet file ({exc})") from None
    return rows_to_task(path.stem, ((f"{spec}:{i}", r) for i, r in enumerate(records, start=1)))


@task_source("datasets", usage="a folder saved with datasets' save_to_disk", folder=True)
def load_datasets_folder(spec: str) -> RawTask:
    """A `Dataset` is split by seed; a `DatasetDict` keeps its train/validation/test splits."""
    from datasets import Dataset, load_from_disk

    path = Path(spec).expanduser()
    try:
        data = load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise MoergeError(f"{spec}: not a folder saved with datasets' save_to_disk ({exc})") from None
    name = path.resolve().name
    if isinstance(data, Dataset):
        return rows_to_task(name, ((f"{spec}:{i}", r) for i, r in enumerate(data, start=1)))
    unknown = sorted(set(data) - set(SPLITS))
    if unknown or "train" not in data:
        raise MoergeError(f"{spec}: dataset splits {sorted(data)} must include train and only train, validation, test")
    presplit = {
        split: read_rows((f"{spec}[{split}]:{i}", r) for i, r in enumerate(data[split], start=1))[0] for split in data
    }
    return RawTask(name=name, presplit=presplit)
