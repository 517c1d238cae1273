"""Proof that a row's G-SNR stats were written by this scorer for this row, and by which ensemble.

The Data-Juicer ops keep a row's existing G-SNR stats only when they carry a `gsnr_proof` that
matches: a digest over the scorer's fingerprint (proxy weights, score options, package version),
the fields the row is scored on, the ensemble that scored it (`gsnr_ensemble`, which names the rows
the ensemble trained on) and the score fields themselves. Stats from another proxy or configuration,
stats moved to another row, and edited or made-up scores do not match, so the row is scored again.
Scores of two ensembles are never kept side by side: once the ops train an ensemble (some row needs
a score), a row proven by another ensemble is scored again by it. It is an integrity check, not a
signature: anyone who runs this package with the same proxy and options can compute a proof.

Both adapters, the Data-Juicer ops (a batch of columns) and the Ray blocks (`distributed.blocks`), go
through this module: `proven_rows` checks a batch, `every_row_proven` decides whether anything needs
training (and warns of rows whose stats this scorer did not write), and `score_unproven` scores the
rows that cannot prove their stats and gives each row the fields to write.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from loguru import logger

from . import fields
from .cache import digest
from .config import GSNRConfig
from .prompts import source
from .records import rows_of


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
    return (claims_score(stats)
            and (ensemble is None or stats.get(fields.ENSEMBLE) == ensemble)
            and stats.get(fields.PROOF) == proof(fingerprint, config, row, stats))


def claims_score(stats: Optional[Mapping[str, Any]]) -> bool:
    """Whether a row's stats claim a G-SNR score (they have a `gsnr_status`), proven or not."""
    return bool(stats) and stats.get(fields.STATUS) is not None


def proven_rows(fingerprint: str, config: GSNRConfig, columns: Mapping[str, Sequence[Any]],
                stats: Sequence[Optional[Mapping[str, Any]]], ensemble: Optional[str] = None) -> list[bool]:
    """For each row of a batch (`columns`: the fields a row is scored on, a dict of columns; `stats`: each row's
    stats or None), whether its stats hold a score that the scorer with `fingerprint` wrote for it (by
    `ensemble`, when given)."""
    return [carries_proof(fingerprint, config, row, s, ensemble) for row, s in zip(rows_of(columns), stats)]


def proven_by(scorer: Any, columns: Mapping[str, Sequence[Any]],
              stats: Sequence[Optional[Mapping[str, Any]]]) -> list[bool]:
    """`proven_rows` for a `GSNRScorer`: by the ensemble it fitted, once it has."""
    return proven_rows(scorer_fingerprint(scorer), scorer.config, columns, stats, fitted_ensemble(scorer))


def warn_unproven(op_name: str, count: int) -> None:
    """Say how many rows arrived with G-SNR stats that this scorer did not write for them."""
    if count:
        logger.warning(f"{op_name}: {count} row(s) arrived with G-SNR stats that this scorer did not write for them "
                       "(another proxy or options, or edited or made-up scores); scoring them again.")


def every_row_proven(op_name: str, claims: Sequence[bool], prove: Callable[[], Sequence[bool]],
                     ensembles: Mapping[str, int]) -> bool:
    """Whether every row arrived with a score this scorer proves, all from one ensemble, so that nothing is
    trained. `claims`: whether each row claims a score (`claims_score`); `prove()`: the flags of
    `proven_rows`, asked for only when some row claims a score (it loads the proxy); the rows whose claim
    it does not prove are counted in a warning."""
    if not any(claims):
        return False
    proven = list(prove())
    warn_unproven(op_name, sum(claim and not ok for claim, ok in zip(claims, proven)))
    return all(proven) and len(ensembles) <= 1


def score_unproven(scorer: Any, columns: Mapping[str, Sequence[Any]], proven: Sequence[bool], *,
                   rank: Optional[int] = None, with_proof: bool = True) -> list[dict[str, Any]]:
    """For each row of a batch (`columns`: the fields a row is scored on), the stats to write over its own: a
    row that cannot prove its score (`proven`) is scored (`fields.SCORE_FIELDS` and the group fields the
    options ask for, with `gsnr_ensemble` and `gsnr_proof` when `with_proof`); a proven row keeps its score,
    and gets this run's groups (`config.group_fields`) when the options ask for them, else nothing."""
    group_names = scorer.config.group_fields
    updates: list[dict[str, Any]] = [{} for _ in proven]
    todo = [i for i, ok in enumerate(proven) if not ok]
    if todo:
        batch = {key: [values[i] for i in todo] for key, values in columns.items()}
        scores = scorer.score_batch(batch, rank=rank)
        fingerprint, ensemble = (scorer_fingerprint(scorer), fitted_ensemble(scorer)) if with_proof else (None, None)
        for j, (i, row) in enumerate(zip(todo, rows_of(batch))):
            record = {name: scores[name][j] for name in fields.SCORE_FIELDS}
            if with_proof:
                record[fields.ENSEMBLE] = ensemble
                record[fields.PROOF] = proof(fingerprint, scorer.config, row, record)
            record.update({name: scores[name][j] for name in group_names})
            updates[i] = record
    kept = [i for i, ok in enumerate(proven) if ok]
    if group_names and kept:  # a proven score keeps its value; its groups are those of this run's rows
        groups = scorer.group_batch({key: [values[i] for i in kept] for key, values in columns.items()})
        for j, i in enumerate(kept):
            updates[i] = {name: groups[name][j] for name in group_names}
    return updates


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
