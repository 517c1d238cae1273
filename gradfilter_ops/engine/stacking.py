"""Several LoRA adapters of one peft model in one forward pass: stacked members.

A stacked batch holds K blocks of rows, block k for adapter k (`names[k]`). The frozen proxy's own
layers run once over all K blocks, and every LoRA layer computes the K adapters' updates with two
batched matmuls, `[K, rows, in] @ [K, in, r]` and `@ [K, r, out]`, instead of K separate passes of
the whole model. The adapters stay peft's parameters (stacked afresh at each forward), so the
gradients reach each adapter's own `A` and `B` as usual; adapters share no parameter and rows never
mix, so the arithmetic is that of K separate passes. On a GPU, where a small proxy's step is bound by
the host launching kernels, that is K times fewer launches (docs/speed.md).

Training stacks the M members (each block: that member's own batch at this step); snapshot scoring
stacks the 2M snapshot adapters over copies of one batch. While `recording()`, the LoRA inputs and
outputs are kept as `grads.LoraActivations` keeps them (both are `grads.LoraRecorder`s), one row per
stacked row, so the per-example norms of `grads` apply unchanged.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .. import fields
from .grads import LoraRecorder
from .peft_internals import cast_input, forwards_replaced, is_plain_lora_linear, lora_layers
from ..prompts import Encoded


def filler(pad_id: int) -> Encoded:
    """A row for a stacked block that is short of examples (the members' batches at one step can differ in
    size): one token and no response, so it adds nothing to any loss or gradient."""
    return Encoded(fields.OK, [pad_id], num_prompt=1)


class StackedLora(LoraRecorder):
    """While entered, every LoRA layer of `model` runs the adapters `names` on their blocks of rows
    (and their weights require grad)."""

    def __init__(self, model: torch.nn.Module, names: Sequence[str]):
        self.names = list(names)
        self.layers = lora_layers(model)
        if not self.layers:
            raise ValueError("StackedLora needs a peft model with LoRA layers.")
        for layer in self.layers:
            missing = [n for n in self.names if n not in layer.lora_A]
            if missing or not is_plain_lora_linear(layer, self.names):
                raise ValueError(f"Stacked members support plain LoRA on linear layers only; {type(layer).__name__} "
                                 f"(adapters missing: {missing}) is not. Set `stack_members: 1`.")
        super().__init__()

    def __enter__(self) -> "StackedLora":
        # The per-example norms need the graph through every stacked adapter, whichever one peft made active.
        weights = [d[n].weight for layer in self.layers for d in (layer.lora_A, layer.lora_B) for n in self.names]
        self._requires_grad = [(w, w.requires_grad) for w in weights]
        for weight in weights:
            weight.requires_grad_(True)
        self._forwards = forwards_replaced(self.layers, self._forward_of)
        self._forwards.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._forwards.__exit__(*exc)
        for weight, requires_grad in self._requires_grad:
            weight.requires_grad_(requires_grad)

    def _forward_of(self, layer):
        names = self.names
        dropout = max(getattr(layer.lora_dropout[n], "p", 0.0) for n in names)
        scaling = [float(layer.scaling[n]) for n in names]
        same_scaling = len(set(scaling)) == 1

        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            result = layer.base_layer(x, *args, **kwargs)
            a = torch.stack([layer.lora_A[n].weight for n in names])  # [K, r, in]
            b = torch.stack([layer.lora_B[n].weight for n in names])  # [K, out, r]
            x = cast_input(layer, x, a.dtype)
            if dropout and layer.training:
                x = F.dropout(x, dropout, training=True)
            k, rank, out = len(names), a.shape[1], b.shape[1]
            hidden = torch.bmm(x.reshape(k, -1, x.shape[-1]), a.transpose(1, 2)).view(*x.shape[:-1], rank)
            update = torch.bmm(hidden.view(k, -1, rank), b.transpose(1, 2)).view(*x.shape[:-1], out)
            if self._active:
                self.records.append(("A", x, hidden))
                self.records.append(("B", hidden, update))
            if same_scaling:
                scaled = update * scaling[0]
            else:
                scale = torch.tensor(scaling, device=update.device, dtype=update.dtype).view(k, 1, 1)
                scaled = (update.view(k, -1, out) * scale).view_as(update)
            return (result + scaled).to(result.dtype)

        return forward
