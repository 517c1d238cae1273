"""What the engine relies on inside peft and inside a model's modules, in one place.

The stacked members (`stacking`) reach into peft's LoRA layers beyond its public API: which adapters
are plain LoRA (`lora_variant`, or `use_dora` in the peft releases before it), peft's cast of a
layer's input to the adapter's dtype (`_cast_input_dtype`, or a plain cast before it), and a
forward of their own set on each layer instance. The frozen prefix (`prefix`) sets such a forward on
the proxy's lower decoder layers. `check_peft_version` refuses a peft older than the oldest release
these accesses were tested with (`PEFT_OLDEST`, the floor of `pyproject.toml`).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch

# The oldest peft release the engine's tests pass on, and the newest they were run with.
PEFT_OLDEST = "0.9.0"
PEFT_NEWEST_TESTED = "0.21.2"


def peft_version_error(installed: str) -> str | None:
    """Why the engine cannot use peft `installed` (None: it can)."""
    from packaging.version import Version

    if Version(installed) >= Version(PEFT_OLDEST):
        return None
    return (f"gradfilter-ops supports peft >= {PEFT_OLDEST} (tested with {PEFT_OLDEST} to {PEFT_NEWEST_TESTED}), "
            f"but peft {installed} is installed; run `pip install -U 'peft>={PEFT_OLDEST}'`.")


@functools.lru_cache(maxsize=None)
def check_peft_version() -> None:
    """Raise a RuntimeError naming the supported peft versions when the installed peft is older."""
    import peft

    error = peft_version_error(peft.__version__)
    if error is not None:
        raise RuntimeError(error)


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft model (`model` itself when it is not one)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every peft LoRA layer of `model`, after checking the installed peft."""
    check_peft_version()
    from peft.tuners.lora import LoraLayer

    return [module for module in model.modules() if isinstance(module, LoraLayer)]


def is_plain_lora_linear(layer: torch.nn.Module, names: Sequence[str]) -> bool:
    """Whether the adapters `names` of the LoRA `layer` are plain LoRA (no DoRA or other variant) on a linear."""
    from peft.tuners.lora.layer import Linear

    if not isinstance(layer, Linear):
        return False
    variants = getattr(layer, "lora_variant", None)
    if variants is None:  # peft before lora_variant: DoRA was the one variant, flagged per adapter
        return not any(layer.use_dora.get(name, False) for name in names)
    return not any(name in variants for name in names)


def cast_input(layer: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` cast for the adapters of the LoRA `layer` as peft's own forward casts it."""
    if hasattr(layer, "_cast_input_dtype"):
        return layer._cast_input_dtype(x, dtype)
    return x.to(dtype)  # peft before `_cast_input_dtype` always cast


@contextmanager
def forwards_replaced(modules: Sequence[torch.nn.Module],
                      forward_of: Callable[[torch.nn.Module], Callable]) -> Iterator[None]:
    """While entered, each of `modules` runs `forward_of(module)` instead of its class's forward (an instance
    attribute, which shadows it; hooks still run)."""
    replaced = []
    try:
        for module in modules:
            module.forward = forward_of(module)
            replaced.append(module)
        yield
    finally:
        for module in replaced:
            del module.forward
