"""Scoring on Ray: a pool of actors maps over the blocks, each with one proxy and the trained
adapters, which it gets through Ray's object store, not through `cache_dir`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from loguru import logger

from .. import fields
from ..config import require_positive_int
from ..provenance import ensembles_of, every_row_proven, fitted_ensemble, scorer_fingerprint, warn_other_ensembles
from ..scorer import GSNRScorer
from ..summary import log_summary, summarize
from ..threads import use_ray_assigned_cpus
from ..timing import timed
from .blocks import add_scores, block_proven, read_fields
from .completeness import check_every_row_once, row_digests
from .resources import MODEL_TASKS, task_resources
from .training import fit_dataset, group_dataset, ray_worker_copy


def on_this_node(scorer: GSNRScorer) -> GSNRScorer:
    """`scorer` with its cache entry under this node's cache folder (`cache_dir`, `$GRADFILTER_CACHE_DIR` or
    `~/.cache`, as this node resolves it), not the one the node that trained it resolved: each node writes
    its score shards to its own cache, which need not be shared."""
    if scorer.fitted is not None and scorer.fitted.cache is not None:
        from ..presets import resolve_cache_dir

        scorer.fitted.cache = scorer.fitted.cache.relocated(resolve_cache_dir(scorer.config.cache_dir))
    return scorer


@dataclass
class Scored:
    dataset: Any  # a materialized `ray.data.Dataset` with the score fields
    scorer: GSNRScorer  # the fitted scorer: counts, summary, timings, `manifest()`


class _ScoreBlocks:
    """A Ray actor of the scoring pool: one proxy, the trained adapters, called once per batch."""

    def __init__(self, scorer: GSNRScorer, stats_column: Optional[str]):
        use_ray_assigned_cpus()
        self.scorer, self.stats_column = on_this_node(scorer), stats_column

    def __call__(self, block):
        return add_scores(block, self.scorer, self.stats_column)


def _block_flags(scorer: GSNRScorer, dataset, stats_column: str) -> list[bool]:
    """`provenance.proven_rows` over every block of a materialized `dataset`, in block order (any ensemble)."""
    import ray

    check = ray.remote(block_proven)
    fingerprint = scorer_fingerprint(scorer)
    return [flag for part in ray.get([check.remote(ref, stats_column, fingerprint, scorer.config)
                                      for ref in dataset.to_arrow_refs()]) for flag in part]


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
    arrived = read_fields(dataset, [fields.STATUS, fields.ENSEMBLE], stats_column)
    statuses, ensembles = arrived[fields.STATUS], ensembles_of({fields.ENSEMBLE: e} for e in arrived[fields.ENSEMBLE])
    if not statuses:
        logger.warning("gsnr: the dataset is empty; nothing to score.")
        return Scored(dataset, scorer)
    exclude = [stats_column] if stats_column else list(fields.SCORE_FIELDS + fields.GROUP_FIELDS)
    claims = [status is not None and bool(stats_column) for status in statuses]
    nothing_to_score = every_row_proven("gsnr", claims, lambda: _block_flags(scorer, dataset, stats_column),
                                        ensembles)
    if nothing_to_score:
        logger.info("gsnr: every row already has a G-SNR score; training nothing.")
        fitted = scorer
        if scorer.config.group_fields:
            fitted = on_this_node(group_dataset(scorer, dataset, exclude=exclude, num_cpus=num_cpus, num_gpus=num_gpus))
    else:
        fitted = on_this_node(fit_dataset(scorer, dataset, train_tasks=train_tasks, exclude=exclude,
                                          num_cpus=num_cpus, num_gpus=num_gpus))
        warn_other_ensembles("gsnr", ensembles, fitted_ensemble(fitted))
    rows = row_digests(dataset, stats_column, labels=True)
    arguments = {"scorer": ray_worker_copy(fitted), "stats_column": stats_column}
    if nothing_to_score:  # Ray tasks write the group fields, in the pool of the tasks that need torch; no actor
        how = dict(fn_kwargs=arguments, runtime_env=MODEL_TASKS)
    else:
        cpus, gpus = task_resources(scorer.config.device, num_cpus, num_gpus, concurrency)
        # One batch in flight per actor: a batch is seconds to minutes of work, so a batch queued behind a busy
        # actor would wait while an idle one (a late-starting one on another node) has none.
        how = dict(fn_constructor_kwargs=arguments, num_cpus=cpus, num_gpus=gpus,
                   compute=ray.data.ActorPoolStrategy(size=concurrency, max_tasks_in_flight_per_actor=1))
    with timed(fitted.timings, "score_s"):
        scored = dataset.map_batches(add_scores if nothing_to_score else _ScoreBlocks, batch_size=batch_size,
                                     batch_format="pyarrow", **how).materialize()
    check_every_row_once(rows, scored, stats_column)
    values = read_fields(scored, [fields.STATUS, fields.DROP], stats_column)
    fitted.summary = summarize(values[fields.STATUS], values[fields.DROP])
    log_summary(fitted.summary)
    return Scored(scored, fitted)

