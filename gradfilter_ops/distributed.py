"""G-SNR on Ray Data, for datasets that one machine cannot score in time. Data-Juicer's Ray executor
runs it through `ray_gsnr_scorer` and `ray_gsnr_top_k_filter`; it works on any `ray.data.Dataset`:

    import ray
    from gradfilter_ops import GSNRScorer
    from gradfilter_ops.distributed import score_dataset, select_dataset

    scored = score_dataset(GSNRScorer(hf_model="openai-community/gpt2"), ray.data.read_json("data.jsonl"),
                           concurrency=8, train_tasks=4)
    kept = select_dataset(scored.dataset, top_ratio=0.1).dataset

- Training: the members are split over `train_tasks` Ray tasks (a GPU each when the cluster has
  GPUs). Each task reads every row, as the method needs, and trains its members as `GSNRScorer.fit`
  would (member m seeds with seed + m), so the ensemble does not depend on the split.
- Scoring: a pool of `concurrency` Ray actors maps over the blocks; each loads the proxy once and
  gets the trained adapters through Ray's object store, not through `cache_dir`.
- Selection: a few numbers per row (score, status, tokens, group) come to the driver, the selection
  is `selection.select` over them in block order, and each block is cut where it lies. Dropped rows
  stream to one JSON-lines file, a block at a time.

Scores go into the columns of `fields.SCORE_FIELDS`, or into a struct column (`stats_column`, which
Data-Juicer calls `__dj__stats__`) with a `gsnr_proof` (`provenance`), where a row whose stats carry
a proof from this scorer keeps its score; other stats are scored again.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from loguru import logger

from . import fields
from .config import require_positive_int
from .dropped import write_dropped_rows
from .provenance import carries_proof, proof, scorer_fingerprint
from .scorer import GSNRScorer, log_summary, summarize
from .selection import Selection, select, validate_budget


class MissingScores(ValueError):
    """A selection met rows without G-SNR stats."""


@dataclass
class Scored:
    dataset: Any  # a materialized `ray.data.Dataset` with the score fields
    scorer: GSNRScorer  # the fitted scorer: counts, summary, timings, `manifest()`


@dataclass
class Selected:
    dataset: Any  # the kept rows, in their order
    selection: Selection  # indices in block order, and the reason of every dropped row
    rows: int  # rows it chose from
    groups: Optional[list[str]]  # every row's `group_by` value, when grouped
    dropped_path: Optional[Path]  # where the dropped rows went, if anywhere


def _arrow_types() -> dict[str, Any]:
    import pyarrow as pa

    types = {name: pa.float64() for name in fields.PARTS}
    types.update({fields.STATUS: pa.string(), fields.TRUNCATED: pa.bool_(), fields.RESPONSE_TOKENS: pa.int64(),
                  fields.TOTAL_TOKENS: pa.int64(), fields.PROOF: pa.string()})
    return types


def _gpus_per_worker(device: str) -> int:
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if device == "cuda" and not gpus:
        raise RuntimeError("`device: cuda` was asked for, but the Ray cluster has no GPU.")
    return 0 if device == "cpu" or not gpus else 1


def _node_cpus() -> int:
    import ray

    return max(int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node["Alive"])


def _resources(device: str, num_cpus: Optional[float], num_gpus: Optional[float], workers: int) -> tuple[float, float]:
    """(CPUs, GPUs) of each of `workers` tasks or actors: as given, else one GPU each when the cluster
    has GPUs (and `device` allows), else a node's CPUs shared out among them."""
    gpus = _gpus_per_worker(device) if num_gpus is None else num_gpus
    cpus = num_cpus if num_cpus is not None else (1 if gpus else max(1, _node_cpus() // workers))
    return cpus, gpus


def _use_assigned_cpus() -> None:
    """Torch threads = the CPUs Ray gave this task or actor."""
    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    if cpus:
        torch.set_num_threads(max(1, int(cpus)))


def _shipped(scorer: GSNRScorer) -> GSNRScorer:
    """A copy (without the loaded proxy) to send to Ray workers, which, unlike `datasets`' forked map
    workers, keep their CPUs for torch."""
    shipped = copy.copy(scorer)
    shipped._one_thread_when_unpickled = False
    return shipped


# -- reading score fields block by block ----------------------------------------------------------
def _block_fields(block, stats_column: Optional[str], names: Sequence[str], group_by: Optional[str] = None):
    """The score fields `names` of one block (None where absent), and its `group_by` values."""
    import pyarrow as pa

    out: dict[str, list] = {}
    if stats_column is None:
        source = {name: block.column(name) for name in names if name in block.column_names}
    elif stats_column in block.column_names:
        stats = block.column(stats_column).combine_chunks()
        present = {stats.type.field(k).name for k in range(stats.type.num_fields)} if pa.types.is_struct(stats.type) \
            else set()
        source = {name: stats.field(name) for name in names if name in present}
    else:
        source = {}
    for name in names:
        out[name] = source[name].to_pylist() if name in source else [None] * block.num_rows
    if group_by is not None:
        if group_by not in block.column_names:
            raise ValueError(f"`group_by: {group_by}` is not a field of the dataset; fields: {block.column_names}.")
        out["group"] = [str(g) for g in block.column(group_by).to_pylist()]
    return out


def _fields_by_block(refs, stats_column: Optional[str], names: Sequence[str], group_by: Optional[str] = None):
    import ray

    read = ray.remote(_block_fields)
    return ray.get([read.remote(ref, stats_column, names, group_by) for ref in refs])


def _joined(parts: Sequence[dict], name: str) -> list:
    return [value for part in parts for value in part[name]]


def read_fields(dataset, names: Sequence[str], stats_column: Optional[str] = None) -> dict[str, list]:
    """The score fields `names` of every row of a materialized `dataset`, in block order (None where absent)."""
    parts = _fields_by_block(dataset.to_arrow_refs(), stats_column, names)
    return {name: _joined(parts, name) for name in names}


# -- training -------------------------------------------------------------------------------------
def _fit_share(scorer: GSNRScorer, refs: list, exclude: Sequence[str], members: list[int]) -> GSNRScorer:
    import ray

    _use_assigned_cpus()
    rows = []
    for block in ray.get(refs):
        rows.extend(block.drop_columns([c for c in exclude if c in block.column_names]).to_pylist())
    scorer.fit(rows, members=members)
    scorer.portable()
    if scorer.snapshots is not None:  # read back from the cache, it may hold the other tasks' members too
        scorer.snapshots = scorer.snapshots.only(members)
    return _shipped(scorer)


def fit_dataset(scorer: GSNRScorer, dataset, *, train_tasks: int = 1, exclude: Sequence[str] = (),
                num_cpus: Optional[float] = None, num_gpus: Optional[float] = None) -> GSNRScorer:
    """Train the ensemble on every row of a materialized `dataset`, its members split over
    `train_tasks` Ray tasks; returns the fitted scorer (adapters in memory, ready to ship)."""
    import numpy as np
    import ray

    config = scorer.config
    if config.member_workers > 1:
        raise ValueError("On Ray the members are split over `train_tasks` Ray tasks; leave member_workers at 1.")
    tasks = max(1, min(train_tasks, config.num_members))
    cpus, gpus = _resources(config.device, num_cpus, num_gpus, tasks)
    shares = [[int(m) for m in share] for share in np.array_split(np.arange(config.num_members), tasks)]
    refs = dataset.to_arrow_refs()
    logger.info(f"gsnr: training members {shares} in {tasks} Ray task(s), {cpus} CPU(s) and {gpus} GPU(s) each.")
    fit = ray.remote(_fit_share).options(num_cpus=cpus, num_gpus=gpus)
    started = time.perf_counter()
    fitted = ray.get([fit.remote(_shipped(scorer), refs, list(exclude), share) for share in shares])
    for part in fitted:
        part._one_thread_when_unpickled = True  # back on the driver: a plain scorer again
    for other in fitted[1:]:
        fitted[0].absorb(other)
    fitted[0].timings["train_s"] = time.perf_counter() - started
    return fitted[0]


# -- scoring --------------------------------------------------------------------------------------
def _inputs(block, stats_column: Optional[str]):
    """`block` without its stats: the fields a row is scored on."""
    return block.drop_columns([c for c in block.column_names if c == stats_column or c in fields.STATS_FIELDS])


def _proven(block, stats_column: str, fingerprint: str, config) -> list[bool]:
    """For each row of `block`, whether its `stats_column` holds a score this scorer wrote for it."""
    existing = _block_fields(block, stats_column, fields.STATS_FIELDS)
    rows = _inputs(block, stats_column).to_pylist()
    return [carries_proof(fingerprint, config, row, {name: existing[name][i] for name in fields.STATS_FIELDS})
            for i, row in enumerate(rows)]


def add_scores(block, scorer: GSNRScorer, stats_column: Optional[str] = None):
    """`block` (a `pyarrow.Table`) with the score fields of its rows; rows whose `stats_column`
    already holds a score this scorer wrote for them (`provenance`) keep it and are not scored again."""
    import pyarrow as pa

    types = _arrow_types()
    n = block.num_rows
    names = fields.STATS_FIELDS if stats_column else fields.SCORE_FIELDS
    existing = _block_fields(block, stats_column, names) if stats_column else None
    proven = _proven(block, stats_column, scorer_fingerprint(scorer), scorer.config) if stats_column else [False] * n
    todo = [i for i in range(n) if not proven[i]]
    values = existing or {name: [None] * n for name in names}
    if todo:
        inputs = _inputs(block, stats_column).take(pa.array(todo))
        scores = scorer.score_batch(inputs.to_pydict())
        rows = inputs.to_pylist()
        for j, i in enumerate(todo):
            record = {name: scores[name][j] for name in fields.SCORE_FIELDS}
            if stats_column:
                record[fields.PROOF] = proof(scorer.fingerprint, scorer.config, rows[j], record)
            for name in names:
                values[name][i] = record[name]
    arrays = {name: pa.array(values[name], type=types[name]) for name in names}
    if stats_column is None:
        for name, array in arrays.items():
            block = (block.set_column(block.column_names.index(name), name, array) if name in block.column_names
                     else block.append_column(name, array))
        return block
    names, children = [], []
    if stats_column in block.column_names:
        stats = block.column(stats_column).combine_chunks()
        if pa.types.is_struct(stats.type):
            for k, child in enumerate(stats.flatten()):
                if stats.type.field(k).name not in arrays:
                    names.append(stats.type.field(k).name)
                    children.append(child)
    struct = pa.StructArray.from_arrays(children + list(arrays.values()), names=names + list(arrays))
    if stats_column in block.column_names:
        return block.set_column(block.column_names.index(stats_column), stats_column, struct)
    return block.append_column(stats_column, struct)


class _ScoreBlocks:
    """A Ray actor of the scoring pool: one proxy, the trained adapters, called once per batch."""

    def __init__(self, scorer: GSNRScorer, stats_column: Optional[str]):
        _use_assigned_cpus()
        self.scorer, self.stats_column = scorer, stats_column

    def __call__(self, block):
        return add_scores(block, self.scorer, self.stats_column)


def _unproven(scorer: GSNRScorer, dataset, stats_column: str) -> int:
    """Rows of a materialized `dataset` whose stats this scorer did not write for them (logged)."""
    import ray

    check = ray.remote(_proven)
    fingerprint = scorer_fingerprint(scorer)
    flags = [flag for part in ray.get([check.remote(ref, stats_column, fingerprint, scorer.config)
                                       for ref in dataset.to_arrow_refs()]) for flag in part]
    unproven = flags.count(False)
    if unproven:
        logger.warning(f"gsnr: {unproven} row(s) arrived with G-SNR stats that this scorer did not write for them "
                       "(another proxy or options, or edited or made-up scores); scoring them again.")
    return unproven


def score_dataset(scorer: GSNRScorer, dataset, *, stats_column: Optional[str] = None, concurrency: int = 1,
                  batch_size: int = 256, train_tasks: int = 1, num_cpus: Optional[float] = None,
                  num_gpus: Optional[float] = None) -> Scored:
    """Fit on every row of `dataset` and score them with a pool of `concurrency` Ray actors.

    With a `stats_column`, rows that already carry a score keep it, and when every row does, nothing
    is trained. `num_cpus` / `num_gpus` are per task and per actor: by default one GPU each when the
    cluster has GPUs (and `device` allows), else a node's CPUs shared out among them.
    """
    import ray

    require_positive_int("concurrency", concurrency)
    require_positive_int("train_tasks", train_tasks)
    dataset = dataset.materialize()
    statuses = read_fields(dataset, [fields.STATUS], stats_column)[fields.STATUS]
    if not statuses:
        logger.warning("gsnr: the dataset is empty; nothing to score.")
        return Scored(dataset, scorer)
    exclude = [stats_column] if stats_column else list(fields.SCORE_FIELDS)
    if stats_column and all(status is not None for status in statuses) and not _unproven(scorer, dataset, stats_column):
        logger.info("gsnr: every row already has a G-SNR score; training nothing.")
        fitted = scorer
    else:
        fitted = fit_dataset(scorer, dataset, train_tasks=train_tasks, exclude=exclude, num_cpus=num_cpus,
                             num_gpus=num_gpus)
    cpus, gpus = _resources(scorer.config.device, num_cpus, num_gpus, concurrency)
    started = time.perf_counter()
    scored = dataset.map_batches(_ScoreBlocks,
                                 fn_constructor_kwargs={"scorer": _shipped(fitted), "stats_column": stats_column},
                                 batch_size=batch_size, batch_format="pyarrow",
                                 compute=ray.data.ActorPoolStrategy(size=concurrency), num_cpus=cpus,
                                 num_gpus=gpus).materialize()
    fitted.timings["score_s"] = time.perf_counter() - started
    values = read_fields(scored, [fields.STATUS, fields.DROP], stats_column)
    fitted.summary = summarize(values[fields.STATUS], values[fields.DROP])
    log_summary(fitted.summary)
    return Scored(scored, fitted)


# -- selection ------------------------------------------------------------------------------------
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

    count = ray.remote(_num_rows)
    offsets = [0]
    for size in ray.get([count.remote(ref) for ref in refs]):
        offsets.append(offsets[-1] + size)
    return offsets


def split_rows(dataset, reasons: dict[int, str], dropped_path: Optional[str | Path] = None):
    """The rows of a materialized `dataset` that `reasons` (row index -> why) leaves out, cut block by
    block; the others, each with its `gsnr_drop_reason`, go to `dropped_path` as JSON lines (one
    block in memory at a time) when it is given. Returns (kept dataset, the path written or None)."""
    import ray

    refs = dataset.to_arrow_refs()
    offsets = _offsets(refs)
    take = ray.remote(_take)
    keep = [i for i in range(offsets[-1]) if i not in reasons]
    kept = ray.data.from_arrow_refs([take.remote(ref, local) for ref, local in zip(refs, _local(keep, offsets))])
    if not dropped_path or not reasons:
        return kept, None
    dropped = sorted(reasons)

    def dropped_rows():  # one block in memory at a time
        for ref, indices in zip(refs, _local(dropped, offsets)):
            if indices:
                yield from ray.get(take.remote(ref, indices)).to_pylist()

    return kept, write_dropped_rows(dropped_path, dropped_rows(), [reasons[i] for i in dropped])


def select_dataset(dataset, *, top_k: Optional[int] = None, top_ratio: Optional[float] = None,
                   max_tokens: Optional[int] = None, stats_column: Optional[str] = None,
                   group_by: Optional[str] = None, group_quota: str = "proportional", min_per_group: int = 0,
                   dropped_path: Optional[str | Path] = None) -> Selected:
    """Keep the best rows by G-SNR under one budget (`selection.select`, ties by block order) and
    write the dropped ones, with their reasons, to `dropped_path` when given."""
    validate_budget(top_k, top_ratio, max_tokens)
    dataset = dataset.materialize()
    names = [fields.GSNR, fields.STATUS, fields.TOTAL_TOKENS]
    parts = _fields_by_block(dataset.to_arrow_refs(), stats_column, names, group_by)
    statuses = _joined(parts, fields.STATUS)
    if not statuses:
        logger.warning("gsnr: the dataset is empty; nothing to select.")
        return Selected(dataset, Selection(keep=[]), 0, None, None)
    if any(status is None for status in statuses):
        raise MissingScores(f"{sum(s is None for s in statuses)} of {len(statuses)} rows have no G-SNR stats "
                            f"(`{fields.STATUS}`); score them before selecting.")
    groups = _joined(parts, "group") if group_by else None
    selection = select(_joined(parts, fields.GSNR), statuses, tokens=[t or 0 for t in _joined(parts, fields.TOTAL_TOKENS)],
                       groups=groups, group_quota=group_quota, min_per_group=min_per_group, top_k=top_k,
                       top_ratio=top_ratio, max_tokens=max_tokens)
    kept, written = split_rows(dataset, selection.reasons, dropped_path)
    return Selected(kept, selection, len(statuses), groups, written)
