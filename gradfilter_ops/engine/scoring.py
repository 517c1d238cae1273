"""Phase 2: every snapshot's per-example squared gradient norms. `EnsembleScorer` runs them in this
process; `PooledEnsembleScorer` in worker processes, a member per job; `ensemble_scorer` picks one."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional, Sequence

import numpy as np
import torch
from loguru import logger
from tqdm.auto import tqdm

from ..config import GSNRConfig
from .grads import LoraActivations, collate, length_buckets, per_example_grad_sq_norms, to_device
from ..precision import Precision, autocast, resolve as resolve_precision
from ..prompts import Encoded
from .policy import adapters_per_pass, prefix_split
from .snapshots import Snapshots, adapter_name
from .workers import can_spawn, held, hold, member_pool


class EnsembleScorer:
    """Holds the proxy with every snapshot adapter loaded and computes per-example gradient norms.

    With `stack_size` > 1 the 2 x `stack_size` adapters of that many members run in one stacked pass
    over copies of each length bucket (`stacking.StackedLora`). `model` (the peft model), `names`
    ((member, epoch) -> adapter name) and `activations` (its LoRA hooks) are there to be read; `precision`
    is `config.precision` as resolved for the model's device (resolved here when not given).
    """

    def __init__(self, model: torch.nn.Module, snapshots: Snapshots, config: GSNRConfig, pad_id: int,
                 precision: Optional[Precision] = None):
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

        self.config, self.snapshots, self.pad_id = config, snapshots, pad_id
        self.device = next(model.parameters()).device
        self.precision = precision or resolve_precision(config.precision, self.device)
        lora = LoraConfig(**{k: v for k, v in snapshots.lora.items() if k in LoraConfig.__dataclass_fields__})
        self.model, self.names = None, {}
        for (member, epoch), state in sorted(snapshots.states.items()):
            name = adapter_name(member, epoch)
            if self.model is None:
                self.model = get_peft_model(model, lora, adapter_name=name)
            else:
                self.model.add_adapter(name, lora)
            set_peft_model_state_dict(self.model, state, adapter_name=name)
            self.names[(member, epoch)] = name
        self.model.eval()
        self.activations = LoraActivations(self.model)
        self._stacks = {}
        split = prefix_split(snapshots.lora)
        self.frozen = None
        if split:
            from .prefix import FrozenPrefix

            self.frozen = FrozenPrefix(self.model, split)

    def sq_norms(self, examples: Sequence[Encoded], progress: bool = True,
                 members: Optional[Sequence[int]] = None) -> np.ndarray:
        """Squared per-example gradient norms, shape [members, len(epochs) (early, late), len(examples)].

        `members` (default: all, in order) picks whose norms to compute.
        """
        members = list(self.snapshots.members if members is None else members)
        epochs = list(self.snapshots.epochs)
        # Filled on the device and copied to the host once, so the device never waits for the host.
        out = torch.zeros((len(members), len(epochs), len(examples)), dtype=torch.float32, device=self.device)
        passes = [((members.index(m), epochs.index(e)), name) for (m, e), name in sorted(self.names.items())
                  if m in members]
        # Each group is one forward, stacked over copies of a bucket when it holds several adapters.
        group = adapters_per_pass(self.config, self.device)
        groups = [passes[i: i + group] for i in range(0, len(passes), group)]
        buckets = length_buckets([len(e.input_ids) for e in examples], self.config.score_batch_size)
        with tqdm(total=len(examples), desc="gsnr: per-example gradients", unit="row", leave=False,
                  disable=not progress) as bar:
            for indices in buckets:
                self._fill(examples, indices, groups, out, bar)
        return out.double().cpu().numpy()

    def _stacked(self, names: tuple[str, ...]):
        from .stacking import StackedLora

        if names not in self._stacks:
            self._stacks[names] = StackedLora(self.model, names)
        return self._stacks[names]

    def _fill(self, examples: Sequence[Encoded], indices: list[int], groups: list, out: torch.Tensor, bar) -> None:
        """Norms of one length bucket under every snapshot in `groups` (lists of ((member row, epoch row),
        adapter), each run in one pass); halves the bucket when the GPU runs out of memory."""
        autocast_dtype = self.precision.autocast_dtype
        try:
            rows = to_device(torch.tensor(indices), self.device)
            bucket = [examples[i] for i in indices]
            batches = {}  # copies of the bucket -> collated batch
            hidden = None  # the frozen prefix's output for the bucket, computed once for every adapter
            if self.frozen is not None:
                batches[1] = collate(bucket, self.pad_id, self.device)
                with autocast(self.device, autocast_dtype):
                    hidden = self.frozen.hidden(batches[1]["input_ids"])
            for group in groups:
                if len(group) not in batches:
                    batches[len(group)] = collate(bucket * len(group), self.pad_id, self.device)
                prefix_fed = (self.frozen.feeding(hidden.repeat(len(group), 1, 1)) if hidden is not None
                              else nullcontext())
                if len(group) == 1:
                    (slot, name), = group
                    self.model.set_adapter(name)
                    with prefix_fed:
                        norms = per_example_grad_sq_norms(self.model, self.activations, batches[1],
                                                          self.config.grad_params, autocast_dtype)
                    out[slot].index_copy_(0, rows, norms)
                    continue
                with self._stacked(tuple(name for _, name in group)) as stacked, prefix_fed:
                    norms = per_example_grad_sq_norms(self.model, stacked, batches[len(group)],
                                                      self.config.grad_params, autocast_dtype, blocks=len(group))
                for (slot, _), block in zip(group, norms.view(len(group), len(indices))):
                    out[slot].index_copy_(0, rows, block)
        except torch.cuda.OutOfMemoryError as error:
            if len(indices) == 1:
                raise RuntimeError(
                    f"gsnr: out of device memory on a single row of {len(examples[indices[0]].input_ids)} tokens. "
                    "Each of `member_workers` processes needs memory of its own, and a stacked pass about "
                    "2 x `stack_members` times that of one adapter's; lower them, or `max_length`."
                ) from error
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            logger.warning(f"gsnr: out of memory on a batch of {len(indices)} rows; retrying it in two halves.")
            half = len(indices) // 2
            self._fill(examples, indices[:half], groups, out, bar)
            self._fill(examples, indices[half:], groups, out, bar)
            return
        bar.update(len(indices))

    def close(self) -> None:
        """Remove the hooks and the adapters, giving the proxy back as it was."""
        if self.model is not None:
            self.activations.remove()
            self._stacks.clear()
            self.model.unload()
            self.model = None


class PooledEnsembleScorer:
    """`EnsembleScorer.sq_norms` in `workers` worker processes, each with the proxy and every adapter
    (adapters are small), a member per job; the same norms."""

    def __init__(self, model: torch.nn.Module, snapshots: Snapshots, config: GSNRConfig, pad_id: int,
                 workers: int, precision: Optional[Precision] = None):
        self.snapshots = snapshots
        self.pool = member_pool(workers, model, _hold_scorer, model, snapshots, config, pad_id, precision)

    def sq_norms(self, examples: Sequence[Encoded], progress: bool = True,
                 members: Optional[Sequence[int]] = None) -> np.ndarray:
        """As `EnsembleScorer.sq_norms`; `progress` is not shown (the workers run without a bar)."""
        members = list(self.snapshots.members if members is None else members)
        examples = list(examples)
        futures = [self.pool.submit(_worker_sq_norms, examples, member) for member in members]
        return np.stack([future.result() for future in futures])

    def close(self) -> None:
        """Stop the workers."""
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None


def ensemble_scorer(model: torch.nn.Module, snapshots: Snapshots, config: GSNRConfig, pad_id: int,
                    workers: int = 1, precision: Optional[Precision] = None):
    """A `PooledEnsembleScorer` when `workers` > 1 processes can share the members, else an `EnsembleScorer`."""
    workers = min(workers, snapshots.num_members) if can_spawn() else 1
    if workers > 1:
        return PooledEnsembleScorer(model, snapshots, config, pad_id, workers, precision)
    return EnsembleScorer(model, snapshots, config, pad_id, precision)


def _hold_scorer(model, snapshots: Snapshots, config: GSNRConfig, pad_id: int,
                 precision: Optional[Precision]) -> None:
    hold("scorer", EnsembleScorer(model, snapshots, config, pad_id, precision))


def _worker_sq_norms(examples: Sequence[Encoded], member: int) -> np.ndarray:
    return held("scorer").sq_norms(examples, progress=False, members=[member])[0]
