"""Response-only losses and exact per-example squared gradient norms over LoRA parameters.

A LoRA adapter adds `B(A(x))` to a frozen linear layer; `A` and `B` are bias-free `nn.Linear`s. For
one example, the gradient of a linear weight is `sum_t delta_t h_t^T` over that example's tokens,
where `h_t` is the layer's input and `delta_t` the loss gradient at its output. Forward hooks keep
`h` and the output; one backward pass of the summed per-example losses gives every `delta`; a batched
matmul per layer then yields each example's own gradient (tiny: rank x width), whose squared norm is
summed over layers. Examples in a batch never mix (causal attention, padding masked, token-wise
norms), so the result is exactly each example's own gradient.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .head import frozen_head, token_losses
from .peft_internals import base_model, lora_layers
from ..precision import autocast
from ..prompts import Encoded


def collate(examples: Sequence[Encoded], pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-pad a batch for `response_loss_sums`; one host-to-device copy, which never waits for the device.

    Keys: `input_ids` and `attention_mask` [B, L]; `loss_mask[b, t]`, True where token t of example b
    is a response token; `targets`, the flat positions `b * L + t` that predict a response token
    (t + 1 is one); `target_rows`, the example of each; `counts`, the response tokens of each example.
    The positions are worked out here on the host, so the device never has to report a count back
    (boolean indexing would make the host wait for the device at every step).
    """
    length = max(len(e.input_ids) for e in examples)
    input_ids = np.full((len(examples), length), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(examples), length), dtype=np.int64)
    targets, counts = [], np.zeros(len(examples), dtype=np.int64)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = example.input_ids
        attention_mask[row, :n] = 1
        counts[row] = example.num_loss_tokens
        targets.append(np.arange(row * length + n - counts[row] - 1, row * length + n - 1))
    targets = np.concatenate(targets)
    target_rows = np.repeat(np.arange(len(examples)), counts)
    packed = torch.from_numpy(np.concatenate([input_ids.ravel(), attention_mask.ravel(), targets, target_rows,
                                              counts]))
    device = torch.device(device)
    packed = to_device(packed, device)
    sizes = [input_ids.size, attention_mask.size, len(targets), len(target_rows), len(counts)]
    ids, mask, targets, target_rows, counts = torch.split(packed, sizes)
    ids, mask = ids.view(input_ids.shape), mask.view(attention_mask.shape)
    loss_mask = torch.zeros(ids.numel(), dtype=torch.bool, device=device)
    loss_mask[targets + 1] = True
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask.view(ids.shape),
            "targets": targets, "target_rows": target_rows, "counts": counts}


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to `device` without waiting for the work queued there (pinned on CUDA: a copy
    from pageable memory first waits for the device to finish)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, so little padding is computed."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def shuffled_length_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator,
                            window_batches: int = 50) -> list[list[int]]:
    """Random training batches of similar-length rows, so little padding is computed.

    The rows are shuffled, each window of `window_batches` batches is sorted by length and cut into
    batches, and the batches are shuffled: every epoch still sees every row once in a random order.
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * window_batches
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start: start + window], key=lambda i: lengths[i])
        batches.extend(chunk[j: j + batch_size] for j in range(0, len(chunk), batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


# A frozen linear LM head runs through `head.token_losses`: chunked, its input gradient taken in the
# forward, so one chunk of full-vocabulary logits is alive at a time. False runs it through autograd
# (a trainable or wrapped head always does), for comparison in tools/bench_speed.py.
FUSED_HEAD = True
# On that autograd path, response positions per LM-head chunk: past this many, the head and its
# cross-entropy run chunk by chunk and are recomputed in the backward pass (one more head forward).
HEAD_CHUNK = 2048


def response_loss_sums(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                       blocks: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example sum of response-token cross-entropy, and the number of such tokens.

    The LM head runs only at positions that predict a response token, which saves most of its cost
    and the memory of full-vocabulary logits (a frozen head: `head.token_losses`, one chunk at a time;
    otherwise chunked past `HEAD_CHUNK` positions per block, for a batch of `blocks` stacked members). No attention mask
    is passed: the batch is right-padded and attention is causal, so a real token never sees a pad,
    and the pads' outputs reach no loss (their gradients are zero). That keeps the fast fused
    attention kernels usable.
    """
    base = base_model(model)
    hidden = base.get_decoder()(input_ids=batch["input_ids"]).last_hidden_state
    targets = batch["targets"]
    head = base.get_output_embeddings()
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, targets)
    labels = batch["input_ids"].reshape(-1).index_select(0, targets + 1)
    chunk = HEAD_CHUNK * blocks
    if FUSED_HEAD and frozen_head(head):
        token_loss = token_losses(head, rows, labels)
    elif len(targets) <= chunk:
        token_loss = _head_losses(head, rows, labels)
    else:
        from torch.utils.checkpoint import checkpoint

        token_loss = torch.cat([checkpoint(_head_losses, head, rows[i: i + chunk], labels[i: i + chunk],
                                           use_reentrant=False) for i in range(0, len(targets), chunk)])
    sums = torch.zeros(hidden.shape[0], device=hidden.device, dtype=torch.float32)
    return sums.index_add_(0, batch["target_rows"], token_loss), batch["counts"]


def _head_losses(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), labels, reduction="none")


class LoraRecorder:
    """Keeps `(kind, input, output)` of every LoRA `A`/`B` matmul that runs while `recording()`."""

    def __init__(self) -> None:
        self.records: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        self._active = False

    @contextmanager
    def recording(self) -> Iterator[None]:
        self.records = []
        self._active = True
        try:
            yield
        finally:
            self._active = False


class LoraActivations(LoraRecorder):
    """Records the inputs and outputs of every LoRA `A`/`B` linear (forward hooks on peft's layers)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self._handles = []
        for module in lora_layers(model):
            for kind, linears in (("A", module.lora_A), ("B", module.lora_B)):
                for linear in linears.values():
                    self._handles.append(linear.register_forward_hook(self._hook(kind)))

    def _hook(self, kind: str):
        def hook(_module, inputs, output):
            if self._active:
                self.records.append((kind, inputs[0], output))
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


Record = tuple[str, torch.Tensor, torch.Tensor]  # (kind "A" or "B", input, output) of one LoRA linear's run


def lora_output_grads(model: torch.nn.Module, activations: LoraRecorder, batch: dict[str, torch.Tensor],
                      grad_params: str = "AB", autocast_dtype: torch.dtype | None = None,
                      blocks: int = 1) -> tuple[torch.Tensor, list[Record], tuple[torch.Tensor, ...]]:
    """The core of every per-example norm: one forward and one backward pass of a batch.

    Returns each example's mean response loss (float32 [B]), the recorded runs of the LoRA linears
    whose kind is in `grad_params`, and the gradient of the summed mean losses at each of their outputs.
    Every example's own gradient of any of those linears is `sum_t delta_t h_t^T` over its own rows
    (`layer_sq_norms`). `blocks`, as in `response_loss_sums`.
    """
    with activations.recording(), autocast(batch["input_ids"].device, autocast_dtype):
        sums, counts = response_loss_sums(model, batch, blocks)
        losses = sums / counts.clamp_min(1)
    wanted = _wanted(activations, grad_params)
    return losses, wanted, torch.autograd.grad(losses.sum(), [out for _, _, out in wanted])


def per_example_grad_sq_norms(model: torch.nn.Module, activations: LoraRecorder,
                              batch: dict[str, torch.Tensor], grad_params: str = "AB",
                              autocast_dtype: torch.dtype | None = None, blocks: int = 1) -> torch.Tensor:
    """Squared L2 norm of each example's gradient of its mean response loss, over the active adapter.

    `grad_params="B"` restricts the norm to the `B` matrices; `blocks`, as in `response_loss_sums`.
    Returns a float32 tensor of shape [B].
    """
    _, wanted, output_grads = lora_output_grads(model, activations, batch, grad_params, autocast_dtype, blocks)
    return summed_sq_norms(wanted, output_grads)


def backward_with_sq_norms(loss: torch.Tensor, counts: torch.Tensor, activations: LoraRecorder,
                           params: Sequence[torch.Tensor], grad_params: str = "AB", blocks: int = 1) -> torch.Tensor:
    """The backward pass of a training step that also yields each example's own squared gradient norm.

    `loss` is the batch's token-mean loss `sum_i s_i / C` (s_i: example i's summed response loss,
    c_i its response tokens, C their total), computed while `activations` recorded; with `blocks` > 1
    (stacked members) the sum of such losses over that many equal blocks of rows, C each block's own.
    Sets `.grad` of `params` as `loss.backward()` would. The gradient at every LoRA output is, row by
    row, c_i / C times that of example i's own mean loss s_i / c_i, so each row's squared norm is read
    off the same backward pass and rescaled by (C / c_i)^2: "online" norms, at the weights of this step.
    """
    wanted = _wanted(activations, grad_params)
    grads = torch.autograd.grad(loss, [*params, *(out for _, _, out in wanted)])
    for param, grad in zip(params, grads):
        param.grad = grad
    totals = counts.view(blocks, -1).sum(dim=1).repeat_interleave(len(counts) // blocks)
    scale = (totals / counts.clamp_min(1)).float().pow(2)
    return summed_sq_norms(wanted, grads[len(params):]) * scale


def _wanted(activations: LoraRecorder, grad_params: str) -> list[Record]:
    wanted = [record for record in activations.records if record[0] in grad_params]
    if not wanted:
        raise RuntimeError("No LoRA layer ran in the forward pass; is an adapter active?")
    return wanted


def layer_sq_norms(inp: torch.Tensor, output_grad: torch.Tensor) -> torch.Tensor:
    """Per-example squared norm of one linear map's weight gradient `sum_t delta_t h_t^T` ([B, T, in] inputs h,
    [B, T, out] output gradients delta): float32 [B]."""
    with torch.no_grad():
        return torch.bmm(output_grad.float().transpose(1, 2), inp.float()).pow(2).sum(dim=(1, 2))  # [B, out, in]


def summed_sq_norms(records: Sequence[Record], output_grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-example squared norms of `sum_t delta_t h_t^T`, summed over the recorded layers: float32 [B]."""
    sq_norms = torch.zeros(output_grads[0].shape[0], dtype=torch.float32, device=output_grads[0].device)
    for (_, inp, _), grad in zip(records, output_grads):
        sq_norms += layer_sq_norms(inp, grad)
    return sq_norms


def per_example_grad_sq_norms_loop(model: torch.nn.Module, examples: Sequence[Encoded], pad_id: int,
                                   grad_params: str = "AB") -> torch.Tensor:
    """Reference: one backward pass per example, norms read off the parameters' `.grad`."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for name, p in trainable if any(f"lora_{k}." in name for k in grad_params)]
    device = params[0].device
    result = []
    for example in examples:
        for _, p in trainable:
            p.grad = None
        sums, counts = response_loss_sums(model, collate([example], pad_id, device))
        (sums / counts.clamp_min(1)).sum().backward()
        result.append(sum(p.grad.float().pow(2).sum() for p in params).item())
    for _, p in trainable:
        p.grad = None
    return torch.tensor(result, dtype=torch.float32)
