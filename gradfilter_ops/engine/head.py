"""Per-token cross-entropy of a frozen LM head, chunk by chunk, with its input gradient taken in the forward.

The LM head's full-vocabulary logits dominate a pass's memory: for 1,000 response positions and
SmolLM2's 49,152 tokens, the logits, their log-softmax and autograd's gradient of them take 0.6 GB
in fp32. The head is frozen, so the only gradient a backward pass needs from it is the one with
respect to its input, and for each position that is the upstream scalar times
`(softmax(logits) - onehot(label)) @ W`, a [positions, hidden] tensor that can be worked out while
the chunk's logits are at hand. So at most one chunk of logits is alive at a time, nothing is
recomputed, and the arithmetic is that of autograd (one forward and one input-gradient matmul).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# Logit elements per chunk: 2**24 is 64 MiB in fp32 (341 positions of a 49,152-token vocabulary).
CHUNK_LOGITS = 1 << 24


def frozen_head(head: torch.nn.Module) -> bool:
    """Whether `head` is a plain linear layer with no trainable parameter (the fused loss applies)."""
    return type(head) is torch.nn.Linear and not any(p.requires_grad for p in head.parameters())


def token_losses(head: torch.nn.Linear, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of `labels` [P] under `head(hidden)` ([P, H] -> [P, V]), fp32, one value per position."""
    chunk = max(1, CHUNK_LOGITS // head.out_features)
    return _FrozenHeadLoss.apply(hidden, head.weight, head.bias, labels, chunk)


class _FrozenHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                labels: torch.Tensor, chunk: int) -> torch.Tensor:
        want_grad = ctx.needs_input_grad[0]
        losses = torch.empty(len(labels), device=hidden.device, dtype=torch.float32)
        grads = torch.empty_like(hidden) if want_grad else None
        for start in range(0, len(labels), chunk):
            part = slice(start, start + chunk)
            # Under autocast the matmuls run in its dtype, as `head(hidden)` would; the softmax in fp32.
            log_probs = F.linear(hidden[part], weight, bias).float().log_softmax(-1)
            picked = labels[part].unsqueeze(1)
            losses[part] = -log_probs.gather(1, picked).squeeze(1)
            if want_grad:
                delta = log_probs.exp_().scatter_add_(1, picked, torch.full_like(picked, -1, dtype=log_probs.dtype))
                grads[part] = torch.mm(delta, weight).to(hidden.dtype)
            del log_probs
        ctx.save_for_backward(grads)
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        (grads,) = ctx.saved_tensors
        grad_hidden = grads * grad_losses.unsqueeze(1).to(grads.dtype) if grads is not None else None
        return grad_hidden, None, None, None, None
