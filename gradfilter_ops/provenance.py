"""Proof that a row's G-SNR stats were written by this scorer for this row, and by which ensemble.

The Data-Juicer ops keep a row's existing G-SNR stats only when they carry a `gsnr_proof` that
matches: a digest over the scorer's fingerprint (proxy weights, score options, package version),
the fields the row is scored on, the ensemble that scored it (`gsnr_ensemble`, which names the rows
the ensemble trained on) and the score fields themselves. Stats from another proxy or configuration,
stats moved to another row, and edited or made-up scores do not match, so the row is scored again.
Scores of two ensembles are never kept side by side: once the ops train an ensemble (some row needs
a score), a row proven by another ensemble is scored again by it. It is an integrity check, not a
signature: anyone who runs this package with the same proxy and options can compute a proof.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Mapping, Optional

from loguru import logger

from . import fields
from .cache import digest
from .config import GSNRConfig
from .prompts import source


def _as_exported(value: Any) -> Any:
    # Data-Juicer's JSON export (pandas) keeps 10 decimals of a float; the proof covers what survives it.
    return round(value, 10) if isinstance(value, float) else value


def proof(fingerprint: str, config: GSNRConfig, row: Mapping[str, Any], stats: Mapping[str, Any]) -> str:
    """The `gsnr_proof` of a row's score fields, as written by the scorer with `fingerprint`."""
    return digest({"scorer": fingerprint, "row": source(config, row), "ensemble": stats.get(fields.ENSEMBLE),
                   "stats": {name: _as_exported(stats.get(name)) for name in fields.SCORE_FIELDS}})


def carries_proof(fingerprint: str, config: GSNRConfig, row: Mapping[str, Any],
                  stats: Optional[Mapping[str, Any]], ensemble: Optional[str] = None) -> bool:
    """Whether `stats` hold a score that this scorer wrote for this row (by the ensemble `ensemble`, when given)."""
    return (bool(stats) and stats.get(fields.STATUS) is not None
            and (ensemble is None or stats.get(fields.ENSEMBLE) == ensemble)
            and stats.get(fields.PROOF) == proof(fingerprint, config, row, stats))


def fitted_ensemble(scorer: Any) -> Optional[str]:
    """The ensemble a `GSNRScorer` scores with (`FittedEnsemble.ensemble`); None before `fit`."""
    return scorer.fitted.ensemble if scorer.fitted is not None else None


def ensembles_of(stats: Iterable[Optional[Mapping[str, Any]]]) -> Counter:
    """How many rows carry the scores of each ensemble (`gsnr_ensemble`); rows without one are left out."""
    return Counter(s.get(fields.ENSEMBLE) for s in stats if isinstance(s, Mapping) and s.get(fields.ENSEMBLE))


def scorer_fingerprint(scorer: Any) -> str:
    """The fingerprint of a `GSNRScorer`, loading its proxy (whose weights it covers) if needed."""
    if scorer.fingerprint is None:
        scorer.load()
    return scorer.fingerprint


def warn_other_ensembles(op_name: str, ensembles: Mapping[str, int], ensemble: Optional[str]) -> None:
    """Say how many rows carry another ensemble's scores, which the ensemble just trained scores again."""
    other = sum(n for name, n in ensembles.items() if name != ensemble)
    if other:
        logger.warning(f"{op_name}: {other} row(s) carry scores of another ensemble (trained on other rows); scores "
                       "of two ensembles are not comparable, so the ensemble trained on this dataset's rows scores "
                       "them again.")


class MixedEnsembles(ValueError):
    """A selection met the scores of more than one ensemble, which are not comparable."""


def check_one_ensemble(ensembles: Mapping[str, int], scorer_step: str) -> None:
    """`MixedEnsembles` when the rows to rank carry the scores of more than one ensemble (`ensembles_of`)."""
    if len(ensembles) > 1:
        raise MixedEnsembles(f"{sum(ensembles.values())} rows carry the scores of {len(ensembles)} ensembles "
                             f"(`{fields.ENSEMBLE}`), which are not comparable: put a `{scorer_step}` step before "
                             "this one, so that one ensemble trained on all the rows scores them.")
