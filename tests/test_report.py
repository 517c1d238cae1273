"""gradfilter_ops.report (`gsnr-report`): loading both layouts, the summary maths, the warnings, the Markdown
and the PNGs."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from gradfilter_ops import fields
from gradfilter_ops.dropped import DROP_REASON
from gradfilter_ops.report.cli import main
from gradfilter_ops.report.markdown import jsonable, md_cell
from gradfilter_ops.report.plots import require_matplotlib, symlog_edges, symlog_threshold, symlog_ticks
from gradfilter_ops.report.rows import NO_GROUP, NO_STATUS, report_rows, score_fields
from gradfilter_ops.report.statistics import is_degenerate, describe_selection

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def scores(gsnr, early, late, noise, status=fields.OK, response_tokens=10, truncated=False):
    """Score fields as the scorer writes them; the drop is derived from early and late."""
    drop = None if early is None else (early - late) / (early + 1e-8)
    return {fields.GSNR: gsnr, fields.EARLY: early, fields.LATE: late, fields.DROP: drop, fields.NOISE: noise,
            fields.STATUS: status, fields.TRUNCATED: truncated, fields.RESPONSE_TOKENS: response_tokens,
            fields.TOTAL_TOKENS: None if response_tokens is None else response_tokens + 20}


def row(i, source, score, layout, **extra):
    base = {"id": f"r{i}", "instruction": f"instruction {i}", "input": "", "output": f"output {i}",
            "source": source, **extra}
    if layout == "stats":  # Data-Juicer with keep_stats_in_res_ds: true
        return {**base, "__dj__stats__": {"text_len": 10, **score}}
    return {**base, **score}  # the datasets API: columns


def selection_rows():
    """6 kept rows (Data-Juicer layout) and 8 dropped rows (columns layout), with known numbers.

    gsnr spans -2e5 .. 3e4 (a symlog histogram); 3 of the 14 rows have no finite gsnr (21 % > 20 %);
    of the 11 finite drops, 6 are negative (late > early).
    """
    kept = [
        row(0, "a", scores(3e4, 10.0, 1.0, 1e-4), "stats",
            instruction="pipe | and\nnewline " + "x" * 200),   # escaped and cut in the table
        row(1, "a", scores(50.0, 4.0, 2.0, 0.01), "stats"),
        row(2, "b", scores(7.5, 3.0, 2.0, 0.04), "stats"),
        row(3, "a", scores(2.0, 5.0, 4.0, 0.1), "stats"),
        row(4, "b", scores(0.5, 8.0, 6.0, 0.5), "stats"),
        row(5, "c", scores(0.25, 2.0, 2.5, 1.0, truncated=True), "stats"),  # negative drop
    ]
    dropped = [
        (row(6, "a", scores(0.1, 1.0, 1.5, 5.0), "columns"), fields.BELOW_CUTOFF),
        (row(7, "a", scores(-3.0, 1.0, 2.0, 0.3), "columns"), fields.BELOW_CUTOFF),
        (row(8, "b", scores(-50.0, 1.0, 3.0, 0.04), "columns"), fields.BELOW_CUTOFF),
        (row(9, "b", scores(-2e5, 1.0, 9.0, 4e-5), "columns"), fields.BELOW_CUTOFF),
        (row(10, "c", scores(1.0, 9.0, 20.0, 1.2), "columns"), fields.GROUP_QUOTA_FULL),
        (row(11, "a", scores(None, None, None, None, fields.EMPTY_RESPONSE, 0), "columns", output=""),
         fields.EMPTY_RESPONSE),
        (row(12, "b", scores(None, None, None, None, fields.MISSING_FIELD, None), "columns", output=None),
         fields.MISSING_FIELD),
        (row(13, "c", scores(float("nan"), float("nan"), 3.0, 1.0, fields.NON_FINITE), "columns"),
         fields.NON_FINITE),
    ]
    return kept, [{**r, DROP_REASON: reason} for r, reason in dropped]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")  # NaN as JSON's NaN
    return path


# Pixel size of each PNG at the default 80 dpi: the figure size in inches times 80 (the group plot is
# 2 inches high for up to 3 groups).
PNG_SIZES = {"gsnr_hist.png": (512, 320), "early_late.png": (416, 368), "gsnr_length.png": (512, 320),
             "groups.png": (512, 160)}


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    size = struct.unpack(">II", data[16:24])  # the IHDR chunk: width, height
    assert size == PNG_SIZES[path.name], (path, size)


# --- loading and the summary maths ------------------------------------------------------------------------

def test_both_layouts_are_read():
    kept, dropped = selection_rows()
    records = report_rows(kept=kept, dropped=dropped, group_by="source")
    assert len(records) == 14
    assert records[0][fields.GSNR] == 3e4 and records[0][fields.STATUS] == fields.OK  # from __dj__stats__
    assert records[7][fields.GSNR] == -3.0 and records[7]["reason"] == fields.BELOW_CUTOFF  # from columns
    assert records[11][fields.GSNR] is None and records[11][fields.STATUS] == fields.EMPTY_RESPONSE
    assert math.isnan(records[13][fields.GSNR])
    assert [r["kept"] for r in records] == [True] * 6 + [False] * 8
    assert records[12]["group"] == "b"
    # Data-Juicer stats without G-SNR fields fall back to the columns
    mixed = score_fields({"__dj__stats__": {"text_len": 3}, fields.GSNR: 1.5, fields.STATUS: fields.OK})
    assert mixed[fields.GSNR] == 1.5
    assert score_fields({"x": 1})[fields.STATUS] == NO_STATUS


def test_summary_counts_reasons_groups_and_cutoff():
    kept, dropped = selection_rows()
    s = describe_selection(report_rows(kept=kept, dropped=dropped, group_by="source"),
                      mode="selection", group_by="source", examples=3)
    assert (s["rows"], s["kept"], s["dropped"]) == (14, 6, 8)
    assert s["drop_reasons"] == {fields.BELOW_CUTOFF: 4, fields.GROUP_QUOTA_FULL: 1, fields.EMPTY_RESPONSE: 1,
                                 fields.MISSING_FIELD: 1, fields.NON_FINITE: 1}
    assert s["statuses"] == {fields.OK: 11, fields.EMPTY_RESPONSE: 1, fields.MISSING_FIELD: 1, fields.NON_FINITE: 1}
    assert (s["finite_gsnr"], s["non_finite_gsnr"]) == (11, 3)
    assert s["non_finite_share"] == pytest.approx(3 / 14)
    assert (s["negative_drops"], s["finite_drops"]) == (6, 11)  # rows 5..10; row 13's drop is NaN
    assert (s["grew"], s["early_late_pairs"]) == (6, 11)
    assert s["truncated"] == 1
    assert s["cutoff"] == 0.25  # the lowest kept finite gsnr
    assert s["gsnr"]["min"] == -2e5 and s["gsnr"]["max"] == 3e4 and s["gsnr"]["median"] == 0.5
    assert s["gsnr_kept"]["count"] == 6 and s["gsnr_dropped"]["count"] == 5
    assert s["groups"] == [
        {"group": "a", "rows": 6, "kept": 3, "kept_share": 0.5},
        {"group": "b", "rows": 5, "kept": 2, "kept_share": 0.4},
        {"group": "c", "rows": 3, "kept": 1, "kept_share": pytest.approx(1 / 3)},
    ]
    assert [e[fields.GSNR] for e in s["top"]] == [3e4, 50.0, 7.5]
    assert [e[fields.GSNR] for e in s["bottom"]] == [-2e5, -50.0, -3.0]
    assert s["bottom"][0]["reason"] == fields.BELOW_CUTOFF and s["top"][0]["kept"]
    codes = {w["code"] for w in s["warnings"]}
    assert codes == {"tiny", "non_finite", "negative_drops"}  # 6 of 11 drops negative: > 50 %
    json.dumps(jsonable(s), allow_nan=False)


def test_scored_mode_selects_the_top_ratio_like_the_filter():
    rows = [row(i, "ab"[i % 2], scores(float(i), 1.0, 1.0 + (i % 3), 0.5), "columns") for i in range(60)]
    rows[5] = row(5, "b", scores(None, None, None, None, fields.EMPTY_RESPONSE), "columns")
    records = report_rows(scored=rows, top_ratio=0.1, group_by="source")
    s = describe_selection(records, mode="scored", group_by="source")
    assert s["kept"] == 6 and s["cutoff"] == 54.0
    assert [r["index"] for r in records if r["kept"]] == list(range(54, 60))
    assert s["drop_reasons"] == {fields.BELOW_CUTOFF: 53, fields.EMPTY_RESPONSE: 1}
    assert s["negative_drops"] == 39 and "negative_drops" in {w["code"] for w in s["warnings"]}
    assert "tiny" not in {w["code"] for w in s["warnings"]}
    assert describe_selection(report_rows(scored=rows), mode="scored")["kept"] == 6  # default ratio 0.1


def test_degenerate_detection():
    assert is_degenerate([2.5, 2.5, 2.5 * (1 + 1e-14)])
    assert is_degenerate([0.0, 0.0])
    assert not is_degenerate([2.5, 2.5001])
    assert not is_degenerate([1.0])
    assert symlog_threshold([-2e5, 3e4, 0.5, -1.0, 2.0]) is not None
    assert symlog_threshold([-0.2, 0.1, 5.8]) is None
    edges = symlog_edges(-2e5, 3e4, 0.1, 10)  # the extreme values stay inside the histogram
    assert edges[0] == -2e5 and edges[-1] == 3e4 and edges == sorted(edges)
    assert symlog_ticks(-2e5, 3e4, 0.1) == [-1e5, -1e3, -10.0, -0.1, 0.0, 1.0, 100.0, 1e4]


def test_markdown_cells_are_escaped_and_cut():
    cell = md_cell("a | b\nc\r\nd <e> *f*", limit=None)
    assert "\n" not in cell and "\r" not in cell
    assert "a \\| b ⏎ c ⏎ d &lt;e&gt; \\*f\\*" == cell
    cut = md_cell("y" * 300, limit=120)
    assert len(cut) == 120 and cut.endswith("…")


# --- the command line -------------------------------------------------------------------------------------

def test_main_writes_report_and_valid_pngs(tmp_path):
    kept, dropped = selection_rows()
    out = tmp_path / "report"
    code = main(["--kept", str(write_jsonl(tmp_path / "kept.jsonl", kept)),
                     "--dropped", str(write_jsonl(tmp_path / "dropped.jsonl", dropped)),
                     "--group-by", "source", "--examples", "3", "--out", str(out)])
    assert code == 0
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "| rows | 14 |" in md and "| kept | 6 (42.9%) |" in md and "| dropped | 8 |" in md
    for reason, count in ((fields.BELOW_CUTOFF, 4), (fields.GROUP_QUOTA_FULL, 1), (fields.EMPTY_RESPONSE, 1),
                          (fields.MISSING_FIELD, 1), (fields.NON_FINITE, 1)):
        assert f"| `{reason}` | {count} |" in md
    assert "| `ok` | 11 | 78.6% |" in md
    assert f"| negative `{fields.DROP}` | 6 of 11 (54.5%) |" in md
    assert "| cut-off (lowest kept finite G-SNR) | 0.25 |" in md
    assert "| a | 6 | 3 | 50.0% |" in md and "| b | 5 | 2 | 40.0% |" in md and "| c | 3 | 1 | 33.3% |" in md
    assert "**non_finite**" in md and "**negative_drops**" in md and "docs/method.md" in md and "**tiny**" in md
    assert "**degenerate**" not in md and "**no_dropped**" not in md
    assert "## Top 3 by G-SNR" in md and "## Bottom 3 by G-SNR" in md
    assert "pipe \\| and ⏎ newline xxx" in md and "x" * 130 not in md
    assert "| 9 | dropped (`below_top_k_cutoff`) | -200000 |" in md
    examples = md[md.index("## Top 3 by G-SNR"):].splitlines()
    table_lines = [line for line in examples if line.startswith("|")]
    assert len(table_lines) == 2 * (2 + 3)
    for line in table_lines:  # escaped pipes and newlines keep every example on one row of 11 columns
        assert line.replace("\\|", "").count("|") == 12, line
    for name in ("gsnr_hist.png", "early_late.png", "gsnr_length.png", "groups.png"):
        assert f"]({name})" in md
        assert_png(out / name)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["kept"] == 6 and summary["drop_reasons"][fields.BELOW_CUTOFF] == 4


def test_degenerate_scored_input_warns(tmp_path):
    rows = [row(i, "s", scores(1.25, 2.0, 1.0, 0.8), "stats") for i in range(60)]
    out = tmp_path / "degenerate"
    assert main(["--scored", str(write_jsonl(tmp_path / "scored.jsonl", rows)), "--top-ratio", "0.25",
                     "--out", str(out)]) == 0
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "**degenerate**" in md and "ranking is by dataset order only" in md
    assert "| kept | 15 (25.0%) |" in md and "**tiny**" not in md and "**negative_drops**" not in md
    assert not (out / "groups.png").exists()
    for name in ("gsnr_hist.png", "early_late.png", "gsnr_length.png"):
        assert_png(out / name)


def test_kept_only_and_no_scores(tmp_path):
    rows = [row(i, "s", scores(None, None, None, None, fields.EMPTY_RESPONSE), "columns") for i in range(3)]
    out = tmp_path / "unscored"
    assert main(["--kept", str(write_jsonl(tmp_path / "k.jsonl", rows)), "--out", str(out), "--no-plots"]) == 0
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "**no_scores**" in md and "**no_dropped**" in md and "| dropped | not given |" in md
    assert "No row has a finite score." in md and ".png" not in md


def test_odd_group_names_and_an_empty_file(tmp_path):
    names = ["cost $^$ | x", None, "multi\nline"]  # "$^$" is a mathtext error unless the plot escapes it
    rows = [row(i, names[i % 3], scores(float(i), 2.0, 1.0, 0.1), "columns") for i in range(9)]
    out = tmp_path / "odd"
    assert main(["--scored", str(write_jsonl(tmp_path / "s.jsonl", rows)), "--group-by", "source",
                     "--out", str(out)]) == 0
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "| cost \\$^\\$ \\| x | 3 |" in md and f"| {NO_GROUP} | 3 |" in md and "| multi ⏎ line | 3 |" in md
    assert_png(out / "groups.png")
    empty = tmp_path / "empty"
    assert main(["--scored", str(write_jsonl(tmp_path / "e.jsonl", [])), "--out", str(empty)]) == 0
    assert "**empty**" in (empty / "report.md").read_text(encoding="utf-8")
    assert_png(empty / "gsnr_hist.png")


def test_bad_arguments_fail_clearly(tmp_path, capsys):
    f = write_jsonl(tmp_path / "x.jsonl", [row(0, "s", scores(1.0, 1.0, 1.0, 1.0), "columns")])
    for argv in (["--out", "o"], ["--kept", str(f), "--scored", str(f), "--out", "o"],
                 ["--scored", str(f), "--dropped", str(f), "--out", "o"],
                 ["--kept", str(f), "--top-ratio", "0.1", "--out", "o"],
                 ["--kept", str(tmp_path / "missing.jsonl"), "--out", "o"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    assert "no such file" in capsys.readouterr().err
    for out in (f, f / "report"):  # --out at a file, or under one: a usage error, not a traceback
        with pytest.raises(SystemExit) as e:
            main(["--scored", str(f), "--out", str(out), "--no-plots"])
        assert e.value.code == 2
        assert f"--out must be a folder, but {f} is a file" in capsys.readouterr().err


def test_missing_matplotlib_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(SystemExit, match=r"pip install matplotlib.*gradfilter-ops\[report\]"):
        require_matplotlib()


def test_help_does_not_import_matplotlib():
    code = ("import sys\nfrom gradfilter_ops.report.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('MPL' if 'matplotlib' in sys.modules else 'NO_MPL')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--group-by" in result.stdout and result.stdout.strip().endswith("NO_MPL")
