"""Per-example gradient norms from one batched backward pass equal a loop of one-example passes."""

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from gradfilter_ops.config import GSNRConfig
from gradfilter_ops.engine.grads import (LoraActivations, collate, length_buckets, per_example_grad_sq_norms,
                                  per_example_grad_sq_norms_loop)
from gradfilter_ops.prompts import PromptFormatter

from helpers import seed_tasks


@pytest.fixture(scope="module")
def setup(tiny_gpt2_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    torch.manual_seed(0)
    # init_lora_weights=False gives B random values too, so the gradients of A are not zero.
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, fan_in_fan_out=True))
    peft_model.eval()
    formatter = PromptFormatter(GSNRConfig(max_length=128), tokenizer)
    examples = [formatter.encode(row) for row in seed_tasks(16)]
    assert len({len(e.input_ids) for e in examples}) >= 5  # real padding happens
    return peft_model, examples, tokenizer.eos_token_id


@pytest.mark.parametrize("grad_params", ["AB", "B"])
def test_batched_norms_match_one_example_loop(setup, grad_params):
    model, examples, pad_id = setup
    activations = LoraActivations(model)
    try:
        batched = per_example_grad_sq_norms(model, activations, collate(examples, pad_id), grad_params)
    finally:
        activations.remove()
    looped = per_example_grad_sq_norms_loop(model, examples, pad_id, grad_params)
    assert (looped > 0).all()
    torch.testing.assert_close(batched, looped, rtol=1e-4, atol=0)


def test_sum_loss_norms_are_the_gradient_norms_of_each_rows_summed_loss(setup):
    from gradfilter_ops.engine.grads import response_loss_sums
    from gradfilter_ops.engine.gsnr import sum_loss_sq_norms

    model, examples, pad_id = setup
    mean_norms = per_example_grad_sq_norms_loop(model, examples[:4], pad_id).numpy()
    params = [p for p in model.parameters() if p.requires_grad]
    summed = []
    for example in examples[:4]:
        sums, _ = response_loss_sums(model, collate([example], pad_id))
        grads = torch.autograd.grad(sums.sum(), params)
        summed.append(sum(g.pow(2).sum() for g in grads).item())
    got = sum_loss_sq_norms(mean_norms, [e.num_loss_tokens for e in examples[:4]])
    np.testing.assert_allclose(got, summed, rtol=1e-4)
    assert not np.allclose(got, mean_norms)


def losses_norms_and_gradients(model, batch):
    """Per-row response losses, per-example norms, and the LoRA gradients of a loss that weighs row i by i + 1
    (so a wrong gradient in any row shows)."""
    from gradfilter_ops.engine import grads

    activations = LoraActivations(model)
    try:
        norms = per_example_grad_sq_norms(model, activations, batch)
    finally:
        activations.remove()
    sums, _ = grads.response_loss_sums(model, batch)
    (sums * torch.arange(1, len(sums) + 1)).sum().backward()
    gradients = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return sums.detach(), norms, gradients


def test_chunked_lm_head_gives_the_same_losses_norms_and_gradients(setup, monkeypatch):
    """Past `HEAD_CHUNK` response positions the autograd head runs in recomputed chunks: nothing else may change."""
    from gradfilter_ops.engine import grads

    monkeypatch.setattr(grads, "FUSED_HEAD", False)  # the path of a trainable or wrapped head

    model, examples, pad_id = setup
    batch = collate(examples, pad_id)
    assert len(batch["targets"]) > 3 * 50  # several chunks below, one of them partial

    whole = losses_norms_and_gradients(model, batch)
    monkeypatch.setattr(grads, "HEAD_CHUNK", 50)
    chunked = losses_norms_and_gradients(model, batch)
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(chunked[1], whole[1], rtol=1e-4, atol=0)
    for a, b in zip(chunked[2], whole[2]):
        # Elements near zero carry the summation-order rounding of the whole tensor's scale.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


def test_b_only_norm_is_part_of_the_full_norm(setup):
    model, examples, pad_id = setup
    both = per_example_grad_sq_norms_loop(model, examples[:3], pad_id, "AB")
    b_only = per_example_grad_sq_norms_loop(model, examples[:3], pad_id, "B")
    assert (b_only < both).all()


def test_length_buckets_cover_every_index_once():
    lengths = [5, 1, 9, 3, 3, 7, 2]
    buckets = length_buckets(lengths, 3)
    assert sorted(i for b in buckets for i in b) == list(range(7))
    assert [[lengths[i] for i in b] for b in buckets] == [[1, 2, 3], [3, 5, 7], [9]]


def test_collate_masks_only_response_tokens(setup):
    _, examples, pad_id = setup
    batch = collate(examples[:2], pad_id)
    for row, example in enumerate(examples[:2]):
        mask = batch["loss_mask"][row]
        assert mask.sum() == example.num_response
        assert not mask[: example.num_prompt].any()
        assert batch["attention_mask"][row].sum() == len(example.input_ids)


def test_training_batches_cover_every_row_once_with_similar_lengths():
    from gradfilter_ops.engine.grads import shuffled_length_batches

    lengths = [(i * 37) % 101 + 1 for i in range(1000)]
    batches = shuffled_length_batches(lengths, 16, torch.Generator().manual_seed(0))
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert len(batches) == -(-1000 // 16)
    padding = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    assert padding < 0.05 * sum(lengths)  # random batches of these lengths pad about 45%
    again = shuffled_length_batches(lengths, 16, torch.Generator().manual_seed(0))
    assert again == batches
    assert shuffled_length_batches(lengths, 16, torch.Generator().manual_seed(1)) != batches


@pytest.mark.parametrize("grad_params", ["AB", "B"])
def test_training_backward_yields_each_rows_own_norm_and_the_batch_gradient(setup, grad_params):
    """Online mode: one backward of the token-mean training loss gives every row's own gradient norm
    (as a loop of one-example passes does) and the same parameter gradients as `loss.backward()`."""
    from gradfilter_ops.engine.grads import backward_with_sq_norms, response_loss_sums

    model, examples, pad_id = setup
    params = [p for p in model.parameters() if p.requires_grad]
    batch = collate(examples, pad_id)

    sums, counts = response_loss_sums(model, batch)
    (sums.sum() / counts.sum()).backward()
    expected_grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    activations = LoraActivations(model)
    try:
        with activations.recording():
            sums, counts = response_loss_sums(model, batch)
        assert len(set(counts.tolist())) > 1  # rows weigh differently in the token mean
        online = backward_with_sq_norms(sums.sum() / counts.sum(), counts, activations, params, grad_params)
    finally:
        activations.remove()
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    looped = per_example_grad_sq_norms_loop(model, examples, pad_id, grad_params)
    torch.testing.assert_close(online, looped, rtol=1e-4, atol=0)


def test_fused_frozen_head_matches_autograd(setup, monkeypatch):
    """The fused head (chunked, input gradient taken in the forward) gives autograd's losses, norms and gradients."""
    from gradfilter_ops.engine import grads, head

    model, examples, pad_id = setup
    batch = collate(examples, pad_id)
    vocab = model.get_output_embeddings().out_features
    assert head.frozen_head(model.get_base_model().get_output_embeddings())

    def run(fused: bool, chunk_positions: int = 1 << 20):
        monkeypatch.setattr(grads, "FUSED_HEAD", fused)
        monkeypatch.setattr(head, "CHUNK_LOGITS", chunk_positions * vocab)
        return losses_norms_and_gradients(model, batch)

    reference = run(fused=False)
    assert len(batch["targets"]) > 3 * 37
    for fused in (run(True), run(True, chunk_positions=37)):  # one chunk; several, the last partial
        torch.testing.assert_close(fused[0], reference[0], rtol=1e-5, atol=0)
        torch.testing.assert_close(fused[1], reference[1], rtol=1e-4, atol=0)
        for a, b in zip(fused[2], reference[2]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())
