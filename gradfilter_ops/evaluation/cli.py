"""`gsnr-eval`: the command line of the selection-quality evaluation.

    gsnr-eval --data recipes/data/self_instruct_seed_tasks.jsonl --data tools/data/chatterbot_english_qa.jsonl \
        --rows-per-file 150 --corrupt-fraction 0.3 --seed 0 --hf-model smollm2-135m \
        --set num_members=8 --set num_epochs=3 --set max_length=160 --set precision=bf16 --out docs/eval/run

`run(argv)` does the same from Python and returns the summary (what `summary.json` holds).
`gsnr-eval downstream ...` is the downstream check (`downstream_cli`): fine-tune on each signal's selection;
`gsnr-eval protocol ...` is the verdict over several pools (`protocol_cli`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from jsonargparse import ArgumentParser

from .arguments import build_config, parse_set, quote
from .corrupt import KINDS, corrupt_dataset
from .data import build_chatterbot, read_instruction_rows
from .readings import config_reading, parse_reading
from .runs import compute, merge_members
from .separation import write_separation
from .signals import signals_for
from .tables import compare_runs
from ..timing import Stopwatch

PROG = "gsnr-eval"
DOWNSTREAM = "downstream"  # the subcommand: gsnr-eval downstream ...
PROTOCOL = "protocol"  # the subcommand: gsnr-eval protocol ...


def build_parser() -> ArgumentParser:
    from ..config import GSNRConfig

    keys = ", ".join(f.name for f in dataclasses.fields(GSNRConfig))
    p = ArgumentParser(prog=PROG, description="How well does G-SNR keep corrupted rows out? Inject known "
                       "corruptions into real instruction data, score every row with G-SNR and with the usual "
                       "baselines, and measure the separation. Subcommand: `gsnr-eval downstream` fine-tunes a "
                       "model on each signal's selection and compares the held-out loss (`gsnr-eval downstream "
                       "--help`).")
    p.add_argument("--data", type=str, action="append", help="Alpaca-style jsonl; repeat for several files")
    p.add_argument("--rows-per-file", type=Optional[int], help="at most this many rows of each file (seeded)")
    p.add_argument("--corrupt-fraction", type=float, default=0.3, help="share of rows to corrupt")
    p.add_argument("--kinds", type=Optional[str],
                   help=f"comma-separated corruption kinds (null: all of {','.join(KINDS)})")
    p.add_argument("--seed", type=int, default=0, help="seeds the sample, the corruptions, random and the bootstrap")
    p.add_argument("--hf-model", type=Optional[str], help="the proxy (null: the smollm2-135m preset)")
    p.add_argument("--set", type=str, action="append", metavar="KEY=VALUE",
                   help=f"a GSNRConfig override, the value read as JSON; repeat. Keys: {keys}")
    p.add_argument("--out", type=str, default="eval_out", help="output folder")
    p.add_argument("--skip-ifd", action="store_true", help="leave out the Data-Juicer IFD baseline")
    p.add_argument("--reuse", action="store_true",
                   help="reuse norms.npz of an earlier run with the same rows and config")
    p.add_argument("--baselines-from", type=Optional[str], metavar="DIR",
                   help="take perplexity and IFD from an earlier run's folder (same rows and proxy setup)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap rounds for the AUROC interval (0: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no table on stdout")
    p.add_argument("--main-reading", type=Optional[str], metavar="K=V,...",
                   help="score the main table's G-SNR (and ablations) with another reading of the same run, "
                        "e.g. params=W,early=1,late=2 (fields of NormReading)")
    p.add_argument("--merge", type=str, nargs=2, metavar="DIR",
                   help="join two runs whose seeds follow on (seed, seed + num_members) into one ensemble in --out")
    p.add_argument("--compare", type=str, nargs="+", metavar="DIR",
                   help="print chosen readings of earlier runs side by side")
    p.add_argument("--reading", type=str, action="append",
                   help="with --compare: a reading label as in readings.csv; repeat")
    p.add_argument("--build-chatterbot", type=Optional[str], metavar="FOLDER", help=argparse.SUPPRESS)
    p.add_argument("--build-out", type=Optional[str], help=argparse.SUPPRESS)
    return p


def run(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Parse `argv` (default: the command line) and run; returns the summary (or what --merge,
    --compare or --build-chatterbot did). `downstream` as the first argument runs the downstream check
    (`downstream_cli.run` on the arguments after it) and returns its results."""
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == [DOWNSTREAM]:
        # A first word, not jsonargparse subcommands: those would make a subcommand compulsory and move
        # every existing flag under one, and `gsnr-eval --data ... --out ...` must keep working as it is.
        from .downstream_cli import run as run_downstream

        return run_downstream(words[1:])
    if words[:1] == [PROTOCOL]:
        from .protocol_cli import run as run_protocol

        return run_protocol(words[1:])
    args = build_parser().parse_args(argv)
    if args.merge:
        members = merge_members(args.merge[0], args.merge[1], args.out)
        print(f"wrote a {members}-member run to {args.out}; analyse it with --reuse --set num_members={members}")
        return {"members": members}
    if args.compare:
        print(compare_runs(args.compare, args.reading or []))
        return {}
    if args.build_chatterbot:
        n = build_chatterbot(args.build_chatterbot, args.build_out)
        print(f"wrote {n} rows to {args.build_out}")
        return {"rows": n}
    if not args.data:
        raise SystemExit("--data is required")
    overrides = parse_set(args.set or [])
    config = build_config(args.hf_model, overrides)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = read_instruction_rows(args.data, args.rows_per_file, args.seed, config.instruction_field,
                                 config.output_field)
    kinds_wanted = tuple(args.kinds.split(",")) if args.kinds else KINDS
    rows = corrupt_dataset(rows, args.corrupt_fraction, args.seed, kinds_wanted, config.instruction_field,
                           config.input_field, config.output_field)
    timings: dict[str, float] = {}
    started = Stopwatch()
    result = compute(rows, config, out_dir, args.skip_ifd, args.reuse, not args.quiet, timings, args.baselines_from)

    command = f"{PROG} " + " ".join(quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    base = config_reading(config, **parse_reading(args.main_reading))
    summary = write_separation(rows, result, config, signals_for(result, config, args.seed, base), base, out_dir,
                               command, timings, seed=args.seed, bootstrap=args.bootstrap,
                               corrupt_fraction=args.corrupt_fraction, quiet=args.quiet)
    summary["total_s"] = started.seconds
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The `gsnr-eval` command: 0 when the run is written (bad arguments exit with 2)."""
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
