"""The downstream check's outputs: the held-out loss per selection with 95 % t-intervals over seeds,
the paired difference G-SNR minus each other signal (per seed, same init and data order), the curves
as CSV and JSON, and their plot."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

# Student's t, 97.5 % quantile, for 1..30 degrees of freedom (a 95 % two-sided interval); 1.96 beyond.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


def t_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its 95 % t-interval; with one value the interval is (nan, nan)."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, float("nan"), float("nan")
    t = T975[len(x) - 2] if len(x) - 1 <= len(T975) else 1.96
    half = t * float(x.std(ddof=1)) / math.sqrt(len(x))
    return mean, mean - half, mean + half


def paired_summary(records: Sequence[dict[str, Any]], reference: str = "G-SNR") -> list[dict[str, Any]]:
    """One row per (budget, signal): final held-out loss and the mean over the curve (the area under it,
    per step: lower = converges faster), each with its t-interval over seeds; and for every signal but
    `reference`, the paired difference reference minus it per seed (negative: the reference is better)."""
    groups: dict[tuple[str, str], dict[int, Any]] = {}
    for rec in records:
        groups.setdefault((rec["budget"], rec["signal"]), {})[rec["seed"]] = rec
    rows = []
    for (budget, signal), by_seed in groups.items():
        seeds = sorted(by_seed)
        final = [by_seed[s]["result"].heldout_loss[-1] for s in seeds]
        area = [float(np.mean(by_seed[s]["result"].heldout_loss)) for s in seeds]
        first = by_seed[seeds[0]]
        row = {"budget": budget, "signal": signal, "rows": first["rows"], "seeds": seeds,
               "corrupted_share": first.get("corrupted_share"), "rule_dropped": first.get("rule_dropped", 0),
               "initial": float(np.mean([by_seed[s]["result"].heldout_loss[0] for s in seeds])),
               "final": t_interval(final), "curve_mean": t_interval(area), "final_per_seed": final}
        ref = groups.get((budget, reference))
        if ref is not None and signal != reference and set(ref) >= set(seeds):
            row["reference_minus"] = t_interval(
                [ref[s]["result"].heldout_loss[-1] - by_seed[s]["result"].heldout_loss[-1] for s in seeds])
            row["reference_minus_curve"] = t_interval(
                [float(np.mean(ref[s]["result"].heldout_loss)) - float(np.mean(by_seed[s]["result"].heldout_loss))
                 for s in seeds])
        rows.append(row)
    return rows


def format_interval(value: tuple[float, float, float], signed: bool = False) -> str:
    """`mean [low, high]` of a `t_interval` (the mean alone when it has no interval)."""
    mean, lo, hi = value
    fmt = "{:+.4f}" if signed else "{:.4f}"
    if not math.isfinite(lo):
        return fmt.format(mean)
    return f"{fmt.format(mean)} [{fmt.format(lo)}, {fmt.format(hi)}]"


def results_table(rows: Sequence[dict[str, Any]], reference: str = "G-SNR") -> str:
    """The markdown table of `paired_summary`'s rows."""
    head = (f"| budget | signal | rows | corrupted | held-out loss, final (95 % CI) | mean over the curve (95 % CI) "
            f"| {reference} minus it, final | {reference} minus it, curve |\n|---|---|---:|---:|---|---|---|---|")
    lines = [head]
    for r in rows:
        corrupted = "" if r["corrupted_share"] is None else f"{100 * r['corrupted_share']:.0f} %"
        if r.get("rule_dropped"):
            corrupted += f" ({r['rule_dropped']} IFD >= 1 filling)"
        diff = format_interval(r["reference_minus"], True) if "reference_minus" in r else ""
        diff_curve = format_interval(r["reference_minus_curve"], True) if "reference_minus_curve" in r else ""
        lines.append(f"| {r['budget']} | {r['signal']} | {r['rows']} | {corrupted} | {format_interval(r['final'])} | "
                     f"{format_interval(r['curve_mean'])} | {diff} | {diff_curve} |")
    return "\n".join(lines)


def render_downstream_report(command: str, rows: Sequence[dict[str, Any]], meta: dict[str, Any], plotted: bool) -> str:
    """report.md: what was run, and the table."""
    seeds = meta["seeds"]
    text = [
        "# Downstream check: held-out loss after fine-tuning on each selection", "",
        f"Command: `{command}`", "",
        f"Pool: {meta['pool_rows']} rows ({meta['pool_corrupted']} corrupted); held-out: {meta['heldout_rows']} clean "
        f"rows ({meta['heldout_source']}), never corrupted and never selected. Target: `{meta['target']}`; "
        f"{meta['recipe']['steps']} optimizer steps of {meta['recipe']['batch_size']} rows for every selection, "
        f"LoRA r {meta['recipe']['lora_r']}, lr {meta['recipe']['learning_rate']:g}; seeds {seeds}.", "",
        "Held-out loss: the mean over held-out rows of each row's mean response-token cross-entropy (lower is "
        "better). Intervals: 95 % t-intervals over seeds. The difference columns pair the runs of one seed "
        "(same adapter init and data order): negative means G-SNR's selection reached the lower loss.", "",
        results_table(rows), "",
    ]
    if plotted:
        text += ["![held-out loss curves](curves.png)", ""]
    text += ["Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in meta["timings"].items()), ""]
    return "\n".join(text)


def write_curves(out_dir: Path, records: Sequence[dict[str, Any]]) -> None:
    """curves.csv (one line per point) and curves.json (one record per fine-tune)."""
    with open(out_dir / "curves.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["budget", "signal", "seed", "rows", "step", "heldout_loss", "train_loss"])
        for rec in records:
            res = rec["result"]
            for step, loss, train in zip(res.steps, res.heldout_loss, res.train_loss):
                writer.writerow([rec["budget"], rec["signal"], rec["seed"], rec["rows"], step, f"{loss:.6f}",
                                 "" if math.isnan(train) else f"{train:.6f}"])
    payload = [{k: v for k, v in rec.items() if k != "result"} | rec["result"].to_dict() for rec in records]
    (out_dir / "curves.json").write_text(json.dumps(payload, indent=1))


def plot_curves(path: Path, records: Sequence[dict[str, Any]]) -> bool:
    """One panel per budget: the mean held-out loss curve of each signal over seeds (band: min to max
    over seeds), the full pool dashed in every panel. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("downstream: no plot: pip install 'gradfilter-ops[eval]' for matplotlib")
        return False
    budgets = list(dict.fromkeys(r["budget"] for r in records if r["budget"] != "all"))
    signals = list(dict.fromkeys(r["signal"] for r in records))
    fig, axes = plt.subplots(1, max(1, len(budgets)), figsize=(5.5 * max(1, len(budgets)), 4), squeeze=False,
                             sharey=True)
    colors = {s: f"C{i}" for i, s in enumerate(signals)}
    for ax, budget in zip(axes[0], budgets or ["all"]):
        for signal in signals:
            runs = [r for r in records if r["signal"] == signal and r["budget"] in (budget, "all")]
            if not runs:
                continue
            steps = runs[0]["result"].steps
            curves = np.array([r["result"].heldout_loss for r in runs])
            style = "--" if runs[0]["budget"] == "all" else "-"
            ax.plot(steps, curves.mean(axis=0), style, color=colors[signal], label=signal)
            ax.fill_between(steps, curves.min(axis=0), curves.max(axis=0), color=colors[signal], alpha=0.15)
        ax.set_title(f"budget {budget}")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out response loss")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
