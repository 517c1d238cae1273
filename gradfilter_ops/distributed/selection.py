"""Selection on Ray: a few numbers per row come to the driver, `selection.select` runs over them in
block order, and each block is cut where it lies; the dropped rows go to a `DropSink`, which streams
them to one JSON-lines file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from loguru import logger

from .. import fields
from ..dropped import DropSink, verdicts
from ..provenance import check_one_ensemble, ensembles_of
from ..selection import Selection, select, stat_selection_inputs, validate_options
from .blocks import fields_by_block, joined


class MissingScores(ValueError):
    """A selection met rows without G-SNR stats."""


@dataclass
class Selected:
    dataset: Any  # the kept rows, in their order
    selection: Selection  # indices in block order, and the reason of every dropped row
    rows: int  # rows it chose from
    groups: Optional[list[str]]  # every row's `group_by` value, when grouped
    dropped_path: Optional[Path]  # where the dropped rows went, if anywhere


def _take(block, indices: list[int]):
    import pyarrow as pa

    return block.take(pa.array(indices, type=pa.int64()))


def _num_rows(block) -> int:
    return block.num_rows


def _local(indices: Sequence[int], offsets: Sequence[int]) -> list[list[int]]:
    """Global row indices -> per-block local indices (blocks start at `offsets`, one past the end last)."""
    import bisect

    out: list[list[int]] = [[] for _ in offsets[:-1]]
    for i in indices:
        b = bisect.bisect_right(offsets, i) - 1
        out[b].append(i - offsets[b])
    return out


def _offsets(refs) -> list[int]:
    import ray

    count = ray.remote(num_cpus=0)(_num_rows)  # cheap reads of blocks: no CPU reserved
    offsets = [0]
    for size in ray.get([count.remote(ref) for ref in refs]):
        offsets.append(offsets[-1] + size)
    return offsets


def split_rows(dataset, reasons: dict[int, str], sink: DropSink):
    """The rows of a materialized `dataset` that `reasons` (row index -> why) leaves out, cut block by
    block; the verdicts go to `sink`, which counts them and writes the dropped rows with their reasons to
    its file, one block in memory at a time. Returns the kept dataset."""
    import ray

    refs = dataset.to_arrow_refs()
    offsets = _offsets(refs)
    take = ray.remote(num_cpus=0)(_take)

    def dropped_rows(dropped: list[int]):  # one block in memory at a time
        for ref, indices in zip(refs, _local(dropped, offsets)):
            if indices:
                yield from ray.get(take.remote(ref, indices)).to_pylist()

    keep = sink.take(verdicts(offsets[-1], reasons), dropped_rows)
    return ray.data.from_arrow_refs([take.remote(ref, local) for ref, local in zip(refs, _local(keep, offsets))])


def select_dataset(dataset, *, top_k: Optional[int] = None, top_ratio: Optional[float] = None,
                   max_tokens: Optional[int] = None, stats_column: Optional[str] = None,
                   group_by: Optional[str] = None, group_quota: str = "proportional", min_per_group: int = 0,
                   diversity: Optional[str] = None, near_duplicates: str = "keep",
                   dropped_path: Optional[str | Path] = None, step: str = "gsnr") -> Selected:
    """Keep the best rows by G-SNR under one budget (`selection.select`, ties by block order) and
    write the dropped ones, with their reasons, to `dropped_path` when given (a `DropSink` named `step`
    in the log). `diversity: clusters`, `diversity: length` and `near_duplicates: drop` read the scorer's
    `gsnr_cluster`, `gsnr_response_tokens` and `gsnr_duplicate_group`."""
    validate_options(top_k=top_k, top_ratio=top_ratio, max_tokens=max_tokens, grouped=group_by is not None,
                     group_quota=group_quota, min_per_group=min_per_group, diversity=diversity,
                     near_duplicates=near_duplicates)
    dataset = dataset.materialize()
    sink = DropSink(step, dropped_path)  # times the selection, not the work before it that materialize runs
    names = [fields.GSNR, fields.STATUS, fields.TOTAL_TOKENS, fields.RESPONSE_TOKENS, fields.ENSEMBLE,
             *fields.GROUP_FIELDS]
    parts = fields_by_block(dataset.to_arrow_refs(), stats_column, names, group_by)
    statuses = joined(parts, fields.STATUS)
    if not statuses:
        logger.warning("gsnr: the dataset is empty; nothing to select.")
        return Selected(dataset, Selection(keep=[]), 0, None, None)
    if any(status is None for status in statuses):
        raise MissingScores(f"{sum(s is None for s in statuses)} of {len(statuses)} rows have no G-SNR stats "
                            f"(`{fields.STATUS}`); score them before selecting.")
    check_one_ensemble(ensembles_of({fields.ENSEMBLE: e} for e in joined(parts, fields.ENSEMBLE)), "ray_gsnr_scorer")
    groups = joined(parts, "group") if group_by else None
    cluster_groups, duplicate_groups = stat_selection_inputs(
        diversity, near_duplicates, statuses, joined(parts, fields.CLUSTER),
        joined(parts, fields.DUPLICATE_GROUP), joined(parts, fields.RESPONSE_TOKENS))
    groups = cluster_groups if cluster_groups is not None else groups
    selection = select(joined(parts, fields.GSNR), statuses,
                       tokens=[t or 0 for t in joined(parts, fields.TOTAL_TOKENS)], groups=groups,
                       group_quota=group_quota, min_per_group=min_per_group, top_k=top_k, top_ratio=top_ratio,
                       max_tokens=max_tokens, duplicate_groups=duplicate_groups)
    kept = split_rows(dataset, selection.reasons, sink)
    return Selected(kept, selection, len(statuses), groups, sink.written)
