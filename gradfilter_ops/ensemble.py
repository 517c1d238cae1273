"""The LoRA ensemble on one frozen proxy: training (phase 1) and per-example gradient norms (phase 2).

Training produces `Snapshots`: each member's adapter after the early and the late epoch. They are
plain peft adapters (`adapter_config.json` + `adapter_model.safetensors` per member and epoch), so
they can be saved, shipped to other workers or machines, and loaded with `PeftModel.from_pretrained`.
Scoring reads them and never trains. With `stack_members` > 1 (the CUDA default), several members
train, and are scored, in one stacked forward pass (`stacking.StackedLora`), with the same arithmetic.
With `score_mode: online` the training steps of those two epochs
also record every training row's squared gradient norm (`Snapshots.online_norms`), and no scoring
pass is needed for those rows. With `member_workers` > 1, members are trained (and their snapshot
passes run) in spawned worker processes that share the frozen proxy; members are independent, so
the result is the same.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from loguru import logger
from tqdm.auto import tqdm

from .config import GSNRConfig
from .grads import (LoraActivations, backward_with_sq_norms, collate, length_buckets, per_example_grad_sq_norms,
                    response_loss_sums, shuffled_length_batches, to_device)
from .precision import resolve as resolve_precision
from .prompts import Encoded

MANIFEST = "ensemble.json"
ONLINE_NORMS = "online_sq_norms.npy"


def adapter_name(member: int, epoch: int) -> str:
    return f"member{member}_epoch{epoch}"


def prefix_split(config: GSNRConfig, model: torch.nn.Module) -> int:
    """The first adapted decoder layer: the layers below it form the frozen prefix (0: none)."""
    if config.lora_layer_fraction >= 1:
        return 0
    from .prefix import adapted_layers, decoder_layers

    _, layers = decoder_layers(model)
    return adapted_layers(len(layers), config.lora_layer_fraction)[0]


def lora_config(config: GSNRConfig, model: torch.nn.Module):
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    from .prefix import adapted_layers, decoder_layers

    layers = {}
    if config.lora_layer_fraction < 1:
        pattern, modules = decoder_layers(model)
        layers = dict(layers_to_transform=adapted_layers(len(modules), config.lora_layer_fraction),
                      layers_pattern=pattern)
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        # GPT-2 stores its projections transposed (Conv1D).
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),
        bias="none",
        init_lora_weights=config.lora_init == "zero_b",
        **layers,
    )


@dataclass
class Snapshots:
    """Adapter weights of every member at the early and the late epoch."""

    epochs: tuple[int, int]
    states: dict[tuple[int, int], dict[str, torch.Tensor]]  # (member, epoch) -> peft state dict
    lora: dict  # LoraConfig as a dict
    # member -> [2 (early, late), rows]: squared norms read off the training steps (`score_mode: online`)
    online_norms: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def members(self) -> list[int]:
        return sorted({member for member, _ in self.states})

    @property
    def num_members(self) -> int:
        return len(self.members)

    def online_sq_norms(self) -> np.ndarray:
        """The training rows' online squared norms, shape [members, 2 (early, late), rows]."""
        missing = [m for m in self.members if m not in self.online_norms]
        if missing:
            raise ValueError(f"Members {missing} were trained without online norms (score_mode: snapshot).")
        return np.stack([self.online_norms[m] for m in self.members])

    @classmethod
    def merge(cls, parts: Sequence["Snapshots"]) -> "Snapshots":
        """One ensemble from members trained apart, with the same epochs and LoRA config."""
        first = parts[0]
        if any((p.epochs, p.lora) != (first.epochs, first.lora) for p in parts):
            raise ValueError("Snapshots.merge: the parts were trained with other epochs or another LoRA config.")
        seen = Counter(member for part in parts for member in part.members)
        shared = sorted(member for member, times in seen.items() if times > 1)
        if shared:
            raise ValueError(f"Snapshots.merge: members {shared} are in more than one part.")
        merged = cls(epochs=first.epochs, states={}, lora=first.lora)
        for part in parts:
            merged.states.update(part.states)
            merged.online_norms.update(part.online_norms)
        return merged

    def only(self, members: Sequence[int]) -> "Snapshots":
        """These members' adapters (and online norms) alone."""
        return Snapshots(epochs=self.epochs, states={k: v for k, v in self.states.items() if k[0] in members},
                         lora=self.lora, online_norms={m: v for m, v in self.online_norms.items() if m in members})

    def save(self, directory: str | os.PathLike) -> Path:
        """Write one peft adapter folder per member and epoch (`member<m>_epoch<e>/`); returns the folder."""
        directory = Path(directory)
        for member in self.members:
            self.save_member(directory, member)
        return directory

    def save_member(self, directory: str | os.PathLike, member: int) -> None:
        """Write one member's adapters; they appear all at once, so a killed run never leaves half a member."""
        from safetensors.torch import save_file

        from .cache import DamagedCacheFile, read_sealed_json, write_checksums, write_sealed_json

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        manifest = directory / MANIFEST
        try:
            read_sealed_json(manifest)
        except DamagedCacheFile:  # missing, or damaged: write it again
            write_sealed_json(manifest, {"epochs": list(self.epochs), "lora": self.lora})
        staging = Path(tempfile.mkdtemp(dir=directory, prefix=f".member{member}."))
        try:
            for epoch in self.epochs:
                folder = staging / adapter_name(member, epoch)
                folder.mkdir()
                (folder / "adapter_config.json").write_text(json.dumps(self.lora, indent=2, default=list))
                save_file(self.states[(member, epoch)], folder / "adapter_model.safetensors")
                if epoch == self.epochs[-1] and member in self.online_norms:
                    np.save(folder / ONLINE_NORMS, self.online_norms[member])
                write_checksums(folder)
            for folder in sorted(staging.iterdir()):
                target = directory / folder.name
                if target.exists():
                    shutil.rmtree(target)
                folder.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Snapshots":
        """Every member whose adapters are complete and intact in `directory` (possibly none); a damaged
        member (or `ensemble.json`) is logged with its path and left out, so it is trained again."""
        from safetensors.torch import load_file

        from .cache import DamagedCacheFile, read_sealed_json, report_damaged, verify_checksums

        directory = Path(directory)
        try:
            manifest = read_sealed_json(directory / MANIFEST)
        except DamagedCacheFile as error:
            report_damaged(error, "every member is trained again.")
            return cls(epochs=(), states={}, lora={})
        epochs = tuple(manifest["epochs"])
        states, online_norms = {}, {}
        for member in sorted({int(p.name[len("member"):].split("_")[0]) for p in directory.glob("member*_epoch*")}):
            files = [directory / adapter_name(member, epoch) / "adapter_model.safetensors" for epoch in epochs]
            if all(f.exists() for f in files):
                try:
                    for f in files:
                        verify_checksums(f.parent)
                except DamagedCacheFile as error:
                    report_damaged(error, f"member {member} is trained again.")
                    continue
                states.update({(member, epoch): load_file(f) for epoch, f in zip(epochs, files)})
                norms = directory / adapter_name(member, epochs[-1]) / ONLINE_NORMS
                if norms.exists():
                    online_norms[member] = np.load(norms)
        return cls(epochs=epochs, states=states, lora=manifest["lora"], online_norms=online_norms)


def stack_size(config: GSNRConfig, device: torch.device) -> int:
    """Members per stacked step (`stack_members`; by default all of them on CUDA, one on a CPU); one
    with `member_workers`, whose processes take a member each."""
    if config.member_workers > 1:
        return 1
    if config.stack_members is None:
        return config.num_members if device.type == "cuda" else 1
    return min(config.stack_members, config.num_members)


def adapters_per_pass(config: GSNRConfig, device: torch.device) -> int:
    """Snapshot adapters in one scoring pass: the early and late ones of `stack_size` members, or one."""
    stack = stack_size(config, device)
    return 2 * stack if stack > 1 else 1


def train_ensemble(model: torch.nn.Module, examples: Sequence[Encoded], config: GSNRConfig, pad_id: int,
                   progress: bool = True, done: Optional[Snapshots] = None,
                   on_member: Optional[Callable[[Snapshots, int], None]] = None,
                   members: Optional[Sequence[int]] = None) -> Snapshots:
    """Train `num_members` LoRA adapters and keep their early and late snapshots.

    Members train one after another, `stack_size` at a time in stacked steps (one forward for all of
    them, `stacking.StackedLora`), or `config.member_workers` at a time in worker processes.

    Member m seeds its adapter init and its data order with `config.seed + m`, so members are
    independent: those already in `done` (from an interrupted run) are not trained again, and the
    result is the same. `on_member(snapshots, m)` is called as each member finishes (to persist it).
    `members` trains only those members (a share of the ensemble trained elsewhere, e.g. in a Ray task).
    The loss is the token-level mean cross-entropy over the batch's response tokens. With
    `score_mode: online`, each member also records every row's squared gradient norm during the
    early and the late epoch (`Snapshots.online_norms`, rows in the order of `examples`).
    """
    if not examples:
        raise ValueError("Cannot train the ensemble on zero scoreable examples.")
    online = config.score_mode == "online"
    lora = lora_config(config, model)
    snapshots = Snapshots(epochs=(config.early_epoch, config.resolved_late_epoch), states={}, lora=lora.to_dict())
    if done is not None:
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
                raise RuntimeError(f"Member {member} left rows without an online norm; every epoch must see every row.")
            snapshots.online_norms[member] = norms
        if on_member is not None:
            on_member(snapshots, member)

    workers = min(config.member_workers, len(todo)) if _can_spawn() else 1
    device = next(model.parameters()).device
    stack = stack_size(config, device)
    store = _prefix_store(model, examples, config, pad_id, device) if todo else None
    try:
        if workers > 1:
            for member, states, norms in _train_in_workers(model, lora, examples, config, pad_id, todo,
                                                           snapshots.epochs, workers, store):
                bar.update(config.num_epochs * steps_per_epoch)
                finished(member, states, norms)
        elif stack > 1 and len(todo) > 1:
            for start in range(0, len(todo), stack):
                group = todo[start: start + stack]
                logger.info(f"gsnr: training members {group} together, stacked in one forward pass")
                for member, states, norms in _train_stacked(model, lora, examples, config, pad_id, group,
                                                            snapshots.epochs, bar, store):
                    finished(member, states, norms)
        else:
            for member in todo:
                finished(member, *_train_one(model, lora, examples, config, pad_id, member, snapshots.epochs, bar,
                                             store))
    finally:
        if store is not None:
            store.close()
    bar.close()
    return snapshots


def _prefix_store(model, examples, config: GSNRConfig, pad_id: int, device: torch.device):
    """The frozen prefix's output of every training row (None when every layer has adapters)."""
    split = prefix_split(config, model)
    if not split:
        return None
    from .prefix import FrozenPrefix, PrefixStore

    logger.info(f"gsnr: running the {split} frozen layers below the adapters once over {len(examples)} rows")
    return PrefixStore.build(FrozenPrefix(model, split), examples, pad_id, config.score_batch_size,
                             resolve_precision(config.precision, device).autocast_dtype)


# -- members in worker processes ---------------------------------------------------------------------
# Each worker gets the frozen proxy once (shared, not copied: CUDA IPC on a GPU, shared memory on a
# CPU) and handles whole members; a member's result is the same as in the main process.
_WORKER: dict = {}


def _member_pool(workers: int, initializer: Callable, *initargs):
    """`workers` spawned processes (a forked child cannot use CUDA), each with its share of the threads."""
    from concurrent.futures import ProcessPoolExecutor

    import torch.multiprocessing as mp

    threads = max(1, torch.get_num_threads() // workers)
    return ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_start_worker,
                               initargs=(threads, initializer, initargs))


def _start_worker(threads: int, initializer: Callable, initargs: tuple) -> None:
    torch.set_num_threads(threads)
    initializer(*initargs)


def _can_spawn() -> bool:
    """A daemonic process (a worker of a multi-process map) may not start processes of its own."""
    import multiprocessing

    return not multiprocessing.current_process().daemon


def _hold_for_training(model, lora, examples, config: GSNRConfig, pad_id: int, store=None) -> None:
    _WORKER.update(model=model, lora=lora, examples=examples, config=config, pad_id=pad_id, store=store)


def _worker_member(member: int, epochs: tuple[int, int]) -> tuple[int, dict, Optional[np.ndarray]]:
    w = _WORKER
    with tqdm(disable=True) as bar:
        return member, *_train_one(w["model"], w["lora"], w["examples"], w["config"], w["pad_id"], member, epochs, bar, w["store"])


def _train_in_workers(model, lora, examples, config, pad_id, members, epochs, workers, store=None):
    """Train `members` in `workers` processes; yields (member, states, norms) as each finishes."""
    from concurrent.futures import as_completed

    logger.info(f"gsnr: training {len(members)} members in {workers} worker processes")
    with _member_pool(workers, _hold_for_training, model, lora, list(examples), config, pad_id,
                      store) as pool:
        futures = [pool.submit(_worker_member, member, epochs) for member in members]
        for future in as_completed(futures):
            yield future.result()


def _hold_for_scoring(model, snapshots: "Snapshots", config: GSNRConfig, pad_id: int) -> None:
    _WORKER["scorer"] = EnsembleScorer(model, snapshots, config, pad_id)


def _worker_sq_norms(examples: Sequence[Encoded], member: int) -> np.ndarray:
    return _WORKER["scorer"].sq_norms(examples, progress=False, members=[member])[0]


def _train_one(model, lora, examples, config, pad_id, member, epochs, bar,
               store=None) -> tuple[dict, Optional[np.ndarray]]:
    """One member's adapter states and, with `score_mode: online`, its [2, rows] online norms (else None)."""
    norms = np.full((2, len(examples)), np.nan) if config.score_mode == "online" else None
    return _train_member(model, lora, examples, config, pad_id, member, epochs, bar, online_norms=norms,
                         store=store), norms


def _train_member(model, lora, examples, config, pad_id, member, epochs, bar,
                  online_norms: Optional[np.ndarray] = None, store=None) -> dict:
    """Train one member; returns its adapter state after each epoch in `epochs`.

    With `online_norms` ([len(epochs), rows]), the steps of those epochs also write each row's
    squared gradient norm (over `config.grad_params`) at that step's weights into it.
    """
    return _train_members(model, lora, examples, config, pad_id, [member], epochs, bar,
                          None if online_norms is None else {member: online_norms}, store)


def _train_stacked(model, lora, examples, config, pad_id, members, epochs, bar, store=None):
    """Train `members` together in stacked steps; yields (member, states, norms) for each, as `_train_one`."""
    online = config.score_mode == "online"
    norms = {m: np.full((2, len(examples)), np.nan) for m in members} if online else None
    states = _train_members(model, lora, examples, config, pad_id, members, epochs, bar, norms, store)
    for member in members:
        yield member, {key: state for key, state in states.items() if key[0] == member}, norms[member] if norms else None


def _train_members(model, lora, examples, config, pad_id, members: Sequence[int], epochs, bar,
                   online_norms: Optional[dict[int, np.ndarray]] = None, store=None) -> dict:
    """Train `members` on one proxy; returns each one's adapter state after each epoch in `epochs`.

    One member trains with peft's own LoRA forward. Several train at once: each step stacks every
    member's own batch of that step into one forward (`stacking.StackedLora`), padded to the longest,
    and the loss is the sum of the members' token-mean losses, so each member's adapter gets exactly
    the gradient of its own batch. Each member keeps its own init and data order (seed + member), so
    a member's training is the same whichever members it is stacked with (with the proxy's dropout,
    if it has any, up to the dropout draws). `online_norms[m]` ([len(epochs), rows]), when given, gets
    member m's squared gradient norm of each row at the step that saw it, in the epochs `epochs`.
    With `store` (a `prefix.PrefixStore` of `examples`), the layers below the adapters are not run:
    each step reads its rows' frozen-prefix output from the store.
    """
    from peft import get_peft_model, get_peft_model_state_dict

    from .prefix import FrozenPrefix, padded

    from .stacking import StackedLora, filler

    device = next(model.parameters()).device
    autocast_dtype = resolve_precision(config.precision, device).autocast_dtype
    frozen = FrozenPrefix(model, prefix_split(config, model)) if store is not None else None
    # Adapter names that are no substring of one another (peft selects a state dict's keys by substring).
    names = [f"member{m}_train" for m in members]
    peft_model = None
    for member, name in zip(members, names):
        torch.manual_seed(config.seed + member)  # this member's adapter init
        if peft_model is None:
            peft_model = get_peft_model(model, lora, adapter_name=name)
        else:
            peft_model.add_adapter(name, lora)
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
    if online_norms is not None:
        activations = stacked if stacked is not None else LoraActivations(peft_model)
    k, rows = len(members), len(examples)
    # [member, epoch row, example], flat, so each step writes its norms with one indexed copy.
    recorded = torch.full((k * len(epochs) * rows,), float("nan"), device=device) if activations else None
    lengths = [len(e.input_ids) for e in examples]
    pad_row = filler(pad_id)
    with stacked if stacked is not None else nullcontext():
        for epoch in range(1, config.num_epochs + 1):
            record = activations is not None and epoch in epochs
            epoch_loss, steps = torch.zeros((), device=device), 0
            for step in zip(*(shuffled_length_batches(lengths, config.train_batch_size, rng) for rng in order_rngs)):
                block = max(len(indices) for indices in step)
                flat = [i for indices in step for i in [*indices, *[None] * (block - len(indices))]]
                batch = collate([examples[i] if i is not None else pad_row for i in flat], pad_id, device)
                fed = (frozen.feeding(padded(store.rows(flat), batch["input_ids"].shape[1], store.width, device))
                       if frozen is not None else nullcontext())
                with fed, (activations.recording() if record else nullcontext()), \
                        torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16,
                                       enabled=autocast_dtype is not None):
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
                epoch_loss, steps = epoch_loss + loss.detach(), steps + 1  # read once per epoch: no host sync per step
                bar.update(k)
            bar.set_postfix(members=members, epoch=epoch, loss=f"{epoch_loss.item() / steps / k:.3f}")
            if epoch in epochs:
                for member, name in zip(members, names):
                    state = get_peft_model_state_dict(peft_model, adapter_name=name)
                    states[(member, epoch)] = {key: v.detach().to("cpu", copy=True) for key, v in state.items()}
    # Give the proxy back as it came: no hooks, no adapter, eval mode.
    if activations is not None:
        if stacked is None:
            activations.remove()
        recorded = recorded.view(k, len(epochs), rows).double().cpu().numpy()
        for member, norms in zip(members, recorded):
            online_norms[member][...] = norms
    peft_model.unload()
    model.eval()
    return states


def _online_positions(step: Sequence[Sequence[int]], block: int, epoch: tuple[int, int, int]):
    """Where a stacked step's norms go in the flat [member, epoch row, example] record: (sources, targets)."""
    epoch_row, num_epochs, rows = epoch
    source = [k * block + j for k, indices in enumerate(step) for j in range(len(indices))]
    target = [(k * num_epochs + epoch_row) * rows + i for k, indices in enumerate(step) for i in indices]
    return torch.tensor(source), torch.tensor(target)


class EnsembleScorer:
    """Holds the proxy with every snapshot adapter loaded and computes per-example gradient norms.

    With `workers` > 1 (and more than one member), the members' passes run in that many worker
    processes, each with the proxy and every adapter (adapters are small), a member per job. With
    `stack_size` > 1 the 2 x `stack_size` adapters of that many members run in one stacked pass over
    copies of each length bucket (`stacking.StackedLora`).
    """

    def __init__(self, model: torch.nn.Module, snapshots: Snapshots, config: GSNRConfig, pad_id: int,
                 workers: int = 1):
        self.config = config
        self.snapshots = snapshots
        self.pad_id = pad_id
        self.device = next(model.parameters()).device
        workers = min(workers, snapshots.num_members) if _can_spawn() else 1
        self.pool = _member_pool(workers, _hold_for_scoring, model, snapshots, config, pad_id) if workers > 1 else None
        self.model = self.activations = None
        if self.pool is None:
            self._load_adapters(model)

    def _load_adapters(self, model: torch.nn.Module) -> None:
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

        lora = LoraConfig(**{k: v for k, v in self.snapshots.lora.items() if k in LoraConfig.__dataclass_fields__})
        self.names = {}
        for (member, epoch), state in sorted(self.snapshots.states.items()):
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
        layers = self.snapshots.lora.get("layers_to_transform")
        split = min(layers) if layers else 0
        self.frozen = None
        if split:
            from .prefix import FrozenPrefix

            self.frozen = FrozenPrefix(self.model, split)

    def sq_norms(self, examples: Sequence[Encoded], progress: bool = True,
                 members: Optional[Sequence[int]] = None) -> np.ndarray:
        """Squared per-example gradient norms, shape [members, 2 (early, late), len(examples)].

        `members` (default: all, in order) picks whose norms to compute.
        """
        members = list(self.snapshots.members if members is None else members)
        if self.pool is not None:
            examples = list(examples)
            futures = [self.pool.submit(_worker_sq_norms, examples, member) for member in members]
            return np.stack([future.result() for future in futures])
        # Filled on the device and copied to the host once, so the device never waits for the host.
        out = torch.zeros((len(members), 2, len(examples)), dtype=torch.float32, device=self.device)
        passes = [((members.index(m), self.snapshots.epochs.index(e)), name)
                  for (m, e), name in sorted(self.names.items()) if m in members]
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
        autocast_dtype = resolve_precision(self.config.precision, self.device).autocast_dtype
        try:
            rows = to_device(torch.tensor(indices), self.device)
            bucket = [examples[i] for i in indices]
            batches = {}  # copies of the bucket -> collated batch
            hidden = None  # the frozen prefix's output for the bucket, computed once for every adapter
            if self.frozen is not None:
                batches[1] = collate(bucket, self.pad_id, self.device)
                with torch.autocast(self.device.type, dtype=autocast_dtype or torch.bfloat16,
                                    enabled=autocast_dtype is not None):
                    hidden = self.frozen.hidden(batches[1]["input_ids"])
            for group in groups:
                if len(group) not in batches:
                    batches[len(group)] = collate(bucket * len(group), self.pad_id, self.device)
                fed = self.frozen.feeding(hidden.repeat(len(group), 1, 1)) if hidden is not None else nullcontext()
                if len(group) == 1:
                    (slot, name), = group
                    self.model.set_adapter(name)
                    with fed:
                        norms = per_example_grad_sq_norms(self.model, self.activations, batches[1],
                                                          self.config.grad_params, autocast_dtype)
                    out[slot].index_copy_(0, rows, norms)
                    continue
                with self._stacked(tuple(name for _, name in group)) as stacked, fed:
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
        """Stop the workers, or remove the hooks and the adapters, giving the proxy back as it was."""
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None
        if self.model is not None:
            self.activations.remove()
            self._stacks.clear()
            self.model.unload()
            self.model = None
