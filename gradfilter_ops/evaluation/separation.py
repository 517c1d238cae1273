"""How well each signal separates the clean rows from the corrupted ones, written out: the tables of
`report.md`, `readings.csv`, `scores.jsonl` and the ROC plot. `gsnr-eval` writes them for its rows;
`gsnr-eval downstream` for its pool (in `OUT/scores`), so one scoring run answers both checks."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..selection import rows_for_ratio
from .corrupt import CLEAN
from .plot import plot_separation
from .readings import NormReading, evaluate_readings, norms_of, reading_grid, reading_scores
from .signals import Signal, evaluate_signal
from .tables import main_table, render_corruption_report


def write_separation(rows: list[dict], result: Mapping[str, Any], config, signals: Sequence[Signal], base: NormReading,
                     out_dir: Path, command: str, timings: Mapping[str, float], *, seed: int, bootstrap: int,
                     corrupt_fraction: float, quiet: bool) -> dict[str, Any]:
    """Evaluate `signals` (G-SNR, read with `base`, first) and every reading of G-SNR on `rows`, whose
    `eval_corruption` names what was done to each; write the outputs into `out_dir`, return the summary."""
    kinds = [r["eval_corruption"] for r in rows]
    rng = np.random.default_rng(seed)
    evals = [evaluate_signal(s, kinds, rng, bootstrap, reference=signals[0].score) for s in signals]
    for ev in evals:
        ev["want10"], ev["want30"] = rows_for_ratio(len(rows), 0.10), rows_for_ratio(len(rows), 0.30)
    grid_rows = evaluate_readings(result, kinds, reading_grid(config, result))
    with open(out_dir / "readings.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(grid_rows[0]))
        writer.writeheader()
        writer.writerows(grid_rows)

    with open(out_dir / "scores.jsonl", "w", encoding="utf-8") as f:
        g = reading_scores(norms_of(result), result["epochs"], base)
        for i, row in enumerate(rows):
            rec = {k: row.get(k) for k in ("eval_index", "eval_corruption", "id", config.instruction_field,
                                           config.input_field, config.output_field)}
            rec.update({s.name: (float(s.score[i]) if np.isfinite(s.score[i]) else None) for s in signals})
            rec.update({f"gsnr_{k}": float(g[k][i]) for k in ("early", "late", "drop", "noise")})
            if "ifd" in result:
                rec["ifd"] = float(result["ifd"][i])
            rec["proxy_loss"] = float(result["proxy_loss"][i])
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")

    plotted = plot_separation(out_dir / "roc.png", signals, kinds, result, base)
    report = render_corruption_report(command, config, rows, kinds, signals, evals, result, base, grid_rows,
                                      dict(timings), corrupt_fraction, plotted)
    (out_dir / "report.md").write_text(report)
    if not quiet:
        print(main_table(signals, evals, corrupt_fraction))
        print(f"\nwrote {out_dir / 'report.md'}")
    return {
        "rows": len(rows), "corrupted": int(sum(k != CLEAN for k in kinds)),
        "signals": {s.name: {k: v for k, v in ev.items() if k not in ("want10", "want30")}
                    for s, ev in zip(signals, evals)},
        "negative_drop_share": signals[0].negative_drop_share,
        "snapshot_loss": norms_of(result)["loss"].mean(axis=(0, 2)).tolist(),
        "timings": dict(timings),
    }
