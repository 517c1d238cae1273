"""The frozen prefix (`lora_layer_fraction` < 1): the same per-example norms as running every layer,
for GPT-2 and Llama, without running the frozen layers again in training or scoring."""

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from gradfilter_ops import fields
from gradfilter_ops.config import GSNRConfig
from gradfilter_ops.engine import EnsembleScorer, train_ensemble
from gradfilter_ops.engine.grads import collate, per_example_grad_sq_norms_loop
from gradfilter_ops.engine.prefix import FrozenPrefix, adapted_layers
from gradfilter_ops.prompts import Encoded

PROXIES = {
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=2, n_positions=64, vocab_size=100,
                                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64,
                                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=100)),
}


@pytest.fixture(params=sorted(PROXIES))
def proxy(request):
    torch.manual_seed(0)
    model = PROXIES[request.param]().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def rows():
    g = torch.Generator().manual_seed(1)
    return [Encoded(fields.OK, torch.randint(1, 100, (int(n),), generator=g).tolist(), num_prompt=3)
            for n in torch.randint(6, 20, (10,), generator=g)]


def config(**overrides):
    values = dict(hf_model="tiny", num_members=2, train_batch_size=4, score_batch_size=4, precision="fp32",
                  learning_rate=1e-2, lora_layer_fraction=0.5)
    values.update(overrides)
    return GSNRConfig(**values)


@pytest.fixture()
def lower_layer_calls(proxy):
    """How often the real forward of a layer below the adapters runs (not the prefix's skip)."""
    layers = proxy.base_model.h if hasattr(proxy.base_model, "h") else proxy.model.layers
    lower, layer = list(layers[:2]), type(layers[0])
    calls, original = [], layer.forward

    def counted(self, *args, **kwargs):
        if any(self is module for module in lower):
            calls.append(self)
        return original(self, *args, **kwargs)

    layer.forward = counted
    yield calls
    layer.forward = original


def test_adapted_layers_are_the_top_share():
    assert adapted_layers(30, 0.25) == list(range(22, 30))
    assert adapted_layers(12, 0.25) == [9, 10, 11]
    assert adapted_layers(2, 0.1) == [1]
    assert adapted_layers(4, 1.0) == [0, 1, 2, 3]


def test_prefix_norms_equal_the_loop_over_every_layer(proxy, rows):
    """Norms through the frozen prefix equal one-example backward passes through the whole model."""
    snapshots = train_ensemble(proxy, rows, config(), pad_id=0, progress=False)
    assert snapshots.lora["layers_to_transform"] == [2, 3]
    scorer = EnsembleScorer(proxy, snapshots, config(), pad_id=0)
    assert scorer.frozen is not None and scorer.frozen.split == 2
    fast = scorer.sq_norms(rows, progress=False)
    for (member, epoch), name in sorted(scorer.names.items()):
        scorer.model.set_adapter(name)
        for n, p in scorer.model.named_parameters():
            p.requires_grad_(f".{name}." in n)
        slow = per_example_grad_sq_norms_loop(scorer.model, rows, pad_id=0).numpy()
        np.testing.assert_allclose(fast[member, snapshots.epochs.index(epoch)], slow, rtol=1e-4)
    scorer.close()


def test_training_and_scoring_skip_the_frozen_layers(proxy, rows, lower_layer_calls):
    """The layers below the adapters run once per row bucket (the store, the scoring buckets), never in steps."""
    snapshots = train_ensemble(proxy, rows, config(), pad_id=0, progress=False)
    # The store: 1 probe run + 3 buckets of 4 rows, and 1 probe run per member, for each of the 2 lower layers;
    # the 2 members x 2 epochs x 3 steps run none.
    assert len(lower_layer_calls) == 2 * (1 + 3 + 2)
    lower_layer_calls.clear()
    scorer = EnsembleScorer(proxy, snapshots, config(), pad_id=0)
    scorer.sq_norms(rows, progress=False)
    assert len(lower_layer_calls) == 2 * (1 + 3)  # 1 probe run, then each bucket once for its 4 adapters
    scorer.close()


@pytest.mark.parametrize("stack", [1, 2])
@pytest.mark.parametrize("mode", ["snapshot", "online"])
def test_prefix_trains_the_same_members_as_every_layer(proxy, rows, stack, mode):
    """Same adapters and norms with the prefix as with the adapted layers run from the embeddings."""
    from gradfilter_ops.engine import EnsembleTrainer

    results = []
    for fed in (True, False):
        c = config(stack_members=stack, score_mode=mode)
        results.append(EnsembleTrainer(proxy, c, pad_id=0, reuse_prefix=fed).train(rows, progress=False))
    for key, state in results[0].states.items():
        for name, value in state.items():
            torch.testing.assert_close(value, results[1].states[key][name], rtol=1e-4, atol=1e-6)
    if mode == "online":
        np.testing.assert_allclose(results[0].online_sq_norms(), results[1].online_sq_norms(), rtol=1e-4)


def test_hidden_is_the_input_of_the_first_adapted_layer(proxy, rows):
    frozen = FrozenPrefix(proxy, 3)
    batch = collate(rows[:4], pad_id=0)
    seen = {}
    layers = proxy.base_model.h if hasattr(proxy.base_model, "h") else proxy.model.layers

    def keep(_module, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]

    handle = layers[3].register_forward_pre_hook(keep, with_kwargs=True)
    with torch.no_grad():
        proxy(input_ids=batch["input_ids"])
    handle.remove()
    torch.testing.assert_close(frozen.hidden(batch["input_ids"]), seen["h"])
