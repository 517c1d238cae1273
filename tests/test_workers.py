"""`member_workers`: members trained in worker processes give the ensemble of one process; the workers fork from a
server that imported the proxy's modules once."""

import os

import numpy as np
import pytest

from gradfilter_ops.engine import train_ensemble
from gradfilter_ops.prompts import PromptFormatter
from gradfilter_ops.proxy import load_proxy

from helpers import imported, seed_tasks


@pytest.mark.integration  # spawns worker processes, each importing torch and loading the proxy
@pytest.mark.parametrize("score_mode", ["snapshot", "online"])
def test_members_trained_in_workers_equal_members_trained_here(tiny_gpt2_dir, tiny_config, score_mode):
    model, tokenizer = load_proxy(str(tiny_gpt2_dir))
    for p in model.parameters():
        p.requires_grad_(False)
    config = tiny_config(num_members=3, score_mode=score_mode)  # 3 members on 2 workers: one worker trains two
    examples = [PromptFormatter(config, tokenizer).encode(r) for r in seed_tasks(10)]
    finished = []
    here = train_ensemble(model, examples, config, tokenizer.eos_token_id, progress=False)
    there = train_ensemble(model, examples, tiny_config(num_members=3, score_mode=score_mode, member_workers=2),
                           tokenizer.eos_token_id, progress=False, on_member=lambda s, m: finished.append(m))
    assert sorted(finished) == [0, 1, 2]
    assert here.states.keys() == there.states.keys()
    for key, state in here.states.items():
        assert state.keys() == there.states[key].keys()
        for name, tensor in state.items():
            # A worker has fewer threads, so float sums may round differently; nothing else differs.
            np.testing.assert_allclose(there.states[key][name].numpy(), tensor.numpy(), rtol=1e-4, atol=1e-6)
    if score_mode == "online":
        np.testing.assert_allclose(there.online_sq_norms(), here.online_sq_norms(), rtol=1e-4)
    # The proxy comes back as it went: no adapter, no hooks (the workers had copies of their own).
    assert not any("lora" in name for name, _ in model.named_parameters())


@pytest.mark.integration  # starts a forkserver, which imports torch, transformers and peft
def test_workers_fork_from_a_server_that_imported_the_proxys_modules(tiny_gpt2_dir):
    from gradfilter_ops.engine.workers import member_pool

    model, _ = load_proxy(str(tiny_gpt2_dir))
    with member_pool(1, model, int) as pool:  # `int()`: an initializer that imports nothing
        assert pool.submit(imported, type(model).__module__).result()  # the proxy's class, preloaded
        assert pool.submit(imported, "peft").result()
        assert pool.submit(os.getppid).result() != os.getpid()  # forked from the server, not from this process


def test_member_workers_must_be_positive(tiny_config):
    with pytest.raises(ValueError, match="member_workers"):
        tiny_config(member_workers=0)


@pytest.mark.integration  # spawns worker processes, each importing torch and loading the proxy
def test_snapshot_norms_computed_in_workers_equal_norms_computed_here(tiny_gpt2_dir, tiny_config):
    from gradfilter_ops.engine import ensemble_scorer

    model, tokenizer = load_proxy(str(tiny_gpt2_dir))
    for p in model.parameters():
        p.requires_grad_(False)
    config = tiny_config(num_members=3)
    examples = [PromptFormatter(config, tokenizer).encode(r) for r in seed_tasks(9)]
    snapshots = train_ensemble(model, examples, config, tokenizer.eos_token_id, progress=False)
    results = {}
    for workers in (1, 2):
        scorer = ensemble_scorer(model, snapshots, config, tokenizer.eos_token_id, workers=workers)
        try:
            results[workers] = (scorer.sq_norms(examples, progress=False),
                                scorer.sq_norms(examples[4:], progress=False))
        finally:
            scorer.close()
    assert results[1][0].shape == (3, 2, 9) and (results[1][0] > 0).all()
    for here, there in zip(results[1], results[2]):
        np.testing.assert_allclose(there, here, rtol=1e-4)
    assert not any("lora" in name for name, _ in model.named_parameters())


@pytest.mark.integration  # spawns worker processes, each importing torch and loading the proxy
def test_scorer_with_member_workers_gives_the_same_scores(tiny_config):
    from datasets import Dataset

    from gradfilter_ops import GSNRScorer, fields

    rows = [{k: r[k] for k in ("instruction", "input", "output")} for r in seed_tasks(10)]
    scores = {}
    for workers in (1, 2):
        scored = GSNRScorer(tiny_config(member_workers=workers)).score(Dataset.from_list(rows))
        scores[workers] = np.array(scored[fields.GSNR], dtype=float)
    assert np.isfinite(scores[1]).all()
    np.testing.assert_allclose(scores[2], scores[1], rtol=1e-3)


def test_members_fitted_apart_join_into_one_ensemble(tiny_config):
    """What `distributed.fit_dataset` does in Ray tasks (tests/test_ray.py checks the scores)."""
    from gradfilter_ops import GSNRScorer
    from gradfilter_ops.engine import Snapshots

    rows = seed_tasks(8)
    config = tiny_config(num_members=3)
    first, second = GSNRScorer(config), GSNRScorer(config)
    first.fit(rows, members=[0, 2])
    second.fit(rows, members=[1])
    assert first.snapshots.members == [0, 2] and second.snapshots.members == [1]
    first.merge_members(second)
    assert first.snapshots.members == [0, 1, 2]
    with pytest.raises(ValueError, match=r"members \[1\] are in more than one part"):
        Snapshots.merge([first.snapshots, second.snapshots])
    other_rows = GSNRScorer(config)
    other_rows.fit(rows[:5], members=[1])
    with pytest.raises(ValueError, match="other rows"):
        first.merge_members(other_rows)
    with pytest.raises(ValueError, match="outside the ensemble"):
        GSNRScorer(config).fit(rows, members=[3])
