"""The `gsnr_top_k_filter` Data-Juicer op: keep the rows with the highest G-SNR."""

from __future__ import annotations

import os
from collections import Counter
from typing import Optional

from data_juicer.ops.base_op import OPERATORS, Selector
from loguru import logger

from .. import fields
from ._options import TOP_K_OPTIONS, bind_options, recipe_options, reject_unknown_options
from ._recipe import (SUFFIX_FIELD, TOP_K_DROPPED_FILE, TOP_K_STEPS, check_dropped_files, default_dropped_file, recipe,
                      restore_prior_stats, step_index)
from ._stats import checked_stats
from ..dropped import DropSink, check_writable, verdicts
from ..provenance import check_one_ensemble, ensembles_of
from ..selection import select, stat_selection_inputs, validate_options

OP_NAME = "gsnr_top_k_filter"


def check_selection_options(options: dict) -> None:
    """The top-k options of a recipe (`TOP_K_OPTIONS` but the dropped-rows ones), as `select` checks them."""
    validate_options(grouped=options["group_by"] is not None,
                     **{name: value for name, value in options.items() if name != "group_by"})


def log_groups(op_name: str, keep: list[int], groups: Optional[list[str]], group_by: str) -> None:
    """How many rows of each group a grouped selection kept (nothing without groups)."""
    if groups is not None:
        kept = Counter(groups[i] for i in keep)
        logger.info(f"{op_name}: kept per {group_by}: "
                    f"{ {g: f'{kept[g]}/{n}' for g, n in sorted(Counter(groups).items())} }.")


def group_name(group_by: Optional[str], diversity: Optional[str]) -> str:
    """What the groups of a grouped selection are, for the log."""
    return group_by or {"clusters": fields.CLUSTER, "length": "response-length bin"}.get(diversity, "group")


def dropped_path_of(op) -> Optional[str]:
    """Where a top-k op writes its dropped rows: `dropped_path`, else `<work_dir>/gsnr_dropped.jsonl`
    (`gsnr_dropped_step<N>.jsonl` for step N of a recipe with several top-k steps)."""
    if not op.keep_dropped:
        return None
    if op.dropped_path is not None:
        return op.dropped_path
    cfg = recipe()
    name = default_dropped_file(TOP_K_DROPPED_FILE, TOP_K_STEPS, step_index(op, cfg), cfg)
    return os.path.join(op.work_dir, name) if op.work_dir else None


@OPERATORS.register_module(OP_NAME)
class GSNRTopKFilter(Selector):
    """Keeps the samples with the highest `gsnr`, under a budget of rows or tokens.

    It reads the stats that `gsnr_scorer` writes, so put `gsnr_scorer` before it. Set exactly one
    of `top_k` (keeps min(k, N) rows), `top_ratio` (keeps floor(ratio x N) rows, at least one) and
    `max_tokens` (keeps the best rows until their `gsnr_tokens` fill the budget). Ties are broken by
    dataset order; rows without a finite score rank last. Kept rows stay in their original order.

    With `group_by`, the row budget is split into per-group quotas (`proportional` to group size,
    or `equal`), each group at least `min_per_group` rows, so a rare source is never wiped out; the
    seats left over after each group's whole share go to the groups whose next row scores best.
    `diversity: clusters` does the same over the clusters of the proxy's pooled hidden states
    (`gsnr_cluster`, written by `gsnr_scorer` with `clusters: true`), so the selection keeps the
    pool's mix without a source field; `diversity: length` over the response-length quintiles of the
    scored rows (`gsnr_response_tokens`), so it cannot fill the budget with the longest answers.
    `near_duplicates: drop` keeps, of each group of
    near-duplicates (`gsnr_duplicate_group`, from the scorer's `near_duplicate_threshold`), the row
    with the best G-SNR, and drops the others as `near_duplicate` before the budget is filled.

    Every dropped row gets a reason: `below_top_k_cutoff`, `over_token_budget`, `group_quota_full`,
    `near_duplicate`, or its `gsnr_status` when it has no score. The log counts them, and the dropped
    rows are written with a `gsnr_drop_reason` field to `dropped_path` (by default
    `<work_dir>/gsnr_dropped.jsonl`, or `gsnr_dropped_step<N>.jsonl` for step N of a recipe with several
    top-k steps), so every input row ends up either in the output or in that file. A `dropped_path`
    that is the dataset, the export or another step's dropped-rows file is refused when the op is built.
    The output and the dropped rows leave out the loader's `__dj__suffix__`, so that they can be fed
    back in with new rows (see `recipes/gsnr.yaml`'s `text_keys`). On Data-Juicer's Ray executor,
    use `ray_gsnr_top_k_filter` (same options).

    Recipe step:

        - gsnr_top_k_filter:
            top_ratio: 0.1
            group_by: source          # optional; or `diversity: clusters` / `length`
            min_per_group: 5
            near_duplicates: drop     # optional
    """

    @recipe_options(TOP_K_OPTIONS)
    def __init__(self, *args, **kwargs):
        options, args, kwargs = bind_options(type(self).__init__, self, args, kwargs)
        reject_unknown_options(OP_NAME, kwargs, Selector)
        super().__init__(*args, **kwargs)
        self.keep_dropped, self.dropped_path = options.pop("keep_dropped"), options.pop("dropped_path")
        check_selection_options(options)
        self.group_by, self.group_quota = options["group_by"], options["group_quota"]
        self.min_per_group = options["min_per_group"]
        self.stat_options = {name: options[name] for name in ("diversity", "near_duplicates")}
        self.budget = {name: options[name] for name in ("top_k", "top_ratio", "max_tokens")}
        check_dropped_files(recipe())
        check_writable(dropped_path_of(self), "dropped_path")

    def process(self, dataset):
        dataset = restore_prior_stats(dataset)
        if len(dataset) == 0:
            logger.warning(f"{OP_NAME}: the dataset is empty; nothing to select.")
            return dataset
        stats = checked_stats(OP_NAME, dataset)
        if not stats or any(not s or s.get(fields.STATUS) is None for s in stats):
            raise ValueError(
                f"{OP_NAME} needs the G-SNR stats of every row: put a `gsnr_scorer` step before it in the recipe."
            )
        check_one_ensemble(ensembles_of(stats), "gsnr_scorer")
        groups = None
        if self.group_by is not None:
            if self.group_by not in dataset.column_names:
                raise ValueError(f"{OP_NAME}: `group_by: {self.group_by}` is not a field of the dataset; "
                                 f"fields: {dataset.column_names}.")
            groups = [str(g) for g in dataset[self.group_by]]
        statuses = [s[fields.STATUS] for s in stats]
        cluster_groups, duplicate_groups = stat_selection_inputs(
            self.stat_options["diversity"], self.stat_options["near_duplicates"], statuses,
            [s.get(fields.CLUSTER) for s in stats], [s.get(fields.DUPLICATE_GROUP) for s in stats],
            [s.get(fields.RESPONSE_TOKENS) for s in stats])
        groups = cluster_groups if cluster_groups is not None else groups
        sink = DropSink(OP_NAME, dropped_path_of(self))
        selection = select([s[fields.GSNR] for s in stats], statuses,
                           tokens=[s.get(fields.TOTAL_TOKENS) or 0 for s in stats], groups=groups,
                           group_quota=self.group_quota, min_per_group=self.min_per_group,
                           duplicate_groups=duplicate_groups, **self.budget)
        kept = dataset.select(sink.take(verdicts(len(stats), selection.reasons), dataset.select))
        log_groups(OP_NAME, selection.keep, groups, group_name(self.group_by, self.stat_options["diversity"]))
        # The loader's own field: an export that kept it would make the loader drop the rows added to it later.
        return kept.remove_columns([SUFFIX_FIELD]) if SUFFIX_FIELD in kept.column_names else kept
