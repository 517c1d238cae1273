"""The drop sink (`dropped.DropSink`) through the real Data-Juicer ops: reasons counted and logged once per
step, the dropped rows in one file per step, by id and with their reasons."""

import json
from collections import Counter

import pytest
from datasets import Dataset

from gradfilter_ops import fields
from gradfilter_ops.selection import range_drops, select

STATS = "__dj__stats__"


def stats_rows(n: int) -> list[dict]:
    """Rows with G-SNR stats as the scorer writes them: every 7th row without a score, ties among the others."""
    rows = []
    for i in range(n):
        status = fields.OK if i % 7 else fields.EMPTY_RESPONSE
        rows.append({"id": f"r{i}", STATS: {fields.GSNR: float((i * 5) % 9) if status == fields.OK else None,
                                            fields.STATUS: status, fields.TOTAL_TOKENS: 20 + i}})
    return rows


def read_dropped(path) -> dict[str, str]:
    return {row["id"]: row["gsnr_drop_reason"] for row in map(json.loads, path.open())}


@pytest.fixture()
def info_logged():
    """Adds a loguru sink that collects INFO messages; call it after building the ops (building a Data-Juicer
    op resets loguru's sinks)."""
    from loguru import logger

    messages, sinks = [], []
    yield lambda: sinks.append(logger.add(lambda m: messages.append(str(m)), level="INFO")) or messages
    for sink in sinks:
        logger.remove(sink)


def test_each_top_k_step_sinks_its_dropped_rows_into_its_own_file(tmp_path, monkeypatch, info_logged):
    from data_juicer.config import config
    from data_juicer.core.data import NestedDataset
    from jsonargparse import Namespace

    from gradfilter_ops.ops import GSNRTopKFilter

    steps = [{"gsnr_scorer": {}}, {"gsnr_top_k_filter": {"top_k": 8}}, {"gsnr_top_k_filter": {"top_k": 3}}]
    monkeypatch.setattr(config, "global_cfg", Namespace(process=steps, work_dir=str(tmp_path)))
    ops = [GSNRTopKFilter(top_k=8, work_dir=str(tmp_path)), GSNRTopKFilter(top_k=3, work_dir=str(tmp_path))]
    for op, step in zip(ops, steps[1:]):
        op._op_cfg = step  # as Data-Juicer's `load_ops` gives each op its step
    logged = info_logged()
    rows = stats_rows(14)
    second_in = ops[0].process(NestedDataset(Dataset.from_list(rows)))
    kept = ops[1].process(second_in)

    stats = [r[STATS] for r in rows]
    first = select([s[fields.GSNR] for s in stats], [s[fields.STATUS] for s in stats], top_k=8)
    after = [rows[i] for i in first.keep]
    second = select([r[STATS][fields.GSNR] for r in after], [r[STATS][fields.STATUS] for r in after], top_k=3)
    assert sorted(p.name for p in tmp_path.glob("*.jsonl")) == ["gsnr_dropped_step2.jsonl", "gsnr_dropped_step3.jsonl"]
    assert read_dropped(tmp_path / "gsnr_dropped_step2.jsonl") == {rows[i]["id"]: why
                                                                   for i, why in first.reasons.items()}
    assert read_dropped(tmp_path / "gsnr_dropped_step3.jsonl") == {after[i]["id"]: why
                                                                   for i, why in second.reasons.items()}
    assert list(kept["id"]) == [after[i]["id"] for i in second.keep]
    lines = [m for m in logged if "gsnr_top_k_filter: kept" in m]
    assert len(lines) == 2  # once per step
    assert (f"kept 8 of 14 rows; dropped by reason: {{'empty_response': 2, 'below_top_k_cutoff': 4}}; wrote them "
            f"to {tmp_path / 'gsnr_dropped_step2.jsonl'}") in lines[0]
    assert "kept 3 of 8 rows; dropped by reason: {'below_top_k_cutoff': 5}" in lines[1]


def test_the_scorer_range_sinks_the_rows_outside_it_with_their_reasons(tmp_path, tiny_gpt2_dir, info_logged):
    from data_juicer.core.data import NestedDataset

    from gradfilter_ops.ops import GSNRScorerOp
    from gradfilter_ops.provenance import proof, scorer_fingerprint

    op = GSNRScorerOp(hf_model=str(tiny_gpt2_dir), device="cpu", use_cache=False, min_gsnr=4.0, max_length=64,
                      num_proc=1, work_dir=str(tmp_path))
    rows = stats_rows(14)
    for row in rows:  # scores this scorer wrote, so that nothing is trained
        row[STATS][fields.PROOF] = proof(scorer_fingerprint(op.scorer), op.scorer.config, row, row[STATS])
    logged = info_logged()
    kept = op.run(NestedDataset(Dataset.from_list(rows)))

    reasons = range_drops([r[STATS][fields.GSNR] for r in rows], [r[STATS][fields.STATUS] for r in rows], 4.0, None)
    assert list(kept["id"]) == [r["id"] for i, r in enumerate(rows) if i not in reasons]
    assert read_dropped(tmp_path / "gsnr_scorer_dropped.jsonl") == {rows[i]["id"]: why for i, why in reasons.items()}
    assert {reasons[0], reasons[2]} == {fields.EMPTY_RESPONSE, fields.OUTSIDE_RANGE}
    counts = dict(Counter(reasons[i] for i in sorted(reasons)))
    lines = [m for m in logged if "gsnr_scorer: kept" in m]
    assert len(lines) == 1 and (f"kept {14 - len(reasons)} of 14 rows in the gsnr range; dropped by reason: {counts}; "
                                f"wrote them to {tmp_path / 'gsnr_scorer_dropped.jsonl'}") in lines[0]


def test_a_step_that_drops_nothing_writes_no_file_and_logs_its_counts(tmp_path, info_logged):
    from gradfilter_ops.dropped import DropSink, verdicts

    logged = info_logged()
    sink = DropSink("step", tmp_path / "dropped.jsonl")
    assert sink.take(verdicts(3, {}), lambda indices: pytest.fail("no row to fetch")) == [0, 1, 2]
    assert not (tmp_path / "dropped.jsonl").exists() and sink.written is None and sink.counts == Counter()
    assert sink.seconds is not None and any("step: kept 3 of 3 rows; dropped by reason: {}" in m for m in logged)
