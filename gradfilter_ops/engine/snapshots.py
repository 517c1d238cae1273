"""`Snapshots`: every member's adapter at the kept epochs, as plain peft adapter folders.

One folder per member and epoch (`member<m>_epoch<e>/`: `adapter_config.json` +
`adapter_model.safetensors`), so they can be saved, shipped to other workers or machines, and loaded
with `PeftModel.from_pretrained`; `ensemble.json` names the epochs and the LoRA config.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

MANIFEST = "ensemble.json"
ONLINE_NORMS = "online_sq_norms.npy"


def adapter_name(member: int, epoch: int) -> str:
    """The adapter (and folder) name of `member` after `epoch` epochs."""
    return f"member{member}_epoch{epoch}"


@dataclass
class Snapshots:
    """Adapter weights of every member at the kept epochs (by default the early and the late one)."""

    epochs: tuple[int, ...]
    states: dict[tuple[int, int], dict[str, torch.Tensor]]  # (member, epoch) -> peft state dict
    lora: dict  # LoraConfig as a dict
    # member -> [len(epochs), rows]: squared norms read off the training steps (`score_mode: online`)
    online_norms: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def members(self) -> list[int]:
        return sorted({member for member, _ in self.states})

    @property
    def num_members(self) -> int:
        return len(self.members)

    def online_sq_norms(self) -> np.ndarray:
        """The training rows' online squared norms, shape [members, len(epochs), rows]."""
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

    def save(self, directory: str | os.PathLike, entry: Optional[str] = None) -> Path:
        """Write one peft adapter folder per member and epoch (`member<m>_epoch<e>/`); returns the folder.
        `entry`: the key of the cache entry the folder is in, named in every file's checked content."""
        directory = Path(directory)
        for member in self.members:
            self.save_member(directory, member, entry=entry)
        return directory

    def save_member(self, directory: str | os.PathLike, member: int, entry: Optional[str] = None) -> None:
        """Write one member's adapters; they appear all at once, so a killed run never leaves half a member."""
        from safetensors.torch import save_file

        from ..cache import (DamagedCacheFile, check_entry, entry_record, read_sealed_json, write_checksums,
                             write_sealed_json)

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        manifest = directory / MANIFEST
        try:
            check_entry(manifest, read_sealed_json(manifest), entry)
        except DamagedCacheFile:  # missing, damaged or another entry's: write it again
            write_sealed_json(manifest, {"epochs": list(self.epochs), "lora": self.lora, **entry_record(entry)})
        staging = Path(tempfile.mkdtemp(dir=directory, prefix=f".member{member}."))
        try:
            for epoch in self.epochs:
                folder = staging / adapter_name(member, epoch)
                folder.mkdir()
                (folder / "adapter_config.json").write_text(json.dumps(self.lora, indent=2, default=list))
                save_file(self.states[(member, epoch)], folder / "adapter_model.safetensors")
                if epoch == self.epochs[-1] and member in self.online_norms:
                    np.save(folder / ONLINE_NORMS, self.online_norms[member])
                write_checksums(folder, entry)
            for folder in sorted(staging.iterdir()):
                target = directory / folder.name
                if target.exists():
                    shutil.rmtree(target)
                folder.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @classmethod
    def load(cls, directory: str | os.PathLike, entry: Optional[str] = None) -> "Snapshots":
        """Every member whose adapters are complete and intact in `directory` (possibly none) and were written
        for cache entry `entry` (`save`); a damaged member (or `ensemble.json`), or one copied from another
        entry, is logged with its path and left out, so it is trained again."""
        from safetensors.torch import load_file

        from ..cache import DamagedCacheFile, check_entry, read_sealed_json, report_damaged, verify_checksums

        directory = Path(directory)
        try:
            manifest = read_sealed_json(directory / MANIFEST)
            check_entry(directory / MANIFEST, manifest, entry)
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
                        verify_checksums(f.parent, entry=entry)
                except DamagedCacheFile as error:
                    report_damaged(error, f"member {member} is trained again.")
                    continue
                states.update({(member, epoch): load_file(f) for epoch, f in zip(epochs, files)})
                norms = directory / adapter_name(member, epochs[-1]) / ONLINE_NORMS
                if norms.exists():
                    online_norms[member] = np.load(norms)
        return cls(epochs=epochs, states=states, lora=manifest["lora"], online_norms=online_norms)
