"""Reading JSON-lines input files, with errors that name the file and the line."""

from __future__ import annotations

import json
import os
from typing import Any, Iterator


class InputFileError(ValueError):
    """An input file that cannot be read as JSON lines; the message names the file and the line."""


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, row) for each JSON object of a JSON-lines file, read one line at a time (blank lines
    skipped); `InputFileError` names the file and line of invalid UTF-8, a line that is not a JSON object,
    or a string holding a lone surrogate (a `\\ud800` escape without its pair, which no UTF-8 writer or
    Arrow reader accepts)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise InputFileError(f"{path}:{number}: not valid UTF-8 "
                                     f"({error.reason} at byte {error.start}).") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputFileError(f"{path}:{number}: not JSON ({error.msg} at column {error.colno}).") from None
            if not isinstance(row, dict):
                raise InputFileError(f"{path}:{number}: a JSON {type(row).__name__}, not an object (one row per line).")
            if "\\u" in line and _has_lone_surrogate(row):
                raise InputFileError(f"{path}:{number}: a string with a lone surrogate (a \\ud800-\\udfff escape "
                                     "without its pair); fix or remove that escape.")
            yield number, row


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def read_jsonl(path: str | os.PathLike, allow_empty: bool = False) -> list[dict]:
    """The JSON objects of a JSON-lines file (`iter_jsonl`); `InputFileError` also for a file with no rows
    at all (unless `allow_empty`)."""
    rows = [row for _, row in iter_jsonl(path)]
    if not rows and not allow_empty:
        raise InputFileError(f"{path}: no rows (the file is empty).")
    return rows
