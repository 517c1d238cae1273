"""How a keep-score (higher = keep) separates clean from corrupted rows: AUROC with bootstrap
intervals, and the share of corrupted rows among the top k kept."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..selection import rank, rows_for_ratio
from .corrupt import CLEAN


def keep_scores(scores: Sequence[float]) -> np.ndarray:
    """Scores as floats, higher = keep; NaN, None and -inf all rank last (as one tie)."""
    s = np.array([np.nan if v is None else v for v in scores], dtype=np.float64)
    return np.where(np.isfinite(s) | (s == np.inf), s, -np.inf)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (like scipy.stats.rankdata)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return (starts + (counts + 1) / 2.0)[inverse]


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation over the pairs where both are finite (nan with fewer than 3)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return float("nan")
    ra, rb = average_ranks(a[ok]), average_ranks(b[ok])
    return float(np.corrcoef(ra, rb)[0, 1])


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """P(score of a random positive row > that of a random negative one), ties counted as 1/2.

    Higher score = keep; here positive = clean. Missing or non-finite scores rank last.
    """
    s = keep_scores(scores)
    pos = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(s)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def stratified_auroc(scores: Sequence[float], positive: Sequence[bool], groups: Sequence[int]) -> float:
    """The AUROC with every pair taken inside one group: over all (positive, negative) pairs of the same
    group, the share the score orders right (ties 1/2). With response-length bins as the groups, a
    score that only follows length reads about 0.5: what is left is what it adds beyond length."""
    s, pos, groups = keep_scores(scores), np.asarray(positive, dtype=bool), np.asarray(groups)
    right = pairs = 0.0
    for g in np.unique(groups):
        inside = groups == g
        n_pos, n_neg = int(pos[inside].sum()), int((~pos[inside]).sum())
        if n_pos and n_neg:
            right += auroc(s[inside], pos[inside]) * n_pos * n_neg
            pairs += n_pos * n_neg
    return float(right / pairs) if pairs else float("nan")


def bootstrap_auroc(scores: Sequence[float], positive: Sequence[bool], rng: np.random.Generator,
                    rounds: int = 1000) -> tuple[float, float]:
    """2.5 % and 97.5 % quantiles of the AUROC over `rounds` resamples of the rows."""
    s, pos = keep_scores(scores), np.asarray(positive, dtype=bool)
    values = []
    for _ in range(rounds):
        idx = rng.integers(0, len(s), len(s))
        value = auroc(s[idx], pos[idx])
        if math.isfinite(value):
            values.append(value)
    if not values:
        return float("nan"), float("nan")
    return float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))


def paired_auroc_difference(first: Sequence[float], second: Sequence[float], positive: Sequence[bool],
                            rng: np.random.Generator, rounds: int = 1000) -> tuple[float, float, float]:
    """AUROC(first) - AUROC(second) on the same rows, with a paired bootstrap 95 % interval."""
    a, b, pos = keep_scores(first), keep_scores(second), np.asarray(positive, dtype=bool)
    diffs = []
    for _ in range(rounds):
        idx = rng.integers(0, len(a), len(a))
        d = auroc(a[idx], pos[idx]) - auroc(b[idx], pos[idx])
        if math.isfinite(d):
            diffs.append(d)
    point = auroc(a, pos) - auroc(b, pos)
    if not diffs:
        return point, float("nan"), float("nan")
    return point, float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975))


def kept_indices(scores: Sequence[float], ratio: float, drop_non_finite: bool = False) -> np.ndarray:
    """The floor(ratio * N) (at least 1) rows with the highest scores, in row order: `selection.rank`'s
    order (ties by row order) with +inf first and missing or other non-finite scores last; with
    `drop_non_finite` those are never kept, so fewer rows may come back (Superfiltering drops IFD >= 1
    before it keeps the top k)."""

    s = keep_scores(scores)
    order = rank(np.where(s == np.inf, np.finfo(np.float64).max, s).tolist())
    if drop_non_finite:
        order = [i for i in order if np.isfinite(s[i])]
    return np.array(sorted(order[:rows_for_ratio(len(s), ratio)]), dtype=int)


def contamination(scores: Sequence[float], corrupted: Sequence[bool], ratio: float,
                  drop_non_finite: bool = False) -> float:
    """Share of corrupted rows among the kept top `ratio`."""
    kept = kept_indices(scores, ratio, drop_non_finite)
    return float(np.asarray(corrupted, dtype=bool)[kept].mean()) if len(kept) else float("nan")


def kind_survival(scores: Sequence[float], kinds: Sequence[str], ratio: float,
                  drop_non_finite: bool = False) -> dict[str, float]:
    """For each corruption kind, the share of its rows that make it into the kept top `ratio`."""
    kept = set(kept_indices(scores, ratio, drop_non_finite).tolist())
    out = {}
    for kind in sorted(set(kinds) - {CLEAN}):
        rows = [i for i, k in enumerate(kinds) if k == kind]
        out[kind] = sum(i in kept for i in rows) / len(rows)
    return out
