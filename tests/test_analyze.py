"""`dj-analyze` on a recipe with `gsnr_scorer`: the G-SNR stats in Data-Juicer's overview table and plots."""

import csv
import json
import statistics

import pytest
import yaml

from gradfilter_ops import fields

from helpers import seed_tasks
from warm_commands import run_command

# One worker runs the whole file (`--dist loadgroup`): its module fixtures (its dj-analyze run) are built once.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("test_analyze")]

STATS = "__dj__stats__"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def analysis(tiny_gpt2_dir, tmp_path_factory):
    """`(stats rows, overall table by column, analysis folder, job folder)` of one real `dj-analyze` run on 12
    demo rows and an empty response. `min_gsnr` is far above any score: `dj-process` would drop every row, while
    an analysis, like Data-Juicer's own filters', keeps them all."""
    tmp = tmp_path_factory.mktemp("analyze")
    data = tmp / "data.jsonl"
    rows = seed_tasks(12) + [{"id": "bad_empty", "instruction": "Say something.", "input": "", "output": " "}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scorer = {"hf_model": str(tiny_gpt2_dir), "device": "cpu", "precision": "fp32", "use_cache": False,
              "num_members": 2, "train_batch_size": 4, "score_batch_size": 4, "max_length": 64, "min_gsnr": 1e30}
    recipe = tmp / "analyze.yaml"
    recipe.write_text(yaml.safe_dump({
        "project_name": "analyze", "dataset_path": str(data), "export_path": str(tmp / "out" / "result.jsonl"),
        "np": 1, "text_keys": "id",
        "process": [{"gsnr_scorer": scorer}, {"gsnr_top_k_filter": {"top_k": 2}}],
    }))
    run = run_command("dj-analyze", ["--config", recipe])
    assert run.returncode == 0, run.log[-6000:]
    stats = [json.loads(line)[STATS] for line in (tmp / "out" / "result_stats.jsonl").open()]
    overall_csv = next((tmp / "out").glob("*/analysis/overall.csv"))
    with overall_csv.open() as f:
        table = list(csv.reader(f))
    header, body = table[0], table[1:]
    overall = {col: {row[0]: row[i] for row in body} for i, col in enumerate(header) if i}
    return stats, overall, overall_csv.parent, overall_csv.parent.parent


def test_every_row_is_analysed_and_none_dropped(analysis):
    stats, _, _, job_dir = analysis
    assert len(stats) == 13
    assert [s[fields.STATUS] for s in stats] == [fields.OK] * 12 + [fields.EMPTY_RESPONSE]
    assert not (job_dir / "gsnr_scorer_dropped.jsonl").exists()


def test_overall_table_describes_the_gsnr_stats(analysis):
    stats, overall, folder, _ = analysis
    scores = [s[fields.GSNR] for s in stats if s[fields.GSNR] is not None]
    assert float(overall[fields.GSNR]["count"]) == len(scores) == 12
    assert float(overall[fields.GSNR]["mean"]) == pytest.approx(statistics.fmean(scores), rel=1e-9)
    assert float(overall[fields.GSNR]["min"]) == pytest.approx(min(scores), rel=1e-9)
    assert float(overall[fields.GSNR]["max"]) == pytest.approx(max(scores), rel=1e-9)
    tokens = [s[fields.RESPONSE_TOKENS] for s in stats]
    assert float(overall[fields.RESPONSE_TOKENS]["mean"]) == pytest.approx(statistics.fmean(tokens), rel=1e-9)
    assert overall[fields.STATUS]["top"] == fields.OK and float(overall[fields.STATUS]["unique"]) == 2
    for name in (fields.EARLY, fields.LATE, fields.DROP, fields.NOISE):
        assert float(overall[name]["count"]) == 12, name
    header = (folder / "overall.md").read_text().splitlines()[0]
    assert [cell.strip() for cell in header.strip("|").split("|")][1:] == list(fields.STATS_FIELDS)


def test_histograms_and_boxes_are_drawn_for_the_scores(analysis):
    _, _, folder, _ = analysis
    for name in (fields.GSNR, fields.EARLY, fields.LATE, fields.DROP, fields.NOISE):
        for kind in ("hist", "box"):
            assert (folder / f"{name}-{kind}.png").read_bytes()[:8] == PNG, f"{name}-{kind}.png"
    assert (folder / f"{fields.STATUS}-hist.png").read_bytes()[:8] == PNG
