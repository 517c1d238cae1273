"""`EnsembleTrainer`: one training run keeps the snapshots of any set of epochs, the same as runs that
keep two each, and saved with them, they load back whole."""

import dataclasses

import numpy as np
import pytest
import torch

from gradfilter_ops.engine import EnsembleScorer, EnsembleTrainer, Snapshots, train_ensemble
from gradfilter_ops.prompts import PromptFormatter

from helpers import seed_tasks


@pytest.fixture()
def setup(dropout_free_proxy, tiny_config):
    model, tokenizer = dropout_free_proxy
    config = tiny_config(num_members=2, num_epochs=3, score_mode="online")
    formatter = PromptFormatter(config, tokenizer)
    return model, tokenizer.eos_token_id, config, [formatter.encode(r) for r in seed_tasks(10)]


def test_keep_epochs_equals_a_run_per_pair_of_epochs(setup, tmp_path):
    model, pad_id, config, examples = setup
    every = EnsembleTrainer(model, config, pad_id, keep_epochs={3, 1, 2}).train(examples, progress=False)
    assert every.epochs == (1, 2, 3) and sorted(every.states) == [(m, e) for m in (0, 1) for e in (1, 2, 3)]
    online = every.online_sq_norms()
    assert online.shape == (2, 3, len(examples)) and np.isfinite(online).all()
    for early, late in ((1, 2), (2, 3)):
        two = dataclasses.replace(config, num_epochs=late, early_epoch=early, late_epoch=late)
        pair = train_ensemble(model, examples, two, pad_id, progress=False)
        for key, state in pair.states.items():
            for name, tensor in state.items():
                assert torch.equal(tensor, every.states[key][name]), (key, name)
        np.testing.assert_allclose(pair.online_sq_norms(), online[:, [early - 1, late - 1]], rtol=1e-6)
    loaded = Snapshots.load(every.save(tmp_path / "every"))
    assert loaded.epochs == (1, 2, 3) and loaded.states.keys() == every.states.keys()
    np.testing.assert_array_equal(loaded.online_sq_norms(), online)
    scorer = EnsembleScorer(model, every, config, pad_id)
    try:
        assert scorer.sq_norms(examples, progress=False).shape == (2, 3, len(examples))
    finally:
        scorer.close()


def test_keep_epochs_must_be_epochs_that_train(setup):
    model, pad_id, config, _ = setup
    for wrong in ({0, 2}, {4}, set()):
        with pytest.raises(ValueError, match=r"keep_epochs must be epochs in 1..num_epochs=3"):
            EnsembleTrainer(model, config, pad_id, keep_epochs=wrong)


def test_the_evaluation_trains_once(setup, monkeypatch):
    from gradfilter_ops.evaluation.gradients import train_all_epochs

    model, pad_id, config, examples = setup
    runs = []
    real = EnsembleTrainer.train

    def counted(self, *args, **kwargs):
        runs.append(self.epochs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(EnsembleTrainer, "train", counted)
    snapshots = train_all_epochs(model, examples, config, pad_id, progress=False)
    assert runs == [(1, 2, 3)] and snapshots.epochs == (1, 2, 3)
