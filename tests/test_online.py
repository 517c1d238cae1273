"""`score_mode: online`: norms read off the training steps, with the real peft ensemble on a tiny proxy."""

import numpy as np
import pytest
from datasets import Dataset

from gradfilter_ops import GSNRScorer, fields
from gradfilter_ops.engine import EnsembleScorer, Snapshots, train_ensemble
from gradfilter_ops.prompts import PromptFormatter

from helpers import seed_tasks


def encoded(config, tokenizer, n):
    formatter = PromptFormatter(config, tokenizer)
    return [formatter.encode(r) for r in seed_tasks(n)]


def snapshot_norms(model, snapshots, config, examples, pad_id):
    scorer = EnsembleScorer(model, snapshots, config, pad_id)
    try:
        return scorer.sq_norms(examples, progress=False)
    finally:
        scorer.close()


def test_online_norms_are_the_norms_at_each_steps_weights(dropout_free_proxy, tiny_config):
    """With one optimizer step per epoch, the late epoch's step runs at the weights saved after the
    early epoch, so its online norms must equal snapshot mode's early norms exactly."""
    model, tokenizer = dropout_free_proxy
    config = tiny_config(score_mode="online", train_batch_size=64)
    examples = encoded(config, tokenizer, 12)
    snapshots = train_ensemble(model, examples, config, tokenizer.eos_token_id, progress=False)
    online = snapshots.online_sq_norms()
    assert online.shape == (2, 2, 12) and np.isfinite(online).all() and (online > 0).all()
    from_snapshots = snapshot_norms(model, snapshots, config, examples, tokenizer.eos_token_id)
    np.testing.assert_allclose(online[:, 1], from_snapshots[:, 0], rtol=1e-4)
    assert not np.allclose(online[:, 1], from_snapshots[:, 1], rtol=1e-2)  # the late snapshot is one step on


def test_online_recording_does_not_change_the_training(dropout_free_proxy, tiny_config):
    model, tokenizer = dropout_free_proxy
    examples = encoded(tiny_config(), tokenizer, 10)
    plain = train_ensemble(model, examples, tiny_config(), tokenizer.eos_token_id, progress=False)
    online = train_ensemble(model, examples, tiny_config(score_mode="online"), tokenizer.eos_token_id, progress=False)
    assert plain.states.keys() == online.states.keys()
    for key, state in plain.states.items():
        for name, tensor in state.items():
            np.testing.assert_allclose(online.states[key][name].numpy(), tensor.numpy(), rtol=1e-5, atol=1e-7)


def test_scorer_in_online_mode_scores_every_row_and_resumes_from_the_cache(tiny_config, tmp_path):
    rows = [{k: r[k] for k in ("instruction", "input", "output")} for r in seed_tasks(14)]
    rows.append({"instruction": "Reply.", "input": None, "output": ""})
    config = tiny_config(score_mode="online", use_cache=True)
    scorer = GSNRScorer(config)
    scored = scorer.score(Dataset.from_list(rows), batch_size=5)
    assert scored[fields.STATUS] == [fields.OK] * 14 + [fields.EMPTY_RESPONSE]
    assert all(np.isfinite(scored[fields.GSNR][:14]))

    # The scores are the G-SNR of the norms recorded in training, whatever the map batches.
    again = GSNRScorer(config).score(Dataset.from_list(rows[::-1]), batch_size=3)
    assert again[fields.GSNR][::-1] == scored[fields.GSNR]

    # A fresh process-like scorer finds the members and their online norms in the cache entry.
    saved = Snapshots.load(scorer.cache.ensemble_dir, entry=scorer.cache.key)
    assert sorted(saved.online_norms) == [0, 1]
    np.testing.assert_array_equal(saved.online_sq_norms(), scorer.snapshots.online_sq_norms())


def test_online_mode_refuses_rows_it_did_not_train_on(tiny_config):
    rows = [{k: r[k] for k in ("instruction", "input", "output")} for r in seed_tasks(12)]
    scorer = GSNRScorer(tiny_config(score_mode="online"))
    scorer.fit(Dataset.from_list(rows[:8]))
    with pytest.raises(ValueError, match="only the rows `fit` trained on"):
        scorer.score_batch(Dataset.from_list(rows[6:]).to_dict())
