"""The proxy's own representation of each row: the mean of its last layer's hidden states.

`pooled_hidden_states` runs the frozen proxy (adapters off) over encoded rows, batched by length as
the scoring passes are, and averages each row's last hidden state over its real tokens, prompt and
response. `clusters` groups rows by these vectors (the mix of a pool, near-duplicates).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from .prompts import Encoded

if TYPE_CHECKING:
    import torch


def pooled_hidden_states(model: torch.nn.Module, encoded: Sequence[Encoded], pad_id: int, batch_size: int = 16,
                         autocast_dtype: Optional[torch.dtype] = None) -> np.ndarray:
    """Float32 array [len(encoded), hidden]: each row's mean over its tokens of the proxy's last hidden state.

    The proxy runs in eval mode (no dropout) without gradients; a peft model runs with its adapters
    disabled, so the vectors are the frozen proxy's. Rows are batched by length (`grads.length_buckets`)
    and right-padded; attention is causal, so a real token never sees a pad and a row's vector does not
    depend on its batch. `autocast_dtype` (e.g. torch.bfloat16) runs the forward under autocast.
    """
    import torch

    from .engine.grads import collate, length_buckets
    from .engine.peft_internals import base_model
    from .precision import autocast

    base = base_model(model)
    out = np.zeros((len(encoded), base.get_input_embeddings().embedding_dim), dtype=np.float32)
    if not encoded:
        return out
    device = next(model.parameters()).device
    adapters_off = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), adapters_off:
            for indices in length_buckets([len(e.input_ids) for e in encoded], batch_size):
                batch = collate([encoded[i] for i in indices], pad_id, device)
                with autocast(device, autocast_dtype):
                    # No attention mask, as in `grads.response_loss_sums`: right padding under causal attention.
                    hidden = base.get_decoder()(input_ids=batch["input_ids"]).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(torch.float32)
                means = (hidden.float() * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)
                out[indices] = means.cpu().numpy()
    finally:
        model.train(was_training)
    return out
