"""`engine.peft_internals`: the peft versions the engine supports, and its checks of peft's LoRA layers."""

import tomllib
from pathlib import Path

import peft
import pytest
import torch
from peft import LoraConfig, get_peft_model

from gradfilter_ops.engine import peft_internals
from gradfilter_ops.engine.stacking import StackedLora


def test_pyproject_floor_is_the_oldest_supported_peft():
    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text(encoding="utf-8"))
    assert f"peft>={peft_internals.PEFT_OLDEST}" in pyproject["project"]["dependencies"]


def test_an_older_peft_is_refused_with_the_supported_versions(monkeypatch):
    assert peft_internals.peft_version_error(peft_internals.PEFT_OLDEST) is None
    assert peft_internals.peft_version_error(peft.__version__) is None  # the installed one
    monkeypatch.setattr(peft, "__version__", "0.1.0")
    peft_internals.check_peft_version.cache_clear()
    try:
        with pytest.raises(RuntimeError) as error:
            peft_internals.check_peft_version()
    finally:
        peft_internals.check_peft_version.cache_clear()
    message = str(error.value)
    assert f"peft >= {peft_internals.PEFT_OLDEST}" in message and "peft 0.1.0 is installed" in message
    assert peft_internals.PEFT_NEWEST_TESTED in message


def tiny_peft_model(**lora) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    return get_peft_model(model, LoraConfig(r=2, target_modules=["0", "2"], **lora))


def test_stacking_takes_plain_lora_and_refuses_dora():
    plain = tiny_peft_model()
    layers = peft_internals.lora_layers(plain)
    assert len(layers) == 2 and all(peft_internals.is_plain_lora_linear(layer, ["default"]) for layer in layers)
    StackedLora(plain, ["default"])
    dora = tiny_peft_model(use_dora=True)
    dora_layers = peft_internals.lora_layers(dora)
    assert not any(peft_internals.is_plain_lora_linear(layer, ["default"]) for layer in dora_layers)
    with pytest.raises(ValueError, match="plain LoRA on linear layers only"):
        StackedLora(dora, ["default"])


def test_forwards_replaced_restores_the_class_forward_even_on_error():
    layer = torch.nn.Linear(2, 2)
    with pytest.raises(KeyError):
        with peft_internals.forwards_replaced([layer], lambda module: lambda x: x * 0):
            assert torch.equal(layer(torch.ones(1, 2)), torch.zeros(1, 2))
            raise KeyError("inside")
    assert "forward" not in vars(layer)
    assert not torch.equal(layer(torch.ones(1, 2)), torch.zeros(1, 2))
