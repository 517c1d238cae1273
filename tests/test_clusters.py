"""Clusters and near-duplicate groups of row vectors, and the proxy's pooled hidden states they are computed from."""

import numpy as np
import pytest

from gradfilter_ops import clusters
from gradfilter_ops.clusters import default_num_clusters, kmeans_clusters, near_duplicate_groups
from tests.helpers import seed_tasks


@pytest.mark.parametrize("n, k", [(0, 1), (1, 1), (2, 1), (50, 5), (200, 10), (1036, 23), (8192, 64), (50000, 64)])
def test_default_number_of_clusters(n, k):
    assert default_num_clusters(n) == k


def blobs(seed=0):
    """30 rows in 3 well-separated directions of R^8 (10 each, a little noise), interleaved; their true blob."""
    rng = np.random.default_rng(seed)
    centres = np.eye(8)[[0, 3, 6]] * np.array([[1.0], [5.0], [0.2]])  # the scale must not matter (rows are normalised)
    truth = np.tile([2, 0, 1], 10)
    return centres[truth] + rng.normal(scale=0.02, size=(30, 8)) * np.abs(centres[truth]).sum(1, keepdims=True), truth


def test_kmeans_finds_separated_blobs_numbered_by_first_appearance():
    x, truth = blobs()
    labels = kmeans_clusters(x, 3, seed=0)
    assert labels.dtype == np.int64
    assert labels.tolist() == [0, 1, 2] * 10  # blob 2 appears first, so it is cluster 0
    assert np.array_equal(kmeans_clusters(x, 3, seed=0), labels)


def test_kmeans_does_not_depend_on_the_row_order():
    x, _ = blobs(seed=1)
    x = x + np.random.default_rng(5).normal(scale=0.3, size=x.shape)  # blurred, so seeding could matter
    labels = kmeans_clusters(x, 4, seed=3)
    perm = np.random.default_rng(7).permutation(len(x))
    assert np.array_equal(kmeans_clusters(x[perm], 4, seed=3), clusters.renumber_by_first_appearance(labels[perm]))


def test_kmeans_gives_fewer_clusters_than_k_for_fewer_distinct_rows():
    x = np.array([[1.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 1.0]])  # two distinct directions
    assert kmeans_clusters(x, 5, seed=0).tolist() == [0, 1, 0, 1]
    assert kmeans_clusters(np.zeros((0, 3)), 2, seed=0).tolist() == []


@pytest.mark.parametrize("k", [0, -1, 2.0, True])
def test_kmeans_rejects_a_bad_k(k):
    with pytest.raises(ValueError, match="positive integer"):
        kmeans_clusters(np.eye(3), k, seed=0)


def test_non_finite_vectors_are_refused():
    with pytest.raises(ValueError, match="NaN or infinite"):
        near_duplicate_groups(np.array([[1.0, np.nan]]), 0.9)


def at_degrees(*degrees, scale=None):
    angles = np.radians(degrees)
    rows = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return rows * (np.array(scale)[:, None] if scale is not None else 1.0)


@pytest.mark.parametrize("block", [clusters.SIMILARITY_BLOCK, 6])
def test_near_duplicate_groups_are_linked_components_named_by_their_first_row(monkeypatch, block):
    monkeypatch.setattr(clusters, "SIMILARITY_BLOCK", block)  # 6 entries: one row per block
    # cos(10 deg) = 0.985 >= 0.98 links; cos(20 deg) = 0.940 does not, but 0 - 10 - 20 is one chain.
    x = at_degrees(90, 20, 200, 0, 90.5, 10, scale=[1, 1, 1, 1, 5, 1])
    assert near_duplicate_groups(x, 0.98).tolist() == [0, 1, 2, 1, 0, 1]
    assert near_duplicate_groups(x, 0.999).tolist() == [0, 1, 2, 3, 0, 5]
    assert near_duplicate_groups(x, 1.0).tolist() == [0, 1, 2, 3, 4, 5]  # 90.5 deg is not 90 deg


def test_near_duplicate_groups_of_many_copies():
    x = np.tile(at_degrees(0, 45, 90), (40, 1))  # rows 0, 3, 6, ... are copies of one another
    assert near_duplicate_groups(x, 0.99).tolist() == [0, 1, 2] * 40
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        near_duplicate_groups(x, 1.5)


# --- the proxy's pooled hidden states ------------------------------------------------------------

@pytest.fixture(scope="module")
def proxy_rows(tiny_gpt2_dir):
    """The tiny proxy (in training mode, dropout on: pooling must switch it off), and 7 encoded rows."""
    from gradfilter_ops.config import GSNRConfig
    from gradfilter_ops.prompts import PromptFormatter
    from gradfilter_ops.proxy import load_proxy

    model, tokenizer = load_proxy(str(tiny_gpt2_dir))
    formatter = PromptFormatter(GSNRConfig(hf_model=str(tiny_gpt2_dir), max_length=128), tokenizer)
    encoded = [formatter.encode(row) for row in seed_tasks(7)]
    assert len({len(e.input_ids) for e in encoded}) > 1  # batches need padding
    return model.train(), tokenizer, encoded


def test_pooled_hidden_states_are_the_mean_of_the_last_hidden_state(proxy_rows):
    import torch

    from gradfilter_ops.embeddings import pooled_hidden_states

    model, tokenizer, encoded = proxy_rows
    pooled = pooled_hidden_states(model, encoded, tokenizer.eos_token_id, batch_size=4)
    assert pooled.shape == (7, 32) and pooled.dtype == np.float32
    assert model.training  # given back as it came
    model.eval()
    with torch.no_grad():
        manual = [model(torch.tensor([list(e.input_ids)]), output_hidden_states=True).hidden_states[-1][0].mean(0)
                  for e in encoded]
    model.train()
    np.testing.assert_allclose(pooled, torch.stack(manual).numpy(), rtol=1e-5, atol=1e-5)
    one_at_a_time = pooled_hidden_states(model, encoded, tokenizer.eos_token_id, batch_size=1)
    np.testing.assert_allclose(pooled, one_at_a_time, rtol=1e-5, atol=1e-5)
    assert np.array_equal(pooled_hidden_states(model, encoded, tokenizer.eos_token_id, batch_size=4), pooled)


def test_pooled_hidden_states_of_a_peft_model_are_the_frozen_proxys(proxy_rows):
    import copy

    from peft import LoraConfig, get_peft_model

    from gradfilter_ops.embeddings import pooled_hidden_states

    model, tokenizer, encoded = proxy_rows
    bare = pooled_hidden_states(model, encoded, tokenizer.eos_token_id)
    lora = LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False)  # B != 0: the adapter changes outputs
    peft_model = get_peft_model(copy.deepcopy(model), lora)
    np.testing.assert_array_equal(pooled_hidden_states(peft_model, encoded, tokenizer.eos_token_id), bare)
    adapted = pooled_hidden_states(peft_model.merge_and_unload(), encoded, tokenizer.eos_token_id)
    assert not np.allclose(adapted, bare)  # the adapter does change them: disabling it is what kept them equal
    assert pooled_hidden_states(model, [], tokenizer.eos_token_id).shape == (0, 32)
