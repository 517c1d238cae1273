"""tools/bench_speed.py and tools/gpu_check.py run on the tiny GPT-2 and report sane figures."""

import json
import math
from pathlib import Path

import pytest
import torch

from helpers import seed_tasks

TOOLS = Path(__file__).resolve().parents[1] / "tools"


@pytest.fixture()
def tools(monkeypatch):
    """The two tool scripts as modules, run on one thread (as --quick does: tiny ops on threads that
    wait for a busy CPU are slow), then torch's thread count is restored."""
    monkeypatch.syspath_prepend(str(TOOLS))
    import bench_speed
    import gpu_check

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield bench_speed, gpu_check
    torch.set_num_threads(threads)


def positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_bench_speed_quick_prints_every_section(tools, tiny_gpt2_dir, tmp_path, capsys):
    bench_speed, _ = tools
    out = tmp_path / "bench.json"
    results = bench_speed.main(["--quick", "--proxy", str(tiny_gpt2_dir), "--precision", "fp32", "--sections",
                                "norms,e2e,memory,online,workers,head,stack", "--json", str(out)])
    printed = capsys.readouterr().out
    for header in ("== 1. ", "== 2. ", "== 3. ", "== 4. ", "== online", "== member workers", "== head",
                   "== stacked members"):
        assert header in printed
    assert json.loads(out.read_text()).keys() == results.keys()

    norms = results["norms"]
    assert norms["max_rel_diff"] < 1e-4  # the batched pass gives the loop's norms
    assert norms["online_max_rel_diff"] < 1e-4  # and so does the online training step
    assert positive(norms["loop_speedup"]) and positive(norms["step_overhead"])
    assert positive(norms["online_step_overhead"])

    e2e = results["e2e"]
    snapshot, online = e2e["modes"]["snapshot"], e2e["modes"]["online"]
    assert snapshot["scored"] == online["scored"] == e2e["ifd_scored"] == e2e["rows"] == 6
    assert len(e2e["ifd_seconds"]) == 3  # every G-SNR run between two IFD runs
    # G-SNR: M(T+2) forward+backward passes of 2 forward passes' cost; IFD: more than one forward pass.
    assert 1 < snapshot["flop_ratio"] < 2 * e2e["members"] * (e2e["epochs"] + 2) and positive(snapshot["wall_ratio"])
    # online: M x T passes instead of M x (T + 2)
    assert online["flop_ratio"] == pytest.approx(snapshot["flop_ratio"] * e2e["epochs"] / (e2e["epochs"] + 2))
    assert positive(e2e["online_vs_snapshot"])

    memory = results["memory"]
    assert memory["large"]["rows"] == 4 * memory["small"]["rows"]
    assert memory["small"]["peak_mib"] >= memory["small"]["loaded_mib"] > 0 and positive(memory["growth"])

    online = results["online"]
    assert -1 <= online["spearman_gsnr"] <= 1 and 0 <= online["top10_overlap"] <= 1

    workers = results["workers"]
    assert workers["rows"] == 8 and workers["workers"] == 2
    assert workers["max_rel_diff"] < 1e-3 and positive(workers["speedup"])  # two processes, the same norms

    head = results["head"]
    assert head["whole"]["targets"] == head["chunked"]["targets"] > 0 and head["max_rel_diff"] < 1e-4

    stack = results["stack"]
    assert stack["rows"] == 8 and positive(stack["speedup"]) and stack["max_rel_diff"] < 0.1  # GPT-2's dropout
    assert stack["ops_ratio"]["train"] > 2 and stack["ops_ratio"]["score"] > 4  # M = 4 members in one forward


def test_flop_accounting_matches_torch_flop_counter(tools, tiny_gpt2_dir):
    """forward_flops, and forward+backward = 2 x forward through a frozen base, as torch counts them."""
    from peft import get_peft_model
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gradfilter_ops.config import GSNRConfig
    from gradfilter_ops.ensemble import lora_config
    from gradfilter_ops.grads import collate, response_loss_sums
    from gradfilter_ops.prompts import PromptFormatter

    bench_speed, _ = tools
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).requires_grad_(False)
    config = GSNRConfig(max_length=96)
    examples = [PromptFormatter(config, tokenizer).encode(row) for row in seed_tasks(4)]
    batch = collate(examples, tokenizer.eos_token_id)
    tokens, response = batch["input_ids"].numel(), sum(e.num_response for e in examples)
    weights = bench_speed.matmul_weights(model)

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=batch["input_ids"])  # all logits, as IFD computes them
    assert counter.get_total_flops() == pytest.approx(bench_speed.forward_flops(weights, tokens, tokens), rel=0.02)

    peft_model = get_peft_model(model, lora_config(config, model))
    with FlopCounterMode(display=False) as counter:
        sums, counts = response_loss_sums(peft_model, batch)
        (sums.sum() / counts.sum()).backward()
    assert counter.get_total_flops() == pytest.approx(2 * bench_speed.forward_flops(weights, tokens, response),
                                                      rel=0.05)


def test_gpu_check_runs_tiny_on_cpu(tools, tmp_path):
    _, gpu_check = tools
    out = tmp_path / "gpu_check.json"
    gpu_check.main(["--examples", "64", "--tiny", "--precision", "fp32", "--micro-rounds", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["status"] == "done" and result["examples"] == 64
    assert set(result["phases"]) == {"micro", "train", "score"}
    assert result["phases"]["micro"]["max_rel_diff"] < 1e-4
    assert result["phases"]["score"]["finite_share"] == 1.0
    assert result["flops"]["executed"] >= result["flops"]["arithmetic"] > 0
    assert positive(result["wall_s"]) and positive(result["examples_per_s"]) and 0 <= result["padding_share"] < 1
    assert 60 < result["tokens"]["mean"] < 220  # Alpaca-like lengths
    # 64 rows in batches of 16: 4 steps per epoch, M x T = 8 epochs; 2M passes over the buckets
    assert result["phases"]["train"]["steps"] == 4 * 4 * 2 and positive(result["phases"]["train"]["ms_per_step"])
    assert result["phases"]["score"]["passes"] == 2 * 4 * 4 and positive(result["phases"]["score"]["ms_per_pass"])

    stacked = gpu_check.main(["--examples", "64", "--tiny", "--precision", "fp32", "--micro-rounds", "0",
                              "--stack-members", "4",
                              "--count-ops", "--out", str(tmp_path / "stacked.json")])
    assert stacked["stack_members"] == 4 and set(stacked["phases"]) == {"ops", "train", "score"}
    assert stacked["phases"]["train"]["forward_steps"] == 4 * 2  # one stacked step trains the 4 members
    assert stacked["phases"]["score"]["passes"] == 4  # one pass per bucket runs all 8 adapters
    assert stacked["phases"]["ops"]["train"] > stacked["phases"]["ops"]["score"] > 0
    assert stacked["phases"]["score"]["finite_share"] == 1.0

    online = gpu_check.main(["--examples", "64", "--tiny", "--precision", "fp32", "--micro-rounds", "1",
                             "--score-mode", "online",
                             "--out", str(tmp_path / "online.json")])
    assert online["phases"]["score"]["finite_share"] == 1.0 and online["phases"]["score"]["passes"] == 0
    assert online["flops"]["arithmetic"] == pytest.approx(result["flops"]["arithmetic"] * 2 / 4)  # M T of M (T + 2)
