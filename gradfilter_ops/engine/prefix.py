"""The frozen prefix: the proxy's layers below the adapted ones, computed once per row.

With LoRA adapters on the top K of the proxy's L decoder layers (`lora_layer_fraction`), the
embeddings and the L - K layers below the first adapted one are frozen and give the same hidden
states for every member, epoch and scoring pass. `FrozenPrefix.hidden` runs them once (the
proxy's own modules, stopped at the first adapted layer); `FrozenPrefix.feeding` then runs the
proxy's own forward with those layers skipped and the saved hidden states handed to the first
adapted layer, so the embeddings, masks and position encodings are still the model's own. Backward
passes end at the first adapted layer: every per-example gradient of the adapters is exact, at
about K / L of the arithmetic (docs/speed.md).

`PrefixStore` keeps the training rows' hidden states in a file (one read per training batch), so
memory stays flat in the number of rows: rows x tokens x hidden size x 4 bytes on disk, in the
temporary folder (`TMPDIR`).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from .peft_internals import base_model, forwards_replaced
from ..precision import autocast


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The attribute name and the list of the proxy's decoder layers (`h` in GPT-2, `layers` in Llama)."""
    base = base_model(model)
    decoder = base.get_decoder()
    count = base.config.num_hidden_layers
    for name, child in decoder.named_children():
        if isinstance(child, torch.nn.ModuleList) and len(child) == count:
            return name, child
    raise ValueError(f"Cannot find the {count} decoder layers of {type(base).__name__}; "
                     "set `lora_layer_fraction: 1.0` to put adapters on every layer without a frozen prefix.")


def adapted_layers(num_layers: int, fraction: float) -> list[int]:
    """The top `fraction` of `num_layers` layers (at least one), by index."""
    count = min(num_layers, max(1, math.ceil(fraction * num_layers - 1e-9)))
    return list(range(num_layers - count, num_layers))


class _Stop(Exception):
    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


def _hidden_argument(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class FrozenPrefix:
    """Runs the proxy's layers below `split` once, and the rest from their saved output."""

    def __init__(self, model: torch.nn.Module, split: int):
        base = base_model(model)
        self.decoder = base.get_decoder()
        _, self.layers = decoder_layers(base)
        if not 0 < split < len(self.layers):
            raise ValueError(f"A frozen prefix needs 0 < split < {len(self.layers)} layers, got {split}.")
        self.split = split
        self._tuple_output = False  # whether a layer returns a tuple (older transformers): set by a 1-token run
        self.hidden(torch.zeros((1, 1), dtype=torch.long, device=next(self.decoder.parameters()).device))

    @torch.no_grad()
    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The input of layer `split` for a right-padded batch: float32 [B, L, hidden]."""

        def stop(_module, args, kwargs):
            raise _Stop(_hidden_argument(args, kwargs))

        def shape(_module, _args, output):
            self._tuple_output = isinstance(output, tuple)

        handles = [self.layers[self.split].register_forward_pre_hook(stop, with_kwargs=True),
                   self.layers[0].register_forward_hook(shape)]
        training = self.decoder.training
        self.decoder.eval()  # the prefix is computed once, so without dropout
        try:
            self.decoder(input_ids=input_ids, use_cache=False)
        except _Stop as stopped:
            return stopped.hidden.float()
        finally:
            self.decoder.train(training)
            for handle in handles:
                handle.remove()
        raise RuntimeError(f"The proxy's forward never reached decoder layer {self.split}.")

    @contextmanager
    def feeding(self, hidden: torch.Tensor) -> Iterator[None]:
        """While entered, a forward of the proxy skips the layers below `split` and gives `hidden` to it."""
        tuple_output = self._tuple_output

        def skip(hidden_states, *args, **kwargs):
            return (hidden_states,) if tuple_output else hidden_states

        def inject(_module, args, kwargs):
            if args:
                return (hidden.to(args[0].dtype), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden.to(kwargs["hidden_states"].dtype)}

        with forwards_replaced(self.layers[: self.split], lambda _layer: skip):
            handle = self.layers[self.split].register_forward_pre_hook(inject, with_kwargs=True)
            try:
                yield
            finally:
                handle.remove()


def padded(hiddens: Sequence[Optional[np.ndarray]], length: int, width: int, device: torch.device) -> torch.Tensor:
    """Rows' hidden states right-padded with zeros into [B, length, width] (None: an all-zero row)."""
    out = np.zeros((len(hiddens), length, width), dtype=np.float32)
    for row, hidden in enumerate(hiddens):
        if hidden is not None:
            out[row, : len(hidden)] = hidden
    from .grads import to_device

    return to_device(torch.from_numpy(out), device)


class PrefixStore:
    """The frozen prefix's output of every training row, in a file; picklable for worker processes."""

    def __init__(self, folder: str, lengths: Sequence[int], width: int):
        self.folder, self.width = folder, width
        self.path = os.path.join(folder, "prefix.f32")
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    @classmethod
    def build(cls, prefix: FrozenPrefix, examples: Sequence, pad_id: int, batch_size: int,
              autocast_dtype: Optional[torch.dtype]) -> "PrefixStore":
        """Run the prefix over `examples` (`prompts.Encoded`) in length buckets and write each row's states."""
        from .grads import collate, length_buckets

        device = next(prefix.decoder.parameters()).device
        lengths = [len(e.input_ids) for e in examples]
        store = None
        folder = tempfile.mkdtemp(prefix="gsnr-prefix-")
        try:
            with open(os.path.join(folder, "prefix.f32"), "wb") as f:
                for indices in length_buckets(lengths, batch_size):
                    batch = collate([examples[i] for i in indices], pad_id, device)
                    with autocast(device, autocast_dtype):
                        hidden = prefix.hidden(batch["input_ids"]).cpu().numpy()
                    if store is None:
                        store = cls(folder, lengths, hidden.shape[-1])
                    for row, i in enumerate(indices):
                        f.seek(int(store.offsets[i]) * store.width * 4)
                        f.write(np.ascontiguousarray(hidden[row, : lengths[i]]).tobytes())
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return store

    def rows(self, indices: Sequence[Optional[int]]) -> list[Optional[np.ndarray]]:
        """Each row's [tokens, width] states (None for None: a filler row)."""
        out = []
        with open(self.path, "rb") as f:
            for i in indices:
                if i is None:
                    out.append(None)
                    continue
                start, end = int(self.offsets[i]), int(self.offsets[i + 1])
                f.seek(start * self.width * 4)
                out.append(np.frombuffer(f.read((end - start) * self.width * 4), dtype=np.float32)
                           .reshape(end - start, self.width))
        return out

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
