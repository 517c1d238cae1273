"""The row groups of a fit (`clusters`, `near_duplicate_threshold`): each distinct scoreable row's pooled
hidden states, from the cache entry or one pass of the frozen proxy, grouped by `clusters.row_groups`
and looked up by row key when a batch is scored."""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping, Optional, Sequence

from loguru import logger

from . import fields
from .cache import CacheEntry
from .config import GSNRConfig
from .records import rows_of
from .timing import Stopwatch

RowGroups = dict[str, dict[str, int]]  # row key -> its group stats (the `fields.GROUP_FIELDS` asked for)


class RowGrouping:
    """`GSNRScorer`'s row groups: made over every row a fit sees (`fit_groups`), kept as `row_groups`,
    and written next to each batch's scores (`group_batch`)."""

    row_groups: Optional[RowGroups] = None

    def fit_groups(self, dataset: Any, batch_size: int = 1000) -> dict[str, dict[str, int]]:
        """Group every scoreable row of `dataset` (a `datasets.Dataset` or a list of dicts) by the frozen
        proxy's pooled hidden states, as the options ask (`clusters`, `near_duplicate_threshold`); kept
        as `row_groups` (row key -> its group stats). `fit` calls it; call it alone when the rows already
        carry their scores. The pooled hidden states come from the score cache when it has them.
        """
        self.load()
        self.release()
        _, scoreable = self._scoreable(dataset, batch_size)
        return self._group(scoreable, self._cache_entry([key for key, _ in scoreable]))

    def _group(self, scoreable, cache: Optional[CacheEntry]) -> dict[str, dict[str, int]]:
        self.row_groups, embed_s = fit_row_groups(self._model, scoreable, cache, self.config, self.pad_id,
                                                  self.precision.autocast_dtype)
        if embed_s is not None:
            self.timings["embed_s"] = embed_s
        return self.row_groups

    def group_batch(self, batch: Mapping[str, Sequence[Any]]) -> dict[str, list]:
        """The group fields (`config.group_fields`) of a batch of rows, from `row_groups`."""
        self.load()
        rows = rows_of(batch)
        return self._groups_of(rows, self.encode(rows))

    def _groups_of(self, rows: Sequence[Mapping[str, Any]], encoded) -> dict[str, list]:
        names = self.config.group_fields
        ok = [i for i, e in enumerate(encoded) if e.ok] if names else []
        return group_values(self.row_groups, names, len(rows), ok, [self._key(rows[i]) for i in ok])


def fit_row_groups(model, scoreable, cache: Optional[CacheEntry], config: GSNRConfig, pad_id: int,
                   autocast_dtype=None) -> tuple[RowGroups, Optional[float]]:
    """The groups of the (key, encoded) pairs `scoreable`, sorted by key, and the seconds the pooled hidden
    states took (None when they came from `cache`, where new ones are kept). `model`: the bare proxy."""
    from .clusters import row_groups
    from .embeddings import pooled_hidden_states

    unique = dict(scoreable)  # identical rows share a key, a vector and their groups
    keys = list(unique)
    cached = cache.embeddings() if cache is not None else None
    seconds = None
    if cached is not None and cached[0] == keys:
        vectors = cached[1]
    else:
        started = Stopwatch()
        vectors = pooled_hidden_states(model, [unique[key] for key in keys], pad_id, config.score_batch_size,
                                       autocast_dtype)
        seconds = started.seconds
        if cache is not None:
            cache.add_embeddings(keys, vectors)
    groups = row_groups(vectors, clusters=config.clusters, num_clusters=config.num_clusters,
                        threshold=config.near_duplicate_threshold, seed=config.seed)
    described = [f"{len(set(groups[fields.CLUSTER].tolist()))} clusters"] if fields.CLUSTER in groups else []
    if fields.DUPLICATE_GROUP in groups:
        sizes = Counter(groups[fields.DUPLICATE_GROUP].tolist())
        described.append(f"{sum(n for n in sizes.values() if n > 1)} rows in {sum(n > 1 for n in sizes.values())} "
                         f"near-duplicate groups at cosine >= {config.near_duplicate_threshold}")
    logger.info(f"gsnr: {len(keys)} distinct scoreable rows grouped by the proxy's pooled hidden states: "
                f"{', '.join(described)}.")
    return {key: {name: int(values[i]) for name, values in groups.items()} for i, key in enumerate(keys)}, seconds


def group_values(row_groups: Optional[RowGroups], names: Sequence[str], n: int, ok: Sequence[int],
                 keys: Sequence[str]) -> dict[str, list]:
    """Columns `names` for a batch of `n` rows: the groups of rows `ok` (their `keys`), None elsewhere."""
    out: dict[str, list] = {name: [None] * n for name in names}
    if not names or not ok:
        return out
    if row_groups is None:
        raise RuntimeError("GSNRScorer: the row groups (`clusters`, `near_duplicate_threshold`) are made by "
                           "fit(dataset) or fit_groups(dataset); call one of them first.")
    unseen = sum(key not in row_groups for key in keys)
    if unseen:
        raise ValueError(f"`clusters` and `near_duplicate_threshold` group the rows that `fit` saw, and {unseen} "
                         "row(s) of this batch were not among them; fit on the dataset you score.")
    for i, key in zip(ok, keys):
        for name in names:
            out[name][i] = row_groups[key][name]
    return out
