"""The downstream check's fine-tune: one LoRA recipe on a target causal LM, a fixed number of
optimizer steps whatever the selection's size, and the held-out response loss every k steps."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class FinetuneRecipe:
    """How every selection is fine-tuned: the same LoRA, optimizer and number of steps for all."""

    steps: int = _help("Optimizer steps for every selection; a selection smaller than steps x batch-size "
                       "rows is cycled (a fresh seeded order each pass), so every selection gets the same compute.",
                       default=100)
    batch_size: int = _help("Rows per optimizer step.", default=8)
    learning_rate: float = _help("AdamW learning rate of the fine-tune.", default=5e-4)
    weight_decay: float = _help("AdamW weight decay of the fine-tune.", default=0.0)
    lora_r: int = _help("LoRA rank of the fine-tune.", default=8)
    lora_alpha: float = _help("LoRA alpha of the fine-tune.", default=16.0)
    target_modules: Optional[list[str]] = _help(
        "Modules of the target that get adapters; default: peft's attention projections for the architecture.",
        default=None)
    eval_every: int = _help("Held-out loss every this many steps (and at step 0 and the last step): the curve.",
                            default=10)
    eval_batch_size: int = _help("Held-out rows per forward pass of the loss evaluation.", default=16)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "lora_r", "eval_every", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        for name in ("learning_rate", "lora_alpha"):
            if not getattr(self, name) > 0:
                raise ValueError(f"`{name}` must be a number > 0, got {getattr(self, name)!r}.")
        if not self.weight_decay >= 0:
            raise ValueError(f"`weight_decay` must be a number >= 0, got {self.weight_decay!r}.")
        if self.eval_every > self.steps:
            raise ValueError(f"`eval_every` ({self.eval_every}) must be at most `steps` ({self.steps}).")

    def eval_steps(self) -> list[int]:
        """The steps after which the held-out loss is taken: 0, every `eval_every`, and the last."""
        return sorted({0, *range(self.eval_every, self.steps + 1, self.eval_every), self.steps})


@dataclass
class FinetuneResult:
    """One fine-tune of one selection with one seed."""

    steps: list[int]  # where the curve was taken (0 = before training)
    heldout_loss: list[float]  # mean over held-out rows of each row's mean response-token loss
    train_loss: list[float]  # mean training loss of the steps since the previous point (nan at 0)
    optimizer_steps: int
    rows_seen: int  # rows fed to the optimizer in all (with repeats)
    response_tokens_seen: int
    row_losses: np.ndarray = dataclasses.field(repr=False)  # [points of the curve, held-out rows]

    @property
    def final_row_losses(self) -> np.ndarray:
        """Each held-out row's loss at the last step."""
        return self.row_losses[-1]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("row_losses")
        return out


def training_batches(rows: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """`steps` batches of `batch_size` indices into a selection of `rows` rows: the selection in a fresh
    seeded order each pass, passes joined, so a small selection is cycled and a large one is sampled."""
    import torch

    if rows < 1:
        raise ValueError("A selection to fine-tune on needs at least one row.")
    generator = torch.Generator().manual_seed(seed)
    stream: list[int] = []
    while len(stream) < steps * batch_size:
        stream.extend(torch.randperm(rows, generator=generator).tolist())
    return [stream[i * batch_size: (i + 1) * batch_size] for i in range(steps)]


def target_lora(recipe: FinetuneRecipe, config, model):
    """The fine-tune's peft `LoraConfig`: the package's own (`ensemble.lora_config`, which knows GPT-2's
    transposed projections and peft's per-architecture targets), with the recipe's rank, alpha and targets,
    peft's usual init (B = 0, the adapter starts as a no-op), no dropout and every layer adapted."""
    from ..engine import lora_config

    return lora_config(dataclasses.replace(config, lora_r=recipe.lora_r, lora_alpha=recipe.lora_alpha,
                                           lora_dropout=0.0, lora_init="zero_b", lora_layer_fraction=1.0,
                                           target_modules=recipe.target_modules), model)


def heldout_losses(model, heldout, pad_id: int, batch_size: int, precision: str) -> np.ndarray:
    """Each held-out row's mean response-token loss, in length-bucketed batches, in eval mode."""
    from .baselines import proxy_losses

    was_training = model.training
    model.eval()
    try:
        return proxy_losses(model, heldout, pad_id, batch_size, precision)
    finally:
        model.train(was_training)


def finetune(model, train: Sequence, heldout: Sequence, recipe: FinetuneRecipe, lora, seed: int, pad_id: int,
             precision: str = "fp32", start_losses: Optional[np.ndarray] = None) -> FinetuneResult:
    """Fine-tune a fresh LoRA adapter on `train` (encoded rows) for `recipe.steps` optimizer steps and
    take the held-out loss along the way; the model comes back without the adapter.

    `seed` sets the adapter init and the data order (and the target's dropout draws, if it has dropout),
    so the same seed gives every selection the same init, and the same selection the same curve. The loss
    of a step is the token mean of the response tokens of its batch, as in the ensemble's training.
    The adapter starts as a no-op (B = 0), so the curve's first point is the bare target's held-out loss:
    pass it as `start_losses` (`heldout_losses` of the target) to measure it once for many fine-tunes.
    """
    import torch
    from peft import get_peft_model

    from ..engine.grads import collate, response_loss_sums
    from ..precision import autocast, resolve as resolve_precision

    device = next(model.parameters()).device
    autocast_dtype = resolve_precision(precision, device).autocast_dtype
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, lora, adapter_name="downstream")
    try:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
        wanted = set(recipe.eval_steps())
        steps, heldout_curve, train_curve = [0], [], [float("nan")]
        row_curve = [heldout_losses(peft_model, heldout, pad_id, recipe.eval_batch_size, precision)
                     if start_losses is None else np.asarray(start_losses, dtype=np.float64)]
        heldout_curve.append(float(row_curve[-1].mean()))
        since, since_steps, done, rows_seen, tokens_seen = torch.zeros(()), 0, 0, 0, 0
        peft_model.train()
        for step, indices in enumerate(training_batches(len(train), recipe.batch_size, recipe.steps, seed), 1):
            batch = collate([train[i] for i in indices], pad_id, device)
            with autocast(device, autocast_dtype):
                sums, counts = response_loss_sums(peft_model, batch)
            loss = sums.sum() / counts.sum().clamp_min(1)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done, rows_seen, tokens_seen = done + 1, rows_seen + len(indices), tokens_seen + int(batch["counts"].sum())
            since, since_steps = since + loss.detach().float().cpu(), since_steps + 1
            if step in wanted:
                row_curve.append(heldout_losses(peft_model, heldout, pad_id, recipe.eval_batch_size, precision))
                steps.append(step)
                heldout_curve.append(float(row_curve[-1].mean()))
                train_curve.append(float(since) / since_steps)
                since, since_steps = torch.zeros(()), 0
    finally:
        peft_model.unload()  # the target as it came: no adapter, eval mode
        model.eval()
    return FinetuneResult(steps=steps, heldout_loss=heldout_curve, train_loss=train_curve, optimizer_steps=done,
                          rows_seen=rows_seen, response_tokens_seen=tokens_seen, row_losses=np.stack(row_curve))
