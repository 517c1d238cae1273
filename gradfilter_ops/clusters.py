"""Groups of rows from their vectors (the proxy's pooled hidden states, `embeddings`): k-means clusters
that describe a pool's mix, and near-duplicate groups. Deterministic, numpy only.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from . import fields

MAX_DEFAULT_CLUSTERS = 64
KMEANS_MAX_ITER = 50  # real pools settle in far fewer; random noise may not settle at all
# Entries of one block of the similarity matrix (float64): 2**22 is 32 MiB, so 50k rows need no n x n matrix.
SIMILARITY_BLOCK = 2 ** 22


def default_num_clusters(n: int) -> int:
    """k for n rows when none is given: round(sqrt(n / 2)), the rule of thumb, clipped to [1, 64]
    (1,036 rows -> 23 clusters, 200 -> 10; 8,192 rows and more -> 64)."""
    return int(min(MAX_DEFAULT_CLUSTERS, max(1, round(math.sqrt(max(n, 0) / 2)))))


def normalized_rows(x: np.ndarray) -> np.ndarray:
    """`x` as float64 with every row scaled to unit L2 norm (a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"Expected a 2-d array of row vectors, got shape {x.shape}.")
    if not np.isfinite(x).all():
        raise ValueError("The row vectors hold NaN or infinite values.")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def kmeans_clusters(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Cluster id (int64, 0..) of each row of `x` [n, d]: k-means on the L2-normalised rows.

    k-means++ seeding from `np.random.default_rng(seed)`, then Lloyd's iterations until no row changes
    cluster (at most `KMEANS_MAX_ITER`). The rows are put in a canonical (lexicographic) order first,
    so the partition does not depend on the row order; ids are then numbered by first appearance in
    the given order (row 0 is in cluster 0). k above the number of distinct rows yields fewer clusters.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"The number of clusters must be a positive integer, got {k!r}.")
    x = normalized_rows(x)
    n = len(x)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort(x.T[::-1])
    canonical = x[order]
    labels = np.empty(n, dtype=np.int64)
    labels[order] = _lloyd(canonical, _kmeans_pp(canonical, min(int(k), n), np.random.default_rng(seed)))
    return renumber_by_first_appearance(labels)


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ centres: the first a uniform row, each next one a row drawn with probability proportional
    to its squared distance to the nearest centre so far; stops early when every row is a centre's copy."""
    centres = [x[rng.integers(len(x))]]
    nearest = ((x - centres[0]) ** 2).sum(axis=1)
    while len(centres) < k:
        total = nearest.sum()
        if total <= 0:
            break
        pick = x[rng.choice(len(x), p=nearest / total)]
        centres.append(pick)
        nearest = np.minimum(nearest, ((x - pick) ** 2).sum(axis=1))
    return np.stack(centres)


def _lloyd(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Lloyd's iterations from `centres`; a centre that loses every row stays where it is."""
    labels = None
    sq_norms = (x ** 2).sum(axis=1)
    for _ in range(KMEANS_MAX_ITER):
        distances = sq_norms[:, None] - 2 * x @ centres.T + (centres ** 2).sum(axis=1)[None, :]
        new = distances.argmin(axis=1)  # ties go to the lower centre
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        counts = np.bincount(labels, minlength=len(centres))
        members = np.zeros((len(centres), len(x)))
        members[labels, np.arange(len(x))] = 1.0
        sums = members @ x
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
    return labels


def renumber_by_first_appearance(labels: np.ndarray) -> np.ndarray:
    """The same partition with ids 0, 1, ... in the order each group first appears."""
    labels = np.asarray(labels)
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.reshape(-1)]


def near_duplicate_groups(x: np.ndarray, threshold: float) -> np.ndarray:
    """Group id (int64) of each row of `x` [n, d]: rows whose cosine similarity is >= `threshold` are
    linked, and each connected component is one group, named by its smallest row index (a row with
    no near-duplicate is its own group). The similarity matrix is computed a block of rows at a time
    (`SIMILARITY_BLOCK` entries), so 50k rows never need an n x n matrix.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1 <= threshold <= 1:
        raise ValueError(f"The near-duplicate threshold must be a cosine similarity in [-1, 1], got {threshold!r}.")
    x = normalized_rows(x)
    n = len(x)
    root = np.arange(n, dtype=np.int64)  # each row's group: the smallest row index linked to it so far
    step = max(1, SIMILARITY_BLOCK // max(n, 1))
    for start in range(0, n, step):
        stop = min(n, start + step)
        similar = x[start:stop] @ x[start:].T >= threshold  # only pairs (i, j) with j >= start
        rows, cols = np.nonzero(similar)
        rows, cols = rows + start, cols + start
        later = cols > rows
        _union(root, rows[later], cols[later])
    return root


def _union(root: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Join the groups of each pair (a[i], b[i]) in `root` (union-find, vectorised): every group is hooked
    under the smallest root it is linked to, and the pointers are then compressed to their roots."""
    while len(a):
        root_a, root_b = root[a], root[b]
        linked = root_a != root_b
        if not linked.any():
            return
        a, b, root_a, root_b = a[linked], b[linked], root_a[linked], root_b[linked]
        smaller = np.minimum(root_a, root_b)
        np.minimum.at(root, root_a, smaller)
        np.minimum.at(root, root_b, smaller)
        while True:  # pointers only ever go down (root[i] <= i), so this ends
            jumped = root[root]
            if np.array_equal(jumped, root):
                break
            root[:] = jumped


def row_groups(x: np.ndarray, *, clusters: bool, num_clusters: Optional[int], threshold: Optional[float],
               seed: int) -> dict[str, np.ndarray]:
    """The group stats of rows with the vectors `x` [n, d]: `gsnr_cluster` (with `clusters`; k is `num_clusters`,
    else `default_num_clusters(n)`) and `gsnr_duplicate_group` (when `threshold` is given).

    The vectors are centred on their mean first: a causal LM's hidden states share a large common
    direction (unrelated rows of SmolLM2-135M are at a median cosine of 0.92), which would make every
    row look like a near-duplicate of every other and blur the clusters.
    """
    x = np.asarray(x, dtype=np.float64)
    centred = x - x.mean(axis=0, keepdims=True) if len(x) else x
    out = {}
    if clusters:
        out[fields.CLUSTER] = kmeans_clusters(centred, num_clusters or default_num_clusters(len(x)), seed)
    if threshold is not None:
        out[fields.DUPLICATE_GROUP] = near_duplicate_groups(centred, threshold)
    return out
