"""Read and write record files (jsonl, json, parquet) with errors that name the file and line.

Every reader yields ``(line_no, record)`` with a 1-based line number (for parquet: the 1-based row
number), so that callers can report ``path:line: what is wrong`` for bad content too. Writers are
atomic (:mod:`megatron_t1.atomic`): the file appears under its name complete, or not at all.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from megatron_t1.atomic import atomic_file


class DataError(ValueError):
    """A malformed dataset file or record; the message starts with ``path:line:``."""


def _rows_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pyarrow is a dev/cpu dependency, not a hard one
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from e
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from e
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            row += 1
            yield row, rec


def _rows_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    # Binary mode, one line at a time: a bad byte is then reported on its own line (a text-mode
    # reader decodes whole buffers and would blame an earlier line).
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{line_no}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(rec).__name__}")
            yield line_no, rec


def _rows_json(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}:1: expected a JSON list of objects, got {type(data).__name__}")
    for i, rec in enumerate(data, start=1):
        if not isinstance(rec, dict):
            raise DataError(f"{path}:item {i}: expected a JSON object, got {type(rec).__name__}")
        yield i, rec


def read_records(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_no, record)`` from a ``.jsonl`` / ``.json`` (list) / ``.parquet`` file.

    Blank jsonl lines are skipped. Raises :class:`DataError` (``path:line: reason``) on a line that
    is not a JSON object, and FileNotFoundError naming the path when it does not exist.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such dataset file")
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        yield from _rows_parquet(p)
    elif suffix == ".json":
        yield from _rows_json(p)
    else:  # .jsonl, .ndjson, or anything else: one JSON object per line
        yield from _rows_jsonl(p)


def require_field(path: str | os.PathLike, line_no: int, rec: dict, name: str, kind: type | tuple[type, ...]):
    """``rec[name]`` if present with type ``kind``, else a :class:`DataError` naming path:line."""
    if name not in rec or rec[name] is None:
        raise DataError(f"{path}:{line_no}: missing field {name!r} (has {sorted(rec)})")
    value = rec[name]
    if not isinstance(value, kind):
        raise DataError(f"{path}:{line_no}: field {name!r} is {type(value).__name__}, expected {kind}")
    return value


class JsonlWriter:
    """Appends records to an open text file, one JSON object (UTF-8, not ASCII-escaped) per line;
    ``count`` is the number of records written so far."""

    def __init__(self, f: IO[str]) -> None:
        self._f = f
        self.count = 0

    def write(self, records: Iterable[dict]) -> None:
        for rec in records:
            self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self.count += 1


@contextlib.contextmanager
def open_jsonl_atomic(path: str | os.PathLike) -> Iterator[JsonlWriter]:
    """A :class:`JsonlWriter` for records that come in batches (an evaluation, benchmark by benchmark).

    ``path`` appears, complete, when the block ends; on an exception it is left as it was (an old file
    stays, none appears) and the temporary file is deleted.
    """
    with atomic_file(path, "w") as f:
        yield JsonlWriter(f)


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write records as jsonl (UTF-8, one object per line) atomically; returns the count."""
    with open_jsonl_atomic(path) as out:
        out.write(records)
    return out.count
