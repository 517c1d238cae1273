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
    assert select_top_k(scores, top_k=3) == [0, 2, 5]


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
