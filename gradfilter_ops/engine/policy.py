"""What the ensemble is built from a `GSNRConfig`: the LoRA config, the frozen prefix below the
adapters, and how many members share one stacked step (`stack_size`) or scoring pass."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..config import GSNRConfig


def prefix_split(lora: Mapping[str, Any]) -> int:
    """The first adapted decoder layer of a LoRA config (`lora_config(...).to_dict()`, or a snapshot's
    `lora`): the layers below it form the frozen prefix (0: adapters on every layer, no prefix)."""
    layers = lora.get("layers_to_transform")
    if isinstance(layers, int):
        return layers
    return min(layers) if layers else 0


def lora_config(config: GSNRConfig, model: torch.nn.Module):
    """The peft `LoraConfig` of every member: rank, alpha, targets and adapted layers from `config`."""
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

