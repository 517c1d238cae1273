"""`report.md`: the summary as Markdown tables, with the plots and the top and bottom rows."""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence

from .. import fields
from ..dropped import DROP_REASON
from .plots import SYMLOG_DECADES

TEXT_CHARS = 120  # characters of instruction / output shown per example


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
        [f"negative `{fields.DROP}`",
         f"{s['negative_drops']} of {s['finite_drops']} ({pct(s['negative_drop_share'])})"],
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
                  f"`{fields.GSNR}` against `{fields.RESPONSE_TOKENS}` (response tokens that carried loss).", "",
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
                                           fields.RESPONSE_TOKENS))]
            if s["group_by"] is not None:
                cells.append(md_cell(e["group"], TEXT_CHARS))
            cells += [md_cell(e["prompt"], TEXT_CHARS), md_cell(e["response"], TEXT_CHARS)]
            body.append(cells)
        lines += table(header, body)
    lines += ["", "Row numbers count from 0 in the order read ("
                  f"{'kept rows, then dropped rows' if s['mode'] == 'selection' else 'file order'}); "
                  f"texts are cut to {TEXT_CHARS} characters, ⏎ marks a line break.", ""]
    return "\n".join(lines)
