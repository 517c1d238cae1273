"""`gsnr-eval downstream`: does a G-SNR selection train a better model?

    gsnr-eval downstream --data recipes/data/self_instruct_seed_tasks.jsonl \
        --data tools/data/chatterbot_english_qa.jsonl --rows-per-file 150 --corrupt-fraction 0.3 \
        --heldout 60 --hf-model smollm2-135m --set max_length=128 --steps 100 --seeds 3 --out docs/eval/downstream

The pool (the `--data` rows, less the held-out ones, `--corrupt-fraction` of them corrupted as
`gsnr-eval` does) is scored once with every signal; each `--budgets` share is selected with each
signal; the target (`--target`, default the proxy) is fine-tuned on each selection and on the full
pool, with one LoRA recipe and the same number of optimizer steps, over `--seeds` seeds; the held-out
clean rows (`--heldout-data`, or a seeded `--heldout` split of the data) measure the loss along the way.
`run(argv)` does the same from Python and returns what `results.json` holds.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, get_type_hints

import numpy as np
from jsonargparse import ArgumentParser

from ..timing import Stopwatch

PROG = "gsnr-eval downstream"


def build_parser() -> ArgumentParser:
    from .corrupt import KINDS
    from .downstream import DEFAULT_SIGNALS

    p = ArgumentParser(prog=PROG, description="Does a selection train a better model? Select the same budget "
                       "with G-SNR and each baseline, fine-tune one target on each selection with the same "
                       "recipe and steps over several seeds, and compare the held-out response loss.")
    p.add_argument("--data", type=str, action="append", help="Alpaca-style jsonl of the pool; repeat for several files")
    p.add_argument("--rows-per-file", type=Optional[int], help="at most this many rows of each file (seeded)")
    p.add_argument("--heldout-data", type=str, action="append",
                   help="jsonl of the held-out clean rows (repeat); without it, --heldout splits them off --data")
    p.add_argument("--heldout-rows-per-file", type=Optional[int], help="at most this many rows of each held-out file")
    p.add_argument("--heldout", type=Optional[float],
                   help="held out of --data before any corruption: a share (< 1) or a count (>= 1); default 0.2")
    p.add_argument("--corrupt-fraction", type=float, default=0.3, help="share of the pool to corrupt")
    p.add_argument("--kinds", type=Optional[str],
                   help=f"comma-separated corruption kinds (null: all of {','.join(KINDS)})")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the sample, the split, the corruptions and random; "
                        "the fine-tunes use seed, seed + 1, ...")
    p.add_argument("--hf-model", type=Optional[str], help="the proxy that scores (null: the smollm2-135m preset)")
    p.add_argument("--set", type=str, action="append", metavar="KEY=VALUE",
                   help="a GSNRConfig override for the scoring (and the fields, max_length, device and precision "
                        "of the fine-tune), the value read as JSON; repeat")
    p.add_argument("--main-reading", type=Optional[str], metavar="K=V,...",
                   help="select with another reading of G-SNR, e.g. params=B (fields of NormReading)")
    p.add_argument("--target", type=Optional[str],
                   help="the fine-tuned model: preset, folder or Hub id (null: the proxy)")
    p.add_argument("--budgets", type=list[float], default=[0.1, 0.3], help="shares of the pool to select")
    p.add_argument("--signals", type=list[str], default=list(DEFAULT_SIGNALS),
                   help="signals to select with (names as in gsnr-eval's tables)")
    p.add_argument("--seeds", type=int, default=3, help="fine-tunes per selection (seed, seed + 1, ...)")
    add_recipe_arguments(p)
    p.add_argument("--skip-ifd", action="store_true", help="leave out the Data-Juicer IFD baseline")
    p.add_argument("--reuse", action="store_true",
                   help="reuse the scores in OUT/scores of an earlier run on the same pool")
    p.add_argument("--baselines-from", type=Optional[str], metavar="DIR",
                   help="take perplexity and IFD from an earlier gsnr-eval folder (same rows and proxy setup)")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap rounds of the pool's separation report in OUT/scores (0: none)")
    p.add_argument("--out", type=str, default="downstream_out", help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress and no table on stdout")
    return p


def add_recipe_arguments(p: ArgumentParser) -> None:
    """One flag per `FinetuneRecipe` field (`--steps`, `--batch-size`, ...), with its default and help."""
    from .finetune import FinetuneRecipe

    hints = get_type_hints(FinetuneRecipe)
    for f in dataclasses.fields(FinetuneRecipe):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=hints[f.name], default=f.default, help=f.metadata["help"])


def run(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Parse `argv` (the arguments after `downstream`) and run; returns what results.json holds."""
    from .arguments import build_config, parse_set, quote
    from .corrupt import CLEAN, KINDS, corrupt_dataset
    from .data import read_instruction_rows
    from ..selection import rows_for_ratio
    from .downstream import (budget_label, drop_heldout_rows, encode_all, load_target, pick_signals,
                             run_grid, select_budgets, split_heldout)
    from ..manifest import package_versions
    from .downstream_report import plot_curves, render_downstream_report, results_table, paired_summary, write_curves
    from .finetune import FinetuneRecipe
    from .readings import config_reading, parse_reading
    from .runs import compute
    from .separation import write_separation
    from .signals import signals_for

    argv = list(sys.argv[2:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if not args.data:
        raise SystemExit("--data is required")
    if args.heldout_data and args.heldout is not None:
        raise SystemExit("give either --heldout-data or --heldout, not both")
    if args.seeds < 1 or not args.budgets or not all(0 < b < 1 for b in args.budgets):
        raise SystemExit("--seeds must be >= 1 and every --budgets value in (0, 1)")
    config = build_config(args.hf_model, parse_set(args.set or []))
    recipe = FinetuneRecipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneRecipe)})
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = Stopwatch()

    fields = (config.instruction_field, config.output_field)
    rows = read_instruction_rows(args.data, args.rows_per_file, args.seed, *fields)
    if args.heldout_data:
        pool, heldout = rows, read_instruction_rows(args.heldout_data, args.heldout_rows_per_file, args.seed, *fields)
        heldout_source = "from " + ", ".join(args.heldout_data)
    else:
        pool, heldout = split_heldout(rows, 0.2 if args.heldout is None else args.heldout, args.seed)
        heldout_source = f"a seeded split of --data (seed {args.seed})"
    if not heldout:
        raise SystemExit("no held-out rows")
    pool, overlap = drop_heldout_rows(pool, heldout, config)
    kinds_wanted = tuple(args.kinds.split(",")) if args.kinds else KINDS
    pool = corrupt_dataset(pool, args.corrupt_fraction, args.seed, kinds_wanted, config.instruction_field,
                           config.input_field, config.output_field)
    kinds = [r["eval_corruption"] for r in pool]

    # Score once (cached in OUT/scores as gsnr-eval caches its norms); every budget cuts the same ranking.
    result = compute(pool, config, out_dir / "scores", args.skip_ifd, args.reuse, not args.quiet, timings,
                     args.baselines_from)
    command = "gsnr-eval downstream " + " ".join(quote(a) for a in argv)
    reading = config_reading(config, **parse_reading(args.main_reading))
    every_signal = signals_for(result, config, args.seed, reading)
    # The pool's corruptions are known, so the same scores also say how well each signal keeps them out.
    write_separation(pool, result, config, every_signal, reading, out_dir / "scores", command, timings,
                     seed=args.seed, bootstrap=args.bootstrap, corrupt_fraction=args.corrupt_fraction, quiet=True)
    signals = pick_signals(every_signal, args.signals)
    selections = select_budgets(signals, args.budgets, len(pool))

    start = Stopwatch()
    model, formatter, pad_id = load_target(args.target or config.hf_model, config)
    pool_encoded, heldout_encoded = encode_all(formatter, pool, "pool"), encode_all(formatter, heldout, "held-out")
    timings["load target"] = start.seconds
    seeds = [args.seed + j for j in range(args.seeds)]
    records = run_grid(model, pool_encoded, heldout_encoded, selections, recipe, config, seeds, pad_id,
                       not args.quiet, timings)
    by_key = {(s.budget, s.signal): s for s in selections}
    for rec in records:
        sel = by_key[(rec["budget"], rec["signal"])]
        rec["corrupted_share"] = float(np.mean([kinds[i] != CLEAN for i in sel.indices]))
        rec["rule_dropped"] = sel.rule_dropped
    table_rows = paired_summary(records)

    write_curves(out_dir, records)
    np.savez_compressed(out_dir / "heldout_losses.npz", **{f"{r['budget']}|{r['signal']}|{r['seed']}":
                                                          r["result"].final_row_losses for r in records})
    (out_dir / "selections.json").write_text(json.dumps(
        {f"{s.budget}|{s.signal}": [int(pool[i]["eval_index"]) for i in s.indices] for s in selections}, indent=1))
    keep = ("eval_index", "eval_corruption", "id", config.instruction_field, config.input_field, config.output_field)
    with open(out_dir / "pool.jsonl", "w", encoding="utf-8") as f:
        for i, row in enumerate(pool):
            rec = {k: row.get(k) for k in keep}
            rec.update({s.name: (float(s.score[i]) if np.isfinite(s.score[i]) else None) for s in signals})
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    with open(out_dir / "heldout.jsonl", "w", encoding="utf-8") as f:
        for row in heldout:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    plotted = plot_curves(out_dir / "curves.png", records)
    timings["total"] = started.seconds

    meta = {
        "command": command, "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "config": config.to_dict(), "recipe": dataclasses.asdict(recipe), "reading": dataclasses.asdict(reading),
        "target": args.target or config.hf_model, "seeds": seeds, "pool_rows": len(pool),
        "pool_corrupted": int(sum(k != CLEAN for k in kinds)), "heldout_rows": len(heldout),
        "heldout_source": heldout_source, "pool_rows_dropped_as_heldout": overlap,
        "budgets": {budget_label(b): rows_for_ratio(len(pool), b) for b in args.budgets},
        "negative_drop_share": signals[0].negative_drop_share if signals[0].name == "G-SNR" else None,
        "timings": timings, "versions": package_versions(),
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    (out_dir / "report.md").write_text(render_downstream_report(command, table_rows, meta, plotted))
    summary = {"rows": table_rows, "pool_rows": len(pool), "heldout_rows": len(heldout), "timings": timings}
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2, default=float))
    if not args.quiet:
        print(results_table(table_rows))
        print(f"\nwrote {out_dir / 'report.md'}")
    return summary
