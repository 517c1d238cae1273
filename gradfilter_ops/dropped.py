"""The side file of dropped rows: each row as it came, plus the reason it was not kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .cache import atomic_write

DROP_REASON = "gsnr_drop_reason"


def write_dropped_rows(path: str | Path, rows: Any, reasons: Sequence[str]) -> Path:
    """Write `rows` (a `datasets.Dataset`) as JSON lines with a `gsnr_drop_reason` column, atomically."""
    if len(rows) != len(reasons):
        raise ValueError(f"{len(rows)} dropped rows but {len(reasons)} reasons.")
    path = Path(path)
    with_reasons = rows.add_column(DROP_REASON, list(reasons))
    atomic_write(path, lambda tmp: with_reasons.to_json(tmp, lines=True, force_ascii=False))
    return path
