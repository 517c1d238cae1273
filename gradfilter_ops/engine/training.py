"""Phase 1: `EnsembleTrainer` trains the LoRA members on one frozen proxy and keeps their snapshots.

Members train `stack_size` at a time in stacked steps (one forward for all of them,
`stacking.StackedLora`), one at a time, or `member_workers` at a time in worker processes
(`workers`); every way gives the same members.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from loguru import logger
from tqdm.auto import tqdm

from ..config import GSNRConfig
from .grads import (LoraActivations, backward_with_sq_norms, collate, response_loss_sums, shuffled_length_batches,
                     to_device)
from ..precision import Precision, autocast, resolve as resolve_precision
from ..prompts import Encoded
from .policy import lora_config, prefix_split, stack_size
from .snapshots import Snapshots
from .workers import can_spawn, held, hold, member_pool


class EnsembleTrainer:
    """Trains members of the ensemble that `config` describes on the frozen proxy `model`.

    `keep_epochs` (default: the config's early and late epoch) are the epochs after which each
    member's adapter is kept, and, with `score_mode: online`, whose training steps record every
    row's squared gradient norm; any set of epochs up to `num_epochs`, so one run can keep them all.
    `reuse_prefix` runs the frozen layers below the adapters once over the rows and feeds each step
    their output (False: run every layer at every step; the same members either way). `precision` is
    `config.precision` as resolved for the model's device (resolved here when not given).
    """

    def __init__(self, model: torch.nn.Module, config: GSNRConfig, pad_id: int,
                 keep_epochs: Optional[Iterable[int]] = None, reuse_prefix: bool = True,
                 precision: Optional[Precision] = None):
        default = (config.early_epoch, config.resolved_late_epoch)
        epochs = default if keep_epochs is None else tuple(sorted(set(keep_epochs)))
        outside = [e for e in epochs if not 1 <= e <= config.num_epochs]
        if not epochs or outside:
            raise ValueError(f"keep_epochs must be epochs in 1..num_epochs={config.num_epochs}; got {list(epochs)}.")
        self.model, self.config, self.pad_id, self.epochs = model, config, pad_id, epochs
        self.lora = lora_config(config, model)
        self.split = prefix_split(self.lora.to_dict()) if reuse_prefix else 0  # 0: every layer runs every step
        self.device = next(model.parameters()).device
        self.precision = precision or resolve_precision(config.precision, self.device)

    def train(self, examples: Sequence[Encoded], members: Optional[Sequence[int]] = None, *,
              done: Optional[Snapshots] = None, on_member: Optional[Callable[[Snapshots, int], None]] = None,
              progress: bool = True) -> Snapshots:
        """Train `members` (default: all `num_members`) on `examples`; returns their `Snapshots`.

        Member m seeds its adapter init and its data order with `config.seed + m`, so members are
        independent: those already in `done` (from an interrupted run, with the same epochs) are not
        trained again, and the result is the same. `on_member(snapshots, m)` is called as each member
        finishes (to persist it). The loss is the token-level mean cross-entropy over the batch's
        response tokens. With `score_mode: online`, each member also records every row's squared
        gradient norm in the kept epochs (`Snapshots.online_norms`, rows in the order of `examples`).
        """
        config = self.config
        if not examples:
            raise ValueError("Cannot train the ensemble on zero scoreable examples.")
        online = config.score_mode == "online"
        snapshots = Snapshots(epochs=self.epochs, states={}, lora=self.lora.to_dict())
        if done is not None and tuple(done.epochs) == self.epochs:
            reusable = [m for m in done.members if m < config.num_members and (not online or m in done.online_norms)]
            snapshots.states.update({key: state for key, state in done.states.items() if key[0] in reusable})
            snapshots.online_norms.update({m: done.online_norms[m] for m in reusable if m in done.online_norms})
        wanted = range(config.num_members) if members is None else members
        outside = [m for m in wanted if not 0 <= m < config.num_members]
        if outside:
            raise ValueError(f"Members {outside} are outside the ensemble of num_members={config.num_members}.")
        snapshots.states = {key: state for key, state in snapshots.states.items() if key[0] in wanted}
        snapshots.online_norms = {m: norms for m, norms in snapshots.online_norms.items() if m in wanted}
        todo = [m for m in wanted if m not in snapshots.members]
        steps_per_epoch = -(-len(examples) // config.train_batch_size)
        bar = tqdm(total=len(todo) * config.num_epochs * steps_per_epoch, desc="gsnr: training LoRA ensemble",
                   disable=not progress, unit="step")

        def finished(member: int, states: dict, norms: Optional[np.ndarray]) -> None:
            snapshots.states.update(states)
            if online:
                if np.isnan(norms).any():
                    raise RuntimeError(f"Member {member} left rows without an online norm; "
                                       "every epoch must see every row.")
                snapshots.online_norms[member] = norms
            if on_member is not None:
                on_member(snapshots, member)

        workers = min(config.member_workers, len(todo)) if can_spawn() else 1
        store = self._prefix_store(examples) if todo else None
        try:
            if workers > 1:
                for member, states, norms in self._in_workers(examples, todo, workers, store):
                    bar.update(config.num_epochs * steps_per_epoch)
                    finished(member, states, norms)
            else:
                stack = stack_size(config, self.device)
                for start in range(0, len(todo), stack):
                    group = todo[start: start + stack]
                    if len(group) > 1:
                        logger.info(f"gsnr: training members {group} together, stacked in one forward pass")
                    for member, (states, norms) in self._train_group(examples, group, bar, store).items():
                        finished(member, states, norms)
        finally:
            if store is not None:
                store.close()
        bar.close()
        return snapshots

    def _prefix_store(self, examples: Sequence[Encoded]):
        """The frozen prefix's output of every training row (None when every layer has adapters)."""
        if not self.split:
            return None
        from .prefix import FrozenPrefix, PrefixStore

        logger.info(f"gsnr: running the {self.split} frozen layers below the adapters once over {len(examples)} rows")
        return PrefixStore.build(FrozenPrefix(self.model, self.split), examples, self.pad_id,
                                 self.config.score_batch_size, self.precision.autocast_dtype)

    def _in_workers(self, examples: Sequence[Encoded], members: list[int], workers: int, store):
        """Train `members` in `workers` processes; yields (member, states, norms) as each finishes."""
        from concurrent.futures import as_completed

        logger.info(f"gsnr: training {len(members)} members in {workers} worker processes")
        with member_pool(workers, self.model, _hold_trainer, self, list(examples), store) as pool:
            futures = [pool.submit(_worker_member, member) for member in members]
            for future in as_completed(futures):
                yield future.result()

    def _train_group(self, examples: Sequence[Encoded], members: Sequence[int], bar,
                     store=None) -> dict[int, tuple[dict, Optional[np.ndarray]]]:
        """Train `members` together on the proxy; returns member -> (its adapter state after each kept
        epoch, and with `score_mode: online` its [len(epochs), rows] online norms, else None).

        One member trains with peft's own LoRA forward. Several train at once: each step stacks every
        member's own batch of that step into one forward (`stacking.StackedLora`), padded to the longest,
        and the loss is the sum of the members' token-mean losses, so each member's adapter gets exactly
        the gradient of its own batch. Each member keeps its own init and data order (seed + member), so
        a member's training is the same whichever members it is stacked with (with the proxy's dropout,
        if it has any, up to the dropout draws). With `store` (a `prefix.PrefixStore` of `examples`),
        the layers below the adapters are not run: each step reads its rows' frozen-prefix output.
        """
        from peft import get_peft_model, get_peft_model_state_dict

        from .prefix import FrozenPrefix, padded
        from .stacking import StackedLora, filler

        model, config, epochs, device = self.model, self.config, self.epochs, self.device
        autocast_dtype = self.precision.autocast_dtype
        frozen = FrozenPrefix(model, self.split) if store is not None else None
        # Adapter names that are no substring of one another (peft selects a state dict's keys by substring).
        names = [f"member{m}_train" for m in members]
        peft_model = None
        for member, name in zip(members, names):
            torch.manual_seed(config.seed + member)  # this member's adapter init
            if peft_model is None:
                peft_model = get_peft_model(model, self.lora, adapter_name=name)
            else:
                peft_model.add_adapter(name, self.lora)
        params = [p for n, p in peft_model.named_parameters() if any(f".{name}." in n for name in names)]
        for p in params:
            p.requires_grad_(True)  # peft leaves only the active adapter trainable
        # The fused kernel on CUDA: the same update in a couple of kernels instead of a few per parameter.
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay,
                                      fused=device.type == "cuda")
        order_rngs = [torch.Generator().manual_seed(config.seed + member) for member in members]
        stacked = StackedLora(peft_model, names) if len(members) > 1 else None
        states = {}
        peft_model.train()
        activations = None
        if config.score_mode == "online":
            activations = stacked if stacked is not None else LoraActivations(peft_model)
        k, rows = len(members), len(examples)
        # [member, epoch row, example], flat, so each step writes its norms with one indexed copy.
        recorded = torch.full((k * len(epochs) * rows,), float("nan"), device=device) if activations else None
        lengths = [len(e.input_ids) for e in examples]
        pad_row = filler(self.pad_id)
        with stacked if stacked is not None else nullcontext():
            for epoch in range(1, config.num_epochs + 1):
                record = activations is not None and epoch in epochs
                epoch_loss, steps = torch.zeros((), device=device), 0
                for step in zip(*(shuffled_length_batches(lengths, config.train_batch_size, rng)
                                  for rng in order_rngs)):
                    block = max(len(indices) for indices in step)
                    flat = [i for indices in step for i in [*indices, *[None] * (block - len(indices))]]
                    batch = collate([examples[i] if i is not None else pad_row for i in flat], self.pad_id, device)
                    prefix_fed = (frozen.feeding(padded(store.rows(flat), batch["input_ids"].shape[1], store.width,
                                                        device))
                                  if frozen is not None else nullcontext())
                    with prefix_fed, (activations.recording() if record else nullcontext()), \
                            autocast(device, autocast_dtype):
                        sums, counts = response_loss_sums(peft_model, batch, blocks=k)
                    loss = (sums.view(k, block).sum(1) / counts.view(k, block).sum(1).clamp_min(1)).sum()
                    if record:
                        norms = backward_with_sq_norms(loss, counts, activations, params, config.grad_params, blocks=k)
                        source, target = _online_positions(step, block, (epochs.index(epoch), len(epochs), rows))
                        recorded[to_device(target, device)] = norms[to_device(source, device)]
                    else:
                        loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    # read once per epoch: no host sync per step
                    epoch_loss, steps = epoch_loss + loss.detach(), steps + 1
                    bar.update(k)
                bar.set_postfix(members=list(members), epoch=epoch, loss=f"{epoch_loss.item() / steps / k:.3f}")
                if epoch in epochs:
                    for member, name in zip(members, names):
                        state = get_peft_model_state_dict(peft_model, adapter_name=name)
                        states[(member, epoch)] = {key: v.detach().to("cpu", copy=True) for key, v in state.items()}
        # Give the proxy back as it came: no hooks, no adapter, eval mode.
        norms_of = {}
        if activations is not None:
            if stacked is None:
                activations.remove()
            norms_of = dict(zip(members, recorded.view(k, len(epochs), rows).double().cpu().numpy()))
        peft_model.unload()
        model.eval()
        return {member: ({key: state for key, state in states.items() if key[0] == member}, norms_of.get(member))
                for member in members}


def _online_positions(step: Sequence[Sequence[int]], block: int, epoch: tuple[int, int, int]):
    """Where a stacked step's norms go in the flat [member, epoch row, example] record: (sources, targets)."""
    epoch_row, num_epochs, rows = epoch
    source = [k * block + j for k, indices in enumerate(step) for j in range(len(indices))]
    target = [(k * num_epochs + epoch_row) * rows + i for k, indices in enumerate(step) for i in indices]
    return torch.tensor(source), torch.tensor(target)


def _hold_trainer(trainer: EnsembleTrainer, examples: list[Encoded], store) -> None:
    hold("trainer", (trainer, examples, store))


def _worker_member(member: int) -> tuple[int, dict, Optional[np.ndarray]]:
    trainer, examples, store = held("trainer")
    with tqdm(disable=True) as bar:
        states, norms = trainer._train_group(examples, [member], bar, store)[member]
    return member, states, norms


def train_ensemble(model: torch.nn.Module, examples: Sequence[Encoded], config: GSNRConfig, pad_id: int,
                   progress: bool = True, done: Optional[Snapshots] = None,
                   on_member: Optional[Callable[[Snapshots, int], None]] = None,
                   members: Optional[Sequence[int]] = None, keep_epochs: Optional[Iterable[int]] = None,
                   precision: Optional[Precision] = None) -> Snapshots:
    """Train the LoRA ensemble and keep its snapshots: `EnsembleTrainer(model, config, pad_id,
    keep_epochs, precision=...).train(examples, members, done=..., on_member=..., progress=...)`."""
    trainer = EnsembleTrainer(model, config, pad_id, keep_epochs, precision=precision)
    return trainer.train(examples, members, done=done, on_member=on_member, progress=progress)
