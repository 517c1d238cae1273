#!/usr/bin/env python
"""Write a Markdown report, with PNG plots next to it, of a G-SNR selection.

    # the output of `gsnr_top_k_filter` (kept rows) and its dropped-rows file
    python tools/gsnr_report.py --kept outputs/gsnr/selected.jsonl \
        --dropped outputs/gsnr/gsnr_dropped.jsonl --group-by source --out outputs/gsnr/report

    # one file of scored rows, no selection yet: the top --top-ratio count as kept
    python tools/gsnr_report.py --scored scored.jsonl --top-ratio 0.1 --out report

Rows carry the score fields (`gsnr`, `gsnr_early`, ... see `gradfilter_ops/fields.py`) either under
`__dj__stats__` (Data-Juicer with `keep_stats_in_res_ds: true`) or as top-level columns (the
`datasets` API); both layouts are read, also mixed in one file.

`DIR/report.md` has: the counts (rows, kept, dropped per `gsnr_drop_reason`, `gsnr_status`, the
share of negative drops), the G-SNR histogram with the cut-off (the lowest kept finite G-SNR), the
late against the early gradient norm, G-SNR against the response length, the kept share per group
(`--group-by`), the top and bottom `--examples` rows with their score parts, and warnings
(degenerate scores, many rows without a score, mostly negative drops, a tiny dataset). It also
writes `summary.json` (the numbers of the report) and the PNGs `gsnr_hist.png`, `early_late.png`,
`gsnr_length.png` and, with `--group-by`, `groups.png`.

The plots need matplotlib (`pip install matplotlib`, or `pip install 'gradfilter-ops[report]'`);
`--no-plots` writes the report without them.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from gradfilter_ops import fields
from gradfilter_ops.dropped import DROP_REASON
from gradfilter_ops.selection import select

STATS_KEY = "__dj__stats__"  # data_juicer.utils.constant.Fields.stats (not imported: it is slow)
NO_STATUS = "(no status)"  # a row without a `gsnr_status` (never scored)
NO_REASON = "(no reason given)"  # a dropped row without a `gsnr_drop_reason`
NO_GROUP = "(missing)"  # a row without the --group-by field

DEFAULT_TOP_RATIO = 0.1
TEXT_CHARS = 120  # characters of instruction / output shown per example
DEGENERATE_REL = 1e-12  # finite G-SNRs all equal within this relative spread: degenerate
NON_FINITE_WARN = 0.2  # warn when more than this share of rows has no finite G-SNR
NEGATIVE_DROP_WARN = 0.5  # warn when more than this share of the drops is negative
TINY_ROWS = 50  # warn below this many rows
SYMLOG_DECADES = 3.0  # a symlog axis when |values| span at least this many decades
MAX_GROUP_BARS = 30  # the group plot shows the largest groups; the table shows all

PLOTS = {
    "hist": "gsnr_hist.png",
    "early_late": "early_late.png",
    "length": "gsnr_length.png",
    "groups": "groups.png",
}
KEPT_COLOR, DROPPED_COLOR = "tab:blue", "tab:orange"


# --- loading ----------------------------------------------------------------------------------------

def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines file (blank lines skipped); a clear error names a bad line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e.msg}).") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}.")
            rows.append(row)
    return rows


def as_number(value: Any) -> Optional[float]:
    """A float for an int or float (NaN and infinities kept), None for anything else (bools too)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def is_finite(value: Any) -> bool:
    return value is not None and math.isfinite(value)


def score_fields(row: dict) -> dict[str, Any]:
    """The G-SNR fields of a row, from `__dj__stats__` when they are there, else from its columns."""
    stats = row.get(STATS_KEY)
    source = stats if isinstance(stats, dict) and any(f in stats for f in fields.SCORE_FIELDS) else row
    out = {f: as_number(source.get(f)) for f in fields.PARTS}
    for f in (fields.NUM_TOKENS, fields.TOKENS):
        out[f] = as_number(source.get(f))
    status = source.get(fields.STATUS)
    out[fields.STATUS] = status if isinstance(status, str) and status else NO_STATUS
    truncated = source.get(fields.TRUNCATED)
    out[fields.TRUNCATED] = truncated if isinstance(truncated, bool) else None
    return out


def example_text(row: dict, instruction_field: str = "instruction", input_field: str = "input",
                 output_field: str = "output", messages_field: str = "messages") -> tuple[str, str]:
    """(prompt, response) text of a row: Alpaca fields, else the last chat turns, else `text`."""
    instruction, output = row.get(instruction_field), row.get(output_field)
    if instruction is not None or output is not None:
        prompt = "" if instruction is None else str(instruction)
        extra = row.get(input_field)
        if extra not in (None, ""):
            prompt = f"{prompt}\n{extra}"
        return prompt, "" if output is None else str(output)
    messages = row.get(messages_field)
    if isinstance(messages, list) and messages:
        turns = [m for m in messages if isinstance(m, dict)]
        last = {m.get("role"): str(m.get("content", "")) for m in turns}
        return last.get("user", ""), last.get("assistant", "")
    return str(row.get("text", "")), ""


def make_record(row: dict, index: int, kept: bool, reason: Optional[str], group_by: Optional[str],
                text_fields: dict[str, str]) -> dict:
    """One row as the report sees it: its score fields, kept or not, the reason, group and text."""
    prompt, response = example_text(row, **text_fields)
    group = None
    if group_by is not None:
        value = row.get(group_by)
        group = NO_GROUP if value is None else str(value)
    return {"index": index, "kept": kept, "reason": reason, "group": group,
            "prompt": prompt, "response": response, **score_fields(row)}


def load_rows(kept: Optional[Sequence[dict]] = None, dropped: Optional[Sequence[dict]] = None,
              scored: Optional[Sequence[dict]] = None, top_ratio: Optional[float] = None,
              group_by: Optional[str] = None, text_fields: Optional[dict[str, str]] = None) -> list[dict]:
    """Records for the report, from kept (+ dropped) rows, or from scored rows and a top ratio.

    Scored rows are selected as `gsnr_top_k_filter` would with `top_ratio` (ranked by `gsnr`, ties by
    order, rows without a score last); the others get its reason codes.
    """
    text_fields = text_fields or {}
    if (kept is None) == (scored is None):
        raise ValueError("Give either the kept rows (and optionally the dropped rows) or the scored rows.")
    if scored is not None:
        if dropped is not None:
            raise ValueError("The dropped rows go with the kept rows, not with the scored rows.")
        records = [make_record(r, i, False, None, group_by, text_fields) for i, r in enumerate(scored)]
        if not records:
            return records
        selection = select([r[fields.GSNR] for r in records], [r[fields.STATUS] for r in records],
                           top_ratio=DEFAULT_TOP_RATIO if top_ratio is None else top_ratio)
        for i in selection.keep:
            records[i]["kept"] = True
        for i, reason in selection.reasons.items():
            records[i]["reason"] = reason
        return records
    records = [make_record(r, i, True, None, group_by, text_fields) for i, r in enumerate(kept)]
    for j, row in enumerate(dropped or ()):
        reason = row.get(DROP_REASON)
        reason = str(reason) if reason not in (None, "") else NO_REASON
        records.append(make_record(row, len(kept) + j, False, reason, group_by, text_fields))
    return records


# --- the numbers --------------------------------------------------------------------------------------

def describe(values: Sequence[float]) -> Optional[dict[str, float]]:
    """min, quartiles, max, mean and population std of finite values; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)

    def quantile(q: float) -> float:  # linear interpolation, as numpy's default
        pos = q * (len(ordered) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return {"count": len(ordered), "min": ordered[0], "p25": quantile(0.25), "median": quantile(0.5),
            "p75": quantile(0.75), "max": ordered[-1], "mean": statistics.fmean(ordered),
            "std": statistics.pstdev(ordered) if len(ordered) > 1 else 0.0}


def is_degenerate(values: Sequence[float]) -> bool:
    """At least two finite values, all equal within DEGENERATE_REL relative to the largest |value|."""
    if len(values) < 2:
        return False
    lo, hi = min(values), max(values)
    return hi - lo <= DEGENERATE_REL * max(abs(lo), abs(hi))


def _share(part: int, whole: int) -> Optional[float]:
    return part / whole if whole else None


def example_row(r: dict) -> dict:
    keys = ("index", "kept", "reason", "group", *fields.PARTS, fields.NUM_TOKENS, fields.STATUS)
    return {**{k: r[k] for k in keys}, "prompt": r["prompt"], "response": r["response"]}


def summarize(records: Sequence[dict], *, mode: str = "selection", group_by: Optional[str] = None,
              examples: int = 5) -> dict:
    """Every number the report shows, as a JSON-able dict; `warnings` is a list of {code, message}.

    `mode`: `selection` (kept and dropped rows given), `kept_only` (no dropped rows file) or `scored`
    (one file of scored rows, kept by a top ratio).
    """
    n = len(records)
    kept = [r for r in records if r["kept"]]
    dropped = [r for r in records if not r["kept"]]
    finite = [r for r in records if is_finite(r[fields.GSNR])]
    scores = [r[fields.GSNR] for r in finite]
    drops = [r[fields.DROP] for r in records if is_finite(r[fields.DROP])]
    negative = sum(d < 0 for d in drops)
    pairs = [(r[fields.EARLY], r[fields.LATE]) for r in records
             if is_finite(r[fields.EARLY]) and is_finite(r[fields.LATE])]
    grew = sum(late > early for early, late in pairs)
    kept_scores = [r[fields.GSNR] for r in kept if is_finite(r[fields.GSNR])]
    summary: dict[str, Any] = {
        "mode": mode,
        "rows": n,
        "kept": len(kept),
        "dropped": len(dropped),
        "kept_share": _share(len(kept), n),
        "drop_reasons": dict(Counter(r["reason"] for r in dropped).most_common()),
        "statuses": dict(Counter(r[fields.STATUS] for r in records).most_common()),
        "finite_gsnr": len(finite),
        "non_finite_gsnr": n - len(finite),
        "non_finite_share": _share(n - len(finite), n),
        "finite_drops": len(drops),
        "negative_drops": negative,
        "negative_drop_share": _share(negative, len(drops)),
        "early_late_pairs": len(pairs),
        "grew": grew,
        "grew_share": _share(grew, len(pairs)),
        "truncated": sum(r[fields.TRUNCATED] is True for r in records),
        "cutoff": min(kept_scores) if kept_scores else None,
        "gsnr": describe(scores),
        "gsnr_kept": describe(kept_scores),
        "gsnr_dropped": describe([r[fields.GSNR] for r in dropped if is_finite(r[fields.GSNR])]),
        "response_tokens": describe([r[fields.NUM_TOKENS] for r in records if is_finite(r[fields.NUM_TOKENS])]),
        "group_by": group_by,
        "groups": None,
    }
    if group_by is not None:
        totals = Counter(r["group"] for r in records)
        kept_in = Counter(r["group"] for r in kept)
        summary["groups"] = [{"group": g, "rows": total, "kept": kept_in[g], "kept_share": kept_in[g] / total}
                             for g, total in sorted(totals.items(), key=lambda item: (-item[1], item[0]))]
    ranked = sorted(finite, key=lambda r: (-r[fields.GSNR], r["index"]))
    summary["top"] = [example_row(r) for r in ranked[:examples]]
    summary["bottom"] = [example_row(r) for r in sorted(finite, key=lambda r: (r[fields.GSNR], r["index"]))[:examples]]
    summary["warnings"] = warnings_for(summary, scores)
    return summary


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"`{k}` {v}" for k, v in counts.items())


def warnings_for(summary: dict, scores: Sequence[float]) -> list[dict[str, str]]:
    out = []

    def warn(code: str, message: str) -> None:
        out.append({"code": code, "message": message})

    n = summary["rows"]
    if n == 0:
        warn("empty", "There are no rows.")
        return out
    if n < TINY_ROWS:
        warn("tiny", f"Only {n} rows (fewer than {TINY_ROWS}): the histogram, the quantiles and the "
                     f"per-group shares say little, and G-SNR itself is noisy on small sets (few optimizer steps).")
    if not scores:
        warn("no_scores", f"No row has a finite `{fields.GSNR}`: were the rows scored by `gsnr_scorer`? "
                          f"Statuses: {_counts(summary['statuses'])}.")
    elif summary["non_finite_share"] > NON_FINITE_WARN:
        warn("non_finite", f"{summary['non_finite_gsnr']} of {n} rows ({summary['non_finite_share']:.0%}) have no "
                           f"finite `{fields.GSNR}` (more than {NON_FINITE_WARN:.0%}); statuses: {_counts(summary['statuses'])}.")
    if is_degenerate(scores):
        warn("degenerate", f"All {len(scores)} finite `{fields.GSNR}` values are equal (within {DEGENERATE_REL:g} "
                           f"relative, value {scores[0]:.6g}): the ranking is by dataset order only. Check the "
                           f"ensemble (one member gives zero noise) and the training run.")
    share = summary["negative_drop_share"]
    if share is not None and share > NEGATIVE_DROP_WARN:
        warn("negative_drops", f"{summary['negative_drops']} of {summary['finite_drops']} drops ({share:.0%}) are "
                               f"negative: the gradient norm grew from the early to the late snapshot for most rows, "
                               f"so the drop measures adapter growth rather than learning (see docs/method.md, "
                               f"'Known weakness: LoRA growth can swamp the drop').")
    if summary["mode"] == "kept_only":
        warn("no_dropped", "Only the kept rows were given (no `--dropped` file): the dropped counts and reasons "
                           "are unknown and the plots show kept rows only.")
    if summary["group_by"] is not None and all(g["group"] == NO_GROUP for g in summary["groups"]):
        warn("no_group_field", f"No row has the `--group-by` field `{summary['group_by']}`.")
    return out


# --- Markdown -------------------------------------------------------------------------------------------

MD_SPECIAL = str.maketrans({"\\": "\\\\", "|": "\\|", "`": "\\`", "*": "\\*", "_": "\\_", "[": "\\[",
                            "]": "\\]", "<": "&lt;", ">": "&gt;", "&": "&amp;", "#": "\\#", "$": "\\$"})


def md_cell(text: Any, limit: Optional[int] = None) -> str:
    """Text safe in a Markdown table cell: cut to `limit` characters, markup, `|` and `$` (GitHub's math)
    escaped, newlines as ⏎."""
    text = "" if text is None else str(text)
    if limit is not None and len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    text = text.translate(MD_SPECIAL)
    return " ⏎ ".join(part.strip() for part in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"))


def fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)  # nan, inf, -inf
        if value == int(value) and abs(value) < 1e6:
            return str(int(value))
        return f"{value:.4g}"
    return str(value)


def pct(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.1%}"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def jsonable(value: Any) -> Any:
    """`value` with non-finite floats as strings ("nan", "inf"), so that the JSON is strict."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def render_markdown(summary: dict, inputs: dict[str, Any], plots: Optional[dict[str, str]] = None) -> str:
    """The report; `plots` maps a PLOTS key to a file name next to the report (None: no plots)."""
    s, plots = summary, plots or {}
    lines = ["# G-SNR selection report", ""]
    lines += [f"- {name}: `{value}`" for name, value in inputs.items() if value is not None]
    lines += ["", "## Counts", ""]
    dropped = s["dropped"] if s["mode"] != "kept_only" else "not given"
    lines += table(["", "value"], [
        ["rows", s["rows"]],
        ["kept", f"{s['kept']} ({pct(s['kept_share'])})"],
        ["dropped", dropped],
        [f"finite `{fields.GSNR}`", s["finite_gsnr"]],
        [f"no finite `{fields.GSNR}`", f"{s['non_finite_gsnr']} ({pct(s['non_finite_share'])})"],
        [f"negative `{fields.DROP}`", f"{s['negative_drops']} of {s['finite_drops']} ({pct(s['negative_drop_share'])})"],
        ["late norm > early norm (gradient grew)", f"{s['grew']} of {s['early_late_pairs']} ({pct(s['grew_share'])})"],
        [f"`{fields.TRUNCATED}`", s["truncated"]],
        ["cut-off (lowest kept finite G-SNR)", fmt(s["cutoff"])],
    ])
    if s["drop_reasons"]:
        lines += ["", f"Dropped rows by `{DROP_REASON}`:", ""]
        lines += table(["reason", "rows", "share of dropped"],
                       [[f"`{k}`", v, pct(v / s["dropped"])] for k, v in s["drop_reasons"].items()])
    lines += ["", f"Rows by `{fields.STATUS}`:", ""]
    lines += table(["status", "rows", "share"], [[f"`{k}`", v, pct(v / s["rows"])] for k, v in s["statuses"].items()])
    lines += ["", f"`{fields.GSNR}` of the rows with a finite score:", ""]
    stat_keys = ("count", "min", "p25", "median", "p75", "max", "mean", "std")
    lines += table(["rows", *stat_keys], [[name, *(fmt(d[k]) if d else "–" for k in stat_keys)]
                                          for name, d in (("all", s["gsnr"]), ("kept", s["gsnr_kept"]),
                                                          ("dropped", s["gsnr_dropped"]))])

    lines += ["", "## Warnings", ""]
    lines += [f"- **{w['code']}**: {w['message']}" for w in s["warnings"]] or ["None."]

    if plots:
        lines += ["", "## G-SNR distribution", "",
                  f"Rows with a finite `{fields.GSNR}`, kept and dropped stacked; the dashed line is the cut-off. "
                  "The x axis is symmetric-log (linear near zero, logarithmic beyond) when the scores span "
                  f"{SYMLOG_DECADES:g} or more decades.", "", f"![G-SNR histogram]({plots['hist']})"]
        lines += ["", "## Early against late gradient norm", "",
                  f"`{fields.LATE}` against `{fields.EARLY}` per row (log-log). Points above the y = x line: the "
                  "gradient grew between the snapshots (a negative drop).", "",
                  f"![early vs late gradient norm]({plots['early_late']})"]
        lines += ["", "## G-SNR against response length", "",
                  f"`{fields.GSNR}` against `{fields.NUM_TOKENS}` (response tokens that carried loss).", "",
                  f"![G-SNR vs response length]({plots['length']})"]
    if s["groups"] is not None:
        lines += ["", f"## Kept share per `{s['group_by']}`", ""]
        if "groups" in plots:
            lines += [f"![kept share per group]({plots['groups']})", ""]
        lines += table([md_cell(s["group_by"]), "rows", "kept", "kept share"],
                       [[md_cell(g["group"], TEXT_CHARS), g["rows"], g["kept"], pct(g["kept_share"])]
                        for g in s["groups"]])

    for title, key in (("Top", "top"), ("Bottom", "bottom")):
        lines += ["", f"## {title} {len(s[key])} by G-SNR", ""]
        if not s[key]:
            lines.append("No row has a finite score.")
            continue
        header = ["row", "kept", "gsnr", "drop", "noise", "early", "late", "resp. tokens"]
        if s["group_by"] is not None:
            header.append(md_cell(s["group_by"]))
        header += ["instruction", "output"]
        body = []
        for e in s[key]:
            cells = [e["index"], "kept" if e["kept"] else f"dropped (`{e['reason']}`)",
                     *(fmt(e[f]) for f in (fields.GSNR, fields.DROP, fields.NOISE, fields.EARLY, fields.LATE,
                                           fields.NUM_TOKENS))]
            if s["group_by"] is not None:
                cells.append(md_cell(e["group"], TEXT_CHARS))
            cells += [md_cell(e["prompt"], TEXT_CHARS), md_cell(e["response"], TEXT_CHARS)]
            body.append(cells)
        lines += table(header, body)
    lines += ["", f"Row numbers count from 0 in the order read ({'kept rows, then dropped rows' if s['mode'] == 'selection' else 'file order'}); "
                  f"texts are cut to {TEXT_CHARS} characters, ⏎ marks a line break.", ""]
    return "\n".join(lines)


# --- plots ------------------------------------------------------------------------------------------------

def require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("gsnr_report: the plots need matplotlib: `pip install matplotlib` "
                         "(or `pip install 'gradfilter-ops[report]'`), or pass --no-plots.") from None
    return matplotlib


def symlog_threshold(values: Sequence[float]) -> Optional[float]:
    """linthresh for a symlog axis when the nonzero |values| span SYMLOG_DECADES or more, else None."""
    magnitudes = sorted(abs(v) for v in values if v != 0 and math.isfinite(v))
    if len(magnitudes) < 2:
        return None
    small = magnitudes[int(0.05 * (len(magnitudes) - 1))]  # robust to one value that is almost zero
    if math.log10(magnitudes[-1] / small) < SYMLOG_DECADES:
        return None
    return 10.0 ** math.floor(math.log10(small))


def _symlog_edges(lo: float, hi: float, linthresh: float, bins: int) -> list[float]:
    """Bin edges evenly spaced on a symlog axis (sign(x) * log10(1 + |x| / linthresh))."""
    def forward(x):
        return math.copysign(math.log10(1 + abs(x) / linthresh), x)

    def back(y):
        return math.copysign(linthresh * (10 ** abs(y) - 1), y)

    a, b = forward(lo), forward(hi)
    return [lo] + [back(a + (b - a) * i / bins) for i in range(1, bins)] + [hi]  # exact ends: no value lost


def symlog_ticks(lo: float, hi: float, linthresh: float, per_side: int = 4) -> list[float]:
    """0 and +-10^k ticks within [lo, hi] on a symlog axis, at most `per_side` on each side of 0."""
    ticks = [0.0] if lo <= 0 <= hi else []
    for sign, bound in ((1, hi), (-1, -lo)):
        if bound < linthresh:
            continue
        first, last = math.ceil(math.log10(linthresh)), math.floor(math.log10(bound))
        step = max(1, math.ceil((last - first + 1) / per_side))
        ticks += [sign * 10.0 ** k for k in range(last, first - 1, -step)]
    return sorted(ticks)


def _tick_label(t: float) -> str:
    if t == 0:
        return "0"
    return f"${'-' if t < 0 else ''}10^{{{round(math.log10(abs(t)))}}}$"


def _symlog_axis(ax, which: str, lo: float, hi: float, linthresh: float) -> None:
    """Make the `which` ("x" or "y") axis symlog with sparse 0, +-10^k ticks over [lo, hi]."""
    from matplotlib.ticker import NullLocator

    (ax.set_xscale if which == "x" else ax.set_yscale)("symlog", linthresh=linthresh)
    axis = ax.xaxis if which == "x" else ax.yaxis
    ticks = symlog_ticks(lo, hi, linthresh)
    axis.set_ticks(ticks, [_tick_label(t) for t in ticks])
    axis.set_minor_locator(NullLocator())


def _plain(text: str) -> str:
    """Text that matplotlib shows as is (a `$` would start mathtext)."""
    return text.replace("$", r"\$")


def _figure(width: float = 6.4, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)  # render with Agg, without pyplot's global state
    return fig


def _save(fig, path: Path, dpi: int) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, format="png")


def _no_data(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_histogram(records: Sequence[dict], cutoff: Optional[float], path: Path, dpi: int = 80) -> None:
    fig = _figure()
    ax = fig.add_subplot()
    kept = [r[fields.GSNR] for r in records if r["kept"] and is_finite(r[fields.GSNR])]
    dropped = [r[fields.GSNR] for r in records if not r["kept"] and is_finite(r[fields.GSNR])]
    values = kept + dropped
    if not values:
        _no_data(ax, f"no finite {fields.GSNR}")
    else:
        lo, hi = min(values), max(values)
        bins = max(10, min(60, int(math.sqrt(len(values)) * 2)))
        linthresh = symlog_threshold(values)
        if lo == hi:
            pad = abs(lo) * 0.01 or 0.5
            edges = [lo - pad + 2 * pad * i / bins for i in range(bins + 1)]
        elif linthresh is not None:
            edges = _symlog_edges(lo, hi, linthresh, bins)
            _symlog_axis(ax, "x", lo, hi, linthresh)
            ax.set_xlim(lo, hi)
        else:
            edges = [lo] + [lo + (hi - lo) * i / bins for i in range(1, bins)] + [hi]
        data = [(kept, "kept", KEPT_COLOR), (dropped, "dropped", DROPPED_COLOR)]
        data = [d for d in data if d[0]]
        ax.hist([d[0] for d in data], bins=edges, stacked=True, label=[f"{d[1]} ({len(d[0])})" for d in data],
                color=[d[2] for d in data])
        if cutoff is not None:
            ax.axvline(cutoff, color="black", linestyle="--", linewidth=1, label=f"cut-off {cutoff:.4g}")
        ax.set_xlabel(fields.GSNR + (f" (symlog, linear within ±{linthresh:g})" if linthresh else ""))
        ax.set_ylabel("rows")
        ax.legend(fontsize="small")
    ax.set_title("G-SNR distribution")
    _save(fig, path, dpi)


def plot_early_late(records: Sequence[dict], path: Path, dpi: int = 80) -> None:
    fig = _figure(5.2, 4.6)
    ax = fig.add_subplot()
    points = [(r[fields.EARLY], r[fields.LATE], r["kept"]) for r in records
              if is_finite(r[fields.EARLY]) and is_finite(r[fields.LATE]) and r[fields.EARLY] > 0 and r[fields.LATE] > 0]
    if not points:
        _no_data(ax, "no positive early and late norms")
    else:
        _scatter_kept_dropped(ax, points)
        lo = min(min(p[0], p[1]) for p in points)
        hi = max(max(p[0], p[1]) for p in points)
        if lo == hi:
            lo, hi = lo / 2, hi * 2
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.plot([lo, hi], [lo, hi], color="black", linewidth=1, linestyle="--", label="y = x")
        grew = sum(p[1] > p[0] for p in points)
        ax.set_title(f"{grew / len(points):.0%} of rows above y = x (gradient grew)", fontsize="medium")
        ax.legend(fontsize="small")
    ax.set_xlabel(f"{fields.EARLY} (early snapshot)")
    ax.set_ylabel(f"{fields.LATE} (late snapshot)")
    _save(fig, path, dpi)


def _scatter_kept_dropped(ax, points: Sequence[tuple]) -> None:
    """Scatter (x, y, kept) points, dropped first so the kept ones stay visible on top."""
    for kept, label, color in ((False, "dropped", DROPPED_COLOR), (True, "kept", KEPT_COLOR)):
        xs = [p[0] for p in points if p[2] == kept]
        ys = [p[1] for p in points if p[2] == kept]
        if xs:
            ax.scatter(xs, ys, s=12, alpha=0.7, color=color, label=f"{label} ({len(xs)})", edgecolors="none")


def plot_length(records: Sequence[dict], cutoff: Optional[float], path: Path, dpi: int = 80) -> None:
    fig = _figure()
    ax = fig.add_subplot()
    points = [(r[fields.NUM_TOKENS], r[fields.GSNR], r["kept"]) for r in records
              if is_finite(r[fields.GSNR]) and is_finite(r[fields.NUM_TOKENS])]
    if not points:
        _no_data(ax, f"no rows with both {fields.GSNR} and {fields.NUM_TOKENS}")
    else:
        _scatter_kept_dropped(ax, points)
        lengths = [p[0] for p in points if p[0] > 0]
        if lengths and min(lengths) > 0 and max(lengths) / min(lengths) >= 100 and len(lengths) == len(points):
            ax.set_xscale("log")
        ys = [p[1] for p in points]
        linthresh = symlog_threshold(ys)
        if linthresh is not None:
            _symlog_axis(ax, "y", min(ys), max(ys), linthresh)
        if cutoff is not None:
            ax.axhline(cutoff, color="black", linestyle="--", linewidth=1, label=f"cut-off {cutoff:.4g}")
        ax.legend(fontsize="small")
        ax.set_ylabel(fields.GSNR + (" (symlog)" if linthresh else ""))
    ax.set_xlabel(f"{fields.NUM_TOKENS}")
    ax.set_title("G-SNR against response length")
    _save(fig, path, dpi)


def plot_groups(summary: dict, path: Path, dpi: int = 80) -> None:
    groups = summary["groups"][:MAX_GROUP_BARS]
    fig = _figure(6.4, max(2.0, 0.9 + 0.3 * len(groups)))
    ax = fig.add_subplot()
    if not groups:
        _no_data(ax, "no rows")
    else:
        names = [_plain(g["group"] if len(g["group"]) <= 30 else g["group"][:29] + "…") for g in groups][::-1]
        shares = [g["kept_share"] for g in groups][::-1]
        bars = ax.barh(range(len(groups)), shares, color=KEPT_COLOR)
        ax.set_yticks(range(len(groups)), names, fontsize="small")
        for bar, g in zip(bars, groups[::-1]):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {g['kept']}/{g['rows']}",
                    va="center", fontsize="small")
        ax.set_xlim(0, max(1.0, max(shares)) * 1.15)
        if summary["kept_share"] is not None:
            ax.axvline(summary["kept_share"], color="black", linestyle="--", linewidth=1,
                       label=f"overall {summary['kept_share']:.1%}")
            ax.legend(fontsize="small", loc="lower right")
    ax.set_xlabel("kept share")
    more = len(summary["groups"]) - len(groups)
    ax.set_title(f"kept share per {_plain(summary['group_by'])}" + (f" (largest {len(groups)}, {more} more in the table)"
                                                              if more > 0 else ""), fontsize="medium")
    _save(fig, path, dpi)


def write_plots(records: Sequence[dict], summary: dict, out: Path, dpi: int = 80) -> dict[str, str]:
    """Write the PNGs into `out`; returns PLOTS key -> file name."""
    require_matplotlib()
    written = {}
    plot_histogram(records, summary["cutoff"], out / PLOTS["hist"], dpi)
    written["hist"] = PLOTS["hist"]
    plot_early_late(records, out / PLOTS["early_late"], dpi)
    written["early_late"] = PLOTS["early_late"]
    plot_length(records, summary["cutoff"], out / PLOTS["length"], dpi)
    written["length"] = PLOTS["length"]
    if summary["groups"] is not None:
        plot_groups(summary, out / PLOTS["groups"], dpi)
        written["groups"] = PLOTS["groups"]
    return written


# --- command line -------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gsnr_report.py", description="Markdown report (with PNG plots) of a G-SNR selection.",
        epilog="Rows carry the G-SNR fields under __dj__stats__ or as top-level columns.")
    parser.add_argument("--kept", type=Path, help="jsonl of the kept rows (the output of gsnr_top_k_filter)")
    parser.add_argument("--dropped", type=Path, help=f"jsonl of the dropped rows, with a `{DROP_REASON}` field")
    parser.add_argument("--scored", type=Path, help="jsonl of all scored rows, no selection (instead of --kept)")
    parser.add_argument("--top-ratio", type=float,
                        help=f"with --scored: the share counted as kept (default {DEFAULT_TOP_RATIO})")
    parser.add_argument("--group-by", help="field whose values are groups (e.g. source): kept share per group")
    parser.add_argument("--out", type=Path, required=True, help="folder for report.md, summary.json and the PNGs")
    parser.add_argument("--examples", type=int, default=5, help="top and bottom rows to show (default 5)")
    parser.add_argument("--instruction-field", default="instruction")
    parser.add_argument("--input-field", default="input")
    parser.add_argument("--output-field", default="output")
    parser.add_argument("--messages-field", default="messages")
    parser.add_argument("--dpi", type=int, default=80, help="resolution of the PNGs (default 80)")
    parser.add_argument("--no-plots", action="store_true", help="write the report without plots (no matplotlib)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
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
    if not args.no_plots:
        require_matplotlib()  # fail before any work

    text_fields = {"instruction_field": args.instruction_field, "input_field": args.input_field,
                   "output_field": args.output_field, "messages_field": args.messages_field}
    try:
        if args.scored is not None:
            records = load_rows(scored=read_jsonl(args.scored), top_ratio=args.top_ratio,
                                group_by=args.group_by, text_fields=text_fields)
            mode = "scored"
        else:
            records = load_rows(kept=read_jsonl(args.kept),
                                dropped=read_jsonl(args.dropped) if args.dropped is not None else None,
                                group_by=args.group_by, text_fields=text_fields)
            mode = "selection" if args.dropped is not None else "kept_only"
    except ValueError as e:
        parser.error(str(e))
    summary = summarize(records, mode=mode, group_by=args.group_by, examples=args.examples)

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
