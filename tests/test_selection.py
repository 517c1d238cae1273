"""Top-k selection: counts, ties, non-finite scores, bad arguments."""

import math

import pytest

from gradfilter_ops.selection import num_to_keep, rank, select_top_k


def test_keeps_highest_in_original_order():
    assert select_top_k([0.1, 0.9, 0.5, 0.7], top_k=2) == [1, 3]


def test_ties_are_broken_by_dataset_order():
    assert select_top_k([1.0, 2.0, 2.0, 2.0], top_k=2) == [1, 2]
    assert rank([2.0, 2.0, 2.0]) == [0, 1, 2]


def test_missing_and_non_finite_rank_last():
    scores = [None, math.nan, -5.0, math.inf, -math.inf, 0.0]
    assert rank(scores) == [5, 2, 0, 1, 3, 4]
    assert select_top_k(scores, top_k=3) == [2, 5]  # an unscored row is never kept in place of nothing


@pytest.mark.parametrize("n, ratio, expected", [(100, 0.29, 29), (175, 0.1, 17), (10, 0.3, 3), (5, 0.01, 1),
                                                (7, 1.0, 7), (0, 0.5, 0)])
def test_ratio_counts(n, ratio, expected):
    assert num_to_keep(n, top_ratio=ratio) == expected


def test_top_k_above_n_keeps_all():
    assert select_top_k([0.3, 0.1], top_k=5) == [0, 1]


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one"),
    ({"top_k": 3, "top_ratio": 0.5}, "exactly one"),
    ({"top_ratio": 0.0}, r"\(0, 1\]"),
    ({"top_ratio": 1.5}, r"\(0, 1\]"),
    ({"top_k": 0}, "positive integer"),
    ({"top_k": 2.5}, "positive integer"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        select_top_k([1.0, 2.0], **kwargs)


# --- budgets, groups and reasons -----------------------------------------------------------------

from gradfilter_ops import fields  # noqa: E402
from gradfilter_ops.selection import quotas, select  # noqa: E402

OK = fields.OK


def test_reasons_for_every_dropped_row():
    scores = [0.9, None, 0.1, 0.5]
    statuses = [OK, fields.EMPTY_RESPONSE, OK, OK]
    result = select(scores, statuses, top_k=2)
    assert result.keep == [0, 3]
    assert result.reasons == {1: fields.EMPTY_RESPONSE, 2: fields.BELOW_CUTOFF}


def test_token_budget_keeps_best_rows_that_fit():
    scores = [0.9, 0.8, 0.7, 0.6]
    result = select(scores, [OK] * 4, max_tokens=250, tokens=[100, 100, 100, 10])
    assert result.keep == [0, 1]
    assert set(result.reasons.values()) == {fields.OVER_TOKEN_BUDGET}


def test_group_quotas_keep_a_rare_source():
    # source "b" has the 4 worst scores: without quotas top_k=4 would take only "a" rows.
    scores = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0.5]
    groups = ["a"] * 6 + ["b"] * 4
    plain = select(scores, [OK] * 10, top_k=4)
    assert plain.keep == [0, 1, 2, 3]
    proportional = select(scores, [OK] * 10, top_k=5, groups=groups)
    assert proportional.keep == [0, 1, 2, 6, 7]
    assert proportional.reasons[3] == fields.GROUP_QUOTA_FULL and proportional.reasons[5] == fields.BELOW_CUTOFF
    with_minimum = select(scores, [OK] * 10, top_k=2, groups=groups, min_per_group=1)
    assert with_minimum.keep == [0, 6]
    equal = select(scores, [OK] * 10, top_k=4, groups=groups, group_quota="equal")
    assert equal.keep == [0, 1, 6, 7]


def interleaved(sizes: dict[str, int]) -> dict[str, list[int]]:
    """Rank positions for groups of `sizes` whose rows take turns down the ranking, in the order given."""
    ranks, position, left = {g: [] for g in sizes}, 0, dict(sizes)
    while any(left.values()):
        for g in sizes:
            if left[g]:
                ranks[g].append(position)
                position, left[g] = position + 1, left[g] - 1
    return ranks


def test_quotas_respect_sizes_and_budget():
    assert quotas(interleaved({"a": 90, "b": 9, "c": 1}), 10) == {"a": 9, "b": 1, "c": 0}
    assert quotas(interleaved({"c": 1, "b": 9, "a": 90}), 10) == {"a": 9, "b": 0, "c": 1}  # c's row ranks best
    assert quotas(interleaved({"a": 90, "b": 9, "c": 1}), 10, minimum=1) == {"a": 8, "b": 1, "c": 1}
    assert quotas(interleaved({"a": 2, "b": 50}), 10, mode="equal") == {"a": 2, "b": 8}
    assert sum(quotas(interleaved({"x": 3, "y": 3, "z": 3}), 7).values()) == 7
    assert quotas(interleaved({"a": 1, "b": 1}), 1, minimum=1) == {"a": 1, "b": 1}  # the minimums win over the budget


def test_leftover_seats_go_to_the_groups_whose_next_row_scores_best():
    # 8 sources of 3 rows, budget 6: each share is 0.75, so all 6 seats are leftovers. Sources g and h
    # (named last) hold the best rows and must get seats; the two with the worst best rows get none.
    sources = "abcdefgh"
    best = {"g": 100.0, "h": 90.0, "a": 80.0, "b": 70.0, "c": 60.0, "d": 50.0, "e": 40.0, "f": 30.0}
    scores, groups = [], []
    for source in sources:
        scores += [best[source], best[source] - 1, best[source] - 2]
        groups += [source] * 3
    result = select(scores, [OK] * 24, top_k=6, groups=groups)
    assert sorted({groups[i] for i in result.keep}) == ["a", "b", "c", "d", "g", "h"]
    assert result.keep == [0, 3, 6, 9, 18, 21]  # each source's best row
    assert {result.reasons[i] for i in (12, 15)} == {fields.BELOW_CUTOFF}  # e's and f's best rows
    assert result.reasons[19] == fields.GROUP_QUOTA_FULL  # g's second row made the plain top 6


def test_group_by_id_keeps_the_top_k_rows():
    scores = [0.1, 0.9, 0.5, 0.8, 0.2, 0.7]
    result = select(scores, [OK] * 6, top_k=3, groups=[f"row{i}" for i in range(6)])
    assert result.keep == [1, 3, 5] == select(scores, [OK] * 6, top_k=3).keep
    assert result.reasons == {0: fields.BELOW_CUTOFF, 2: fields.BELOW_CUTOFF, 4: fields.BELOW_CUTOFF}


def test_raised_minimum_takes_the_seat_of_the_worst_row():
    # a and b get 2 seats each of 4; c's minimum takes one back from the group whose last kept row ranks
    # worst: b (its row 3), not a (its row 2), whatever the names.
    result = select([7, 6, 5, 4, 3, 2, 1], [OK] * 7, top_k=4, groups=["a", "b", "a", "b", "a", "b", "c"],
                    min_per_group=1)
    assert result.keep == [0, 1, 2, 6]
    assert result.reasons[3] == fields.GROUP_QUOTA_FULL and result.reasons[4] == fields.BELOW_CUTOFF


def test_token_budget_that_keeps_nothing_warns_with_the_smallest_row(warnings_logged):
    result = select([0.9, 0.8, 0.7], [OK] * 3, max_tokens=40, tokens=[120, 300, 64])
    assert result.keep == [] and set(result.reasons.values()) == {fields.OVER_TOKEN_BUDGET}
    assert any("max_tokens=40 keeps no row" in m and "best row has 120 tokens" in m and "smallest scored row 64" in m
               for m in warnings_logged)


def test_budget_combinations_are_rejected():
    with pytest.raises(ValueError, match="exactly one"):
        select([1.0], [OK], top_k=1, max_tokens=5, tokens=[1])
    with pytest.raises(ValueError, match="cannot be combined"):
        select([1.0], [OK], max_tokens=5, tokens=[1], groups=["a"])


def test_unscored_rows_are_never_selected_even_when_the_budget_is_larger():
    scores = [None, 0.4, None, 0.2, math.nan, None]
    statuses = [fields.MISSING_FIELD, OK, fields.MISSING_FIELD, OK, fields.NON_FINITE, fields.EMPTY_RESPONSE]
    result = select(scores, statuses, top_ratio=1.0)
    assert result.keep == [1, 3]
    assert result.reasons == {0: fields.MISSING_FIELD, 2: fields.MISSING_FIELD, 4: fields.NON_FINITE,
                              5: fields.EMPTY_RESPONSE}
    assert select(scores, statuses, top_k=5, groups=list("aabbcc")).keep == [1, 3]
    assert select(scores, statuses, max_tokens=10**6, tokens=[1] * 6).keep == [1, 3]
    forged = select([1e12, 0.1], [fields.MISSING_FIELD, OK], top_k=1)  # a score without status ok does not count
    assert forged.keep == [1] and forged.reasons == {0: fields.MISSING_FIELD}


def test_no_scored_row_fails_with_the_likely_cause():
    from gradfilter_ops.selection import NoScoredRows

    with pytest.raises(NoScoredRows, match=r"None of the 3 rows .*'missing_field': 3.*output_field"):
        select([None] * 3, [fields.MISSING_FIELD] * 3, top_ratio=0.5)
    with pytest.raises(NoScoredRows, match="None of the 2 rows"):
        select_top_k([None, math.nan], top_k=1)
    assert select([], [], top_k=1).keep == []


def test_the_ops_check_their_options_as_select_does():
    from gradfilter_ops.selection import validate_options

    cases = [({"top_k": 1, "max_tokens": 5}, "exactly one"), ({"max_tokens": 5, "grouped": True}, "cannot be combined"),
             ({"top_k": 1, "group_quota": "even"}, "`group_quota` must be one of"),
             ({"top_k": 1, "min_per_group": -1}, "`min_per_group` must be a non-negative integer, got -1")]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            validate_options(**options)
        with pytest.raises(ValueError, match=message):
            select([1.0], [OK], tokens=[1], groups=["a"] if options.pop("grouped", False) else None, **options)


def test_ratio_to_rows_and_range_drops():
    from gradfilter_ops.selection import range_drops, rows_for_ratio

    assert [rows_for_ratio(100, r) for r in (0.29, 0.1, 0.001)] == [29, 10, 1]
    scores, statuses = [0.5, 2.0, None, -1.0], [OK, OK, fields.EMPTY_RESPONSE, OK]
    assert range_drops(scores, statuses, 0.0, 1.0) == {1: fields.OUTSIDE_RANGE, 2: fields.EMPTY_RESPONSE,
                                                        3: fields.OUTSIDE_RANGE}
    assert range_drops(scores, statuses, None, 1.0) == {1: fields.OUTSIDE_RANGE, 2: fields.EMPTY_RESPONSE}


def test_dropped_rows_are_written_alike_from_a_dataset_and_from_row_dicts(tmp_path):
    import json

    from datasets import Dataset

    from gradfilter_ops.dropped import DROP_REASON, write_dropped_rows

    rows = [{"id": i, "text": f"row/{i} é", "score": 0.1234567890123 * i} for i in range(2500)]
    reasons = [fields.BELOW_CUTOFF] * len(rows)
    from_dataset = write_dropped_rows(tmp_path / "a.jsonl", Dataset.from_list(rows), reasons).read_text("utf-8")
    from_dicts = write_dropped_rows(tmp_path / "b.jsonl", iter(rows), reasons).read_text("utf-8")
    assert from_dataset == from_dicts
    assert [json.loads(line) for line in from_dicts.splitlines()] == [{**r, DROP_REASON: fields.BELOW_CUTOFF}
                                                                      for r in rows]
    with pytest.raises(ValueError, match="differ in number"):
        write_dropped_rows(tmp_path / "c.jsonl", rows, reasons[:-1])
    assert not (tmp_path / "c.jsonl").exists()


# --- the group stats of the scorer: clusters and near-duplicates ----------------------------------

from gradfilter_ops.selection import length_bins, stat_selection_inputs, validate_options  # noqa: E402

DEDUP_SCORES = [0.9, 0.8, 0.7, 0.6, 0.5, None]
DEDUP_STATUSES = [OK] * 5 + [fields.EMPTY_RESPONSE]
DUPLICATE_GROUPS = [0, 1, 0, 3, 1, None]  # rows 2 and 4 have a better-scored near-duplicate (0 and 1)


def test_near_duplicates_keep_the_best_of_each_group_before_the_budget():
    assert select(DEDUP_SCORES, DEDUP_STATUSES, top_k=3).keep == [0, 1, 2]
    deduped = select(DEDUP_SCORES, DEDUP_STATUSES, top_k=3, duplicate_groups=DUPLICATE_GROUPS)
    assert deduped.keep == [0, 1, 3]  # row 3 fills the seat of row 2
    assert deduped.reasons == {2: fields.NEAR_DUPLICATE, 4: fields.NEAR_DUPLICATE, 5: fields.EMPTY_RESPONSE}
    tight = select(DEDUP_SCORES, DEDUP_STATUSES, top_k=1, duplicate_groups=DUPLICATE_GROUPS)
    assert tight.reasons == {1: fields.BELOW_CUTOFF, 2: fields.NEAR_DUPLICATE, 3: fields.BELOW_CUTOFF,
                             4: fields.NEAR_DUPLICATE, 5: fields.EMPTY_RESPONSE}
    tied = select([0.5, 0.5], [OK, OK], top_k=2, duplicate_groups=[7, 7])
    assert tied.keep == [0] and tied.reasons == {1: fields.NEAR_DUPLICATE}  # a tie keeps the first row


def test_cluster_quotas_rank_inside_each_cluster():
    clusters = [0, 0, 0, 1, 1, None]
    groups, duplicates = stat_selection_inputs("clusters", "keep", DEDUP_STATUSES, clusters, [None] * 6)
    assert groups == ["0", "0", "0", "1", "1", "None"] and duplicates is None
    # top 3 of clusters of 3 and 2 scored rows: one seat each, the leftover to cluster 0 (its next row ranks
    # best), so cluster 1's best row takes the place of cluster 0's third
    result = select(DEDUP_SCORES, DEDUP_STATUSES, top_k=3, groups=groups)
    assert result.keep == [0, 1, 3]
    assert result.reasons == {2: fields.GROUP_QUOTA_FULL, 4: fields.BELOW_CUTOFF, 5: fields.EMPTY_RESPONSE}


def test_a_scored_row_without_the_group_stat_names_the_scorer_option():
    with pytest.raises(ValueError, match=r"1 of the 6 rows have a score but no `gsnr_cluster`.*`clusters: true`"):
        stat_selection_inputs("clusters", "keep", DEDUP_STATUSES, [0, None, 0, 1, 1, None], [None] * 6)
    with pytest.raises(ValueError, match=r"no `gsnr_duplicate_group`.*`near_duplicate_threshold`"):
        select(DEDUP_SCORES, DEDUP_STATUSES, top_k=1, duplicate_groups=[None] * 6)


@pytest.mark.parametrize("options, message", [
    ({"diversity": "topics"}, "`diversity` must be one of"),
    ({"near_duplicates": "remove"}, "`near_duplicates` must be one of"),
    ({"diversity": "clusters", "grouped": True}, "cannot be combined with `group_by`"),
    ({"diversity": "clusters", "top_k": None, "max_tokens": 100}, "`max_tokens` cannot be combined"),
])
def test_group_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        validate_options(**{"top_k": 3, **options})


def test_length_bins_are_quantiles_and_equal_lengths_share_a_bin():
    assert length_bins([5, 1, 2, 3, 4, 6, 7, 8, 9, 10], 5) == [2, 0, 0, 1, 1, 2, 3, 3, 4, 4]
    assert length_bins([3, 3, 3, 3, 9, 9], 3) == [0, 0, 0, 0, 2, 2]


def test_length_quotas_keep_every_response_length_and_rank_inside_each():
    # ten scored rows whose G-SNR grows with their response length, and one row without a score
    tokens = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, None]
    statuses = [OK] * 10 + [fields.EMPTY_RESPONSE]
    scores = [t / 10 if t else None for t in tokens]
    groups, duplicates = stat_selection_inputs("length", "keep", statuses, [None] * 11, [None] * 11, tokens)
    assert groups[:4] == ["1/5: 10-20 tokens"] * 2 + ["2/5: 30-40 tokens"] * 2
    assert groups[10] == "no score" and duplicates is None
    assert select(scores, statuses, top_k=5).keep == [5, 6, 7, 8, 9]  # G-SNR alone: the five longest
    spread = select(scores, statuses, top_k=5, groups=groups)
    assert spread.keep == [1, 3, 5, 7, 9]  # the best of each quintile
    assert spread.reasons[6] == spread.reasons[8] == fields.GROUP_QUOTA_FULL
    assert spread.reasons[10] == fields.EMPTY_RESPONSE
    with pytest.raises(ValueError, match=r"1 of the 11 rows have a score but no `gsnr_response_tokens`"):
        stat_selection_inputs("length", "keep", statuses, [None] * 11, [None] * 11, [None] + tokens[1:])
