"""Dropped rows: the drop sink of a step, and its side file of each row as it came (less `LOADER_FIELDS`),
plus the reason it was not kept.

As in datatrove's filters and exclusion writer, a step gives each row a verdict, kept or dropped with a
reason (`verdicts`), and its `DropSink` counts the reasons, logs them once, writes the dropped rows to the
step's own file and times the step. Every op that drops rows goes through it: `gsnr_scorer` and
`gsnr_top_k_filter`, and their Ray variants. One writer serves every path: a `datasets.Dataset` (the
Data-Juicer ops) and the rows of Ray blocks, fetched one block at a time, go through `write_dropped_rows`
and come out as the same JSON lines.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from itertools import zip_longest
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

from loguru import logger

from .cache import atomic_write
from .timing import Stopwatch

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


Verdict = tuple[bool, Optional[str]]  # (kept, the reason when not)
RowsAt = Callable[[list[int]], Iterable[Mapping[str, Any]]]  # row indices -> those rows, in order


def verdicts(rows: int, reasons: Mapping[int, str]) -> Iterator[Verdict]:
    """The verdict on each of `rows` rows of a step that drops the rows of `reasons` (row index -> reason)."""
    return ((i not in reasons, reasons.get(i)) for i in range(rows))


class DropSink:
    """The end of a step that drops rows (`step`, the op's name in the log): it takes the step's verdicts,
    counts the reasons (`counts`), logs them once, writes the dropped rows with their reasons to `path`
    (the step's own file; none when None, or when nothing is dropped) and times the step, from when the
    sink is made until it has written (`seconds`). `scope` qualifies what was kept (" in the gsnr range")."""

    def __init__(self, step: str, path: Optional[str | Path], scope: str = ""):
        self.step, self.path, self.scope = step, path, scope
        self.counts: Counter = Counter()
        self.written: Optional[Path] = None  # the file written, if any
        self.seconds: Optional[float] = None
        self._watch = Stopwatch()

    def take(self, step_verdicts: Iterable[Verdict], dropped_rows: RowsAt) -> list[int]:
        """Take a step's verdict on each row, in row order; `dropped_rows(indices)` gives the rows at those
        indices (a `datasets.Dataset` or an iterable of row dicts, read once, in order). Returns the indices of
        the kept rows."""
        kept, dropped, reasons = [], [], []
        for i, (keep, reason) in enumerate(step_verdicts):
            if keep:
                kept.append(i)
            else:
                dropped.append(i)
                reasons.append(reason)
        self.counts = Counter(reasons)
        if dropped and self.path is not None:
            self.written = write_dropped_rows(self.path, dropped_rows(dropped), reasons)
        self.seconds = self._watch.seconds
        where = f"; wrote them to {self.written}" if self.written is not None else ""
        logger.info(f"{self.step}: kept {len(kept)} of {len(kept) + len(dropped)} rows{self.scope}; dropped by "
                    f"reason: {dict(self.counts)}{where} ({self.seconds:.1f} s).")
        return kept


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
