"""Proof that a row's G-SNR stats were written by this scorer for this row.

The Data-Juicer ops keep a row's existing G-SNR stats only when they carry a `gsnr_proof` that
matches: a digest over the scorer's fingerprint (proxy weights, score options, package version),
the fields the row is scored on, and the score fields themselves. Stats from another proxy or
configuration, stats moved to another row, and edited or made-up scores do not match, so the row
is scored again. It is an integrity check, not a signature: anyone who runs this package with the
same proxy and options can compute a proof.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from . import fields
from .cache import digest
from .config import GSNRConfig
from .prompts import source


def _as_exported(value: Any) -> Any:
    # Data-Juicer's JSON export (pandas) keeps 10 decimals of a float; the proof covers what survives it.
    return round(value, 10) if isinstance(value, float) else value


def proof(fingerprint: str, config: GSNRConfig, row: Mapping[str, Any], stats: Mapping[str, Any]) -> str:
    """The `gsnr_proof` of a row's score fields, as written by the scorer with `fingerprint`."""
    return digest({"scorer": fingerprint, "row": source(config, row),
                   "stats": {name: _as_exported(stats.get(name)) for name in fields.SCORE_FIELDS}})


def carries_proof(fingerprint: str, config: GSNRConfig, row: Mapping[str, Any],
                  stats: Optional[Mapping[str, Any]]) -> bool:
    """Whether `stats` hold a score that this scorer wrote for this row."""
    return (bool(stats) and stats.get(fields.STATUS) is not None
            and stats.get(fields.PROOF) == proof(fingerprint, config, row, stats))


def scorer_fingerprint(scorer: Any) -> str:
    """The fingerprint of a `GSNRScorer`, loading its proxy (whose weights it covers) if needed."""
    if scorer.fingerprint is None:
        scorer.load()
    return scorer.fingerprint
