"""`FittedEnsemble`: what `GSNRScorer.fit` made of a dataset, as one value that can be merged
(members fitted apart, in Ray tasks), shipped (`load_into_memory`: read into memory from the cache, for a
worker that cannot see `cache_dir`) and cached (the members go to the cache entry as they finish)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .cache import CacheEntry, room_for


@dataclass
class FittedEnsemble:
    """The trained members of one fit (`snapshots`, or the cache entry that holds them) and the rows
    they were trained on: `counts` (rows per status) and, with `score_mode: online`, `online_rows`
    (row key -> column of the online norms). `fingerprint` is the scorer's (proxy, options, device);
    `ensemble` names the ensemble: a digest of the fingerprint and the training rows' keys, in order."""

    fingerprint: Optional[str]
    counts: dict[str, int]
    online_rows: dict[str, int]
    cache: Optional[CacheEntry] = None
    snapshots: Optional[object] = None  # an `ensemble.Snapshots`
    ensemble: Optional[str] = None

    def matches(self, other: "FittedEnsemble") -> bool:
        """Whether `other` was fitted on the same rows with the same options and proxy."""
        return ((other.fingerprint, other.ensemble, other.counts, other.online_rows)
                == (self.fingerprint, self.ensemble, self.counts, self.online_rows))

    def merge(self, other: "FittedEnsemble") -> "FittedEnsemble":
        """One ensemble from this one's members and those `other` trained (`fit(..., members=...)`)."""
        from .engine import Snapshots

        if not self.matches(other):
            raise ValueError("merge_members: the other scorer was fitted with other options, "
                             "another proxy or other rows.")
        snapshots = self.snapshots
        if other.snapshots is not None:
            snapshots = other.snapshots if snapshots is None else Snapshots.merge([snapshots, other.snapshots])
        return FittedEnsemble(self.fingerprint, self.counts, self.online_rows, self.cache, snapshots, self.ensemble)

    def cached_members(self):
        """The members already trained in the cache entry (`Snapshots`), or None."""
        from .engine import MANIFEST, Snapshots

        if self.cache is None or not (self.cache.ensemble_dir / MANIFEST).exists():
            return None
        return Snapshots.load(self.cache.ensemble_dir, entry=self.cache.key)

    def save_member(self, snapshots, member: int) -> None:
        """Keep `member` of `snapshots` in the cache entry (the `on_member` of training)."""
        with room_for(self.cache.root, f"the adapters of member {member}"):
            snapshots.save_member(self.cache.ensemble_dir, member, entry=self.cache.key)

    def load_snapshots(self):
        """The trained members, read from the cache entry the first time when they are not in memory."""
        from .engine import Snapshots

        if self.snapshots is None and self.cache is not None:
            self.snapshots = Snapshots.load(self.cache.ensemble_dir, entry=self.cache.key)
        return self.snapshots

    def load_into_memory(self) -> "FittedEnsemble":
        """Read into memory what scoring takes from the cache (the trained adapters, the cached scores)."""
        from .engine import MANIFEST

        if self.cache is not None:
            self.cache.scores()
            if self.snapshots is None and (self.cache.ensemble_dir / MANIFEST).exists():
                self.load_snapshots()
        return self

    def online_sq_norms(self, keys: Sequence[str]) -> np.ndarray:
        """The online squared norms of the rows `keys`, [members, 2 (early, late), len(keys)]."""
        unseen = sum(key not in self.online_rows for key in keys)
        if unseen:
            raise ValueError(f"score_mode: online scores only the rows `fit` trained on, and {unseen} row(s) of this "
                             "batch were not among them; fit on the dataset you score, or use score_mode: snapshot.")
        return self.load_snapshots().online_sq_norms()[:, :, [self.online_rows[key] for key in keys]]
