"""`report.md` of an evaluation run, and the side-by-side table of earlier runs (`--compare`)."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from ..engine.gsnr import negative_drop_share
from .corrupt import CLEAN
from .metrics import spearman
from ..config import EXAMPLE_LOSSES, NOISES, NORMS
from .readings import EPS_GRID, NormReading, norms_of, reading_scores
from .signals import Signal


def fmt_number(x: Optional[float], digits: int = 3) -> str:
    """`x` with `digits` decimals; `n/a` for None or a non-finite value."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def fmt_share(x: Optional[float]) -> str:
    """A share as a whole percentage (`37 %`); `n/a` for None or a non-finite value."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{100 * x:.0f} %"


def main_table(signals: Sequence[Signal], evals: Sequence[Mapping[str, Any]], fraction: float) -> str:
    lines = ["| signal | AUROC (95 % CI) | G-SNR's AUROC minus this (paired 95 % CI) | corrupted in top 10 % | "
             "corrupted in top 30 % | rows with negative drop | how |",
             "|---|---|---|---|---|---|---|"]
    for sig, ev in zip(signals, evals):
        ci = ev.get("ci")
        auc = fmt_number(ev["auroc"]) + (f" ({fmt_number(ci[0], 2)}-{fmt_number(ci[1], 2)})" if ci else "")
        t10 = fmt_share(ev["top10"]) + ("" if ev["kept10"] == ev.get("want10", ev["kept10"]) else f" of {ev['kept10']}")
        t30 = fmt_share(ev["top30"]) + ("" if ev["kept30"] == ev.get("want30", ev["kept30"]) else f" of {ev['kept30']}")
        neg = fmt_share(sig.negative_drop_share) if sig.negative_drop_share is not None else ""
        diff = ev.get("gsnr_minus")
        versus = f"{diff[0]:+.3f} ({diff[1]:+.2f} to {diff[2]:+.2f})" if diff else ""
        lines.append(f"| {sig.name} | {auc} | {versus} | {t10} | {t30} | {neg} | {sig.note} |")
    lines.append(f"| *chance* | 0.500 | | {fmt_share(fraction)} | {fmt_share(fraction)} | | |")
    return "\n".join(lines)


def kind_table(signals: Sequence[Signal], evals: Sequence[Mapping[str, Any]], key: str, kinds: Sequence[str],
               fmt: Callable[[float], str]) -> str:
    present = sorted(set(kinds) - {CLEAN})
    counts = {k: sum(x == k for x in kinds) for k in present}
    lines = ["| signal | " + " | ".join(f"{k} ({counts[k]})" for k in present) + " |",
             "|---|" + "---|" * len(present)]
    for sig, ev in zip(signals, evals):
        lines.append(f"| {sig.name} | " + " | ".join(fmt(ev[key][k]) for k in present) + " |")
    return "\n".join(lines)


def parts_table(result: Mapping[str, Any], reading: NormReading, kinds: Sequence[str]) -> str:
    """Median G-SNR parts per corruption kind: where do the kinds sit on the signal and the noise?"""
    g = reading_scores(norms_of(result), result["epochs"], reading)
    loss = norms_of(result)["loss"][: reading.members]
    epochs = list(result["epochs"])
    ls = loss[:, epochs.index(reading.early)].mean(axis=0)
    lt = loss[:, epochs.index(reading.late)].mean(axis=0)
    lines = ["| rows | n | early norm | late norm | drop | noise | G-SNR | loss early | loss late | "
             "proxy loss | share with negative drop |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind in [CLEAN] + sorted(set(kinds) - {CLEAN}):
        m = np.array([k == kind for k in kinds])
        med = lambda a: float(np.median(np.asarray(a)[m]))  # noqa: E731
        lines.append(f"| {kind} | {int(m.sum())} | {med(g['early']):.3g} | {med(g['late']):.3g} | "
                     f"{med(g['drop']):.3f} | "
                     f"{med(g['noise']):.3g} | {med(g['gsnr']):.3g} | {med(ls):.3f} | {med(lt):.3f} | "
                     f"{med(result['proxy_loss']):.3f} | {fmt_share(negative_drop_share(g['drop'][m]))} |")
    return "\n".join(lines)


def length_table(result: Mapping[str, Any], readings: Sequence[NormReading], kinds: Sequence[str]) -> str:
    """How each part of a reading follows the response's length: Spearman's rho with the number of
    response tokens, over the clean rows (a score that only follows length is a length filter)."""
    clean = np.array([k == CLEAN for k in kinds])
    tokens = np.asarray(result["response_tokens"])[clean]
    lines = ["| reading | early norm | late norm | drop | noise | G-SNR |", "|---|---|---|---|---|---|"]
    for reading in readings:
        g = reading_scores(norms_of(result), result["epochs"], reading)
        rhos = [spearman(np.asarray(g[k])[clean], tokens) for k in ("early", "late", "drop", "noise", "gsnr")]
        lines.append(f"| {reading.label()} | " + " | ".join(f"{r:+.2f}" for r in rhos) + " |")
    return "\n".join(lines)


def readings_markdown(rows: Sequence[Mapping[str, Any]], base: NormReading, epochs: Sequence[int]) -> str:
    """One-factor-at-a-time views of the grid around the config's reading, plus the best readings."""
    def pick(**fixed):
        want = {**dataclasses.asdict(base), **fixed}
        return next((r for r in rows if all(r[k] == v for k, v in want.items() if k in r)), None)

    def line(label, r):
        if r is None:
            return None
        return (f"| {label} | {fmt_number(r['auroc'])} | {fmt_share(r['top10'])} | {fmt_share(r['top30'])} | "
                f"{fmt_share(r['negative_drop_share'])} |")

    header = ["| reading | AUROC | corrupted in top 10 % | corrupted in top 30 % | rows with negative drop |",
              "|---|---|---|---|---|"]
    out = []
    sections = [
        ("grad_params (A+B, B only, W = the adapted frozen weight, experimental; online = A+B read off the "
         "training steps, `score_mode: online`)",
         [(f"`{p}`", pick(params=p)) for p in ("AB", "B", "W", "online")]),
        ("snapshots (early_epoch, late_epoch)",
         [(f"s={s}, t={t}", pick(early=s, late=t)) for s, t in itertools.combinations(epochs, 2)]),
        ("num_members", [(f"M={m}", pick(members=m)) for m in (2, 4, 8)]),
        ("norm", [(f"`{n}`", pick(norm=n)) for n in NORMS]),
        ("noise", [(f"`{n}`", pick(noise=n)) for n in NOISES]),
        ("eps", [(f"{e:g}", pick(eps=e)) for e in EPS_GRID]),
        ("example_loss (the per-example loss whose gradient is read)",
         [(f"`{x}`", pick(example_loss=x)) for x in EXAMPLE_LOSSES]),
        ("signal (paper ablations; loss drop = the ensemble's own loss drop, a reference)",
         [(s, pick(signal=s, norm="l2sq", noise="var", eps=1e-8, **({"params": "AB"} if s == "loss_drop" else {})))
          for s in ("gsnr", "drop", "raw_drop", "neg_late_norm", "loss_drop")]),
    ]
    for title, items in sections:
        body = [line(label, r) for label, r in items]
        body = [b for b in body if b]
        if len(body) > 1:
            out += [f"**{title}** (everything else as `{base.label()}`)", "", *header, *body, ""]
    best = sorted((r for r in rows if r["signal"] == "gsnr"), key=lambda r: -r["auroc"])[:8]
    out += ["**the 8 G-SNR readings with the highest AUROC in this run**", "",
            "| reading | AUROC | corrupted in top 10 % | corrupted in top 30 % | rows with negative drop |",
            "|---|---|---|---|---|"]
    for r in best:
        label = NormReading(**{k: r[k] for k in NormReading.__dataclass_fields__}).label()
        out.append(line(label, r))
    return "\n".join(out)


def compare_runs(folders: Sequence[str], readings: Sequence[str]) -> str:
    """One markdown table of chosen readings (`readings.csv` labels, or `*` for the config's own G-SNR)
    across earlier runs: how the training configuration changes the drop and the separation."""
    lines = ["| run | training | reading | AUROC | corrupted in top 10 % | corrupted in top 30 % | "
             "rows with negative drop |", "|---|---|---|---|---|---|---|"]
    for folder in folders:
        meta = json.loads((Path(folder) / "meta.json").read_text())
        cfg = meta["key"]["config"]
        training = (f"lr {cfg['learning_rate']:g}, batch {cfg['train_batch_size']}, {cfg['lora_init']}, "
                    f"T={cfg['num_epochs']}, M={cfg['num_members']}")
        with open(Path(folder) / "readings.csv") as f:
            table = list(csv.DictReader(f))
        for row in table:
            reading = NormReading(params=row["params"], early=int(row["early"]), late=int(row["late"]),
                              members=int(row["members"]), norm=row["norm"], noise=row["noise"],
                              eps=float(row["eps"]), signal=row["signal"],
                              example_loss=row.get("example_loss", "mean"))
            if reading.label() in readings:
                lines.append(f"| {Path(folder).name} | {training} | {reading.label()} | {float(row['auroc']):.3f} | "
                             f"{fmt_share(float(row['top10']))} | {fmt_share(float(row['top30']))} | "
                             f"{fmt_share(float(row['negative_drop_share']))} |")
    return "\n".join(lines)


def render_corruption_report(command, config, rows, kinds, signals, evals, result, base, grid_rows, timings, fraction,
                  plotted) -> str:
    counts = {k: sum(x == k for x in kinds) for k in [CLEAN] + sorted(set(kinds) - {CLEAN})}
    snap_loss = norms_of(result)["loss"]  # [members, epochs, N]
    lines = [
        "# Selection evaluation",
        "",
        "```bash",
        command,
        "```",
        "",
        f"{len(rows)} rows: " + ", ".join(f"{v} {k}" for k, v in counts.items()) +
        f"; {int(np.asarray(result['truncated']).sum())} cut to max_length={config.max_length}. "
        f"Proxy `{config.hf_model}`; G-SNR reading `{base.label()}`.",
        "",
        f"Mean response loss per row: bare proxy {np.mean(result['proxy_loss']):.3f}; after "
        + ", ".join(f"epoch {e}: {snap_loss[:, i].mean():.3f}" for i, e in enumerate(result["epochs"]))
        + " (mean over members).",
        "",
        "Run time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ".",
        "",
        "## Separation of clean and corrupted rows",
        "",
        "AUROC: the chance that a random clean row outranks a random corrupted one (1 = perfect, 0.5 = "
        "chance, below 0.5 = prefers corrupted rows). Top k %: the share of corrupted rows among the "
        "rows a selection of that size keeps (lower is better).",
        "",
        main_table(signals, evals, fraction),
        "",
        "### AUROC per corruption kind (clean rows against that kind only)",
        "",
        kind_table(signals, evals, "per_kind_auroc", kinds, fmt_number),
        "",
        "### Share of each kind's rows that survive into the top 30 % (30 % = chance)",
        "",
        kind_table(signals, evals, "per_kind_survival30", kinds, fmt_share),
        "",
        "### G-SNR parts by kind (medians)",
        "",
        parts_table(result, base, kinds),
        "",
        "### How the parts follow the response's length (Spearman's rho with response tokens, clean rows)",
        "",
        length_table(result, list(dict.fromkeys([base, dataclasses.replace(base, noise="relvar")])), kinds),
        "",
    ]
    if plotted:
        lines += ["![ROC curves, G-SNR histograms and early against late norms](roc.png)", ""]
    lines += ["## Readings from the same training run", "", readings_markdown(grid_rows, base, result["epochs"]), "",
              "Every reading of the grid is in `readings.csv`."]
    return "\n".join(lines) + "\n"
