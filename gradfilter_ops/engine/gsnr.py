"""The G-SNR formula (phase 3): normalized gradient drop over late-stage ensemble disagreement.

    a      = ||g||^2 (norm="l2sq") or ||g|| (norm="l2"), per member, snapshot and example, g the
             gradient of the example's mean response-token loss (or, example_loss="sum", of the sum)
    mu_s   = mean over members of a at the early snapshot
    mu_t   = mean over members of a at the late snapshot
    drop   = (mu_s - mu_t) / (mu_s + eps)
    noise  = population variance over members of a at the late snapshot (`var`), its square root
             (`std`), or the variance over mu_t^2 (`relvar`, scale-free)
    gsnr   = drop / (noise + eps)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

# Above this share of negative drops, the drop mostly measures LoRA growth, not learning (docs/method.md).
NEGATIVE_DROP_WARN_SHARE = 0.5


def negative_drop_share(drops: Iterable[Optional[float]]) -> Optional[float]:
    """Share of the finite drops below zero (gradients that grew from the early to the late snapshot);
    None when no drop is finite. Missing (None) and non-finite drops are left out."""
    finite = [d for d in drops if d is not None and math.isfinite(d)]
    return float(sum(d < 0 for d in finite) / len(finite)) if finite else None


@dataclass(frozen=True)
class GSNRParts:
    early: np.ndarray
    late: np.ndarray
    drop: np.ndarray
    noise: np.ndarray
    gsnr: np.ndarray

    @property
    def negative_drop_share(self) -> float:
        """Share of finite drops below zero: gradients that grew from the early to the late epoch."""
        return negative_drop_share(self.drop) or 0.0  # 0 without a finite drop, as the tables print it


def sum_loss_sq_norms(sq_norms: np.ndarray, loss_tokens: Sequence[int]) -> np.ndarray:
    """Squared norms of the summed-loss gradients from those of the mean-loss gradients
    ([..., examples]): the gradient of a sum over n tokens is n times that of their mean."""
    n = np.asarray(loss_tokens, dtype=np.float64)
    return np.asarray(sq_norms, dtype=np.float64) * n * n


def gsnr_from_sq_norms(sq_norms: np.ndarray, *, norm: str = "l2sq", noise: str = "var",
                       eps: float = 1e-8) -> GSNRParts:
    """G-SNR and its parts from squared gradient norms of shape [members, 2 (early, late), examples]."""
    sq_norms = np.asarray(sq_norms, dtype=np.float64)
    if sq_norms.ndim != 3 or sq_norms.shape[1] != 2:
        raise ValueError(f"Expected squared norms of shape [members, 2, examples], got {sq_norms.shape}.")
    values = sq_norms if norm == "l2sq" else np.sqrt(sq_norms)
    early, late = values[:, 0, :], values[:, 1, :]
    mu_s, mu_t = early.mean(axis=0), late.mean(axis=0)
    drop = (mu_s - mu_t) / (mu_s + eps)
    spread = late.var(axis=0)  # population variance (ddof=0)
    if noise not in ("var", "std", "relvar"):
        raise ValueError(f"Unknown noise {noise!r}; expected var, std or relvar.")
    with np.errstate(divide="ignore", invalid="ignore"):
        if noise == "var":
            noise_term = spread
        elif noise == "std":
            noise_term = np.sqrt(spread)
        else:  # relvar, the squared coefficient of variation: unchanged when every norm is rescaled
            noise_term = spread / (mu_t * mu_t)
        score = drop / (noise_term + eps)
    return GSNRParts(early=mu_s, late=mu_t, drop=drop, noise=noise_term, gsnr=score)
