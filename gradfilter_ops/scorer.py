"""`GSNRScorer`: G-SNR scores for a Hugging Face `datasets.Dataset`, with no Data-Juicer needed.

    from gradfilter_ops import GSNRConfig, GSNRScorer, select_top_k

    scorer = GSNRScorer(GSNRConfig(hf_model="smollm2-135m"))
    scored = scorer.score(dataset)                  # adds the columns in `fields.SCORE_FIELDS`
    kept = scored.select(select_top_k(scored["gsnr"], top_ratio=0.1))

`fit` trains the ensemble over the whole dataset; `score_batch` is the per-example pass that
`score` runs through `dataset.map(batched=True)` and that the Data-Juicer op calls per batch.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from typing import Any, Iterable, Mapping, Optional, Sequence

from loguru import logger

from . import fields
from .config import GSNRConfig

NEGATIVE_DROP_WARN_SHARE = 0.5


def _rows(batch: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    size = len(next(iter(batch.values()))) if batch else 0
    return [{key: values[i] for key, values in batch.items()} for i in range(size)]


def _finite_or_none(value: float) -> Optional[float]:
    return float(value) if math.isfinite(value) else None


class GSNRScorer:
    """Trains the proxy's LoRA ensemble on a dataset and scores every example by G-SNR."""

    def __init__(self, config: Optional[GSNRConfig] = None, **overrides: Any):
        if config is not None and overrides:
            raise ValueError("Pass either a GSNRConfig or keyword overrides, not both.")
        self.config = config if config is not None else GSNRConfig.from_dict(overrides)
        self.snapshots = None
        self._model = self._tokenizer = self._formatter = self._ensemble = None
        self._device = None

    # -- state that is rebuilt in each worker process instead of being pickled ------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_model=None, _tokenizer=None, _formatter=None, _ensemble=None, _device=None,
                     _pickled_by=os.getpid())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if state.pop("_pickled_by", None) != os.getpid():
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
        from .prompts import PromptFormatter
        from .proxy import load_proxy

        self._device = self._resolve_device(rank)
        model, tokenizer = load_proxy(self.config.hf_model, cache_dir=self.config.cache_dir)
        for param in model.parameters():
            param.requires_grad_(False)
        self._model, self._tokenizer = model.to(self._device), tokenizer
        self._formatter = PromptFormatter(self.config, tokenizer)

    @property
    def pad_id(self) -> int:
        return self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else self._tokenizer.eos_token_id

    def encode(self, rows: Iterable[Mapping[str, Any]]):
        self._load()
        return [self._formatter.encode(row) for row in rows]

    # -- phase 1 --------------------------------------------------------------------------------
    def fit(self, dataset: Any, batch_size: int = 1000) -> None:
        """Train the ensemble on every scoreable row of `dataset` (a `datasets.Dataset` or a list of dicts)."""
        from .ensemble import train_ensemble

        self._load()
        self._release_ensemble()
        batches = dataset.iter(batch_size=batch_size) if hasattr(dataset, "iter") else [_batch_of(list(dataset))]
        encoded = [e for batch in batches for e in self.encode(_rows(batch))]
        counts = Counter(e.status for e in encoded)
        scoreable = [e for e in encoded if e.ok]
        logger.info(f"gsnr: {len(encoded)} rows, {len(scoreable)} scoreable; statuses {dict(counts)}; "
                    f"{sum(e.truncated for e in scoreable)} truncated to max_length={self.config.max_length}.")
        if not scoreable:
            logger.warning("gsnr: no scoreable rows, so no ensemble is trained; every row keeps its reason code.")
            self.snapshots = None
            return
        self.snapshots = train_ensemble(self._model, scoreable, self.config, self.pad_id)

    def _release_ensemble(self) -> None:
        if self._ensemble is not None:
            self._ensemble.close()
            self._ensemble = None

    # -- phases 2 and 3 -------------------------------------------------------------------------
    def score_batch(self, batch: Mapping[str, Sequence[Any]], rank: Optional[int] = None) -> dict[str, list]:
        """Score fields for a batch of rows (a dict of columns), in the order of `fields.SCORE_FIELDS`."""
        from .ensemble import EnsembleScorer
        from .gsnr import gsnr_from_sq_norms

        self._load(rank)
        encoded = self.encode(_rows(batch))
        out: dict[str, list] = {name: [None] * len(encoded) for name in fields.SCORE_FIELDS}
        out[fields.STATUS] = [e.status for e in encoded]
        out[fields.TRUNCATED] = [e.truncated for e in encoded]
        out[fields.NUM_TOKENS] = [e.num_response for e in encoded]
        ok = [i for i, e in enumerate(encoded) if e.ok]
        if not ok:
            return out
        if self.snapshots is None:
            raise RuntimeError("GSNRScorer.score_batch needs a trained ensemble: call fit(dataset) first.")
        if self._ensemble is None:
            self._ensemble = EnsembleScorer(self._model, self.snapshots, self.config, self.pad_id)
        sq_norms = self._ensemble.sq_norms([encoded[i] for i in ok])
        parts = gsnr_from_sq_norms(sq_norms, norm=self.config.norm, noise=self.config.noise, eps=self.config.eps)
        for j, i in enumerate(ok):
            values = {fields.EARLY: parts.early[j], fields.LATE: parts.late[j], fields.DROP: parts.drop[j],
                      fields.NOISE: parts.noise[j], fields.GSNR: parts.gsnr[j]}
            for name, value in values.items():
                out[name][i] = _finite_or_none(value)
            if out[fields.GSNR][i] is None:
                out[fields.STATUS][i] = fields.NON_FINITE
        return out

    def score(self, dataset: Any, batch_size: int = 256, num_proc: Optional[int] = None) -> Any:
        """Fit (unless fitted) and return `dataset` with the score columns added."""
        if len(dataset) == 0:
            logger.warning("gsnr: the dataset is empty; nothing to score.")
            for name in fields.SCORE_FIELDS:
                dataset = dataset.add_column(name, [])
            return dataset
        if self.snapshots is None:
            self.fit(dataset)
        scored = dataset.map(self.score_batch, batched=True, batch_size=batch_size, num_proc=num_proc,
                             desc="gsnr: per-example gradients")
        log_summary(summarize(scored[fields.STATUS], scored[fields.DROP]))
        return scored


def _batch_of(rows: list[dict[str, Any]]) -> dict[str, list]:
    keys = sorted({key for row in rows for key in row})
    return {key: [row.get(key) for row in rows] for key in keys}


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
            "drop mostly measures LoRA growth rather than learning (see docs/method.md). More optimizer "
            "steps before the early snapshot (more epochs, a higher learning_rate) or grad_params: B may help."
        )
