"""`precision: auto` decided from the CPU's flags and caps (faked both ways), the warning, the manifest."""

import pytest
import torch
from datasets import Dataset

from gradfilter_ops import GSNRScorer, precision

from helpers import seed_tasks

CPU = torch.device("cpu")
SAPPHIRE_RAPIDS = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
ZEN3 = frozenset({"avx2", "fma", "sse4_2"})


@pytest.fixture()
def cpu(monkeypatch):
    """Sets what this 'CPU' reports: `cpu(units)`, its flags with or without bf16 units, torch's kernels at
    AVX-512 and no oneDNN cap; the cached answer and the one-time warning reset."""

    def fake(units: bool) -> None:
        monkeypatch.setattr(precision, "cpu_flags", lambda: SAPPHIRE_RAPIDS if units else ZEN3)
        monkeypatch.setattr(precision, "aten_cpu_capability", lambda: "AVX512")
        for name in precision.ONEDNN_ISA_VARS:
            monkeypatch.delenv(name, raising=False)
        precision.reset_warnings()

    yield fake
    precision.reset_warnings()


def test_auto_never_picks_bf16_on_a_cpu_without_bf16_units(cpu, warnings_logged):
    cpu(units=False)
    resolved = precision.resolve("auto", CPU)
    assert (resolved.name, resolved.autocast_dtype) == ("fp32", None)
    assert "no bf16 units" in resolved.reason
    assert warnings_logged == []


def test_auto_picks_bf16_where_the_cpu_computes_it_natively(cpu):
    cpu(units=True)
    resolved = precision.resolve("auto", CPU)
    assert (resolved.name, resolved.autocast_dtype) == ("bf16", torch.bfloat16)
    assert "natively" in resolved.reason and "amx_bf16" in resolved.reason


@pytest.mark.parametrize("flags, capability, env, native, why", [
    (ZEN3, "AVX2", {}, False, "no bf16 units"),
    ({"avx512f", "avx512_bf16"}, "AVX512", {}, True, "avx512_bf16"),
    ({"amx_bf16"}, "AVX512", {"ONEDNN_MAX_CPU_ISA": "avx512_core_amx"}, True, "amx_bf16"),
    (SAPPHIRE_RAPIDS, "AVX512", {"ONEDNN_MAX_CPU_ISA": "ALL"}, True, "natively"),
    (SAPPHIRE_RAPIDS, "AVX2", {}, False, "torch's kernels run at AVX2 (ATEN_CPU_CAPABILITY)"),
    (SAPPHIRE_RAPIDS, "DEFAULT", {}, False, "run at DEFAULT"),
    (SAPPHIRE_RAPIDS, "AVX512", {"ONEDNN_MAX_CPU_ISA": "AVX2"}, False, "ONEDNN_MAX_CPU_ISA=AVX2 caps oneDNN"),
    (SAPPHIRE_RAPIDS, "AVX512", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, False, "caps oneDNN below them"),
    (SAPPHIRE_RAPIDS, "AVX512", {"DNNL_MAX_CPU_ISA": "AVX512_CORE_VNNI"}, False, "DNNL_MAX_CPU_ISA"),
])
def test_the_cpu_decision_follows_the_flags_and_the_caps(flags, capability, env, native, why):
    decided = precision.cpu_bf16_decision(flags, capability, env)
    assert decided[0] is native and why in decided[1]
    assert precision.cpu_bf16_decision(flags, capability, env) == decided  # no timing: the same every time


def test_auto_follows_a_onednn_cap_in_the_environment(cpu, monkeypatch):
    cpu(units=True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    precision.reset_warnings()
    resolved = precision.resolve("auto", CPU)
    assert resolved.name == "fp32" and "ONEDNN_MAX_CPU_ISA=AVX2" in resolved.reason


def test_this_machine_gets_the_same_answer_every_time():
    """Decided from the flags and the caps alone: a fresh answer never differs (it once came from a timing)."""
    answers = set()
    for _ in range(5):
        precision.reset_warnings()
        answers.add(precision.resolve("auto", CPU))
    assert len(answers) == 1
    if not set(precision.BF16_FLAGS) & precision.cpu_flags():  # e.g. an AMD EPYC with AVX2 only
        assert answers.pop().name == "fp32"


def test_explicit_bf16_on_an_emulating_cpu_warns_once_with_the_fix(cpu, warnings_logged):
    cpu(units=False)
    for _ in range(3):
        assert precision.resolve("bf16", CPU).name == "bf16"
    assert len(warnings_logged) == 1
    assert "60x slower" in warnings_logged[0] and "precision: auto" in warnings_logged[0]


def test_explicit_choices_are_kept(cpu, warnings_logged):
    cpu(units=True)
    assert precision.resolve("fp32", CPU).name == "fp32"
    assert precision.resolve("bf16", CPU).name == "bf16"
    assert warnings_logged == []


def test_the_manifest_records_what_auto_resolved_to_and_why(cpu, tiny_config):
    cpu(units=False)
    scorer = GSNRScorer(tiny_config(num_members=2, num_epochs=2, precision="auto"))
    scorer.score(Dataset.from_list(seed_tasks(6)))
    recorded = scorer.manifest()["precision"]
    assert recorded["resolved"] == "fp32" and "no bf16 units" in recorded["reason"]
    assert scorer.manifest()["config"]["precision"] == "auto"

