"""`stack_members`: several members in one forward pass give the ensemble and the norms of one at a time."""

from pathlib import Path

import numpy as np
import pytest
import torch

from gradfilter_ops.engine import EnsembleScorer, train_ensemble
from gradfilter_ops.engine.grads import shuffled_length_batches
from gradfilter_ops.prompts import PromptFormatter

from helpers import seed_tasks, write_tiny_gpt2


def encoded(config, tokenizer, n):
    formatter = PromptFormatter(config, tokenizer)
    return [formatter.encode(r) for r in seed_tasks(n)]


def assert_same_states(a, b):
    assert a.states.keys() == b.states.keys()
    for key, state in a.states.items():
        assert state.keys() == b.states[key].keys()
        for name, tensor in state.items():
            np.testing.assert_allclose(b.states[key][name].numpy(), tensor.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("score_mode", ["snapshot", "online"])
def test_stacked_training_equals_one_member_at_a_time(dropout_free_proxy, tiny_config, score_mode):
    model, tokenizer = dropout_free_proxy
    config = tiny_config(num_members=3, score_mode=score_mode, stack_members=1)
    examples = encoded(config, tokenizer, 10)  # batches of 4, 4 and 2 rows
    # The members' short batch falls on different steps, so stacked steps carry filler rows.
    lengths = [len(e.input_ids) for e in examples]
    orders = [shuffled_length_batches(lengths, 4, torch.Generator().manual_seed(config.seed + m)) for m in range(3)]
    assert any(len({len(batch) for batch in step}) > 1 for step in zip(*orders))

    one_by_one = train_ensemble(model, examples, config, tokenizer.eos_token_id, progress=False)
    finished = []
    stacked = train_ensemble(model, examples, tiny_config(num_members=3, score_mode=score_mode, stack_members=3),
                             tokenizer.eos_token_id, progress=False, on_member=lambda s, m: finished.append(m))
    assert sorted(finished) == [0, 1, 2]
    assert_same_states(one_by_one, stacked)
    if score_mode == "online":
        np.testing.assert_allclose(stacked.online_sq_norms(), one_by_one.online_sq_norms(), rtol=1e-4)
    # The proxy comes back as it went: no adapter, no patched forward.
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_stacks_of_two_members_with_one_left_over(dropout_free_proxy, tiny_config):
    model, tokenizer = dropout_free_proxy
    examples = encoded(tiny_config(), tokenizer, 8)
    one_by_one = train_ensemble(model, examples, tiny_config(num_members=3, stack_members=1), tokenizer.eos_token_id,
                                progress=False)
    in_twos = train_ensemble(model, examples, tiny_config(num_members=3, stack_members=2), tokenizer.eos_token_id,
                             progress=False)
    assert_same_states(one_by_one, in_twos)


def test_stacked_snapshot_norms_equal_one_pass_per_adapter(dropout_free_proxy, tiny_config):
    model, tokenizer = dropout_free_proxy
    config = tiny_config(num_members=3)
    examples = encoded(config, tokenizer, 9)
    snapshots = train_ensemble(model, examples, config, tokenizer.eos_token_id, progress=False)
    results = {}
    for stack in (1, 2, 3):  # one pass per adapter; passes of 4 and 2 adapters; one pass of all 6
        scorer = EnsembleScorer(model, snapshots, tiny_config(num_members=3, stack_members=stack),
                                tokenizer.eos_token_id)
        try:
            results[stack] = scorer.sq_norms(examples, progress=False), scorer.sq_norms(examples[5:], progress=False)
        finally:
            scorer.close()
    assert results[1][0].shape == (3, 2, 9) and (results[1][0] > 0).all()
    assert not np.allclose(results[1][0][0], results[1][0][1])  # members differ, so a mixed-up slot would show
    for stack in (2, 3):
        for here, there in zip(results[1], results[stack]):
            np.testing.assert_allclose(there, here, rtol=1e-4)
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_stacking_runs_the_proxy_once_for_all_adapters(dropout_free_proxy, tiny_config, monkeypatch):
    """What stacking is for: far fewer operations per row (on a GPU each costs a kernel launch)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "tools"))
    from bench_speed import ops_per_batch

    model, tokenizer = dropout_free_proxy
    examples = encoded(tiny_config(), tokenizer, 8)
    ops = {stack: ops_per_batch(model, examples, tiny_config(num_members=4, stack_members=stack),
                                tokenizer.eos_token_id, 4) for stack in (1, 4)}
    assert ops[4]["train"] < ops[1]["train"] / 2, ops
    assert ops[4]["score"] < ops[1]["score"] / 4, ops


def test_stack_members_must_be_positive_or_null(tiny_config):
    assert tiny_config(stack_members=None).stack_members is None
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="stack_members"):
            tiny_config(stack_members=bad)


def test_scorer_with_stacked_members_gives_the_same_scores(tiny_config, tmp_path, tiny_gpt2_dir):
    """End to end through `GSNRScorer`, on a tiny GPT-2 saved without dropout."""
    import shutil

    from datasets import Dataset
    from transformers import GPT2Config, GPT2TokenizerFast

    from gradfilter_ops import GSNRScorer, fields

    path = tmp_path / "tiny-gpt2-no-dropout"
    write_tiny_gpt2(path, GPT2Config.from_pretrained(tiny_gpt2_dir).vocab_size, resid_pdrop=0.0, embd_pdrop=0.0,
                    attn_pdrop=0.0)
    for name in ("vocab.json", "merges.txt"):  # conftest's tokenizer
        shutil.copyfile(tiny_gpt2_dir / name, path / name)
    GPT2TokenizerFast.from_pretrained(path).save_pretrained(path)
    rows = [{k: r[k] for k in ("instruction", "input", "output")} for r in seed_tasks(10)]
    scores = {}
    for stack in (1, 2):
        scored = GSNRScorer(tiny_config(hf_model=str(path), stack_members=stack)).score(Dataset.from_list(rows))
        scores[stack] = np.array(scored[fields.GSNR], dtype=float)
    assert np.isfinite(scores[1]).all()
    np.testing.assert_allclose(scores[2], scores[1], rtol=1e-3)
