"""The ops for Data-Juicer's Ray executor (`executor_type: ray`): `ray_gsnr_scorer` and
`ray_gsnr_top_k_filter`, thin adapters over `gradfilter_ops.distributed`.

Data-Juicer's Ray executor maps a Filter block by block, but G-SNR trains on the whole dataset
before it scores a row, and the top k are chosen over all rows. So, as Data-Juicer does for its
`ray_*_deduplicator` ops, these are separate ops that take the whole `ray.data.Dataset`. They take
the same options as `gsnr_scorer` and `gsnr_top_k_filter`, and the scorer two more:

- `train_tasks`: Ray tasks the ensemble's members are split over (a GPU each on a GPU cluster);
- `num_proc`: Ray actors scoring the rows (each holds the proxy; default 1).

`num_cpus` / `num_gpus` set each task's and actor's share (default: one GPU each when the cluster has
GPUs, else a node's CPUs shared out among them).
"""

from __future__ import annotations

import os

from data_juicer.ops.base_op import OPERATORS, Pipeline
from data_juicer.utils.constant import Fields

from .. import fields
from ..config import GSNRConfig, require_positive_int
from ..dropped import DropSink, check_writable
from ..scorer import GSNRScorer
from ..selection import range_drops, validate_range
from ._options import (RANGE_OPTIONS, RAY_OPTIONS, TOP_K_OPTIONS, bind_options, config_options, recipe_options,
                       reject_unknown_options)
from ._recipe import check_dropped_files, recipe, scorer_dropped_path
from .gsnr_scorer import MANIFEST_FILE, RANGE_SCOPE
from .gsnr_top_k_filter import check_selection_options, dropped_path_of, group_name, log_groups

SCORER_NAME = "ray_gsnr_scorer"
TOP_K_NAME = "ray_gsnr_top_k_filter"


@OPERATORS.register_module(SCORER_NAME)
class RayGSNRScorerOp(Pipeline):
    """`gsnr_scorer` on Data-Juicer's Ray executor: trains the LoRA ensemble on the whole dataset in
    `train_tasks` Ray tasks, then scores every row with `num_proc` Ray actors, and writes the same
    stats into `__dj__stats__`. Rows that already carry a score keep it; rows outside
    `min_gsnr` / `max_gsnr` go with their reason to `<work_dir>/gsnr_scorer_dropped.jsonl`.

    Recipe step (with `executor_type: ray`):

        - ray_gsnr_scorer:
            hf_model: openai-community/gpt2
            train_tasks: 4      # members on 4 GPUs at once
            num_proc: 8         # 8 scoring actors
    """

    _accelerator = "cuda"
    _supported_exec_modes = ("ray",)

    @recipe_options(config_options(GSNRConfig), RANGE_OPTIONS, RAY_OPTIONS)
    def __init__(self, *args, **kwargs):
        options, args, kwargs = bind_options(type(self).__init__, self, args, kwargs)
        self.train_tasks = require_positive_int("train_tasks", options.pop("train_tasks"))
        self.min_gsnr, self.max_gsnr = options.pop("min_gsnr"), options.pop("max_gsnr")
        validate_range(self.min_gsnr, self.max_gsnr)
        self.actors = require_positive_int("num_proc", kwargs.get("num_proc") or 1)
        self.resources = {name: kwargs.get(name) for name in ("num_cpus", "num_gpus")}
        kwargs.setdefault("batch_size", 256)  # rows per actor call; bucketed by length inside
        reject_unknown_options(SCORER_NAME, kwargs, Pipeline)
        super().__init__(*args, **kwargs)
        config = GSNRConfig(**options)
        if config.member_workers > 1:
            raise ValueError(f"{SCORER_NAME}: members run in Ray tasks (`train_tasks`); leave `member_workers` at 1.")
        self.scorer = GSNRScorer(config)
        check_dropped_files(recipe())

    def run(self, dataset, *, exporter=None, tracer=None):
        from ..distributed import read_fields, score_dataset, split_rows

        scored = score_dataset(self.scorer, dataset, stats_column=Fields.stats, concurrency=self.actors,
                               batch_size=self.batch_size, train_tasks=self.train_tasks, **self.resources)
        self.scorer = scored.scorer
        if self.work_dir:
            self.scorer.write_manifest(os.path.join(self.work_dir, MANIFEST_FILE))
        if self.min_gsnr is None and self.max_gsnr is None:
            return scored.dataset
        sink = DropSink(SCORER_NAME, scorer_dropped_path(self), RANGE_SCOPE)
        values = read_fields(scored.dataset, [fields.GSNR, fields.STATUS], stats_column=Fields.stats)
        reasons = range_drops(values[fields.GSNR], values[fields.STATUS], self.min_gsnr, self.max_gsnr)
        return split_rows(scored.dataset, reasons, sink)


@OPERATORS.register_module(TOP_K_NAME)
class RayGSNRTopKFilter(Pipeline):
    """`gsnr_top_k_filter` on Data-Juicer's Ray executor: the same budgets, groups, reasons and
    dropped-rows file, over the whole `ray.data.Dataset`. Put `ray_gsnr_scorer` before it.

    Recipe step (with `executor_type: ray`):

        - ray_gsnr_top_k_filter:
            top_ratio: 0.1
    """

    _supported_exec_modes = ("ray",)

    @recipe_options(TOP_K_OPTIONS)
    def __init__(self, *args, **kwargs):
        options, args, kwargs = bind_options(type(self).__init__, self, args, kwargs)
        reject_unknown_options(TOP_K_NAME, kwargs, Pipeline)
        super().__init__(*args, **kwargs)
        self.keep_dropped, self.dropped_path = options.pop("keep_dropped"), options.pop("dropped_path")
        check_selection_options(options)
        self.options = options
        check_dropped_files(recipe())
        check_writable(dropped_path_of(self), "dropped_path")

    def run(self, dataset, *, exporter=None, tracer=None):
        from ..distributed import MissingScores, select_dataset

        try:
            selected = select_dataset(dataset, stats_column=Fields.stats, dropped_path=dropped_path_of(self),
                                      step=TOP_K_NAME, **self.options)
        except MissingScores as error:
            raise ValueError(f"{TOP_K_NAME} needs the G-SNR stats of every row: put a `{SCORER_NAME}` step before it "
                             f"in the recipe ({error}).") from error
        log_groups(TOP_K_NAME, selected.selection.keep, selected.groups,
                   group_name(self.options["group_by"], self.options["diversity"]))
        return selected.dataset

