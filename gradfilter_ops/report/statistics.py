"""Every number of the report (counts, reasons, quantiles, groups, top and bottom rows) and its warnings."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from typing import Any, Optional, Sequence

from .. import fields
from ..engine.gsnr import NEGATIVE_DROP_WARN_SHARE, negative_drop_share
from .rows import NO_GROUP, is_finite

DEGENERATE_REL = 1e-12  # finite G-SNRs all equal within this relative spread: degenerate
NON_FINITE_WARN = 0.2  # warn when more than this share of rows has no finite G-SNR
TINY_ROWS = 50  # warn below this many rows


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
    keys = ("index", "kept", "reason", "group", *fields.PARTS, fields.RESPONSE_TOKENS, fields.STATUS)
    return {**{k: r[k] for k in keys}, "prompt": r["prompt"], "response": r["response"]}


def describe_selection(records: Sequence[dict], *, mode: str = "selection", group_by: Optional[str] = None,
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
        "negative_drop_share": negative_drop_share(drops),
        "early_late_pairs": len(pairs),
        "grew": grew,
        "grew_share": _share(grew, len(pairs)),
        "truncated": sum(r[fields.TRUNCATED] is True for r in records),
        "cutoff": min(kept_scores) if kept_scores else None,
        "gsnr": describe(scores),
        "gsnr_kept": describe(kept_scores),
        "gsnr_dropped": describe([r[fields.GSNR] for r in dropped if is_finite(r[fields.GSNR])]),
        "response_tokens": describe([r[fields.RESPONSE_TOKENS] for r in records
                                     if is_finite(r[fields.RESPONSE_TOKENS])]),
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
                           f"finite `{fields.GSNR}` (more than {NON_FINITE_WARN:.0%}); "
                           f"statuses: {_counts(summary['statuses'])}.")
    if is_degenerate(scores):
        warn("degenerate", f"All {len(scores)} finite `{fields.GSNR}` values are equal (within {DEGENERATE_REL:g} "
                           f"relative, value {scores[0]:.6g}): the ranking is by dataset order only. Check the "
                           f"ensemble (one member gives zero noise) and the training run.")
    share = summary["negative_drop_share"]
    if share is not None and share > NEGATIVE_DROP_WARN_SHARE:
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
