"""The LoRA ensemble on one frozen proxy: training (phase 1) and per-example gradient norms (phase 2).

Training produces `Snapshots`: each member's adapter after the early and the late epoch. They are
plain peft adapters (`adapter_config.json` + `adapter_model.safetensors` per member and epoch), so
they can be saved, shipped to other workers or machines, and loaded with `PeftModel.from_pretrained`.
Scoring reads them and never trains.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import GSNRConfig
from .grads import LoraActivations, collate, length_buckets, per_example_grad_sq_norms, response_loss_sums
from .prompts import Encoded

MANIFEST = "ensemble.json"


def adapter_name(member: int, epoch: int) -> str:
    return f"member{member}_epoch{epoch}"


def lora_config(config: GSNRConfig, model: torch.nn.Module):
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        # GPT-2 stores its projections transposed (Conv1D).
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),
        bias="none",
        init_lora_weights=config.lora_init == "zero_b",
    )


@dataclass
class Snapshots:
    """Adapter weights of every member at the early and the late epoch."""

    epochs: tuple[int, int]
    states: dict[tuple[int, int], dict[str, torch.Tensor]]  # (member, epoch) -> peft state dict
    lora: dict  # LoraConfig as a dict

    @property
    def num_members(self) -> int:
        return len({member for member, _ in self.states})

    def save(self, directory: str | os.PathLike) -> Path:
        """Write one peft adapter folder per (member, epoch) and a manifest; returns the folder."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for (member, epoch), state in self.states.items():
            folder = directory / adapter_name(member, epoch)
            folder.mkdir(exist_ok=True)
            (folder / "adapter_config.json").write_text(json.dumps(self.lora, indent=2, default=list))
            _atomic_save(lambda path: save_file(state, path), folder / "adapter_model.safetensors")
        manifest = {"epochs": list(self.epochs), "members": self.num_members, "lora": self.lora}
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, default=list))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Snapshots":
        from safetensors.torch import load_file

        directory = Path(directory)
        manifest = json.loads((directory / MANIFEST).read_text())
        epochs = tuple(manifest["epochs"])
        states = {(member, epoch): load_file(directory / adapter_name(member, epoch) / "adapter_model.safetensors")
                  for member in range(manifest["members"]) for epoch in epochs}
        return cls(epochs=epochs, states=states, lora=manifest["lora"])


def _atomic_save(write, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def train_ensemble(model: torch.nn.Module, examples: Sequence[Encoded], config: GSNRConfig, pad_id: int,
                   progress: bool = True) -> Snapshots:
    """Train `num_members` LoRA adapters, one after another, and keep their early and late snapshots.

    Member m seeds its adapter init and its data order with `config.seed + m`. The loss is the
    token-level mean cross-entropy over the batch's response tokens.
    """
    from peft import get_peft_model, get_peft_model_state_dict

    if not examples:
        raise ValueError("Cannot train the ensemble on zero scoreable examples.")
    device = next(model.parameters()).device
    autocast_dtype = _autocast_dtype(device, config.precision)
    lora = lora_config(config, model)
    epochs = (config.early_epoch, config.resolved_late_epoch)
    steps_per_epoch = -(-len(examples) // config.train_batch_size)
    bar = tqdm(total=config.num_members * config.num_epochs * steps_per_epoch, desc="gsnr: training LoRA ensemble",
               disable=not progress, unit="step")
    states: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    peft_model = None
    for member in range(config.num_members):
        name = f"train{member}"
        torch.manual_seed(config.seed + member)  # this member's adapter init
        if peft_model is None:
            peft_model = get_peft_model(model, lora, adapter_name=name)
        else:
            peft_model.add_adapter(name, lora)
        peft_model.set_adapter(name)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        order_rng = torch.Generator().manual_seed(config.seed + member)
        peft_model.train()
        for epoch in range(1, config.num_epochs + 1):
            order = torch.randperm(len(examples), generator=order_rng).tolist()
            for start in range(0, len(order), config.train_batch_size):
                batch = collate([examples[i] for i in order[start: start + config.train_batch_size]], pad_id, device)
                with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16,
                                    enabled=autocast_dtype is not None):
                    sums, counts = response_loss_sums(peft_model, batch)
                loss = sums.sum() / counts.sum().clamp_min(1)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                bar.update()
                bar.set_postfix(member=member, epoch=epoch, loss=f"{loss.item():.3f}")
            if epoch in epochs:
                state = get_peft_model_state_dict(peft_model, adapter_name=name)
                states[(member, epoch)] = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        if member + 1 < config.num_members:
            peft_model.delete_adapter(name)  # peft keeps one adapter at least; unload() drops the last
    bar.close()
    # Leave the caller's model as it was given: no adapters, no hooks, eval mode.
    peft_model.unload()
    model.eval()
    return Snapshots(epochs=epochs, states=states, lora=lora.to_dict())


class EnsembleScorer:
    """Holds the proxy with every snapshot adapter loaded and computes per-example gradient norms."""

    def __init__(self, model: torch.nn.Module, snapshots: Snapshots, config: GSNRConfig, pad_id: int):
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

        self.config = config
        self.snapshots = snapshots
        self.pad_id = pad_id
        self.device = next(model.parameters()).device
        lora = LoraConfig(**{k: v for k, v in snapshots.lora.items() if k in LoraConfig.__dataclass_fields__})
        self.names = {}
        self.model = None
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

    def sq_norms(self, examples: Sequence[Encoded], progress: bool = True) -> np.ndarray:
        """Squared per-example gradient norms, shape [members, 2 (early, late), len(examples)]."""
        members = self.snapshots.num_members
        out = np.zeros((members, 2, len(examples)), dtype=np.float64)
        autocast_dtype = _autocast_dtype(self.device, self.config.precision)
        lengths = [len(e.input_ids) for e in examples]
        buckets = length_buckets(lengths, self.config.score_batch_size)
        bar = tqdm(total=len(buckets) * len(self.names), desc="gsnr: per-example gradients", unit="pass",
                   leave=False, disable=not progress)
        for indices in buckets:
            batch = collate([examples[i] for i in indices], self.pad_id, self.device)
            for (member, epoch), name in self.names.items():
                self.model.set_adapter(name)
                norms = per_example_grad_sq_norms(self.model, self.activations, batch, self.config.grad_params,
                                                  autocast_dtype)
                out[member, self.snapshots.epochs.index(epoch), indices] = norms.double().cpu().numpy()
                bar.update()
        bar.close()
        return out

    def close(self) -> None:
        """Remove the hooks and the adapters, giving the proxy back as it was."""
        self.activations.remove()
        self.model.unload()
