"""What the engine relies on inside peft, in one place.

`base_model` unwraps a peft model to the transformers model it adapts.
"""

from __future__ import annotations

import torch


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft model (`model` itself when it is not one)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
