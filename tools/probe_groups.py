#!/usr/bin/env python
"""How the proxy's pooled hidden states group real rows (the numbers of `docs/method.md`, "Groups of rows").

    python tools/probe_groups.py --per-source 60          # SmolLM2-135M, offline; minutes on 2 CPU cores

It takes the first `--per-source` rows of each file of `tools/data/`, pools the frozen proxy's last
hidden states (`embeddings.pooled_hidden_states`, max_length 256), and prints, raw and centred on
their mean: the spread of the pairwise cosines, the purity of k-means clusters against the source
files (k = 4 and 8), and the near-duplicate groups at a few thresholds, with the first rows'
instructions of each centred group at the first threshold.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-source", type=int, default=60)
    parser.add_argument("--hf-model", default="smollm2-135m")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.95, 0.98])
    args = parser.parse_args()

    from gradfilter_ops.clusters import kmeans_clusters, near_duplicate_groups, normalized_rows
    from gradfilter_ops.config import GSNRConfig
    from gradfilter_ops.embeddings import pooled_hidden_states
    from gradfilter_ops.prompts import PromptFormatter
    from gradfilter_ops.proxy import load_proxy, pad_id_of

    rows, sources = [], []
    for index, path in enumerate(sorted(DATA.glob("*.jsonl"))):
        lines = path.read_text(encoding="utf-8").splitlines()[: args.per_source]
        rows += [json.loads(line) for line in lines]
        sources += [index] * len(lines)
    sources = np.array(sources)
    model, tokenizer = load_proxy(args.hf_model)
    formatter = PromptFormatter(GSNRConfig(hf_model=args.hf_model, max_length=256), tokenizer)
    vectors = pooled_hidden_states(model, [formatter.encode(row) for row in rows], pad_id_of(tokenizer))
    for name, x in (("raw", vectors), ("centred", vectors - vectors.mean(axis=0))):
        unit = normalized_rows(x)
        cosines = (unit @ unit.T)[np.triu_indices(len(x), 1)]
        print(f"{name}: {len(x)} rows, pairwise cosine 1st / 50th / 99th percentile "
              f"{np.percentile(cosines, [1, 50, 99]).round(3).tolist()}")
        for k in (4, 8):
            labels = kmeans_clusters(x, k, seed=0)
            purity = sum(np.bincount(sources[labels == c]).max() for c in set(labels.tolist())) / len(x)
            print(f"  k-means k={k}: purity against the source files {purity:.3f}")
        for threshold in args.thresholds:
            sizes = Counter(near_duplicate_groups(x, threshold).tolist())
            multi = [g for g, n in sizes.items() if n > 1]
            print(f"  cosine >= {threshold}: {sum(sizes[g] for g in multi)} rows in {len(multi)} near-duplicate groups")
        if name == "centred":
            groups = near_duplicate_groups(x, args.thresholds[0])
            for g, n in Counter(groups.tolist()).items():
                if n > 1:
                    print("   ", [rows[i]["instruction"][:40] for i in np.flatnonzero(groups == g)])


if __name__ == "__main__":
    main()
