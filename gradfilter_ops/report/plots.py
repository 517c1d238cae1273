"""The report's PNGs: the G-SNR histogram, early against late norm, G-SNR against length, kept share
per group. matplotlib is imported only here, and only when a plot is drawn."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

from .. import fields
from .rows import is_finite

SYMLOG_DECADES = 3.0  # a symlog axis when |values| span at least this many decades
MAX_GROUP_BARS = 30  # the group plot shows the largest groups; the table shows all

PLOTS = {
    "hist": "gsnr_hist.png",
    "early_late": "early_late.png",
    "length": "gsnr_length.png",
    "groups": "groups.png",
}
KEPT_COLOR, DROPPED_COLOR = "tab:blue", "tab:orange"


def require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("gsnr-report: the plots need matplotlib: `pip install matplotlib` "
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


def symlog_edges(lo: float, hi: float, linthresh: float, bins: int) -> list[float]:
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
            edges = symlog_edges(lo, hi, linthresh, bins)
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
              if is_finite(r[fields.EARLY]) and is_finite(r[fields.LATE])
              and r[fields.EARLY] > 0 and r[fields.LATE] > 0]
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
    points = [(r[fields.RESPONSE_TOKENS], r[fields.GSNR], r["kept"]) for r in records
              if is_finite(r[fields.GSNR]) and is_finite(r[fields.RESPONSE_TOKENS])]
    if not points:
        _no_data(ax, f"no rows with both {fields.GSNR} and {fields.RESPONSE_TOKENS}")
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
    ax.set_xlabel(f"{fields.RESPONSE_TOKENS}")
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
    ax.set_title(f"kept share per {_plain(summary['group_by'])}"
                 + (f" (largest {len(groups)}, {more} more in the table)" if more > 0 else ""), fontsize="medium")
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
