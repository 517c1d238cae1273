"""`GSNRScorer`: G-SNR scores for a Hugging Face `datasets.Dataset`, with no Data-Juicer needed.

    from gradfilter_ops import GSNRConfig, GSNRScorer, select_top_k

    scorer = GSNRScorer(GSNRConfig(hf_model="smollm2-135m"))
    scored = scorer.score(dataset)                  # adds the columns in `fields.SCORE_FIELDS`
    kept = scored.select(select_top_k(scored["gsnr"], top_ratio=0.1))

`fit` trains the ensemble over the whole dataset; `score_batch` is the per-example pass that
`score` runs through `dataset.map(batched=True)` and that the Data-Juicer op calls per batch (with
`score_mode: online` it looks up the norms that `fit` recorded while training instead). With
`use_cache` (the default) both go through a `cache.CacheEntry`: a re-run on the same rows does no
proxy work, and a killed run resumes from its finished members and batches.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from loguru import logger

from . import fields
from .cache import CacheEntry, atomic_write_json, digest
from .config import NON_SCORE_OPTIONS, GSNRConfig

NEGATIVE_DROP_WARN_SHARE = 0.5


def _rows(batch: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    size = len(next(iter(batch.values()))) if batch else 0
    return [{key: values[i] for key, values in batch.items()} for i in range(size)]


def _batch_of(rows: list[dict[str, Any]]) -> dict[str, list]:
    keys = sorted({key for row in rows for key in row})
    return {key: [row.get(key) for row in rows] for key in keys}


def _finite_or_none(value: float) -> Optional[float]:
    return float(value) if math.isfinite(value) else None


class GSNRScorer:
    """Trains the proxy's LoRA ensemble on a dataset and scores every example by G-SNR."""

    def __init__(self, config: Optional[GSNRConfig] = None, **overrides: Any):
        if config is not None and overrides:
            raise ValueError("Pass either a GSNRConfig or keyword overrides, not both.")
        self.config = config if config is not None else GSNRConfig.from_dict(overrides)
        self.snapshots = None
        self.cache: Optional[CacheEntry] = None
        self.timings: dict[str, float] = {}
        self.counts: Optional[dict[str, int]] = None  # rows per status seen by `fit`
        self.summary: Optional[dict[str, Any]] = None  # see `summarize`
        self.fingerprint: Optional[str] = None
        self._fitted = False
        self._online_rows: dict[str, int] = {}  # score_mode online: row key -> column of the online norms
        self._model = self._tokenizer = self._formatter = self._ensemble = None
        self._device = None
        self.precision = None  # a `precision.Precision`, resolved for the device when the proxy loads
        # A copy unpickled in another process is a worker of `datasets`' forked map, which must run
        # torch on one thread; `distributed` ships copies to Ray workers, which keep their CPUs.
        self._one_thread_when_unpickled = True

    # -- state that is rebuilt in each worker process instead of being pickled ------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_model=None, _tokenizer=None, _formatter=None, _ensemble=None, _device=None,
                     _pickled_by=os.getpid())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if state.pop("_pickled_by", None) != os.getpid() and state.get("_one_thread_when_unpickled", True):
            import torch

            # A worker of a multi-process map: parallelism comes from the processes, and a forked
            # child that enters the parent's OpenMP thread pool deadlocks.
            torch.set_num_threads(1)
        self.__dict__.update(state)

    def _resolve_device(self, rank: Optional[int] = None):
        import torch

        wanted = self.config.device
        if wanted == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("`device: cuda` was asked for, but torch sees no CUDA device.")
        if wanted == "cpu" or not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", (rank or 0) % torch.cuda.device_count())

    def _load(self, rank: Optional[int] = None) -> None:
        if self._model is not None:
            return
        from . import __version__
        from .prompts import PromptFormatter
        from .precision import resolve as resolve_precision
        from .proxy import check_proxy_limits, load_proxy, proxy_fingerprint

        started = time.perf_counter()
        self._device = self._resolve_device(rank)
        self.precision = resolve_precision(self.config.precision, self._device)
        logger.info(f"gsnr: precision {self.precision.name} on {self._device.type} ({self.precision.reason}).")
        model, tokenizer = load_proxy(self.config.hf_model, cache_dir=self.config.cache_dir)
        check_proxy_limits(model, tokenizer, self.config.max_length)
        for param in model.parameters():
            param.requires_grad_(False)
        if self.fingerprint is None:
            options = {k: v for k, v in self.config.to_dict().items() if k not in NON_SCORE_OPTIONS}
            self.fingerprint = digest({"proxy": proxy_fingerprint(self.config.hf_model, model), "options": options,
                                       "device": self._device.type, "precision": self.precision.name,
                                       "version": __version__})
        self._model, self._tokenizer = model.to(self._device), tokenizer
        self._formatter = PromptFormatter(self.config, tokenizer)
        self.timings.setdefault("load_s", time.perf_counter() - started)

    @property
    def pad_id(self) -> int:
        return self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else self._tokenizer.eos_token_id

    def encode(self, rows: Iterable[Mapping[str, Any]]):
        self._load()
        return [self._formatter.encode(row) for row in rows]

    def _key(self, row: Mapping[str, Any]) -> str:
        return digest(self._formatter.source(row))

    # -- phase 1 --------------------------------------------------------------------------------
    def fit(self, dataset: Any, batch_size: int = 1000, members: Optional[Sequence[int]] = None) -> None:
        """Train the ensemble on every scoreable row of `dataset` (a `datasets.Dataset` or a list of dicts).

        Rows are sorted by content hash first, so the ensemble does not depend on the row order.
        `members` trains only those members: a share of the ensemble, joined with `absorb`.
        """
        from .ensemble import MANIFEST, Snapshots, train_ensemble
        from .proxy import resolve_cache_dir

        self._load()
        self.release()
        batches = dataset.iter(batch_size=batch_size) if hasattr(dataset, "iter") else [_batch_of(list(dataset))]
        rows = [row for batch in batches for row in _rows(batch)]
        encoded = self.encode(rows)
        scoreable = sorted(((self._key(row), e) for row, e in zip(rows, encoded) if e.ok), key=lambda pair: pair[0])
        keys = [key for key, _ in scoreable]
        self.counts = dict(Counter(e.status for e in encoded))
        logger.info(f"gsnr: {len(encoded)} rows, {len(scoreable)} scoreable; statuses {self.counts}; "
                    f"{sum(e.truncated for _, e in scoreable)} truncated to max_length={self.config.max_length}.")
        self.snapshots, self._fitted = None, True
        self._online_rows = {key: i for i, key in enumerate(keys)} if self.config.score_mode == "online" else {}
        self.cache = (CacheEntry(resolve_cache_dir(self.config.cache_dir), self.fingerprint, digest(keys))
                      if self.config.use_cache else None)
        if not scoreable:
            logger.warning("gsnr: no scoreable rows, so no ensemble is trained; every row keeps its reason code.")
            return
        if self.cache is not None and self.cache.has_all(keys):
            logger.info(f"gsnr: all {len(keys)} scoreable rows are in the score cache {self.cache.dir}; "
                        "nothing to train or score.")
            return
        done = None
        if self.cache is not None and (self.cache.ensemble_dir / MANIFEST).exists():
            done = Snapshots.load(self.cache.ensemble_dir)
            if done.members:
                logger.info(f"gsnr: reusing trained members {done.members} from {self.cache.ensemble_dir}.")
        save = (lambda snapshots, member: snapshots.save_member(self.cache.ensemble_dir, member)) if self.cache else None
        started = time.perf_counter()
        self.snapshots = train_ensemble(self._model, [e for _, e in scoreable], self.config, self.pad_id,
                                        done=done, on_member=save, members=members)
        self.timings["train_s"] = time.perf_counter() - started

    def absorb(self, other: "GSNRScorer") -> None:
        """Join the members that `other` trained (`fit(..., members=...)`) on the same rows with the same options."""
        from .ensemble import Snapshots

        if (other.fingerprint, other.counts, other._online_rows) != (self.fingerprint, self.counts, self._online_rows):
            raise ValueError("absorb: the other scorer was fitted with other options, another proxy or other rows.")
        if other.snapshots is not None:
            self.snapshots = (other.snapshots if self.snapshots is None
                              else Snapshots.merge([self.snapshots, other.snapshots]))
        if "train_s" in other.timings:
            self.timings["train_s"] = max(self.timings.get("train_s", 0.0), other.timings["train_s"])

    def portable(self) -> "GSNRScorer":
        """Read into memory what scoring takes from the cache (the trained adapters, the cached scores), so
        that a pickled copy scores where `cache_dir` cannot be seen (a Ray actor on another node)."""
        from .ensemble import MANIFEST

        if self.cache is not None:
            self.cache.scores()
            if self.snapshots is None and (self.cache.ensemble_dir / MANIFEST).exists():
                self._snapshots()
        return self

    def release(self) -> None:
        """Give back the proxy's adapters and stop `member_workers`' processes; the next batch loads them again."""
        if self._ensemble is not None:
            self._ensemble.close()
            self._ensemble = None

    # -- phases 2 and 3 -------------------------------------------------------------------------
    def score_batch(self, batch: Mapping[str, Sequence[Any]], rank: Optional[int] = None) -> dict[str, list]:
        """Score fields for a batch of rows (a dict of columns), in the order of `fields.SCORE_FIELDS`."""
        self._load(rank)
        rows = _rows(batch)
        encoded = self.encode(rows)
        out: dict[str, list] = {name: [None] * len(encoded) for name in fields.SCORE_FIELDS}
        out[fields.STATUS] = [e.status for e in encoded]
        out[fields.TRUNCATED] = [e.truncated for e in encoded]
        out[fields.RESPONSE_TOKENS] = [e.num_response for e in encoded]
        out[fields.TOTAL_TOKENS] = [len(e.input_ids) for e in encoded]
        ok = [i for i, e in enumerate(encoded) if e.ok]
        if not ok:
            return out
        if not self._fitted:
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
        if self.config.score_mode == "online":
            return self._records(self._online_sq_norms(keys))
        try:
            sq_norms = self._sq_norms(examples)
        except Exception as batch_error:  # noqa: BLE001 - isolated per row below, re-raised if every row fails
            logger.warning(f"gsnr: a batch of {len(examples)} rows failed ({batch_error!r}); retrying row by row.")
            return self._compute_one_by_one(examples, batch_error)
        return self._records(sq_norms)

    def _compute_one_by_one(self, examples, batch_error: Exception) -> list[dict[str, Any]]:
        records = []
        for example in examples:
            try:
                records.extend(self._records(self._sq_norms([example])))
            except Exception as error:  # noqa: BLE001 - recorded as the row's reason and logged
                logger.error(f"gsnr: scoring a row failed: {error!r}")
                records.append({**{name: None for name in fields.PARTS}, fields.STATUS: fields.SCORING_ERROR})
        if all(r[fields.STATUS] == fields.SCORING_ERROR for r in records):
            raise batch_error
        return records

    def _snapshots(self):
        from .ensemble import Snapshots

        if self.snapshots is None and self.cache is not None:
            self.snapshots = Snapshots.load(self.cache.ensemble_dir)
        return self.snapshots

    def _online_sq_norms(self, keys: Sequence[str]):
        unseen = sum(key not in self._online_rows for key in keys)
        if unseen:
            raise ValueError(f"score_mode: online scores only the rows `fit` trained on, and {unseen} row(s) of this "
                             "batch were not among them; fit on the dataset you score, or use score_mode: snapshot.")
        return self._snapshots().online_sq_norms()[:, :, [self._online_rows[key] for key in keys]]

    def _sq_norms(self, examples):
        from .ensemble import EnsembleScorer

        self._snapshots()
        if self._ensemble is None:
            self._ensemble = EnsembleScorer(self._model, self.snapshots, self.config, self.pad_id,
                                            workers=self.config.member_workers)
        return self._ensemble.sq_norms(examples)

    def _records(self, sq_norms) -> list[dict[str, Any]]:
        from .gsnr import gsnr_from_sq_norms

        parts = gsnr_from_sq_norms(sq_norms, norm=self.config.norm, noise=self.config.noise, eps=self.config.eps)
        records = []
        for j in range(sq_norms.shape[2]):
            values = {fields.EARLY: parts.early[j], fields.LATE: parts.late[j], fields.DROP: parts.drop[j],
                      fields.NOISE: parts.noise[j], fields.GSNR: parts.gsnr[j]}
            record = {name: _finite_or_none(value) for name, value in values.items()}
            record[fields.STATUS] = fields.OK if record[fields.GSNR] is not None else fields.NON_FINITE
            records.append(record)
        return records

    def score(self, dataset: Any, batch_size: int = 256, num_proc: Optional[int] = None) -> Any:
        """Fit (unless fitted) and return `dataset` with the score columns added."""
        if len(dataset) == 0:
            logger.warning("gsnr: the dataset is empty; nothing to score.")
            for name in fields.SCORE_FIELDS:
                dataset = dataset.add_column(name, [])
            return dataset
        if not self._fitted:
            self.fit(dataset)
        started = time.perf_counter()
        try:
            scored = dataset.map(self.score_batch, batched=True, batch_size=batch_size,
                                 num_proc=map_num_proc(num_proc), desc="gsnr: per-example gradients")
        finally:
            self.release()
        self.timings["score_s"] = time.perf_counter() - started
        self.summary = summarize(scored[fields.STATUS], scored[fields.DROP])
        log_summary(self.summary)
        self.write_manifest()
        return scored

    def manifest(self) -> dict[str, Any]:
        """What a run needs to be reproduced: versions, seeds, options, fingerprints, counts, timings."""
        from importlib.metadata import PackageNotFoundError, version

        versions = {"python": platform.python_version()}
        for package in ("gradfilter-ops", "torch", "transformers", "peft", "datasets", "py-data-juicer"):
            try:
                versions[package] = version(package)
            except PackageNotFoundError:
                versions[package] = None
        return {
            "versions": versions,
            "config": self.config.to_dict(),
            "precision": self.precision.to_dict() if self.precision is not None else None,
            "member_seeds": [self.config.seed + m for m in range(self.config.num_members)],
            "scorer_fingerprint": self.fingerprint,
            "cache_entry": str(self.cache.dir) if self.cache else None,
            "rows": self.counts,
            "summary": self.summary,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
        }

    def write_manifest(self, path: Optional[str | Path] = None) -> list[Path]:
        """Write the manifest into the cache entry, and to `path` when given; returns where it went."""
        manifest = self.manifest()
        written = [self.cache.write_manifest(manifest)] if self.cache is not None else []
        if path is not None:
            written.append(atomic_write_json(Path(path), manifest))
        return written


def map_num_proc(num_proc: Optional[int]) -> Optional[int]:
    """`num_proc` for a `datasets` map of `score_batch`. `datasets` forks a worker even for
    `num_proc=1`, and a forked worker must run torch on one thread (`__setstate__`), so one process
    means this process (`None`), where torch keeps every thread."""
    return None if num_proc == 1 else num_proc


def summarize(statuses: Sequence[str], drops: Sequence[Optional[float]]) -> dict[str, Any]:
    """Counts per reason code and the share of scored rows whose gradient grew (negative drop)."""
    finite = [d for d in drops if d is not None and math.isfinite(d)]
    return {
        "rows": len(statuses),
        "statuses": dict(Counter(statuses)),
        "negative_drop_share": (sum(d < 0 for d in finite) / len(finite)) if finite else None,
    }


def log_summary(summary: Mapping[str, Any]) -> None:
    share = summary["negative_drop_share"]
    logger.info(f"gsnr: scored {summary['rows']} rows; statuses {summary['statuses']}; "
                f"negative drop share {share if share is None else round(share, 3)}.")
    if share is not None and share > NEGATIVE_DROP_WARN_SHARE:
        logger.warning(
            f"gsnr: the gradient norm grew from the early to the late epoch for {share:.0%} of rows, so the "
            "drop mostly measures LoRA growth rather than learning (see docs/method.md). With lora_init: "
            "zero_b, switch to lora_init: random (the default); more rows per optimizer step also help."
        )
