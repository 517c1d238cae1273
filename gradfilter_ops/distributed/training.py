"""Training on Ray: the members split over Ray tasks, each reading every row and training its share
as `GSNRScorer.fit` would, joined on the driver into one fitted scorer."""

from __future__ import annotations

import copy
from typing import Optional, Sequence

from loguru import logger

from ..scorer import GSNRScorer
from ..threads import FORKED_MAP_WORKER, KEEP_THREADS, use_ray_assigned_cpus
from ..timing import Stopwatch
from .resources import model_task_options


def ray_worker_copy(scorer: GSNRScorer) -> GSNRScorer:
    """A copy (without the loaded proxy) to send to Ray workers, which, unlike `datasets`' forked map
    workers, keep their CPUs for torch (`threads.KEEP_THREADS`)."""
    copied = copy.copy(scorer)
    copied.thread_policy = KEEP_THREADS
    return copied


def _rows(refs: list, exclude: Sequence[str]) -> list[dict]:
    import ray

    rows = []
    for block in ray.get(refs):
        rows.extend(block.drop_columns([c for c in exclude if c in block.column_names]).to_pylist())
    return rows


def _fit_share(scorer: GSNRScorer, refs: list, exclude: Sequence[str], members: list[int]) -> GSNRScorer:
    use_ray_assigned_cpus()
    scorer.fit(_rows(refs, exclude), members=members)
    scorer.load_into_memory()
    if scorer.snapshots is not None:  # read back from the cache, it may hold the other tasks' members too
        scorer.snapshots = scorer.snapshots.only(members)
    return ray_worker_copy(scorer)


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
    options = model_task_options(config.device, num_cpus, num_gpus, tasks)
    shares = [[int(m) for m in share] for share in np.array_split(np.arange(config.num_members), tasks)]
    refs = dataset.to_arrow_refs()
    logger.info(f"gsnr: training members {shares} in {tasks} Ray task(s), {options['num_cpus']} CPU(s) and "
                f"{options['num_gpus']} GPU(s) each.")
    fit = ray.remote(_fit_share).options(**options)
    started = Stopwatch()
    fitted = ray.get([fit.remote(ray_worker_copy(scorer), refs, list(exclude), share) for share in shares])
    for part in fitted:
        part.thread_policy = FORKED_MAP_WORKER  # back on the driver: a plain scorer again
    for other in fitted[1:]:
        fitted[0].merge_members(other)
    fitted[0].timings["train_s"] = started.seconds
    return fitted[0]



def _fit_groups(scorer: GSNRScorer, refs: list, exclude: Sequence[str]) -> GSNRScorer:
    use_ray_assigned_cpus()
    scorer.fit_groups(_rows(refs, exclude))
    return ray_worker_copy(scorer)


def group_dataset(scorer: GSNRScorer, dataset, *, exclude: Sequence[str] = (), num_cpus: Optional[float] = None,
                  num_gpus: Optional[float] = None) -> GSNRScorer:
    """`GSNRScorer.fit_groups` over every row of a materialized `dataset`, in one Ray task (which loads the
    proxy): for rows that carry their scores already. Returns the scorer with its `row_groups`."""
    import ray

    options = model_task_options(scorer.config.device, num_cpus, num_gpus, 1)
    grouped = ray.get(ray.remote(_fit_groups).options(**options).remote(
        ray_worker_copy(scorer), dataset.to_arrow_refs(), list(exclude)))
    grouped.thread_policy = FORKED_MAP_WORKER  # back on the driver: a plain scorer again
    return grouped
