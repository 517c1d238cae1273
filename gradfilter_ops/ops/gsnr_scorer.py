"""The `gsnr_scorer` Data-Juicer op: a thin adapter over `gradfilter_ops.GSNRScorer`."""

from __future__ import annotations

import os

from data_juicer.ops.base_op import OPERATORS, Filter
from data_juicer.utils.constant import Fields
from loguru import logger

from .. import fields
from ._options import RANGE_OPTIONS, bind_options, config_options, recipe_options, reject_unknown_options
from ._recipe import check_dropped_files, recipe, restore_prior_stats, scorer_dropped_path
from ._stats import checked_stats
from ..config import GSNRConfig
from ..dropped import DropSink, verdicts
from ..provenance import (claims_score, ensembles_of, every_row_proven, fitted_ensemble, proven_by, score_unproven,
                          warn_other_ensembles)
from ..scorer import GSNRScorer, map_num_proc
from ..selection import range_drops, validate_range
from ..summary import log_summary, summarize

OP_NAME = "gsnr_scorer"
MANIFEST_FILE = "gsnr_manifest.json"
RANGE_SCOPE = " in the gsnr range"  # what the scorer ops keep, in their drop sink's log


def _inputs(batch: dict) -> dict:
    """A batch's columns without its stats: the fields a row is scored on."""
    return {key: values for key, values in batch.items() if key != Fields.stats}


def _every_row_proven(scorer: GSNRScorer, dataset, ensembles) -> bool:
    """Whether every row of `dataset` carries a score `scorer` proves, all from one ensemble (`provenance`)."""
    if not len(dataset) or Fields.stats not in dataset.column_names:
        return False
    return every_row_proven(OP_NAME, [claims_score(s) for s in dataset[Fields.stats]],
                            lambda: [flag for batch in dataset.iter(batch_size=1000)
                                     for flag in proven_by(scorer, _inputs(batch), batch[Fields.stats])],
                            ensembles)


def _stale_groups(stats, group_names) -> list[str]:
    """The group stats in a row's `stats` that this run's options do not ask for."""
    return [name for name in fields.GROUP_FIELDS if stats and name in stats and name not in group_names]


@OPERATORS.register_module(OP_NAME)
class GSNRScorerOp(Filter):
    """Scores every sample by its Gradient Signal-to-Noise Ratio (GradFiltering, arXiv 2601.13697).

    The op trains an ensemble of LoRA adapters on a small proxy LM over the whole dataset, then
    measures each sample's own LoRA gradient at an early and a late epoch. A sample whose gradient
    shrinks as the ensemble learns it, and on which the members agree at the end, is learnable and
    consistent: it gets a high G-SNR. Follow it with `gsnr_top_k_filter` to keep the best.

    Written into `__dj__stats__` for every sample:
      - `gsnr`: the score, drop / (noise + eps); null unless `gsnr_status` is "ok";
      - `gsnr_early`, `gsnr_late`: mean gradient norm over members at the early and late epoch;
      - `gsnr_drop`: (early - late) / (early + eps), the signal;
      - `gsnr_noise`: variance, std or relvar (variance / mean^2) of the late norms over members, the noise;
      - `gsnr_status`: "ok", or why there is no score: `missing_field`, `invalid_field`,
        `empty_response`, `non_finite_score`, `scoring_error`;
      - `gsnr_truncated`: whether tokens were cut to fit `max_length`;
      - `gsnr_response_tokens`: the response tokens that carried loss;
      - `gsnr_tokens`: all tokens the proxy saw (what `max_tokens` budgets count);
      - `gsnr_ensemble`: the ensemble that scored the sample (scores of two are not comparable);
      - `gsnr_proof`: the digest that proves these stats came from this scorer (below).
      - with `clusters: true`, `gsnr_cluster`: the row's k-means cluster of the frozen proxy's
        mean-pooled last hidden states, for the top-k filter's `diversity: clusters`;
      - with `near_duplicate_threshold`, `gsnr_duplicate_group`: rows at that cosine similarity or
        above (of the pooled states, centred), linked into groups, for `near_duplicates: drop`.
    The group ids are labels over the whole dataset (equal id, same group), computed on every run
    from the pooled states in the score cache; a row without a score has none. The pooled states
    stay in the cache, not in the stats.

    By default every sample is kept; with `min_gsnr` / `max_gsnr` the rows outside the range are
    written with their reason to `<work_dir>/gsnr_scorer_dropped.jsonl`. When every row already
    carries a score from this scorer (same proxy and options, checked by `gsnr_proof`, a digest over
    the scorer's fingerprint, the row, its ensemble and its score) and one ensemble (`gsnr_ensemble`)
    scored them all, nothing is trained or scored. Otherwise an ensemble is trained on all the rows,
    and a row keeps its stats only when they carry a proof from that ensemble: scores of two
    ensembles are never ranked together. With `use_cache`,
    trained ensembles and scores are kept in `cache_dir`: re-running on the same rows does no proxy
    work, and a killed run resumes. A failing batch is retried row by row and a row the proxy fails
    on gets `scoring_error`; nothing is skipped silently. `<work_dir>/gsnr_manifest.json` records
    versions, options, seeds, fingerprints and timings. On Data-Juicer's Ray executor, use
    `ray_gsnr_scorer` (same options).

    Recipe step:

        - gsnr_scorer:
            hf_model: openai-community/gpt2   # or smollm2-135m (offline), a folder or a .gguf
            num_members: 4
            num_epochs: 2
    """

    _accelerator = "cuda"
    _batched_op = True
    _supported_exec_modes = ("default",)  # it trains on the whole dataset first; on Ray: `ray_gsnr_scorer`

    @recipe_options(config_options(GSNRConfig), RANGE_OPTIONS)
    def __init__(self, *args, **kwargs):
        config, args, kwargs = bind_options(type(self).__init__, self, args, kwargs)
        min_gsnr, max_gsnr = config.pop("min_gsnr"), config.pop("max_gsnr")
        validate_range(min_gsnr, max_gsnr)
        # Data-Juicer skips a batch that raises when skip_op_error is on: that would drop rows silently.
        kwargs["skip_op_error"] = False
        kwargs.setdefault("batch_size", 256)  # rows per map batch; bucketed by length inside
        reject_unknown_options(OP_NAME, kwargs, Filter)
        super().__init__(*args, **kwargs)
        self.scorer = GSNRScorer(GSNRConfig(**config))
        self.min_gsnr = min_gsnr
        self.max_gsnr = max_gsnr
        check_dropped_files(recipe())
        self._mapping = False

    def runtime_np(self):
        """Processes; for this op's own stats map on the CPU, one process is this process
        (`scorer.map_num_proc`): twice as fast on 2 cores as the one-thread worker `datasets` forks."""
        procs = super().runtime_np()
        return map_num_proc(procs) if self._mapping and not self.use_cuda() else procs

    def run(self, dataset, *, exporter=None, tracer=None, reduce=True):
        dataset = restore_prior_stats(dataset)
        checked_stats(OP_NAME, dataset)
        ensembles = ensembles_of(dataset[Fields.stats]) if Fields.stats in dataset.column_names else {}
        if _every_row_proven(self.scorer, dataset, ensembles):
            logger.info(f"{OP_NAME}: every row already has a G-SNR score; training nothing (the scores come from "
                        "one ensemble).")
            if self.scorer.config.group_fields:
                self.scorer.fit_groups(dataset)
        else:
            self.scorer.fit(dataset)
            warn_other_ensembles(OP_NAME, ensembles, fitted_ensemble(self.scorer))
        self._mapping = True
        try:
            scored = super().run(dataset, exporter=exporter, tracer=tracer, reduce=False)
        finally:
            self._mapping = False
            self.scorer.release()
        stats = scored[Fields.stats]
        self.scorer.summary = summarize([s[fields.STATUS] for s in stats], [s.get(fields.DROP) for s in stats])
        log_summary(self.scorer.summary)
        if self.work_dir:
            self.scorer.write_manifest(os.path.join(self.work_dir, MANIFEST_FILE))
        # dj-analyze sets `process` to None to compute stats only: then, like its own filters, drop nothing.
        if not reduce or self.process is None or (self.min_gsnr is None and self.max_gsnr is None):
            return scored
        sink = DropSink(OP_NAME, scorer_dropped_path(self), RANGE_SCOPE)
        reasons = range_drops([s[fields.GSNR] for s in stats], [s[fields.STATUS] for s in stats], self.min_gsnr,
                              self.max_gsnr)
        return scored.select(sink.take(verdicts(len(stats), reasons), scored.select))

    def compute_stats_batched(self, samples, rank=None):
        all_stats = samples[Fields.stats]
        columns = _inputs(samples)
        proven = proven_by(self.scorer, columns, all_stats)
        group_names = self.scorer.config.group_fields
        if all(proven) and not group_names and not any(_stale_groups(s, group_names) for s in all_stats):
            return samples
        updates = score_unproven(self.scorer, columns, proven, rank=rank)
        # A row of partly scored input has null stats; group stats of an earlier run with other options would be
        # read as this run's: they go.
        merged = [{**(stats or {}), **update} if update else stats for stats, update in zip(all_stats, updates)]
        samples[Fields.stats] = [{k: v for k, v in s.items() if k not in _stale_groups(s, group_names)} if s else s
                                 for s in merged]
        return samples
