"""That a Ray stage gave back every row once. Ray retries a scoring batch whose actor or node died
(`scoring`: the actors restart, their tasks are retried), but a block that fails past its retries and
is skipped (`DataContext.max_errored_blocks`) would leave a partial dataset. So the rows before and
after are compared by content, and a row lost or doubled stops the job, naming the rows, before
anything is selected or exported."""

from __future__ import annotations

import json
from collections import Counter
from typing import Optional

from ..cache import digest
from .blocks import score_inputs

SHOWN = 10  # rows named in the error; the count covers the rest


class LostRows(RuntimeError):
    """A Ray stage gave back fewer rows than it was given, or some twice."""


def _label(row: dict) -> str:
    if "id" in row:
        return f"id={row['id']!r}"
    text = json.dumps(row, ensure_ascii=False, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _block_digests(block, stats_column: Optional[str], labels: bool):
    rows = score_inputs(block, stats_column).to_pylist()
    return [(digest(row), _label(row) if labels else None) for row in rows]


def row_digests(dataset, stats_column: Optional[str] = None, labels: bool = False) -> list[tuple[str, Optional[str]]]:
    """(content digest, label) of every row of a materialized `dataset`, in block order, over the fields a
    row is scored on (its stats left out); the label (its `id`, else the start of the row) when `labels`."""
    import ray

    # no CPU reserved: a digest is cheap, and the actors of a pool that has not yet been torn down may hold
    # every CPU of the cluster (a task that waited for one would never start)
    read = ray.remote(num_cpus=0)(_block_digests)
    parts = ray.get([read.remote(ref, stats_column, labels) for ref in dataset.to_arrow_refs()])
    return [pair for part in parts for pair in part]


def _named(positions: list[int], labels: list[Optional[str]]) -> str:
    shown = ", ".join(f"row {i} ({labels[i]})" for i in positions[:SHOWN])
    return shown + (f" and {len(positions) - SHOWN} more" if len(positions) > SHOWN else "")


def check_every_row_once(before: list[tuple[str, Optional[str]]], dataset, stats_column: Optional[str] = None,
                         stage: str = "scoring") -> None:
    """Raise `LostRows`, naming the rows (position in the input, and label), unless the materialized `dataset`
    holds each row of `before` (`row_digests` of the input, with labels) exactly once."""
    expected = Counter(d for d, _ in before)
    got = Counter(d for d, _ in row_digests(dataset, stats_column))
    if got == expected:
        return
    lost, doubled = expected - got, got - expected
    labels = [label for _, label in before]
    lost_at, doubled_at = [], []
    for i, (d, _) in enumerate(before):
        if lost[d]:
            lost[d] -= 1
            lost_at.append(i)
        elif doubled[d]:
            doubled[d] -= 1
            doubled_at.append(i)
    unknown = sum(doubled.values())  # rows that were not in the input at all
    parts = [f"{stage} on Ray gave back {sum(got.values())} rows for {len(before)}"]
    if lost_at:
        parts.append(f"{len(lost_at)} lost: {_named(lost_at, labels)}")
    if doubled_at:
        parts.append(f"{len(doubled_at)} more than once: {_named(doubled_at, labels)}")
    if unknown:
        parts.append(f"{unknown} that were not in the input")
    raise LostRows("; ".join(parts) + ". A block failed past Ray's retries (or was skipped: "
                   "`DataContext.max_errored_blocks`); nothing is selected or exported from a partial run. "
                   "Run it again: with `use_cache`, the rows already scored are read back from the cache.")
