"""A worker node of a two-node Ray cluster removed (every process of it: raylet, object store, the scoring actor)
while its actor holds a batch: the head node scores that batch again and every row comes back once.

The cluster and the test's scorer are `tests/test_ray_cluster.py`'s, on a cluster of this file's own: after that
file's tests, Ray Data took from 70 s to several minutes to place the lost batch again (23 s on a fresh cluster)."""

import pytest

import test_ray_cluster as cluster
from test_ray_cluster import (Ledger, assert_every_row_once_with_the_scores_of, on_the_held_batch, ray,
                              run_on_the_cluster)

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("test_ray_node_loss")]
# The module fixtures, for a cluster of this module's own
two_nodes, one_process = cluster.two_nodes, cluster.one_process


def test_a_worker_node_lost_in_a_batch_leaves_the_rest_to_finish_every_row_once(two_nodes, one_process, tiny_gpt2_dir):
    """The worker node is removed (every process of it: raylet, object store, the scoring actor) while its actor
    holds a batch; the head node scores that batch again."""
    lost = two_nodes.worker
    ledger = Ledger.remote(hold=lost.node_id, spread=2)  # the head's actor waits until the worker holds a batch
    removed = {}

    def remove(held):
        two_nodes.cluster.remove_node(lost, allow_graceful=False)
        removed["ids"] = held[1]

    remover = on_the_held_batch(ledger, remove)
    try:
        scored = run_on_the_cluster(two_nodes, tiny_gpt2_dir, ledger, train_tasks=1)  # where it trains is not the point
    finally:
        remover.join()
        two_nodes.caches.pop(lost.node_id)
    _, batches = ray.get(ledger.records.remote())

    assert removed, "the worker node held no batch, so it was not removed"
    held_at = batches.index((lost.node_id, removed["ids"]))
    assert [node for node, ids in batches[held_at + 1:] if ids == removed["ids"]] == [next(iter(two_nodes.caches))]
    assert_every_row_once_with_the_scores_of(one_process, scored.dataset.take_all())
