"""Seconds a piece of work took, on one clock (`time.perf_counter`, monotonic): `Stopwatch` reads the time
since it started (for progress lines and totals), and `timed` writes a block's seconds under a key of a
timings dict (`GSNRScorer.timings`, the evaluation's report), as the manifests and reports give them."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator, MutableMapping


class Stopwatch:
    """Started when made; `seconds` is the time since then."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


@contextmanager
def timed(timings: MutableMapping[str, float], key: str, *, keep_first: bool = False) -> Iterator[Stopwatch]:
    """Write the seconds the block took to `timings[key]` when it ends without an error (a failed step reports
    no time); with `keep_first`, only when the key is not there yet (the first of repeated loads)."""
    watch = Stopwatch()
    yield watch
    if keep_first:
        timings.setdefault(key, watch.seconds)
    else:
        timings[key] = watch.seconds
