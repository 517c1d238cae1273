"""The one timing helper (`timing`): a block's seconds under its key, none for a block that failed."""

import time

import pytest

from gradfilter_ops.timing import Stopwatch, timed


def test_timed_writes_the_seconds_of_a_block_that_ends_and_keeps_the_first_when_asked():
    timings = {}
    with timed(timings, "load_s"):
        time.sleep(0.01)
    first = timings["load_s"]
    assert 0.01 <= first < 5
    with timed(timings, "load_s", keep_first=True):
        time.sleep(0.01)
    assert timings["load_s"] == first
    with timed(timings, "load_s"):
        pass
    assert timings["load_s"] < first
    with pytest.raises(RuntimeError), timed(timings, "score_s"):
        raise RuntimeError("failed step")
    assert "score_s" not in timings


def test_a_stopwatch_reads_the_time_since_it_started():
    watch = Stopwatch()
    time.sleep(0.01)
    first = watch.seconds
    assert 0.01 <= first <= watch.seconds < 5
