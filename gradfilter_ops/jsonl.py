"""Reading JSON-lines input files, with errors that name the file and the line."""

from __future__ import annotations

import json
import os


class InputFileError(ValueError):
    """An input file that cannot be read as JSON lines; the message names the file and the line."""


def read_jsonl(path: str | os.PathLike, allow_empty: bool = False) -> list[dict]:
    """The JSON objects of a JSON-lines file (blank lines skipped); `InputFileError` names the file and
    line of invalid UTF-8, a line that is not a JSON object, or a file with no rows at all (unless
    `allow_empty`)."""
    rows = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise InputFileError(f"{path}:{number}: not valid UTF-8 ({error.reason} at byte {error.start}).") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputFileError(f"{path}:{number}: not JSON ({error.msg} at column {error.colno}).") from None
            if not isinstance(row, dict):
                raise InputFileError(f"{path}:{number}: a JSON {type(row).__name__}, not an object (one row per line).")
            rows.append(row)
    if not rows and not allow_empty:
        raise InputFileError(f"{path}: no rows (the file is empty).")
    return rows
