"""Phase 4: rank by G-SNR and keep the top k."""

from __future__ import annotations

import math
from typing import Optional, Sequence

from loguru import logger


def validate_k_or_ratio(top_k: Optional[int], top_ratio: Optional[float]) -> None:
    """Exactly one of `top_k` (a positive integer) and `top_ratio` (in (0, 1])."""
    if (top_k is None) == (top_ratio is None):
        raise ValueError(f"Set exactly one of `top_k` and `top_ratio`, got top_k={top_k!r}, top_ratio={top_ratio!r}.")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"`top_k` must be a positive integer, got {top_k!r}.")
    if top_ratio is not None and not (isinstance(top_ratio, (int, float)) and 0 < top_ratio <= 1):
        raise ValueError(f"`top_ratio` must be in (0, 1], got {top_ratio!r}.")


def num_to_keep(n: int, top_k: Optional[int] = None, top_ratio: Optional[float] = None) -> int:
    """How many of `n` rows to keep: `top_k` capped at n, or floor(top_ratio * n), at least 1 when n > 0."""
    validate_k_or_ratio(top_k, top_ratio)
    if n == 0:
        return 0
    if top_k is not None:
        if top_k > n:
            logger.warning(f"top_k={top_k} is larger than the {n} rows; keeping all of them.")
        return min(top_k, n)
    return max(1, math.floor(top_ratio * n + 1e-9))  # 1e-9: 0.29 * 100 must give 29, not 28


def _is_finite(score: object) -> bool:
    return isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score)


def rank(scores: Sequence[Optional[float]]) -> list[int]:
    """Indices from best to worst: higher score first, ties by input order; missing or non-finite last."""
    return sorted(range(len(scores)), key=lambda i: (0, -scores[i], i) if _is_finite(scores[i]) else (1, 0.0, i))


def select_top_k(scores: Sequence[Optional[float]], top_k: Optional[int] = None,
                 top_ratio: Optional[float] = None) -> list[int]:
    """Indices of the rows to keep, in their original order."""
    keep = num_to_keep(len(scores), top_k, top_ratio)
    return sorted(rank(scores)[:keep])
