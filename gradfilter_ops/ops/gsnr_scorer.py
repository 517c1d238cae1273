"""The `gsnr_scorer` Data-Juicer op: a thin adapter over `gradfilter_ops.GSNRScorer`."""

from __future__ import annotations

import os
from collections import Counter

from data_juicer.ops.base_op import OPERATORS, Filter
from data_juicer.utils.constant import Fields
from loguru import logger

from .. import fields
from ._options import RANGE_OPTIONS, bind_options, config_options, recipe_options, reject_unknown_options
from ._recipe import check_dropped_files, recipe, restore_prior_stats, scorer_dropped_path
from ._stats import checked_stats
from ..config import GSNRConfig
from ..dropped import write_dropped_rows
from ..provenance import (carries_proof, ensembles_of, fitted_ensemble, proof, scorer_fingerprint,
                          warn_other_ensembles)
from ..records import rows_of
from ..scorer import GSNRScorer, map_num_proc
from ..selection import in_range, range_drops, validate_range
from ..summary import log_summary, summarize

OP_NAME = "gsnr_scorer"
MANIFEST_FILE = "gsnr_manifest.json"


def proven_rows(scorer: GSNRScorer, batch: dict) -> list[bool]:
    """For each row of a batch (a dict of columns), whether its stats hold a score that `scorer`
    wrote for it (`provenance`), by the ensemble it fitted when it has; only those are not scored again."""
    stats = batch.get(Fields.stats)
    if stats is None:
        return [False] * len(next(iter(batch.values()), []))
    fingerprint = scorer_fingerprint(scorer)
    rows = rows_of({key: values for key, values in batch.items() if key != Fields.stats})
    ensemble = fitted_ensemble(scorer)
    return [carries_proof(fingerprint, scorer.config, row, s, ensemble) for row, s in zip(rows, stats)]


def _unproven(scorer: GSNRScorer, dataset) -> int:
    """Rows of `dataset` to score: all of them without a stats column, else those without a proven score."""
    if Fields.stats not in dataset.column_names:
        return len(dataset)
    claimed = sum(bool(s) and s.get(fields.STATUS) is not None for s in dataset[Fields.stats])
    if not claimed:
        return len(dataset)
    proven = sum(sum(proven_rows(scorer, batch)) for batch in dataset.iter(batch_size=1000))
    if proven < claimed:
        logger.warning(f"{OP_NAME}: {claimed - proven} row(s) arrived with G-SNR stats that this scorer did not write "
                       "for them (another proxy or options, or edited or made-up scores); scoring them again.")
    return len(dataset) - proven


def log_range_drops(op_name: str, rows: int, reasons: dict[int, str]) -> None:
    logger.info(f"{op_name}: kept {rows - len(reasons)} of {rows} rows in the gsnr range; dropped by reason: "
                f"{dict(Counter(reasons.values()))}.")


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
        if len(dataset) and len(ensembles) <= 1 and not _unproven(self.scorer, dataset):
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
        reasons = range_drops([s[fields.GSNR] for s in stats], [s[fields.STATUS] for s in stats], self.min_gsnr,
                              self.max_gsnr)
        log_range_drops(OP_NAME, len(stats), reasons)
        dropped = sorted(reasons)
        if dropped and self.work_dir:
            path = write_dropped_rows(scorer_dropped_path(self), scored.select(dropped), [reasons[i] for i in dropped])
            logger.info(f"{OP_NAME}: wrote the dropped rows to {path}.")
        return scored.select([i for i in range(len(stats)) if i not in reasons])

    def compute_stats_batched(self, samples, rank=None):
        all_stats = samples[Fields.stats]
        proven = proven_rows(self.scorer, samples)
        todo = [i for i, ok in enumerate(proven) if not ok]
        group_names = self.scorer.config.group_fields
        if not todo and not group_names and not any(_stale_groups(s, group_names) for s in all_stats):
            return samples
        if todo:
            columns = {key: [values[i] for i in todo] for key, values in samples.items() if key != Fields.stats}
            scores = self.scorer.score_batch(columns, rank=rank)
            fingerprint, ensemble = scorer_fingerprint(self.scorer), fitted_ensemble(self.scorer)
            for j, (i, row) in enumerate(zip(todo, rows_of(columns))):
                record = {name: scores[name][j] for name in fields.SCORE_FIELDS}
                record[fields.ENSEMBLE] = ensemble
                record[fields.PROOF] = proof(fingerprint, self.scorer.config, row, record)
                record.update({name: scores[name][j] for name in group_names})
                # A row of partly scored input has null stats.
                all_stats[i] = {**(all_stats[i] or {}), **record}
        kept = [i for i, ok in enumerate(proven) if ok]
        if group_names and kept:  # a proven score keeps its value; its groups are those of this run's rows
            groups = self.scorer.group_batch({key: [values[i] for i in kept] for key, values in samples.items()
                                              if key != Fields.stats})
            for j, i in enumerate(kept):
                all_stats[i] = {**all_stats[i], **{name: groups[name][j] for name in group_names}}
        # Group stats of an earlier run with other options would be read as this run's: they go.
        samples[Fields.stats] = [{k: v for k, v in s.items() if k not in _stale_groups(s, group_names)} if s else s
                                 for s in all_stats]
        return samples

    def process_batched(self, samples):
        if self.min_gsnr is None and self.max_gsnr is None:
            return [True] * len(samples[Fields.stats])
        return [in_range(stats[fields.GSNR], self.min_gsnr, self.max_gsnr) for stats in samples[Fields.stats]]
