"""tools/bench_speed.py and tools/gpu_check.py run on the tiny GPT-2 and report sane figures."""

import json
import math
import statistics
import subprocess
import threading
from pathlib import Path

import pytest
import torch

from helpers import seed_tasks
from warm_commands import call

TOOLS = Path(__file__).resolve().parents[1] / "tools"


@pytest.fixture()
def tools(monkeypatch):
    """The two tool scripts as modules, run on one thread (as --quick does: tiny ops on threads that
    wait for a busy CPU are slow), then torch's thread count is restored. The benchmark's child processes
    (the memory and head sections: a fresh interpreter each, to measure its own peak memory) fork from the
    test worker's warm server instead (`warm_commands.call`: the same code and arguments in a process of its
    own, without importing torch and transformers again), one at a time."""
    monkeypatch.syspath_prepend(str(TOOLS))
    import bench_speed
    import gpu_check

    one_at_a_time = threading.Lock()

    def warm_child(argv):
        with one_at_a_time:
            done = call(bench_speed.main, list(argv))
        return subprocess.CompletedProcess(argv, done.returncode, done.stdout, done.stderr)

    monkeypatch.setattr(bench_speed, "run_child", warm_child)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield bench_speed, gpu_check
    torch.set_num_threads(threads)


def timed_rounds(seconds: dict[str, list[float]], rounds: int) -> bool:
    """Every variant was timed in each of the `rounds` rounds (the speed-ups are medians over them)."""
    return all(len(values) == rounds and min(values) > 0 for values in seconds.values())


def ranks(scores: list[float]) -> list[int]:
    """Each score's place in ascending order (no ties among float scores of distinct rows)."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    return [order.index(i) for i in range(len(scores))]


def spearman_reference(a: list[float], b: list[float]) -> float:
    """Spearman's rho as the Pearson correlation of the ranks (`statistics`), independent of the tool's numpy one."""
    return statistics.correlation(ranks(a), ranks(b))


def test_rank_and_share_helpers_on_hand_made_scores(tools):
    bench_speed, _ = tools
    assert bench_speed.spearman([1, 2, 3, 4, 5], [10, 20, 30, 40, 50]) == pytest.approx(1.0)
    assert bench_speed.spearman([1, 2, 3, 4, 5], [5, 4, 3, 2, 1]) == pytest.approx(-1.0)
    # two swapped neighbour pairs: sum d^2 = 4, so rho = 1 - 6 * 4 / (5 * 24) = 0.8
    assert bench_speed.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    # a row that is not finite in either list is left out: the rest is reversed
    assert bench_speed.spearman([1, 2, float("nan"), 3], [3, 2, 0, 1]) == pytest.approx(-1.0)
    # the top half by a is rows {0, 1}, by b rows {0, 2}
    assert bench_speed.top_overlap([4, 3, 2, 1], [4, 1, 3, 2], ratio=0.5) == 0.5
    # rows of 2, 4 and 4 tokens in batches [0, 1] and [2]: 12 positions computed, 10 of them tokens
    assert bench_speed.padding_share([2, 4, 4], [[0, 1], [2]]) == pytest.approx(2 / 12)


@pytest.mark.integration
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
    assert set(norms["seconds"]) == {"loop", "batched", "step", "online_step"} and timed_rounds(norms["seconds"], 1)

    e2e = results["e2e"]
    snapshot, online = e2e["modes"]["snapshot"], e2e["modes"]["online"]
    assert snapshot["scored"] == online["scored"] == e2e["ifd_scored"] == e2e["rows"] == 6
    assert len(e2e["ifd_seconds"]) == 3  # every G-SNR run between two IFD runs
    # G-SNR: M(T+2) forward+backward passes of 2 forward passes' cost; IFD: more than one forward pass.
    assert 1 < snapshot["flop_ratio"] < 2 * e2e["members"] * (e2e["epochs"] + 2)
    # online: M x T passes instead of M x (T + 2)
    assert online["flop_ratio"] == pytest.approx(snapshot["flop_ratio"] * e2e["epochs"] / (e2e["epochs"] + 2))
    assert timed_rounds({"snapshot": snapshot["seconds"], "online": online["seconds"]}, 1)

    memory = results["memory"]
    assert memory["large"]["rows"] == 4 * memory["small"]["rows"]
    assert memory["small"]["peak_mib"] >= memory["small"]["loaded_mib"] > 0

    online = results["online"]
    # rank agreements of two scorings of the same 8 rows, recomputed from the scores; the top 10% of 8 rows is
    # one row (at least one is kept), so the overlap is whether the best row is the same
    snap, by_online, reseeded = (online["gsnr"][k] for k in ("snapshot", "online", "reseeded"))
    assert online["rows"] == len(snap) == len(by_online) == len(reseeded) == 8
    assert all(math.isfinite(x) for x in snap + by_online + reseeded) and len(set(snap)) == 8
    assert online["spearman_gsnr"] == pytest.approx(spearman_reference(snap, by_online))
    assert online["reseeded_spearman_gsnr"] == pytest.approx(spearman_reference(snap, reseeded))
    best = snap.index(max(snap))
    assert online["top10_overlap"] == float(by_online.index(max(by_online)) == best)
    assert online["reseeded_top10_overlap"] == float(reseeded.index(max(reseeded)) == best)

    workers = results["workers"]
    assert workers["rows"] == 8 and workers["workers"] == 2
    assert workers["max_rel_diff"] < 1e-3  # two processes, the same norms
    assert set(workers["seconds"]) == {"1 process", "2 workers"} and timed_rounds(workers["seconds"], 1)

    head = results["head"]
    assert head["whole"]["targets"] == head["chunked"]["targets"] > 0 and head["max_rel_diff"] < 1e-4

    stack = results["stack"]
    assert stack["rows"] == 8 and stack["max_rel_diff"] < 0.1  # GPT-2's dropout
    assert set(stack["seconds"]) == {"one at a time", "stacked"} and timed_rounds(stack["seconds"], 1)
    assert stack["ops_ratio"]["train"] > 2 and stack["ops_ratio"]["score"] > 4  # M = 4 members in one forward


def test_flop_accounting_matches_torch_flop_counter(tools, tiny_gpt2_dir):
    """forward_flops, and forward+backward = 2 x forward through a frozen base, as torch counts them."""
    from peft import get_peft_model
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gradfilter_ops.config import GSNRConfig
    from gradfilter_ops.engine import lora_config
    from gradfilter_ops.engine.grads import collate, response_loss_sums
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


@pytest.mark.integration
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
    train, score = result["phases"]["train"], result["phases"]["score"]
    # the padding share is the part of the executed FLOPs that the rows' own tokens do not need
    assert result["flops"]["executed"] * (1 - result["padding_share"]) == pytest.approx(result["flops"]["arithmetic"])
    assert 60 < result["tokens"]["mean"] < 220  # Alpaca-like lengths
    # 64 rows in batches of 16: 4 steps per epoch, M x T = 8 epochs; 2M passes over the buckets
    assert train["steps"] == 4 * 4 * 2 and score["passes"] == 2 * 4 * 4

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
