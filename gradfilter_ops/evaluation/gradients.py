"""The proxy side of the evaluation: the ensemble trained once with every epoch's adapters kept, and
each row's squared gradient norm with respect to A, B and the adapted frozen weights W at every one."""

from __future__ import annotations

import dataclasses

import numpy as np


def train_all_epochs(model, examples, config, pad_id: int, progress: bool = True):
    """The package's own ensemble training (`ensemble.EnsembleTrainer`), run once, every epoch's
    adapters kept (`keep_epochs` 1..num_epochs).

    The run records the online norms (`score_mode: online`, over `A` + `B`), one member at a time
    unless `stack_members` is set, as the scorer trains on a CPU. Returns `Snapshots` whose `epochs`
    are 1..num_epochs; its `online_norms` hold, for every epoch, each row's squared `A` + `B` norm
    read off that epoch's training steps.
    """
    from ..engine import EnsembleTrainer

    recording = dataclasses.replace(config, grad_params="AB", score_mode="online",
                                    stack_members=config.stack_members or 1)
    trainer = EnsembleTrainer(model, recording, pad_id, keep_epochs=range(1, config.num_epochs + 1))
    return trainer.train(examples, progress=progress)


def per_example_parts(model, activations, batch, autocast_dtype=None, scaling: float = 1.0) -> dict:
    """Per-example squared gradient norms w.r.t. all LoRA `A`s, all `B`s, and the adapted weights W.

    `A` + `B` is `grad_params: AB` and `B` is `grad_params: B` of `per_example_grad_sq_norms` (the
    tests check both). `W` is the norm of the gradient w.r.t. the frozen weight each adapter sits on,
    sum_t delta_t x_t^T per layer (delta: the loss gradient at the layer's output, x: its input),
    computed with the Gram trick; it does not depend on the size of A or B, only on what the adapted
    model computes. `scaling` is the adapters' alpha / r: the gradient at B's output is scaling
    times the gradient at the layer's output. Also returns each example's mean response loss (`loss`).
    Assumes lora_dropout 0 (A's input is then the layer's input).
    """
    import torch

    from ..engine.grads import lora_output_grads, summed_sq_norms

    losses, records, grads = lora_output_grads(model, activations, batch, "AB", autocast_dtype)
    out = {}
    for kind in "AB":  # the A and B parts, as `grad_params` counts them
        pairs = [(record, grad) for record, grad in zip(records, grads) if record[0] == kind]
        out[kind] = summed_sq_norms([record for record, _ in pairs], [grad for _, grad in pairs])
    out["W"] = torch.zeros(losses.shape[0], dtype=torch.float32, device=losses.device)
    with torch.no_grad():
        # Each layer records its A run (input: the layer input x) right before its B run (output gradient g).
        for (kind, inp, _), (next_kind, _, _), grad in zip(records, records[1:], grads[1:]):
            if kind == "A" and next_kind == "B":
                g, x = grad.float(), inp.float()
                # ||sum_t g_t x_t^T||^2 = sum_{t,t'} (g_t . g_t')(x_t . x_t'), g = scaling * delta.
                gram = torch.bmm(g, g.transpose(1, 2)) * torch.bmm(x, x.transpose(1, 2))
                out["W"] += gram.sum(dim=(1, 2)) / scaling ** 2
    out["loss"] = losses.detach().float()
    return out


def snapshot_norms(model, snapshots, config, examples, pad_id: int, progress: bool = True) -> dict[str, np.ndarray]:
    """Per-part squared norms and losses of every example at every kept snapshot:
    {"A"|"B"|"W"|"loss": [members, epochs, N]}."""
    from tqdm.auto import tqdm

    from ..engine import EnsembleScorer
    from ..engine.grads import collate, length_buckets
    scorer = EnsembleScorer(model, snapshots, config, pad_id)  # loads every adapter, hooks A and B
    try:
        epochs = list(snapshots.epochs)
        shape = (snapshots.num_members, len(epochs), len(examples))
        out = {key: np.zeros(shape) for key in ("A", "B", "W", "loss")}
        autocast_dtype = scorer.precision.autocast_dtype
        buckets = length_buckets([len(e.input_ids) for e in examples], config.score_batch_size)
        bar = tqdm(total=len(buckets) * len(scorer.names), desc="eval: per-example gradients", disable=not progress,
                   mininterval=30)
        for indices in buckets:
            batch = collate([examples[i] for i in indices], pad_id, scorer.device)
            for (member, epoch), name in scorer.names.items():
                scorer.model.set_adapter(name)
                parts = per_example_parts(scorer.model, scorer.activations, batch, autocast_dtype,
                                          config.lora_alpha / config.lora_r)
                for key in out:
                    out[key][member, epochs.index(epoch), indices] = parts[key].double().cpu().numpy()
                bar.update()
        bar.close()
    finally:
        scorer.close()
    return out
