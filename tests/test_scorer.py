"""The `datasets` API end to end on a tiny proxy: scores, reasons, determinism, batching, workers."""

import math

import numpy as np
import pytest
from datasets import Dataset

from gradfilter_ops import GSNRConfig, GSNRScorer, fields, select_top_k
from gradfilter_ops.engine import Snapshots

from helpers import seed_tasks

# One worker runs the whole file (`--dist loadgroup`): its module fixtures (the trained scorer) are built once.
pytestmark = pytest.mark.xdist_group("test_scorer")

BAD_ROWS = [
    {"instruction": "Reply.", "input": None, "output": ""},
    {"instruction": None, "input": None, "output": "An answer without a question."},
    {"instruction": "Reply.", "input": None, "output": "   "},
]


@pytest.fixture(scope="module")
def rows():
    return [{k: r[k] for k in ("instruction", "input", "output")} for r in seed_tasks(20)] + BAD_ROWS


@pytest.fixture(scope="module")
def scored(module_tiny_config, rows):
    """One trained scorer and its scores, shared: the tests read them and score again, they never refit it."""
    scorer = GSNRScorer(module_tiny_config())
    return scorer, scorer.score(Dataset.from_list(rows))


def test_every_row_gets_a_score_or_a_reason(scored, rows):
    _, ds = scored
    assert len(ds) == len(rows)
    assert set(fields.SCORE_FIELDS) <= set(ds.column_names)
    statuses = ds[fields.STATUS]
    assert statuses[:20] == [fields.OK] * 20
    assert statuses[20:] == [fields.EMPTY_RESPONSE, fields.MISSING_FIELD, fields.EMPTY_RESPONSE]
    for row in ds:
        if row[fields.STATUS] == fields.OK:
            assert math.isfinite(row[fields.GSNR]) and row[fields.EARLY] > 0 and row[fields.LATE] > 0
            expected = row[fields.DROP] / (row[fields.NOISE] + 1e-8)
            assert row[fields.GSNR] == pytest.approx(expected, rel=1e-9)
        else:
            assert row[fields.GSNR] is None and row[fields.RESPONSE_TOKENS] == 0


def test_same_seed_gives_identical_scores(scored, tiny_config, rows):
    _, first = scored
    second = GSNRScorer(tiny_config()).score(Dataset.from_list(rows))
    assert first[fields.GSNR] == second[fields.GSNR]
    other_seed = GSNRScorer(tiny_config(seed=7)).score(Dataset.from_list(rows))
    assert other_seed[fields.GSNR] != first[fields.GSNR]


@pytest.mark.parametrize("score_mode", ["snapshot", "online"])
def test_sum_loss_reads_the_same_training_with_each_norm_times_its_tokens_squared(tiny_config, rows, score_mode):
    mean = GSNRScorer(tiny_config(score_mode=score_mode)).score(Dataset.from_list(rows))
    summed = GSNRScorer(tiny_config(score_mode=score_mode, example_loss="sum")).score(Dataset.from_list(rows))
    assert summed[fields.STATUS] == mean[fields.STATUS]
    for a, b in zip(mean, summed):
        if a[fields.STATUS] != fields.OK:
            continue
        n2 = a[fields.RESPONSE_TOKENS] ** 2
        assert b[fields.EARLY] == pytest.approx(a[fields.EARLY] * n2, rel=1e-5)
        assert b[fields.LATE] == pytest.approx(a[fields.LATE] * n2, rel=1e-5)
        assert b[fields.DROP] == pytest.approx(a[fields.DROP], rel=1e-5, abs=1e-9)
        assert b[fields.GSNR] == pytest.approx(b[fields.DROP] / (b[fields.NOISE] + 1e-8), rel=1e-9)
    assert summed[fields.GSNR] != mean[fields.GSNR]


def test_scores_do_not_depend_on_batching_or_workers(scored, rows):
    scorer, reference = scored
    ds = Dataset.from_list(rows).remove_columns([])
    for batch_size, num_proc in ((3, None), (1000, None), (5, 2)):
        again = scorer.score(ds, batch_size=batch_size, num_proc=num_proc)
        ok = [i for i, s in enumerate(reference[fields.STATUS]) if s == fields.OK]
        np.testing.assert_allclose([again[fields.EARLY][i] for i in ok], [reference[fields.EARLY][i] for i in ok],
                                   rtol=1e-4)
        np.testing.assert_allclose([again[fields.LATE][i] for i in ok], [reference[fields.LATE][i] for i in ok],
                                   rtol=1e-4)
        assert again[fields.STATUS] == reference[fields.STATUS]


def test_one_process_scores_in_this_process(scored, rows, monkeypatch):
    """`datasets` forks a one-thread worker even for num_proc=1; `score` keeps that work here."""
    import os

    scorer, reference = scored
    pids = []
    real = GSNRScorer.score_batch

    def spy(self, batch, rank=None):
        pids.append(os.getpid())
        return real(self, batch, rank)

    monkeypatch.setattr(GSNRScorer, "score_batch", spy)
    again = scorer.score(Dataset.from_list(rows), num_proc=1)
    assert pids and set(pids) == {os.getpid()}
    assert again[fields.GSNR] == reference[fields.GSNR]


def test_saved_snapshots_reproduce_the_scores(scored, tiny_config, rows, tmp_path):
    scorer, reference = scored
    folder = scorer.snapshots.save(tmp_path / "adapters")
    assert (folder / "member1_epoch2" / "adapter_model.safetensors").exists()
    fresh = GSNRScorer(tiny_config())
    fresh.fit(Dataset.from_list(rows))
    fresh.snapshots = Snapshots.load(folder)  # scored with the loaded adapters, not those fit trained
    assert fresh.score(Dataset.from_list(rows))[fields.GSNR] == reference[fields.GSNR]


def test_top_k_on_scores(scored):
    _, ds = scored
    keep = select_top_k(ds[fields.GSNR], top_ratio=0.25)
    assert len(keep) == 5
    kept_scores = [ds[fields.GSNR][i] for i in keep]
    assert min(kept_scores) >= max(s for i, s in enumerate(ds[fields.GSNR]) if i not in keep and s is not None)


def test_empty_dataset(tiny_config):
    empty = Dataset.from_list([{"instruction": "x", "output": "y"}]).select([])
    out = GSNRScorer(tiny_config()).score(empty)
    assert len(out) == 0 and fields.GSNR in out.column_names


def test_no_scoreable_rows_trains_nothing_and_records_reasons(tiny_config):
    scorer = GSNRScorer(tiny_config())
    out = scorer.score(Dataset.from_list(BAD_ROWS))
    assert scorer.snapshots is None
    assert out[fields.STATUS] == [fields.EMPTY_RESPONSE, fields.MISSING_FIELD, fields.EMPTY_RESPONSE]


def test_config_rejects_unknown_and_bad_values(tiny_config):
    with pytest.raises(ValueError, match="Unknown GSNRConfig key"):
        GSNRScorer(num_memebrs=3)
    with pytest.raises(ValueError, match="`norm` must be one of"):
        GSNRConfig(norm="l1")
    with pytest.raises(ValueError, match="early_epoch < late_epoch"):
        GSNRConfig(num_epochs=2, early_epoch=2)
    with pytest.raises(ValueError, match="prompt_template"):
        GSNRConfig(format="custom")


# --- row groups: clusters and near-duplicates of the proxy's pooled hidden states ---------------

@pytest.fixture(scope="module")
def grouped_rows(rows):
    """20 tasks, a copy of task 1 (row 20), task 6 with a null input (row 21: other fields, the same
    prompt), and the 3 bad rows (22-24)."""
    return rows[:20] + [dict(rows[1]), {**rows[6], "input": None}] + BAD_ROWS


def test_row_groups_and_their_selection_through_the_datasets_api(tiny_config, grouped_rows):
    from gradfilter_ops.selection import quotas, select, stat_selection_inputs

    config = tiny_config(use_cache=True, clusters=True, num_clusters=3, near_duplicate_threshold=0.999)
    scorer = GSNRScorer(config)
    ds = scorer.score(Dataset.from_list(grouped_rows))
    clusters, duplicates, gsnr = ds[fields.CLUSTER], ds[fields.DUPLICATE_GROUP], ds[fields.GSNR]
    assert clusters[22:] == duplicates[22:] == [None] * 3  # no score, no groups
    assert sorted(set(clusters[:22])) == [0, 1, 2]
    assert (clusters[20], duplicates[20], clusters[21], duplicates[21]) == (clusters[1], duplicates[1], clusters[6],
                                                                            duplicates[6])
    assert len(set(duplicates[:20])) == 20  # the distinct tasks are not near-duplicates at 0.999
    keys, vectors = scorer.cache.embeddings()  # the pooled states are in the cache, not in the rows
    assert vectors.shape == (21, 32) and len(keys) == 21  # row 20 is the same row as row 1
    assert set(ds.column_names) == {"instruction", "input", "output", *fields.SCORE_FIELDS, *fields.GROUP_FIELDS}

    groups, dups = stat_selection_inputs("clusters", "drop", ds[fields.STATUS], clusters, duplicates)
    picked = select(gsnr, ds[fields.STATUS], top_k=6, groups=groups, duplicate_groups=dups)
    for first, copy in ((1, 20), (6, 21)):
        loser = copy if gsnr[first] >= gsnr[copy] else first
        assert picked.reasons[loser] == fields.NEAR_DUPLICATE and {first, copy} - {loser} <= set(range(22))
    eligible = [i for i in range(22) if picked.reasons.get(i) != fields.NEAR_DUPLICATE]
    ranking = sorted(eligible, key=lambda i: (-gsnr[i], i))  # each cluster's rows by their place in it
    expected = quotas({str(c): [p for p, i in enumerate(ranking) if clusters[i] == c] for c in set(clusters[:22])}, 6)
    for c in set(clusters[:22]):
        best = sorted((i for i in eligible if clusters[i] == c), key=lambda i: -gsnr[i])[: expected[str(c)]]
        assert sorted(i for i in picked.keep if clusters[i] == c) == sorted(best)
    assert len(picked.keep) == 6

    # Another row order: the same groups, from the cache (nothing trained or embedded again).
    again = GSNRScorer(config)
    reordered = again.score(Dataset.from_list(grouped_rows[::-1]))
    assert reordered[fields.CLUSTER][::-1] == clusters and reordered[fields.DUPLICATE_GROUP][::-1] == duplicates
    assert "train_s" not in again.timings and "embed_s" not in again.timings
    # Other group options change the groups only: the scores come from the same cache entry.
    two = GSNRScorer(tiny_config(use_cache=True, clusters=True, num_clusters=2))
    fewer = two.score(Dataset.from_list(grouped_rows))
    assert fewer[fields.GSNR] == gsnr and sorted(set(fewer[fields.CLUSTER][:22])) == [0, 1]
    assert fields.DUPLICATE_GROUP not in fewer.column_names and "embed_s" not in two.timings
    with pytest.raises(ValueError, match="not among them; fit on the dataset you score"):
        two.score_batch({"instruction": ["A task fit never saw."], "input": [""], "output": ["Its answer."]})


def test_damaged_pooled_states_in_the_cache_are_computed_again(tiny_config, grouped_rows):
    from pathlib import Path

    from gradfilter_ops.cache import CacheEntry

    config = tiny_config(use_cache=True, clusters=True, num_clusters=3)
    first = GSNRScorer(config)
    first.fit_groups(grouped_rows)  # the groups alone: nothing is trained
    assert first.fitted is None and "embed_s" in first.timings
    folder, = Path(config.cache_dir).glob("scores/*/embeddings")
    (folder / "vectors.npy").write_bytes(b"not an array")
    second = GSNRScorer(config)
    second.fit_groups(grouped_rows)
    assert "embed_s" in second.timings and second.row_groups == first.row_groups
    entry = CacheEntry(Path(config.cache_dir), "", "")
    entry.embeddings_dir = folder
    assert entry.embeddings()[1].shape == (21, 32)  # written again, whole
