"""`gsnr-report`: the command line of the selection report.

    # the output of `gsnr_top_k_filter` (kept rows) and its dropped-rows file
    gsnr-report --kept outputs/gsnr/selected.jsonl --dropped outputs/gsnr/gsnr_dropped.jsonl \
        --group-by source --out outputs/gsnr/report

    # one file of scored rows, no selection yet: the top --top-ratio count as kept
    gsnr-report --scored scored.jsonl --top-ratio 0.1 --out report

`run(argv)` does the same from Python and returns the summary (what `summary.json` holds).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from jsonargparse import ArgumentParser

from ..dropped import DROP_REASON
from ..jsonl import read_jsonl
from .markdown import jsonable, render_markdown
from .plots import require_matplotlib, write_plots
from .rows import DEFAULT_TOP_RATIO, report_rows
from .statistics import describe_selection

PROG = "gsnr-report"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG, description="Markdown report (with PNG plots) of a G-SNR selection.",
        epilog="Rows carry the G-SNR fields under __dj__stats__ or as top-level columns.")
    parser.add_argument("--kept", type=Optional[Path], help="jsonl of the kept rows (the output of gsnr_top_k_filter)")
    parser.add_argument("--dropped", type=Optional[Path],
                        help=f"jsonl of the dropped rows, with a `{DROP_REASON}` field")
    parser.add_argument("--scored", type=Optional[Path],
                        help="jsonl of all scored rows, no selection (instead of --kept)")
    parser.add_argument("--top-ratio", type=Optional[float],
                        help=f"with --scored: the share counted as kept (null: {DEFAULT_TOP_RATIO})")
    parser.add_argument("--group-by", type=Optional[str],
                        help="field whose values are groups (e.g. source): kept share per group")
    parser.add_argument("--out", type=Path, required=True, help="folder for report.md, summary.json and the PNGs")
    parser.add_argument("--examples", type=int, default=5, help="top and bottom rows to show")
    parser.add_argument("--instruction-field", type=str, default="instruction")
    parser.add_argument("--input-field", type=str, default="input")
    parser.add_argument("--output-field", type=str, default="output")
    parser.add_argument("--messages-field", type=str, default="messages")
    parser.add_argument("--dpi", type=int, default=80, help="resolution of the PNGs")
    parser.add_argument("--no-plots", action="store_true", help="write the report without plots (no matplotlib)")
    return parser


def run(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Parse `argv` (default: the command line), write the report; returns the summary."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.kept is None) == (args.scored is None):
        parser.error("give either --kept (optionally with --dropped) or --scored")
    if args.dropped is not None and args.kept is None:
        parser.error("--dropped goes with --kept")
    if args.top_ratio is not None and args.scored is None:
        parser.error("--top-ratio goes with --scored (with --kept the selection is already made)")
    if args.top_ratio is not None and not 0 < args.top_ratio <= 1:
        parser.error(f"--top-ratio must be in (0, 1], got {args.top_ratio}")
    if args.examples < 0:
        parser.error("--examples must be >= 0")
    for path in (args.kept, args.dropped, args.scored):
        if path is not None and not path.is_file():
            parser.error(f"no such file: {path}")
    existing = next(path for path in (args.out, *args.out.absolute().parents) if path.exists())
    if not existing.is_dir():
        parser.error(f"--out must be a folder, but {existing} is a file; give a folder for the report")
    if not args.no_plots:
        require_matplotlib()  # fail before any work

    text_fields = {"instruction_field": args.instruction_field, "input_field": args.input_field,
                   "output_field": args.output_field, "messages_field": args.messages_field}
    try:
        if args.scored is not None:
            records = report_rows(scored=read_jsonl(args.scored, allow_empty=True), top_ratio=args.top_ratio,
                                group_by=args.group_by, text_fields=text_fields)
            mode = "scored"
        else:
            records = report_rows(kept=read_jsonl(args.kept, allow_empty=True),
                                  dropped=(read_jsonl(args.dropped, allow_empty=True) if args.dropped is not None
                                           else None),
                                  group_by=args.group_by, text_fields=text_fields)
            mode = "selection" if args.dropped is not None else "kept_only"
    except ValueError as e:
        parser.error(str(e))
    summary = describe_selection(records, mode=mode, group_by=args.group_by, examples=args.examples)

    args.out.mkdir(parents=True, exist_ok=True)
    plots = None if args.no_plots else write_plots(records, summary, args.out, args.dpi)
    inputs = {"kept": args.kept, "dropped": args.dropped, "scored": args.scored,
              "top ratio (kept for the plots)": (args.top_ratio or DEFAULT_TOP_RATIO) if args.scored else None,
              "group by": args.group_by}
    report = args.out / "report.md"
    report.write_text(render_markdown(summary, inputs, plots), encoding="utf-8")
    (args.out / "summary.json").write_text(json.dumps(jsonable(summary), indent=1, ensure_ascii=False, allow_nan=False,
                                                      default=str) + "\n", encoding="utf-8")
    print(f"{report}: {summary['rows']} rows, {summary['kept']} kept, {len(summary['warnings'])} warnings"
          + "".join(f"\n  warning {w['code']}: {w['message']}" for w in summary["warnings"]))
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The `gsnr-report` command: 0 when the report is written (bad arguments exit with 2)."""
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
