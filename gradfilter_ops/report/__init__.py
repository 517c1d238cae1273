"""The selection report: a Markdown report, with PNG plots next to it, of a G-SNR selection.

`gsnr-report` (or `run(argv)`) reads the kept rows of `gsnr_top_k_filter` and its dropped-rows file,
or one file of scored rows and a top ratio, and writes into `--out`:

- `report.md`: the counts (rows, kept, dropped per `gsnr_drop_reason`, `gsnr_status`, the share of
  negative drops), the G-SNR histogram with the cut-off (the lowest kept finite G-SNR), the late
  against the early gradient norm, G-SNR against the response length, the kept share per group
  (`--group-by`), the top and bottom `--examples` rows with their score parts, and warnings
  (degenerate scores, many rows without a score, mostly negative drops, a tiny dataset);
- `summary.json`: the numbers of the report;
- the PNGs `gsnr_hist.png`, `early_late.png`, `gsnr_length.png` and, with `--group-by`, `groups.png`.

The plots need matplotlib (`pip install 'gradfilter-ops[report]'`); `--no-plots` writes the report
without them.

One concern per module: `records` (reading rows of either layout), `summary` (the numbers and the
warnings), `markdown` (report.md), `plots` (the PNGs), `cli` (the command).
"""

from .cli import main, run
from .markdown import render_markdown
from .plots import write_plots
from .rows import report_rows
from .statistics import describe_selection

__all__ = ["report_rows", "main", "render_markdown", "run", "describe_selection", "write_plots"]
