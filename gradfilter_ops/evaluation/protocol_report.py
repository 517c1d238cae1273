"""The protocol's verdict: wins, ties and losses of each G-SNR reading against each baseline over
(pool x held-out set x budget), the mean held-out losses behind them, each pool's corruption AUROC,
and the default that the rule of `docs/evaluation.md` picks from them.

A comparison pairs the fine-tunes of one seed (same adapter init and data order). A reading *wins*
a cell when the 95 % t-interval over seeds of its loss minus the baseline's lies below zero, *loses*
when it lies above, and ties otherwise (with one seed every cell is a tie).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .downstream import FULL_POOL
from .downstream_report import format_interval, t_interval
from .protocol import BASELINES, GSNR_SELECTIONS, HELDOUT_KINDS

RULE_BASELINES = ("response length", "random")  # the rule counts wins minus losses against these
MEASURES = {"final": lambda curve: curve[-1], "curve": lambda curve: float(np.mean(curve))}


def outcome(differences: Sequence[float]) -> str:
    """`win`, `loss` or `tie` of paired differences (reading minus baseline; lower loss is better)."""
    _, low, high = t_interval(differences)
    if math.isfinite(high) and high < 0:
        return "win"
    if math.isfinite(low) and low > 0:
        return "loss"
    return "tie"


def losses_by_cell(records: Sequence[Mapping[str, Any]], measure: str = "final") -> dict[tuple, dict[int, float]]:
    """(pool, held-out kind, budget, selection) -> {seed: loss}; the full pool's runs under budget `all`."""
    read = MEASURES[measure]
    out: dict[tuple, dict[int, float]] = defaultdict(dict)
    for rec in records:
        for kind, curve in rec["curves"].items():
            out[(rec["pool"], kind, rec["budget"], rec["selection"])][rec["seed"]] = read(curve)
    return out


def compare(cells: Mapping[tuple, Mapping[int, float]], reading: str, baseline: str) -> list[dict[str, Any]]:
    """Every (pool, held-out, budget) where both have runs of the same seeds: the paired difference and its
    outcome. Against the full pool, each budget of the reading is paired with the full pool's runs."""
    rows = []
    for (pool, kind, budget, name), by_seed in sorted(cells.items()):
        if name != reading:
            continue
        other = cells.get((pool, kind, "all" if baseline == FULL_POOL else budget, baseline))
        seeds = sorted(set(by_seed) & set(other or {}))
        if not seeds:
            continue
        diffs = [by_seed[s] - other[s] for s in seeds]
        rows.append({"pool": pool, "heldout": kind, "budget": budget, "seeds": seeds,
                     "difference": t_interval(diffs), "outcome": outcome(diffs)})
    return rows


def tally(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    counts = {"win": 0, "tie": 0, "loss": 0}
    for r in rows:
        counts[r["outcome"]] += 1
    return counts


def verdict(records: Sequence[Mapping[str, Any]], auroc: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """W/T/L of each reading against each baseline (final loss and curve mean), and the rule's pick: the
    reading with the most wins minus losses against length and random on the final loss, among those whose
    mean corruption AUROC over the pools is not below perplexity's; ties go to the shipped default
    (`G-SNR`), then to the order of `GSNR_SELECTIONS` (then the `--reading` ones by name)."""
    present = {r["selection"] for r in records}
    readings = [r for r in GSNR_SELECTIONS if r in present]
    readings += sorted(r for r in present if r.startswith("G-SNR") and r not in readings)  # --reading ones
    baselines = [b for b in (*BASELINES, FULL_POOL) if b in present]
    table: dict[str, dict[str, Any]] = {}
    for measure in MEASURES:
        cells = losses_by_cell(records, measure)
        for reading in readings:
            for baseline in baselines:
                rows = compare(cells, reading, baseline)
                table.setdefault(reading, {}).setdefault(baseline, {})[measure] = {"counts": tally(rows),
                                                                                   "cells": rows}

    def mean_auroc(name: str) -> float:
        # a stratified selection ranks by G-SNR inside its groups: its corruption reading is G-SNR's
        signal = "G-SNR" if name.startswith("G-SNR in ") else name
        values = [a[signal] for a in auroc.values() if signal in a]
        return float(np.mean(values)) if values else float("nan")

    perplexity = mean_auroc("proxy perplexity")
    candidates = []
    for reading in readings:
        counts = [table[reading][b]["final"]["counts"] for b in RULE_BASELINES if b in table[reading]]
        net = sum(c["win"] - c["loss"] for c in counts)
        eligible = not math.isfinite(perplexity) or mean_auroc(reading) >= perplexity
        candidates.append({"reading": reading, "net_vs_length_and_random": net, "mean_auroc": mean_auroc(reading),
                           "eligible": eligible})
    eligible = [c for c in candidates if c["eligible"]]
    pick = max(eligible, key=lambda c: (c["net_vs_length_and_random"], c["reading"] == "G-SNR",
                                        -readings.index(c["reading"])))["reading"] if eligible else None
    return {"table": table, "candidates": candidates, "perplexity_auroc": perplexity, "pick": pick}


def render(meta: Mapping[str, Any], result: Mapping[str, Any], records: Sequence[Mapping[str, Any]],
           pools: Sequence[str]) -> str:
    """report.md: the setting, the verdict (W/T/L), the rule's pick, the loss tables and the AUROCs."""
    recipe, seeds = meta["recipe"], meta["seeds"]
    text = ["# Downstream protocol: does a selection train a better model?", "", f"Command: `{meta['command']}`", "",
            f"Target `{meta['target']}`, {recipe['steps']} optimizer steps of {recipe['batch_size']} rows for every "
            f"selection (LoRA r {recipe['lora_r']}, lr {recipe['learning_rate']:g}); seeds {seeds}. Held-out loss: the "
            "mean over a set's rows of each row's mean response-token cross-entropy (lower is better).", "",
            "| pool | rows (corrupted) | sources | in-distribution | out-of-distribution | good answers |",
            "|---|---|---|---:|---:|---:|"]
    for name in pools:
        p = meta["pools"][name]
        sources = ", ".join(f"{k} {v}" for k, v in p["sources"].items())
        text.append(f"| {name} | {p['rows']} ({p['corrupted']}) | {sources} | "
                    + " | ".join(str(p["heldout"][k]) for k in HELDOUT_KINDS) + " |")
    for name, changes in meta.get("readings", {}).items():
        text.append(f"\n`{name}`: the pools scored again with " + ", ".join(f"`{k}: {v}`" for k, v in changes.items())
                    + " (everything else as above).")
    text += ["", "## Wins / ties / losses", "",
             "Each cell: the G-SNR reading against the baseline over (pool x held-out set x budget); a win is a paired "
             "difference over seeds (reading minus baseline) whose 95 % t-interval lies below zero. Final loss, then "
             "(in brackets) the mean loss over the curve (convergence).", ""]
    table = result["table"]
    baselines = list(next(iter(table.values())).keys()) if table else []
    text.append("| reading | " + " | ".join(baselines) + " |")
    text.append("|---|" + "---|" * len(baselines))
    for reading, row in table.items():
        cells = []
        for b in baselines:
            f, c = row[b]["final"]["counts"], row[b]["curve"]["counts"]
            cells.append(f"{f['win']}/{f['tie']}/{f['loss']} ({c['win']}/{c['tie']}/{c['loss']})")
        text.append(f"| {reading} | " + " | ".join(cells) + " |")
    text += ["", "## The rule's pick", "",
             f"Perplexity's mean corruption AUROC: {result['perplexity_auroc']:.3f}.", "",
             "| reading | wins minus losses vs length and random | mean corruption AUROC | eligible |",
             "|---|---:|---:|---|"]
    for c in result["candidates"]:
        text.append(f"| {c['reading']} | {c['net_vs_length_and_random']:+d} | {c['mean_auroc']:.3f} | "
                    f"{'yes' if c['eligible'] else 'no'} |")
    if result["pick"]:
        text += ["", f"Pick: **{result['pick']}**.", ""]
    else:
        text += ["", "No G-SNR selection is eligible: the default stays as shipped.", ""]

    cells = losses_by_cell(records)
    names = list(dict.fromkeys(r["selection"] for r in records))
    for pool in pools:
        text += [f"## Pool `{pool}`: final held-out loss (mean over seeds)", "",
                 "| held-out | budget | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
        budgets = list(dict.fromkeys(r["budget"] for r in records if r["pool"] == pool and r["budget"] != "all"))
        for kind in HELDOUT_KINDS:
            full = cells.get((pool, kind, "all", FULL_POOL), {})
            for budget in budgets:
                values = []
                for name in names:
                    by_seed = full if name == FULL_POOL else cells.get((pool, kind, budget, name), {})
                    values.append(f"{np.mean(list(by_seed.values())):.3f}" if by_seed else "")
                text.append(f"| {kind} | {budget} | " + " | ".join(values) + " |")
        auroc = meta["pools"][pool].get("auroc", {})
        inside = meta["pools"][pool].get("auroc_in_length_bins", {})
        if auroc:
            text += ["", "Corruption AUROC (clean rows ranked above corrupted ones; in brackets, with every pair "
                     "taken inside one response-length quintile: what the signal adds beyond length): "
                     + ", ".join(f"{k} {v:.3f} ({inside.get(k, float('nan')):.3f})" for k, v in auroc.items()
                                 if not k.startswith("ablation")), ""]
        text.append("")
    text += ["## Every comparison against length and random", "",
             "| reading | baseline | pool | held-out | budget | reading minus baseline, final (95 % CI) | outcome |",
             "|---|---|---|---|---|---|---|"]
    for reading, row in table.items():
        for b in RULE_BASELINES:
            for r in row.get(b, {}).get("final", {}).get("cells", []):
                text.append(f"| {reading} | {b} | {r['pool']} | {r['heldout']} | {r['budget']} | "
                            f"{format_interval(r['difference'], signed=True)} | {r['outcome']} |")
    timings = meta.get("timings", {})
    text += ["", "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), ""]
    return "\n".join(text)


def write_report(out_dir: Path, records: Sequence[Mapping[str, Any]], meta: Mapping[str, Any],
                 pools: Sequence[str]) -> dict[str, Any]:
    """OUT/report.md and OUT/verdict.json (the W/T/L counts, the candidates and the pick); returns the latter."""
    auroc = {name: meta["pools"][name].get("auroc", {}) for name in pools}
    result = verdict(records, auroc)
    (out_dir / "report.md").write_text(render(meta, result, records, pools), encoding="utf-8")
    summary = {"pick": result["pick"], "perplexity_auroc": result["perplexity_auroc"],
               "candidates": result["candidates"],
               "counts": {r: {b: {m: v[m]["counts"] for m in v} for b, v in row.items()}
                          for r, row in result["table"].items()},
               "meta": meta}
    (out_dir / "verdict.json").write_text(json.dumps(summary, indent=1, default=float), encoding="utf-8")
    return summary
