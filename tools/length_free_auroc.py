"""What each signal of a scored pool adds beyond response length, on the corruption check.

    python tools/length_free_auroc.py docs/eval/downstream_1136rows/scores

Reads a `gsnr-eval` / `gsnr-eval downstream` scores folder (norms.npz, meta.json, scores.jsonl) and
prints, for G-SNR and its parts and the baselines: the AUROC, the AUROC with every pair taken inside
one response-length quintile (`metrics.stratified_auroc`: a pure length picker reads about 0.5 there),
and the Spearman correlation with the response's length on the clean rows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from gradfilter_ops.config import GSNRConfig
from gradfilter_ops.evaluation.corrupt import CLEAN
from gradfilter_ops.evaluation.metrics import auroc, spearman, stratified_auroc
from gradfilter_ops.evaluation.protocol import pool_signals
from gradfilter_ops.selection import length_bins


def main(folder: str) -> None:
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    result = {**dict(np.load(folder / "norms.npz")), "epochs": tuple(meta["epochs"])}
    config = GSNRConfig.from_dict(meta["key"]["config"])
    kinds = [json.loads(line)["eval_corruption"] for line in (folder / "scores.jsonl").read_text().splitlines()]
    clean = np.array([k == CLEAN for k in kinds])
    lengths = result["response_tokens"]
    bins = length_bins(lengths)
    signals = pool_signals(result, config, seed=0)
    print("| signal | AUROC | AUROC inside length quintiles | Spearman with length (clean rows) |")
    print("|---|---:|---:|---:|")
    for name in ("G-SNR", "G-SNR relvar", "G-SNR M2", "late gradient norm", "ablation: normalized drop",
                 "response length", "proxy perplexity", "IFD (Superfiltering)", "random"):
        if name in signals:
            score = np.asarray(signals[name].score, dtype=np.float64)
            print(f"| {name} | {auroc(score, clean):.3f} | {stratified_auroc(score, clean, bins):.3f} | "
                  f"{spearman(score[clean], lengths[clean]):+.2f} |")


if __name__ == "__main__":
    main(sys.argv[1])
