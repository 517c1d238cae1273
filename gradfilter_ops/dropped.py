"""The side file of dropped rows: each row as it came (less `LOADER_FIELDS`), plus the reason it was not kept.

One writer serves every path, as datatrove's exclusion writer does: a `datasets.Dataset` (the Data-Juicer
ops, the `datasets` API) and the rows of Ray blocks, fetched one block at a time, go through
`write_dropped_rows` and come out as the same JSON lines.
"""

from __future__ import annotations

import json
import tempfile
from itertools import zip_longest
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from .cache import atomic_write

DROP_REASON = "gsnr_drop_reason"
# Data-Juicer's loader adds it to every row of a file without it, and drops the rows without it of a file
# with it (in the recipes' `text_keys`): left out, so that dropped rows fed back in are not lost.
LOADER_FIELDS = ("__dj__suffix__",)
_MISSING = object()


def write_dropped_rows(path: str | Path, rows: Iterable[Mapping[str, Any]], reasons: Iterable[str]) -> Path:
    """Write `rows` (a `datasets.Dataset`, or any iterable of row dicts, read once and in order) as JSON
    lines, each with its reason under `gsnr_drop_reason`; atomically: the file appears complete or not at all."""
    path = Path(path)
    if hasattr(rows, "column_names"):  # a datasets.Dataset: read in batches, not row by row
        rows = dataset_rows(rows)

    def write(tmp: str) -> None:
        written = 0
        with open(tmp, "w", encoding="utf-8") as f:
            for row, reason in zip_longest(rows, reasons, fillvalue=_MISSING):
                if row is _MISSING or reason is _MISSING:
                    raise ValueError(f"dropped rows and reasons differ in number (they part after {written}).")
                kept = {k: v for k, v in row.items() if k not in LOADER_FIELDS}
                f.write(json.dumps({**kept, DROP_REASON: reason}, ensure_ascii=False, default=str) + "\n")
                written += 1

    atomic_write(path, write)
    return path


def dataset_rows(dataset: Any, batch_size: int = 1000) -> Iterator[dict[str, Any]]:
    """The rows of a `datasets.Dataset` as dicts, read a batch of columns at a time."""
    for batch in dataset.iter(batch_size=batch_size):
        names = list(batch)
        yield from (dict(zip(names, values)) for values in zip(*batch.values()))


class UnwritablePathError(OSError):
    """A dropped-rows file that cannot be written where it is asked for."""


def check_writable(path: str | Path | None, option: str) -> None:
    """`UnwritablePathError` naming `path` and the `option` that set it, unless a file can be written there:
    checked when the op is built, so that a run fails before training rather than after all the scoring."""
    if path is None:
        return
    target = Path(path)
    fix = f"set `{option}` to a file in a writable folder, or `keep_dropped: false` to write no dropped rows"
    if target.is_dir():
        raise UnwritablePathError(f"`{option}` {target} is a folder, not a file; {fix}.")
    folder = target.parent
    while not folder.exists() and folder != folder.parent:  # it is created when the rows are written
        folder = folder.parent
    if not folder.is_dir():
        raise UnwritablePathError(f"`{option}` {target} lies under {folder}, a file, not a folder; {fix}.")
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise UnwritablePathError(f"`{option}` {target} cannot be written: {folder} is not writable "
                                  f"({error.strerror}); {fix}.") from None
