"""G-SNR on Ray Data (`gradfilter_ops.distributed`) and the Ray ops, on a real local Ray cluster."""

import json
import math
from collections import Counter

import pytest
from datasets import Dataset

from gradfilter_ops import GSNRScorer, fields
from gradfilter_ops.selection import select
from gradfilter_ops.threads import FORKED_MAP_WORKER

from helpers import seed_tasks

# One worker runs the whole file (`--dist loadgroup`): its module fixtures (its Ray cluster) are built once.
pytestmark = pytest.mark.xdist_group("test_ray")

ray = pytest.importorskip("ray")
STATS = "__dj__stats__"


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def on_ray_cluster(test):
    """Marks a test that runs on the module's local Ray cluster: it starts Ray, so it is an integration test;
    the tests without the mark need no cluster and stay in the fast set."""
    return pytest.mark.integration(pytest.mark.usefixtures("local_ray")(test))


def bad_rows() -> list[dict]:
    return [{"id": "bad_empty", "instruction": "Say something.", "input": "", "output": " "},
            {"id": "bad_missing", "instruction": "Say something.", "input": None}]


@on_ray_cluster
def test_ray_scores_equal_the_datasets_api_with_members_split_over_tasks(tiny_config):
    import pyarrow as pa

    from gradfilter_ops.distributed import add_scores, fit_dataset, score_dataset

    rows = seed_tasks(10) + bad_rows()
    expected = GSNRScorer(tiny_config(num_members=3)).score(Dataset.from_list(rows))

    def assert_scores_of_the_datasets_api(got: dict, run: str) -> None:
        assert len(got) == len(rows), run
        for row in expected:
            twin = got[row["id"]]
            assert twin[fields.STATUS] == row[fields.STATUS]
            assert twin[fields.TOTAL_TOKENS] == row[fields.TOTAL_TOKENS]
            if row[fields.STATUS] == fields.OK:
                assert twin[fields.EARLY] == pytest.approx(row[fields.EARLY], rel=1e-4), run
                assert twin[fields.LATE] == pytest.approx(row[fields.LATE], rel=1e-4), run
            else:
                assert twin[fields.GSNR] is None

    on_ray = tiny_config(num_members=3, use_cache=True)
    mine = GSNRScorer(on_ray)
    dataset = ray.data.from_items(rows, override_num_blocks=3).materialize()
    scored = score_dataset(mine, dataset, train_tasks=2, batch_size=8)
    # Only the copies sent to Ray workers keep every thread; these stay safe for `datasets`' forked maps.
    assert mine.thread_policy == scored.scorer.thread_policy == FORKED_MAP_WORKER
    assert_scores_of_the_datasets_api({row["id"]: row for row in scored.dataset.take_all()}, "trained")
    assert scored.scorer.snapshots.members == [0, 1, 2]  # three members, trained in two tasks
    assert scored.scorer.summary["statuses"] == {"ok": 10, "empty_response": 1, "missing_field": 1}
    # The second fit finds every member in the cache; each task must keep only its own. Its rows are scored
    # here by the scoring actors' block function (the actors ran above).
    cached = fit_dataset(GSNRScorer(on_ray), dataset, train_tasks=2)
    assert cached.snapshots.members == [0, 1, 2]
    table = add_scores(pa.Table.from_pylist(rows), cached)
    assert_scores_of_the_datasets_api({row["id"]: row for row in table.to_pylist()}, "cached")


class WhereTrained(GSNRScorer):
    """The real scorer, noting the process it trained in and that process's `resources.MODEL_TASKS` variables."""

    def fit(self, dataset, batch_size=1000, members=None):
        import os

        from gradfilter_ops.distributed.resources import MODEL_TASKS

        self.trained_in = (os.getpid(), {name: os.environ.get(name) for name in MODEL_TASKS["env_vars"]})
        return super().fit(dataset, batch_size, members)


@on_ray_cluster
def test_training_runs_again_in_the_worker_that_imported_torch_though_block_reads_ran_between(tiny_config):
    """Training runs in the pool of the tasks that need torch (`resources.MODEL_TASKS`), so the second training,
    after block reads in the default pool, runs in the first one's process, where torch is imported already."""
    import sys

    from gradfilter_ops.distributed import fit_dataset, read_fields
    from gradfilter_ops.distributed.resources import MODEL_TASKS

    module = sys.modules[__name__]
    ray.cloudpickle.register_pickle_by_value(module)  # the workers cannot import the tests folder
    try:
        dataset = ray.data.from_items(seed_tasks(6), override_num_blocks=3).materialize()
        first = fit_dataset(WhereTrained(tiny_config()), dataset)
        for _ in range(3):
            read_fields(dataset, ["id"])
        second = fit_dataset(WhereTrained(tiny_config(seed=1)), dataset)
    finally:
        ray.cloudpickle.unregister_pickle_by_value(module)
    assert first.trained_in[1] == MODEL_TASKS["env_vars"]
    assert second.trained_in == first.trained_in


def stats_rows(n: int) -> list[dict]:
    """Rows as Data-Juicer's Ray executor holds them: stats of another op, and G-SNR stats with ties."""
    rows = []
    for i in range(n):
        status = fields.OK if i % 7 else fields.EMPTY_RESPONSE
        gsnr = float((i * 5) % 9) if status == fields.OK else None
        rows.append({"id": f"r{i}", "source": "a" if i % 3 else "b",
                     STATS: {"text_len": 10 + i, fields.GSNR: gsnr, fields.STATUS: status,
                             fields.TOTAL_TOKENS: 20 + i}})
    return rows


@on_ray_cluster
@pytest.mark.parametrize("budget", [{"top_k": 7}, {"top_ratio": 0.5, "group_by": "source", "min_per_group": 3},
                                    {"max_tokens": 200}])
def test_ray_selection_over_blocks_equals_the_selection_over_the_rows(tmp_path, budget):
    from gradfilter_ops.distributed import select_dataset

    rows = stats_rows(30)
    stats = [r[STATS] for r in rows]
    local = {k: v for k, v in budget.items() if k != "group_by"}
    expected = select([s[fields.GSNR] for s in stats], [s[fields.STATUS] for s in stats],
                      tokens=[s[fields.TOTAL_TOKENS] for s in stats],
                      groups=[r["source"] for r in rows] if "group_by" in budget else None, **local)
    selected = select_dataset(ray.data.from_items(rows, override_num_blocks=4), stats_column=STATS,
                              dropped_path=tmp_path / "dropped.jsonl", **budget)
    assert [r["id"] for r in selected.dataset.take_all()] == [rows[i]["id"] for i in expected.keep]
    dropped = [json.loads(line) for line in (tmp_path / "dropped.jsonl").open()]
    reasons = {rows[i]["id"]: why for i, why in expected.reasons.items()}
    assert {r["id"]: r["gsnr_drop_reason"] for r in dropped} == reasons
    assert all(r[STATS]["text_len"] == int(r["id"][1:]) + 10 for r in dropped)  # rows as they came


@on_ray_cluster
def test_ray_selection_without_scores_says_so():
    from gradfilter_ops.distributed import MissingScores, select_dataset

    rows = [{"id": "x", STATS: {"text_len": 3}}]
    with pytest.raises(MissingScores, match="1 of 1 rows have no G-SNR stats"):
        select_dataset(ray.data.from_items(rows), stats_column=STATS, top_k=1)


def test_scored_rows_keep_their_score_and_other_stats_survive(tiny_config):
    """An unfitted scorer refuses to score a scoreable row, so this passes only if the scored rows are skipped."""
    from gradfilter_ops.distributed import add_scores
    from gradfilter_ops.provenance import proof, scorer_fingerprint

    import pyarrow as pa

    scored = {fields.GSNR: 2.5, fields.EARLY: 1.0, fields.LATE: 0.5, fields.DROP: 0.5, fields.NOISE: 0.2,
              fields.STATUS: fields.OK, fields.TRUNCATED: False, fields.RESPONSE_TOKENS: 4, fields.TOTAL_TOKENS: 9,
              fields.ENSEMBLE: "an ensemble"}
    scorer = GSNRScorer(tiny_config())
    scored[fields.PROOF] = proof(scorer_fingerprint(scorer), scorer.config, seed_tasks(1)[0], scored)
    rows = [{**seed_tasks(1)[0], STATS: {"text_len": 5, **scored}}] + \
        [{**row, STATS: {"text_len": 6}} for row in bad_rows()]
    out = add_scores(pa.Table.from_pylist(rows), scorer, STATS).to_pylist()
    assert out[0][STATS] == {"text_len": 5, **scored}
    assert [r[STATS][fields.STATUS] for r in out[1:]] == [fields.EMPTY_RESPONSE, fields.MISSING_FIELD]
    assert [r[STATS]["text_len"] for r in out] == [5, 6, 6] and out[1][STATS][fields.GSNR] is None


@on_ray_cluster
def test_ray_scorer_op_range_drops_rows_with_their_reasons(tmp_path, tiny_gpt2_dir):
    from gradfilter_ops.ops import RayGSNRScorerOp

    from gradfilter_ops.provenance import proof, scorer_fingerprint

    op = RayGSNRScorerOp(hf_model=str(tiny_gpt2_dir), device="cpu", use_cache=False, min_gsnr=4.0, max_length=96,
                         work_dir=str(tmp_path))
    rows = stats_rows(14)
    for row in rows:  # scores this scorer wrote, so they are kept
        row[STATS][fields.PROOF] = proof(scorer_fingerprint(op.scorer), op.scorer.config, row, row[STATS])
    kept = op.run(ray.data.from_items(rows, override_num_blocks=3)).take_all()
    inside = [r["id"] for r in rows if r[STATS][fields.GSNR] is not None and r[STATS][fields.GSNR] >= 4.0]
    assert [r["id"] for r in kept] == inside
    dropped = {json.loads(line)["id"]: json.loads(line)["gsnr_drop_reason"]
               for line in (tmp_path / "gsnr_scorer_dropped.jsonl").open()}
    assert sorted(dropped) == sorted(r["id"] for r in rows if r["id"] not in inside)
    assert dropped["r0"] == fields.EMPTY_RESPONSE and dropped["r2"] == fields.OUTSIDE_RANGE
    assert json.loads((tmp_path / "gsnr_manifest.json").read_text())["summary"]["rows"] == 14


def test_default_ops_refuse_the_ray_executor_and_ray_ops_take_their_options():
    import inspect

    from data_juicer.core.preflight import PipelineRuntimeError, post_instantiation_check
    from jsonargparse import Namespace

    from gradfilter_ops.ops import GSNRScorerOp, GSNRTopKFilter, RayGSNRScorerOp, RayGSNRTopKFilter

    with pytest.raises(PipelineRuntimeError, match="does not support executor mode 'ray'"):
        post_instantiation_check([GSNRScorerOp(hf_model="x")], None, Namespace(executor_type="ray"))
    post_instantiation_check([RayGSNRScorerOp(hf_model="x"), RayGSNRTopKFilter(top_k=1)], None,
                             Namespace(executor_type="ray"))
    scorer = inspect.signature(RayGSNRScorerOp.__init__).parameters
    assert set(inspect.signature(GSNRScorerOp.__init__).parameters) | {"train_tasks"} == set(scorer)
    assert set(inspect.signature(GSNRTopKFilter.__init__).parameters) == \
        set(inspect.signature(RayGSNRTopKFilter.__init__).parameters)
    assert ":param train_tasks:" in RayGSNRScorerOp.__init__.__doc__
    with pytest.raises(ValueError, match="unknown option"):
        RayGSNRScorerOp(hf_model="x", num_member=2)
    with pytest.raises(ValueError, match="leave `member_workers` at 1"):
        RayGSNRScorerOp(hf_model="x", member_workers=2)
    with pytest.raises(ValueError, match="exactly one"):
        RayGSNRTopKFilter(top_k=2, top_ratio=0.5)
    assert math.isclose(RayGSNRTopKFilter(top_ratio=0.5).options["top_ratio"], 0.5)


@on_ray_cluster
def test_ray_selection_never_keeps_an_unscored_row(tmp_path):
    from gradfilter_ops.distributed import select_dataset
    from gradfilter_ops.selection import NoScoredRows

    rows = [r for r in stats_rows(14) if r[STATS][fields.STATUS] != fields.OK][:2] + stats_rows(3)[1:]
    selected = select_dataset(ray.data.from_items(rows, override_num_blocks=2), stats_column=STATS, top_ratio=1.0)
    assert [r["id"] for r in selected.dataset.take_all()] == ["r1", "r2"]
    assert set(selected.selection.reasons.values()) == {fields.EMPTY_RESPONSE}
    with pytest.raises(NoScoredRows, match="None of the 2 rows"):
        select_dataset(ray.data.from_items(rows[:2]), stats_column=STATS, top_k=1)


@on_ray_cluster
def test_ray_warns_of_unproven_stats_when_only_some_rows_carry_stats(tiny_config, warnings_logged):
    from gradfilter_ops.distributed import score_dataset

    forged = {**seed_tasks(5)[4], STATS: {fields.GSNR: 1e12, fields.STATUS: fields.OK}}  # made up: no proof
    rows = [{**row, STATS: None} for row in seed_tasks(4)] + [forged]
    scored = score_dataset(GSNRScorer(tiny_config()), ray.data.from_items(rows, override_num_blocks=2),
                           stats_column=STATS, batch_size=8)
    assert any("1 row(s) arrived with G-SNR stats that this scorer did not write" in m for m in warnings_logged), \
        warnings_logged
    got = {row["id"]: row[STATS] for row in scored.dataset.take_all()}
    assert sorted(got) == sorted(r["id"] for r in rows)
    assert got[forged["id"]][fields.GSNR] != 1e12 and got[forged["id"]][fields.PROOF]
    assert all(stats[fields.STATUS] == fields.OK for stats in got.values())


@on_ray_cluster
def test_rows_lost_or_doubled_are_named_by_position_and_id():
    from gradfilter_ops.distributed import LostRows
    from gradfilter_ops.distributed.completeness import check_every_row_once, row_digests

    rows = stats_rows(6)
    before = row_digests(ray.data.from_items(rows, override_num_blocks=2).materialize(), STATS, labels=True)
    # Stats differ after scoring and are left out of the comparison; rows r1 and r4 are missing, r2 is twice.
    after = [{**row, STATS: {"text_len": 0}} for row in rows if row["id"] not in ("r1", "r4")] + [rows[2]]
    with pytest.raises(LostRows) as error:
        check_every_row_once(before, ray.data.from_items(after, override_num_blocks=3).materialize(), STATS)
    assert str(error.value).startswith("scoring on Ray gave back 5 rows for 6; 2 lost: row 1 (id='r1'), "
                                       "row 4 (id='r4'); 1 more than once: row 2 (id='r2').")
    check_every_row_once(before, ray.data.from_items(rows[::-1]).materialize(), STATS)  # order does not matter


@on_ray_cluster
def test_ray_scores_old_output_plus_new_rows_with_one_ensemble(tiny_config):
    """As `gsnr_scorer` does (tests/test_trust.py): a row scored by another ensemble is scored again."""
    from gradfilter_ops.distributed import score_dataset

    rows = [{k: r[k] for k in ("id", "instruction", "input", "output")} for r in seed_tasks(10)]
    config = tiny_config()

    def run(items):
        scored = score_dataset(GSNRScorer(config), ray.data.from_items(items, override_num_blocks=2),
                               stats_column=STATS, batch_size=4)
        return {row["id"]: row for row in scored.dataset.take_all()}

    def fitted_here(items):  # rows as the Ray actors' `add_scores` writes them, of an ensemble fitted here
        import pyarrow as pa

        from gradfilter_ops.distributed import add_scores

        scorer = GSNRScorer(config)
        scorer.fit(items)
        return {row["id"]: row for row in add_scores(pa.Table.from_pylist(items), scorer, STATS).to_pylist()}

    first = fitted_here(rows[:7])  # an earlier run's output
    again = run(list(first.values()) + rows[7:])
    scratch = fitted_here(rows)  # every row, one ensemble trained on all of them
    assert len({row[STATS][fields.ENSEMBLE] for row in again.values()}) == 1
    for row in rows:
        assert again[row["id"]][STATS][fields.GSNR] == pytest.approx(scratch[row["id"]][STATS][fields.GSNR], rel=1e-5)
        assert again[row["id"]][STATS][fields.ENSEMBLE] == scratch[row["id"]][STATS][fields.ENSEMBLE]
    assert any(first[r["id"]][STATS][fields.GSNR] != pytest.approx(scratch[r["id"]][STATS][fields.GSNR], rel=1e-3)
               for r in rows[:7])
    from gradfilter_ops.distributed import select_dataset
    from gradfilter_ops.provenance import MixedEnsembles

    mixed = ray.data.from_items(list(first.values()) + [scratch[r["id"]] for r in rows[7:]])
    with pytest.raises(MixedEnsembles, match="10 rows carry the scores of 2 ensembles .* `ray_gsnr_scorer`"):
        select_dataset(mixed, stats_column=STATS, top_k=2)
    subset = run([first[r["id"]] for r in rows[:3]])  # one ensemble's rows: kept as they are
    assert {i: r[STATS] for i, r in subset.items()} == {r["id"]: first[r["id"]][STATS] for r in rows[:3]}


@on_ray_cluster
def test_ray_selection_by_clusters_and_near_duplicates_equals_the_selection_over_the_rows(tmp_path):
    from gradfilter_ops.distributed import select_dataset
    from gradfilter_ops.selection import stat_selection_inputs

    rows = stats_rows(30)
    for i, row in enumerate(rows):  # 4 clusters; near-duplicate pairs of consecutive rows
        scored = row[STATS][fields.STATUS] == fields.OK
        row[STATS].update({fields.CLUSTER: i % 4 if scored else None,
                           fields.DUPLICATE_GROUP: i - i % 2 if scored else None})
    stats = [r[STATS] for r in rows]
    statuses = [s[fields.STATUS] for s in stats]
    groups, duplicates = stat_selection_inputs("clusters", "drop", statuses, [s[fields.CLUSTER] for s in stats],
                                               [s[fields.DUPLICATE_GROUP] for s in stats])
    expected = select([s[fields.GSNR] for s in stats], statuses, top_ratio=0.2, groups=groups,
                      duplicate_groups=duplicates)
    assert {fields.NEAR_DUPLICATE, fields.GROUP_QUOTA_FULL} <= set(expected.reasons.values())
    selected = select_dataset(ray.data.from_items(rows, override_num_blocks=4), stats_column=STATS, top_ratio=0.2,
                              diversity="clusters", near_duplicates="drop", dropped_path=tmp_path / "dropped.jsonl")
    assert [r["id"] for r in selected.dataset.take_all()] == [rows[i]["id"] for i in expected.keep]
    dropped = [json.loads(line) for line in (tmp_path / "dropped.jsonl").open()]
    reasons = {rows[i]["id"]: why for i, why in expected.reasons.items()}
    assert {r["id"]: r["gsnr_drop_reason"] for r in dropped} == reasons
    with pytest.raises(ValueError, match="no `gsnr_cluster`: score them with `clusters: true`"):
        select_dataset(ray.data.from_items(stats_rows(8)), stats_column=STATS, top_k=2, diversity="clusters")


@on_ray_cluster
def test_ray_scoring_writes_the_row_groups_of_the_datasets_api(tiny_config):
    from gradfilter_ops.distributed import score_dataset

    rows = seed_tasks(10) + [{**seed_tasks(2)[1], "id": "copy_of_1"}] + bad_rows()
    config = tiny_config(use_cache=True, clusters=True, num_clusters=3, near_duplicate_threshold=0.999)
    expected = GSNRScorer(config).score(Dataset.from_list(rows))  # fills the cache: Ray trains nothing below
    scored = score_dataset(GSNRScorer(config), ray.data.from_items(rows, override_num_blocks=3), stats_column=STATS,
                           train_tasks=2, batch_size=8)
    got = {row["id"]: row[STATS] for row in scored.dataset.take_all()}
    for row in expected:
        assert (got[row["id"]][fields.CLUSTER], got[row["id"]][fields.DUPLICATE_GROUP]) == \
            (row[fields.CLUSTER], row[fields.DUPLICATE_GROUP])
    assert got["copy_of_1"][fields.DUPLICATE_GROUP] == got[rows[1]["id"]][fields.DUPLICATE_GROUP] is not None
    assert got["bad_empty"][fields.CLUSTER] is None
    # Scored rows with other group options: nothing is trained or scored, the groups are made again.
    regrouped = score_dataset(GSNRScorer(tiny_config(use_cache=True, clusters=True, num_clusters=2)), scored.dataset,
                              stats_column=STATS)
    again = {row["id"]: row[STATS] for row in regrouped.dataset.take_all()}
    assert "train_s" not in regrouped.scorer.timings and "embed_s" not in regrouped.scorer.timings
    assert {s[fields.CLUSTER] for s in again.values() if s[fields.STATUS] == fields.OK} == {0, 1}
    assert all(fields.DUPLICATE_GROUP not in s for s in again.values())  # not asked for: not left to be misread
    assert {k: s[fields.GSNR] for k, s in again.items()} == {k: s[fields.GSNR] for k, s in got.items()}


def test_ray_and_default_top_k_ops_sink_the_same_rows_reasons_and_counts(tmp_path):
    from data_juicer.core.data import NestedDataset
    from loguru import logger

    from gradfilter_ops.ops import GSNRTopKFilter, RayGSNRTopKFilter

    rows = stats_rows(20)
    ops = {"default": GSNRTopKFilter(top_ratio=0.4, group_by="source", work_dir=str(tmp_path / "default")),
           "ray": RayGSNRTopKFilter(top_ratio=0.4, group_by="source", work_dir=str(tmp_path / "ray"))}
    seen = []
    handle = logger.add(lambda message: seen.append(str(message)), level="INFO")  # after the ops reset loguru
    try:
        kept = {"default": list(ops["default"].process(NestedDataset(Dataset.from_list(rows)))["id"]),
                "ray": [r["id"] for r in ops["ray"].run(ray.data.from_items(rows, override_num_blocks=3)).take_all()]}
    finally:
        logger.remove(handle)
    dropped = {name: {r["id"]: r["gsnr_drop_reason"] for r in map(json.loads, (tmp_path / name / "gsnr_dropped.jsonl")
                                                                  .open())} for name in ops}
    assert kept["ray"] == kept["default"] and dropped["ray"] == dropped["default"]
    assert sorted(kept["default"] + list(dropped["default"])) == sorted(r["id"] for r in rows)
    counts = dict(Counter(dropped["default"][r["id"]] for r in rows if r["id"] in dropped["default"]))
    for name in ("gsnr_top_k_filter", "ray_gsnr_top_k_filter"):
        lines = [m for m in seen if m.split(" - ", 1)[-1].startswith(f"{name}: kept {len(kept['default'])} of")]
        assert len(lines) == 1 and f"kept {len(kept['default'])} of 20 rows; dropped by reason: {counts}" in lines[0]


@on_ray_cluster
def test_length_quotas_select_the_same_rows_and_reasons_on_ray_and_in_the_op(tmp_path):
    from data_juicer.core.data import NestedDataset

    from gradfilter_ops.distributed import select_dataset
    from gradfilter_ops.ops import GSNRTopKFilter
    from gradfilter_ops.selection import stat_selection_inputs

    rows = stats_rows(30)
    for i, row in enumerate(rows):  # G-SNR grows with the response length, so plain top-k keeps the longest
        row[STATS].update({fields.RESPONSE_TOKENS: 5 + i, fields.GSNR: float(i)}
                          if row[STATS][fields.STATUS] == fields.OK else {fields.RESPONSE_TOKENS: 0})
    stats = [r[STATS] for r in rows]
    statuses = [s[fields.STATUS] for s in stats]
    groups, _ = stat_selection_inputs("length", "keep", statuses, [None] * 30, [None] * 30,
                                      [s[fields.RESPONSE_TOKENS] for s in stats])
    expected = select([s[fields.GSNR] for s in stats], statuses, top_ratio=0.2, groups=groups)
    assert len({groups[i] for i in expected.keep}) == 5  # one row of each response-length quintile
    reasons = {rows[i]["id"]: why for i, why in expected.reasons.items()}
    assert fields.GROUP_QUOTA_FULL in reasons.values()

    on_ray = select_dataset(ray.data.from_items(rows, override_num_blocks=4), stats_column=STATS, top_ratio=0.2,
                            diversity="length", dropped_path=tmp_path / "ray.jsonl")
    op = GSNRTopKFilter(top_ratio=0.2, diversity="length", dropped_path=str(tmp_path / "op.jsonl"))
    in_op = op.process(NestedDataset(Dataset.from_list(rows)))
    for kept, dropped in (([r["id"] for r in on_ray.dataset.take_all()], "ray.jsonl"), (list(in_op["id"]), "op.jsonl")):
        assert kept == [rows[i]["id"] for i in expected.keep]
        assert {r["id"]: r["gsnr_drop_reason"] for r in map(json.loads, (tmp_path / dropped).open())} == reasons
