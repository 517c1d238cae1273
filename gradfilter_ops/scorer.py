"""`GSNRScorer`: G-SNR scores for a Hugging Face `datasets.Dataset`, with no Data-Juicer needed.

    from gradfilter_ops import GSNRConfig, GSNRScorer, select_top_k

    scorer = GSNRScorer(GSNRConfig(hf_model="smollm2-135m"))
    scored = scorer.score(dataset)                  # adds the columns in `fields.SCORE_FIELDS`
    kept = scored.select(select_top_k(scored["gsnr"], top_ratio=0.1))

`fit` trains the ensemble over the whole dataset; `score_batch` is the per-example pass that `score` runs through
`dataset.map(batched=True)` and that the Data-Juicer op calls per batch (with `score_mode: online` it looks up the
norms that `fit` recorded while training instead). `fit` also groups the rows when asked (`groups.RowGrouping`),
and `score_batch` writes their groups. With `use_cache` (the default) both go through a `cache.CacheEntry`: a
re-run on the same rows does no proxy work, and a killed run resumes from its finished members and batches.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from loguru import logger

from . import fields
from .cache import CacheEntry, atomic_write_json, digest
from .config import GROUP_OPTIONS, NON_SCORE_OPTIONS, GSNRConfig
from .fitted import FittedEnsemble
from .groups import RowGrouping
from .manifest import own_version, run_manifest
from .records import batch_of, records_row_by_row, rows_of, score_records
from .summary import log_summary, summarize
from .template import check_template_fields
from .threads import FORKED_MAP_WORKER, ThreadPolicy
from .timing import Stopwatch

__all__ = ["GSNRScorer", "map_num_proc"]


class GSNRScorer(RowGrouping):
    """Trains the proxy's LoRA ensemble on a dataset and scores every example by G-SNR."""

    def __init__(self, config: Optional[GSNRConfig] = None, **overrides: Any):
        if config is not None and overrides:
            raise ValueError("Pass either a GSNRConfig or keyword overrides, not both.")
        self.config = config if config is not None else GSNRConfig.from_dict(overrides)
        self.fitted: Optional[FittedEnsemble] = None  # what `fit` returned
        self.timings: dict[str, float] = {}
        self.summary: Optional[dict[str, Any]] = None  # see `summarize`
        self.fingerprint: Optional[str] = None
        self.row_groups = None  # see `groups.RowGrouping`
        self._model = self._tokenizer = self._formatter = self._ensemble = None
        self._device = None
        self.precision = None  # a `precision.Precision`, resolved for the device when the proxy loads
        # Torch threads of a copy unpickled in another process (`threads`): one, for `datasets`'
        # forked map workers; `distributed` ships copies to Ray workers with `KEEP_THREADS`.
        self.thread_policy: ThreadPolicy = FORKED_MAP_WORKER

    @property
    def snapshots(self):
        """The fitted ensemble's trained members (`ensemble.Snapshots`; None before `fit`, or when they
        are in the cache only)."""
        return self.fitted.snapshots if self.fitted is not None else None

    @snapshots.setter
    def snapshots(self, snapshots) -> None:
        if self.fitted is None:
            raise AttributeError("GSNRScorer.snapshots: call fit(dataset) first; it sets the rows they belong to.")
        self.fitted.snapshots = snapshots

    @property
    def cache(self) -> Optional[CacheEntry]:
        """The cache entry of the fitted rows and options (None before `fit`, or without `use_cache`)."""
        return self.fitted.cache if self.fitted is not None else None

    @property
    def counts(self) -> Optional[dict[str, int]]:
        """Rows per status seen by `fit`."""
        return self.fitted.counts if self.fitted is not None else None

    # -- state that is rebuilt in each worker process instead of being pickled ------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_model=None, _tokenizer=None, _formatter=None, _ensemble=None, _device=None,
                     _pickled_by=os.getpid())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.get("thread_policy", FORKED_MAP_WORKER).apply(state.pop("_pickled_by", None))
        self.__dict__.update(state)

    def load(self, rank: Optional[int] = None) -> None:
        """Load the proxy (on the device of `rank`) and compute the scorer's fingerprint, once."""
        if self._model is not None:
            return
        import torch

        from .prompts import PromptFormatter
        from .precision import resolve as resolve_precision
        from .proxy import load_frozen_proxy, proxy_fingerprint, resolve_device

        started = Stopwatch()
        self._device = resolve_device(self.config.device, rank)
        self.precision = resolve_precision(self.config.precision, self._device)
        logger.info(f"gsnr: precision {self.precision.name} on {self._device.type} ({self.precision.reason}).")
        # Loaded on the CPU, where the fingerprint hashes the weights, then moved to the device.
        proxy = load_frozen_proxy(self.config.hf_model, cache_dir=self.config.cache_dir, device=torch.device("cpu"),
                                  max_length=self.config.max_length)
        model, tokenizer = proxy.model, proxy.tokenizer
        if self.fingerprint is None:
            options = {k: v for k, v in self.config.to_dict().items() if k not in NON_SCORE_OPTIONS + GROUP_OPTIONS}
            self.fingerprint = digest({"proxy": proxy_fingerprint(self.config.hf_model, model), "options": options,
                                       "device": self._device.type, "precision": self.precision.name,
                                       "version": own_version()})
        self._model, self._tokenizer = model.to(self._device), tokenizer
        self._formatter = PromptFormatter(self.config, tokenizer)
        self.timings.setdefault("load_s", started.seconds)

    @property
    def pad_id(self) -> int:
        from .proxy import pad_id_of

        return pad_id_of(self._tokenizer)

    def encode(self, rows: Iterable[Mapping[str, Any]]):
        self.load()
        return [self._formatter.encode(row) for row in rows]

    def _key(self, row: Mapping[str, Any]) -> str:
        return digest(self._formatter.source(row))

    # -- phase 1 --------------------------------------------------------------------------------
    def fit(self, dataset: Any, batch_size: int = 1000, members: Optional[Sequence[int]] = None) -> FittedEnsemble:
        """Train the ensemble on every scoreable row of `dataset` (a `datasets.Dataset` or a list of dicts);
        returns the `FittedEnsemble`, also kept as `self.fitted`.

        Rows are sorted by content hash first, so the ensemble does not depend on the row order.
        `members` trains only those members: a share of the ensemble, joined with `merge_members`; the row
        groups (`fit_groups`) are made by the share that holds member 0.
        """
        from .engine import train_ensemble

        self.load()
        self.release()
        encoded, scoreable = self._scoreable(dataset, batch_size)
        keys = [key for key, _ in scoreable]
        counts = dict(Counter(e.status for e in encoded))
        logger.info(f"gsnr: {len(encoded)} rows, {len(scoreable)} scoreable; statuses {counts}; "
                    f"{sum(e.truncated for _, e in scoreable)} truncated to max_length={self.config.max_length}.")
        online_rows = {key: i for i, key in enumerate(keys)} if self.config.score_mode == "online" else {}
        cache = self._cache_entry(keys)
        fitted = self.fitted = FittedEnsemble(self.fingerprint, counts, online_rows, cache,
                                              ensemble=digest({"scorer": self.fingerprint, "rows": digest(keys)}))
        if self.config.group_fields and (members is None or 0 in members):
            self._group(scoreable, cache)
        if not scoreable:
            logger.warning("gsnr: no scoreable rows, so no ensemble is trained; every row keeps its reason code.")
            return fitted
        if cache is not None and cache.has_all(keys):
            logger.info(f"gsnr: all {len(keys)} scoreable rows are in the score cache {cache.dir}; "
                        "nothing to train or score.")
            return fitted
        done = fitted.cached_members()
        if done is not None and done.members:
            logger.info(f"gsnr: reusing trained members {done.members} from {cache.ensemble_dir}.")
        started = Stopwatch()
        fitted.snapshots = train_ensemble(self._model, [e for _, e in scoreable], self.config, self.pad_id, done=done,
                                          on_member=fitted.save_member if cache else None, members=members,
                                          precision=self.precision)
        self.timings["train_s"] = started.seconds
        return fitted

    def _scoreable(self, dataset: Any, batch_size: int = 1000):
        """Every row of `dataset` encoded, and the (key, encoded) pairs of the scoreable ones, sorted by key."""
        batches = dataset.iter(batch_size=batch_size) if hasattr(dataset, "iter") else [batch_of(list(dataset))]
        rows = [row for batch in batches for row in rows_of(batch)]
        check_template_fields(self.config.prompt_template, self.config.response_field, rows)
        encoded = self.encode(rows)
        return encoded, sorted(((self._key(row), e) for row, e in zip(rows, encoded) if e.ok), key=lambda p: p[0])

    def _cache_entry(self, keys: Sequence[str]) -> Optional[CacheEntry]:
        from .presets import resolve_cache_dir

        cache_dir = resolve_cache_dir(self.config.cache_dir) if self.config.use_cache else None
        return CacheEntry(cache_dir, self.fingerprint, digest(list(keys))) if cache_dir else None

    def merge_members(self, other: "GSNRScorer") -> None:
        """Join the members that `other` trained (`fit(..., members=...)`) on the same rows with the same options
        (`FittedEnsemble.merge`), and its row groups when it made them."""
        if self.fitted is None or other.fitted is None:
            raise ValueError("merge_members: both scorers must be fitted first.")
        self.fitted = self.fitted.merge(other.fitted)
        if self.row_groups is None:
            self.row_groups = other.row_groups
        if "train_s" in other.timings:
            self.timings["train_s"] = max(self.timings.get("train_s", 0.0), other.timings["train_s"])

    def load_into_memory(self) -> "GSNRScorer":
        """Read into memory what scoring takes from the cache (the trained adapters, the cached scores), so
        that a pickled copy scores where `cache_dir` cannot be seen (a Ray actor on another node)."""
        if self.fitted is not None:
            self.fitted.load_into_memory()
        return self

    def release(self) -> None:
        """Give back the proxy's adapters and stop `member_workers`' processes; the next batch loads them again."""
        if self._ensemble is not None:
            self._ensemble.close()
            self._ensemble = None

    # -- phases 2 and 3 -------------------------------------------------------------------------
    def score_batch(self, batch: Mapping[str, Sequence[Any]], rank: Optional[int] = None) -> dict[str, list]:
        """Score fields for a batch of rows (a dict of columns): `fields.SCORE_FIELDS`, then `config.group_fields`."""
        self.load(rank)
        rows = rows_of(batch)
        encoded = self.encode(rows)
        out: dict[str, list] = {name: [None] * len(encoded) for name in fields.SCORE_FIELDS}
        out.update(self._groups_of(rows, encoded))
        out[fields.STATUS] = [e.status for e in encoded]
        out[fields.TRUNCATED] = [e.truncated for e in encoded]
        out[fields.RESPONSE_TOKENS] = [e.num_response for e in encoded]
        out[fields.TOTAL_TOKENS] = [len(e.input_ids) for e in encoded]
        ok = [i for i, e in enumerate(encoded) if e.ok]
        if not ok:
            return out
        if self.fitted is None:
            raise RuntimeError("GSNRScorer.score_batch needs a trained ensemble: call fit(dataset) first.")
        keys = [self._key(rows[i]) for i in ok]
        if self.cache is not None and self.cache.has_all(keys):
            records = [self.cache.scores()[key] for key in keys]
        else:
            records = self._compute([encoded[i] for i in ok], keys)
            if self.cache is not None:
                self.cache.add_scores({k: r for k, r in zip(keys, records) if r[fields.STATUS] == fields.OK})
        for i, record in zip(ok, records):
            for name, value in record.items():
                out[name][i] = value
        return out

    def _compute(self, examples, keys: Sequence[str]) -> list[dict[str, Any]]:
        """Score fields of scoreable examples; a row the proxy fails on alone gets `scoring_error`."""
        tokens = [e.num_loss_tokens for e in examples]
        if self.config.score_mode == "online":
            return score_records(self.fitted.online_sq_norms(keys), self.config, tokens)
        try:
            sq_norms = self._sq_norms(examples)
        except Exception as batch_error:  # noqa: BLE001 - isolated per row below, re-raised if every row fails
            logger.warning(f"gsnr: a batch of {len(examples)} rows failed ({batch_error!r}); retrying row by row.")
            return records_row_by_row(
                examples, lambda one: score_records(self._sq_norms(one), self.config, [one[0].num_loss_tokens]),
                batch_error)
        return score_records(sq_norms, self.config, tokens)

    def _sq_norms(self, examples):
        from .engine import ensemble_scorer

        self.fitted.load_snapshots()
        if self._ensemble is None:
            self._ensemble = ensemble_scorer(self._model, self.snapshots, self.config, self.pad_id,
                                            workers=self.config.member_workers, precision=self.precision)
        return self._ensemble.sq_norms(examples)

    def score(self, dataset: Any, batch_size: int = 256, num_proc: Optional[int] = None) -> Any:
        """Fit (unless fitted) and return `dataset` with the score columns added."""
        if len(dataset) == 0:
            logger.warning("gsnr: the dataset is empty; nothing to score.")
            for name in fields.SCORE_FIELDS + self.config.group_fields:
                dataset = dataset.add_column(name, [])
            return dataset
        if self.fitted is None:
            self.fit(dataset)
        started = Stopwatch()
        try:
            scored = dataset.map(self.score_batch, batched=True, batch_size=batch_size,
                                 num_proc=map_num_proc(num_proc), desc="gsnr: per-example gradients")
        finally:
            self.release()
        self.timings["score_s"] = started.seconds
        self.summary = summarize(scored[fields.STATUS], scored[fields.DROP])
        log_summary(self.summary)
        self.write_manifest()
        return scored

    def manifest(self) -> dict[str, Any]:
        """What a run needs to be reproduced: versions, seeds, options, fingerprints, counts, timings."""
        return run_manifest(self)

    def write_manifest(self, path: Optional[str | Path] = None) -> list[Path]:
        """Write the manifest into the cache entry, and to `path` when given; returns where it went."""
        manifest = self.manifest()
        written = [self.cache.write_manifest(manifest)] if self.cache is not None else []
        if path is not None:
            written.append(atomic_write_json(Path(path), manifest))
        return written


def map_num_proc(num_proc: Optional[int]) -> Optional[int]:
    """`num_proc` for a `datasets` map of `score_batch`. `datasets` forks a worker even for `num_proc=1`, and a
    forked worker must run torch on one thread (`thread_policy`), so one process means this process (`None`)."""
    return None if num_proc == 1 else num_proc
