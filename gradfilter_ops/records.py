"""A batch's rows, and the score record of each row: the G-SNR parts of the squared norms, a reason
code where there is no finite score, and the row-by-row retry that isolates a row the proxy fails on."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence

from loguru import logger

from . import fields


def rows_of(batch: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """A batch (a dict of columns) as a list of rows."""
    size = len(next(iter(batch.values()))) if batch else 0
    return [{key: values[i] for key, values in batch.items()} for i in range(size)]


def batch_of(rows: list[dict[str, Any]]) -> dict[str, list]:
    """Rows as a batch (a dict of columns; a row without a key gets None there)."""
    keys = sorted({key for row in rows for key in row})
    return {key: [row.get(key) for row in rows] for key in keys}


def finite_or_none(value: float) -> Optional[float]:
    return float(value) if math.isfinite(value) else None


def score_records(sq_norms, config, loss_tokens: Sequence[int]) -> list[dict[str, Any]]:
    """One record per row of `sq_norms` ([members, 2 (early, late), rows], of the mean-loss gradients):
    the G-SNR parts (None where not finite) and the status, `ok` or `non_finite`. With `example_loss:
    sum` the norms are those of the summed loss, each row's times its `loss_tokens`
    (`Encoded.num_loss_tokens`) squared."""
    from .engine.gsnr import gsnr_from_sq_norms, sum_loss_sq_norms

    if config.example_loss == "sum":
        sq_norms = sum_loss_sq_norms(sq_norms, loss_tokens)
    parts = gsnr_from_sq_norms(sq_norms, norm=config.norm, noise=config.noise, eps=config.eps)
    records = []
    for j in range(sq_norms.shape[2]):
        values = {fields.EARLY: parts.early[j], fields.LATE: parts.late[j], fields.DROP: parts.drop[j],
                  fields.NOISE: parts.noise[j], fields.GSNR: parts.gsnr[j]}
        record = {name: finite_or_none(value) for name, value in values.items()}
        record[fields.STATUS] = fields.OK if record[fields.GSNR] is not None else fields.NON_FINITE
        records.append(record)
    return records


def records_row_by_row(examples: Sequence, records_of: Callable[[Sequence], list[dict[str, Any]]],
                       batch_error: Exception) -> list[dict[str, Any]]:
    """`records_of` each example alone, after the batch failed with `batch_error`: a row that fails
    alone gets `scoring_error`; when every row does, the batch's error is raised."""
    records = []
    for example in examples:
        try:
            records.extend(records_of([example]))
        except Exception as error:  # noqa: BLE001 - recorded as the row's reason and logged
            logger.error(f"gsnr: scoring a row failed: {error!r}")
            records.append({**{name: None for name in fields.PARTS}, fields.STATUS: fields.SCORING_ERROR})
    if all(r[fields.STATUS] == fields.SCORING_ERROR for r in records):
        raise batch_error
    return records
