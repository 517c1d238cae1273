"""`precision: auto` on CPUs with and without bf16 units (faked both ways), the warning, the manifest."""

import pytest
import torch
from datasets import Dataset
from loguru import logger

from gradfilter_ops import GSNRScorer, precision

from helpers import seed_tasks

CPU = torch.device("cpu")


@pytest.fixture()
def cpu(monkeypatch):
    """Sets what this 'CPU' reports: `cpu(units, speedup)`; the probe's cache and the one-time warning reset."""

    def fake(units: bool, speedup: float = 3.0) -> None:
        monkeypatch.setattr(precision, "cpu_bf16_units", lambda: units)
        monkeypatch.setattr(precision, "bf16_matmul_speedup", lambda: speedup)
        precision.reset_warnings()

    yield fake
    precision.reset_warnings()


@pytest.fixture()
def warnings():
    seen = []
    handle = logger.add(lambda message: seen.append(str(message)), level="WARNING")
    yield seen
    logger.remove(handle)


def test_auto_never_picks_bf16_on_a_cpu_without_bf16_units(cpu, warnings):
    cpu(units=False)
    resolved = precision.resolve("auto", CPU)
    assert (resolved.name, resolved.autocast_dtype) == ("fp32", None)
    assert "no bf16 units" in resolved.reason
    assert warnings == []


def test_auto_picks_bf16_where_the_cpu_computes_it_natively(cpu):
    cpu(units=True, speedup=3.0)
    resolved = precision.resolve("auto", CPU)
    assert (resolved.name, resolved.autocast_dtype) == ("bf16", torch.bfloat16)
    assert "natively" in resolved.reason


def test_auto_trusts_the_probe_over_the_flags(cpu):
    """Units reported but capped away (e.g. ONEDNN_MAX_CPU_ISA=AVX2): the probe's slow bf16 decides."""
    cpu(units=True, speedup=0.02)
    assert precision.resolve("auto", CPU).name == "fp32"


def test_explicit_bf16_on_an_emulating_cpu_warns_once_with_the_fix(cpu, warnings):
    cpu(units=False)
    for _ in range(3):
        assert precision.resolve("bf16", CPU).name == "bf16"
    assert len(warnings) == 1
    assert "60x slower" in warnings[0] and "precision: auto" in warnings[0]


def test_explicit_choices_are_kept(cpu, warnings):
    cpu(units=True)
    assert precision.resolve("fp32", CPU).name == "fp32"
    assert precision.resolve("bf16", CPU).name == "bf16"
    assert warnings == []


def test_the_manifest_records_what_auto_resolved_to_and_why(cpu, tiny_config):
    cpu(units=False)
    scorer = GSNRScorer(tiny_config(num_members=2, num_epochs=2, precision="auto"))
    scorer.score(Dataset.from_list(seed_tasks(6)))
    recorded = scorer.manifest()["precision"]
    assert recorded["resolved"] == "fp32" and "no bf16 units" in recorded["reason"]
    assert scorer.manifest()["config"]["precision"] == "auto"

