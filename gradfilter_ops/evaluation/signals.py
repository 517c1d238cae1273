"""The compared signals (G-SNR, the baselines and the paper's ablations) as keep-scores of one run,
and each one's separation of clean from corrupted rows."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .baselines import superfiltering_keep_score
from .corrupt import CLEAN
from .metrics import (auroc, bootstrap_auroc, contamination, kept_indices, kind_survival,
                      paired_auroc_difference, stratified_auroc)
from .readings import NormReading, config_reading, norms_of, reading_scores


@dataclasses.dataclass
class Signal:
    """One compared score of every row, with how it was made (`note`) for the tables."""

    name: str
    score: np.ndarray  # higher = keep
    note: str
    drop_non_finite: bool = False
    negative_drop_share: Optional[float] = None


def signals_for(result: Mapping[str, Any], config, seed: int, reading: Optional[NormReading] = None) -> list[Signal]:
    """The compared signals; G-SNR and its ablations use `reading` (default: the config's own)."""
    norms, epochs = norms_of(result), result["epochs"]
    reading = reading or config_reading(config)
    n = len(result["proxy_loss"])
    g = reading_scores(norms, epochs, reading)
    out = [
        Signal("G-SNR", g["score"], f"this package, {reading.label()}",
               negative_drop_share=g["negative_drop_share"]),
        Signal("random", np.random.default_rng([seed, 7]).random(n), "uniform, seeded"),
        Signal("response length", result["response_tokens"], "proxy tokens of the response, longer kept"),
        Signal("proxy perplexity", -result["proxy_loss"], "mean response-token loss of the bare proxy, lower kept"),
    ]
    if "ifd" in result:
        out.append(Signal("IFD (Superfiltering)", superfiltering_keep_score(result["ifd"]),
                          "Data-Juicer instruction_following_difficulty_filter; IFD >= 1 dropped, highest kept",
                          drop_non_finite=True))
    for signal, name, note in (
        ("neg_late_norm", "ablation: gradient norm", "late mean gradient norm, smaller kept"),
        ("raw_drop", "ablation: raw drop", "early - late mean norm, higher kept"),
        ("drop", "ablation: normalized drop", "(early - late) / early, no variance term"),
    ):
        out.append(Signal(name, reading_scores(norms, epochs, dataclasses.replace(reading, signal=signal))["score"],
                          note))
    return out


def evaluate_signal(signal: Signal, kinds: Sequence[str], rng: Optional[np.random.Generator],
                    bootstrap: int = 1000, reference: Optional[np.ndarray] = None,
                    length_bins: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """AUROC (+ bootstrap interval, + paired difference to `reference`, the G-SNR score), top-k
    contamination, and the per-kind views; with `length_bins`, also the AUROC inside them (what the
    signal adds beyond response length)."""
    clean = np.array([k == CLEAN for k in kinds])
    row = {
        "auroc": auroc(signal.score, clean),
        "top10": contamination(signal.score, ~clean, 0.10, signal.drop_non_finite),
        "top30": contamination(signal.score, ~clean, 0.30, signal.drop_non_finite),
        "kept10": len(kept_indices(signal.score, 0.10, signal.drop_non_finite)),
        "kept30": len(kept_indices(signal.score, 0.30, signal.drop_non_finite)),
        "per_kind_auroc": {},
        "per_kind_survival30": kind_survival(signal.score, kinds, 0.30, signal.drop_non_finite),
    }
    if length_bins is not None:
        row["auroc_in_length_bins"] = stratified_auroc(signal.score, clean, length_bins)
    if rng is not None and bootstrap:
        row["ci"] = bootstrap_auroc(signal.score, clean, rng, bootstrap)
        if reference is not None and reference is not signal.score:
            row["gsnr_minus"] = paired_auroc_difference(reference, signal.score, clean, rng, bootstrap)
    for kind in sorted(set(kinds) - {CLEAN}):
        mask = np.array([k in (CLEAN, kind) for k in kinds])
        row["per_kind_auroc"][kind] = auroc(np.asarray(signal.score)[mask], clean[mask])
    return row
