"""`roc.png`: ROC curves of every signal, the G-SNR histogram per corruption kind, and early against
late norms. Needs matplotlib (`pip install 'gradfilter-ops[eval]'`); without it the run has no plot."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .corrupt import CLEAN
from .metrics import auroc, keep_scores
from .readings import NormReading, norms_of, reading_scores
from .signals import Signal


def plot_separation(path: Path, signals: Sequence[Signal], kinds: Sequence[str], result: Mapping[str, Any],
                    reading: NormReading) -> bool:
    """Write `path` (PNG); False, with a message, when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("eval: matplotlib is not installed, so no plot (pip install 'gradfilter-ops[eval]')", file=sys.stderr)
        return False
    clean = np.array([k == CLEAN for k in kinds])
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    ax = axes[0]
    for sig in signals:
        s = keep_scores(sig.score)
        order = np.argsort(-s, kind="stable")
        tpr = np.concatenate([[0], np.cumsum(clean[order]) / max(1, clean.sum())])
        fpr = np.concatenate([[0], np.cumsum(~clean[order]) / max(1, (~clean).sum())])
        style = "-" if not sig.name.startswith("ablation") else ":"
        ax.plot(fpr, tpr, style, label=f"{sig.name} ({auroc(sig.score, clean):.2f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
    ax.set_xlabel("corrupted rows kept (false positive rate)")
    ax.set_ylabel("clean rows kept (true positive rate)")
    ax.set_title("ROC: keeping rows by each score")
    ax.legend(fontsize=7, loc="lower right")

    g = reading_scores(norms_of(result), result["epochs"], reading)
    ax = axes[1]
    raw = np.asarray(g["score"], dtype=float)
    finite = np.isfinite(raw)
    scale = float(np.median(np.abs(raw[finite]))) if finite.any() else 1.0
    scale = scale if scale > 0 else 1.0
    values = np.sign(raw) * np.log10(1 + np.abs(raw) / scale)  # heavy tails on both sides: a signed log
    lo, hi = (float(values[finite].min()), float(values[finite].max())) if finite.any() else (0.0, 1.0)
    bins = np.linspace(lo, hi + 1e-9, 40)
    for kind in [CLEAN] + sorted(set(kinds) - {CLEAN}):
        m = np.array([k == kind for k in kinds]) & finite
        ax.hist(np.clip(values[m], lo, hi), bins=bins, histtype="step" if kind != CLEAN else "stepfilled",
                alpha=0.35 if kind == CLEAN else 1.0, density=True, label=f"{kind} ({m.sum()})", lw=1.4)
    ax.set_xlabel(f"sign(G-SNR) * log10(1 + |G-SNR| / {scale:.3g})   (higher = kept first)")
    ax.set_title("G-SNR of clean and corrupted rows")
    ax.legend(fontsize=7)

    ax = axes[2]
    ax.scatter(g["early"][clean], g["late"][clean], s=8, alpha=0.6, label="clean")
    ax.scatter(g["early"][~clean], g["late"][~clean], s=8, alpha=0.8, marker="x", label="corrupted")
    both = np.concatenate([g["early"], g["late"]])
    both = both[np.isfinite(both) & (both > 0)]
    if len(both):
        ax.plot([both.min(), both.max()], [both.min(), both.max()], color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel(f"early mean {reading.norm} gradient norm (epoch {reading.early})")
    ax.set_ylabel(f"late mean norm (epoch {reading.late})")
    ax.set_title("rows above the line: the gradient grew")
    ax.legend(fontsize=7)
    fig.suptitle(f"G-SNR reading: {reading.label()}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
