#!/usr/bin/env python
"""Side-by-side speed and memory benchmark of G-SNR scoring (GitHub issue 3).

Every figure is a ratio of variants timed in this one run, on the same rows, interleaved, so a
machine shared with other jobs slows the variants alike. Sections (``--sections``, comma-separated):

  norms   1. the batched per-example norm pass (`per_example_grad_sq_norms`) vs a loop of
             one-example backward passes (`per_example_grad_sq_norms_loop`), with the same norms;
          2. the same pass vs a plain batched forward+backward of the batch (a training step).
  e2e     3. Data-Juicer's `gsnr_scorer` op with its defaults, and with `score_mode: online`, vs
             Data-Juicer's `instruction_following_difficulty_filter` (IFD), same proxy, same rows;
             and the FLOP ratio of each, the arithmetic limit of the wall-time ratio.
  memory  4. peak RSS (ru_maxrss) of fresh processes that score N and 4N rows with `GSNRScorer`.
  online  how far `score_mode: online`, which reads each row's norms off the training steps of the
          snapshot epochs, ranks like snapshot mode on the same members (Spearman, top-10% overlap),
          next to how far snapshot mode agrees with itself under other seeds.
  workers `member_workers: k` vs one process, train + snapshot-score.
  head    one long norm pass with the frozen LM head fused (head.token_losses) vs through autograd: memory.
  ray     `distributed.score_dataset` on a local Ray cluster (one training task, one scoring actor)
          vs `GSNRScorer.score` in this process: what Ray costs on one machine; same scores.
  nodes   `distributed.score_dataset` on a local cluster of 1 node vs 2 nodes (`ray.cluster_utils`,
          `--nodes-cpus` CPUs, a temp folder and a cache folder each; a training task and a scoring
          actor per node): wall time, rows/s and the speed-up; same scores.
  prefix  `lora_layer_fraction: F` (adapters on the top layers, the frozen layers below run once per
          row) vs adapters on every layer, train + snapshot-score: seconds, and how the G-SNR ranking
          moves (Spearman, top-10% overlap) next to an every-layer ensemble with other seeds.
  stack   `stack_members: M` (all members in one forward) vs one member at a time, train +
          snapshot-score: seconds, same norms, and the operations dispatched per batch of rows trained
          and scored (each one a kernel launch on a GPU, where a small proxy waits on the host).

    python tools/bench_speed.py --proxy smollm2-135m --sections norms --rounds 2
    python tools/bench_speed.py --quick --proxy path/to/tiny-gpt2 --json out.json   # seconds

Results, commands and the machine are in docs/speed.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from gradfilter_ops.config import GSNRConfig
from gradfilter_ops.engine import EnsembleScorer, ensemble_scorer, lora_config, train_ensemble
from gradfilter_ops.precision import resolve as resolve_precision
from gradfilter_ops.engine.grads import (LoraActivations, backward_with_sq_norms, collate, length_buckets,
                                  per_example_grad_sq_norms, per_example_grad_sq_norms_loop, response_loss_sums,
                                  shuffled_length_batches)
from gradfilter_ops.engine.gsnr import gsnr_from_sq_norms
from gradfilter_ops.engine.head import CHUNK_LOGITS
from gradfilter_ops.prompts import Encoded, PromptFormatter, alpaca_prompt
from gradfilter_ops.proxy import FrozenProxy, hf_folder, load_frozen_proxy
from gradfilter_ops.selection import select_top_k
from gradfilter_ops.evaluation.metrics import spearman

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / "recipes" / "data" / "self_instruct_seed_tasks.jsonl"
SECTIONS = ("norms", "e2e", "memory", "online", "workers", "head", "stack", "ray", "nodes", "prefix")
SCORE_CHUNK = 256  # rows per map batch of `gsnr_scorer` and of `GSNRScorer.score`
# Sizes for --quick (a smoke test on a tiny proxy); explicit arguments still win.
QUICK = dict(threads=1, batch_size=4, pool=16, rounds=1, max_length=96, e2e_rows=6, e2e_max_tokens=100, mem_rows=8,
             online_rows=8, online_members=2, workers_rows=8, head_rows=2, stack_rows=8, ray_rows=8, ray_members=2,
             nodes_rows=8, prefix_rows=8, prefix_members=2)
TARGETS = {"loop_speedup_cpu": 3.0, "loop_speedup_gpu": 20.0, "step_overhead": 1.15, "e2e_vs_ifd": 4.0,
           "rss_growth": 1.10}


# -- measuring ---------------------------------------------------------------------------------------
def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Wall seconds of `fn()` (waiting for the GPU) and its result."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def interleaved(variants: dict[str, Callable[[], Any]], rounds: int,
                device: torch.device) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Time every variant once per round, round r starting with variant r (mod k).

    Returns the seconds per variant and round, and each variant's result from its first run."""
    names = list(variants)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    results: dict[str, Any] = {}
    for r in range(rounds):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            spent, out = timed(variants[name], device)
            seconds[name].append(spent)
            results.setdefault(name, out)
    return seconds, results


def round_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    return [a / b for a, b in zip(numerator, denominator)]


def max_rel_diff(values: np.ndarray, reference: np.ndarray) -> float:
    """Largest relative difference, over the entries that are numbers in both."""
    return float(np.nanmax(np.abs(values - reference) / np.abs(reference)))


def padded_tokens(lengths: Sequence[int], batches: Iterable[Sequence[int]]) -> int:
    """Token positions computed for these batches of row indices, each padded to its longest row."""
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def padding_share(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of the computed token positions that are padding."""
    return 1 - sum(lengths[i] for b in batches for i in b) / padded_tokens(lengths, batches)


def matmul_weights(model: torch.nn.Module) -> tuple[int, int]:
    """(weights of the decoder's linear layers, weights of the LM head): what a token multiplies."""
    from transformers.pytorch_utils import Conv1D

    body = sum(m.weight.numel() for m in model.get_decoder().modules() if isinstance(m, (torch.nn.Linear, Conv1D)))
    return body, model.get_output_embeddings().weight.numel()


def forward_flops(weights: tuple[int, int], tokens: int, head_tokens: int) -> int:
    """Matmul FLOPs of a forward pass: 2 per weight and token; the LM head only at `head_tokens`.

    Attention scores (4 x length x width per token and layer, a few % at these lengths) and the
    rank-r LoRA matmuls (< 1 %) are left out. A backward pass through a frozen base computes only
    input gradients, one matmul per forward matmul, so forward+backward is 2x this."""
    body, head = weights
    return 2 * (body * tokens + head * head_tokens)


def scoring_passes(config: GSNRConfig) -> int:
    """Scoring passes per member and row: 2 snapshots, or none online (the norms come with training)."""
    return 2 if config.score_mode == "snapshot" else 0


def gsnr_flops(weights: tuple[int, int], examples: Sequence[Encoded], config: GSNRConfig) -> int:
    """Arithmetic (padding-free) FLOPs of G-SNR: M x (T + 2) forward+backward passes over every row
    (M x T online)."""
    tokens = sum(len(e.input_ids) for e in examples)
    head_tokens = sum(e.num_response for e in examples)  # the head runs where a response token is predicted
    passes = config.num_members * (config.num_epochs + scoring_passes(config))
    return passes * 2 * forward_flops(weights, tokens, head_tokens)


def training_batches(lengths: Sequence[int], config: GSNRConfig) -> list[list[int]]:
    """The row batches `train_ensemble` trains on, all members and epochs (`grads.shuffled_length_batches`
    with each member's generator, as `ensemble.EnsembleTrainer` trains), to count their padding."""
    return [batch for member in member_batches(lengths, config) for batch in member]


def member_batches(lengths: Sequence[int], config: GSNRConfig) -> list[list[list[int]]]:
    """Each member's training batches, in step order over all epochs."""
    out = []
    for member in range(config.num_members):
        rng = torch.Generator().manual_seed(config.seed + member)
        out.append([b for _ in range(config.num_epochs)
                    for b in shuffled_length_batches(lengths, config.train_batch_size, rng)])
    return out


def training_tokens(lengths: Sequence[int], config: GSNRConfig, stack: int = 1) -> int:
    """Token positions that training computes: each batch padded to its longest row, or with `stack`
    members per step, every block of a stacked step padded to the step's longest row and largest batch."""
    members = member_batches(lengths, config)
    total = 0
    for start in range(0, len(members), stack):
        for step in zip(*members[start: start + stack]):
            total += len(step) * max(map(len, step)) * max(lengths[i] for b in step for i in b)
    return total


def scoring_batches(lengths: Sequence[int], config: GSNRConfig) -> list[list[int]]:
    """The length buckets the scorer forms inside each map batch of `SCORE_CHUNK` rows."""
    return [[start + i for i in bucket] for start in range(0, len(lengths), SCORE_CHUNK)
            for bucket in length_buckets(lengths[start: start + SCORE_CHUNK], config.score_batch_size)]


def executed_flops(weights: tuple[int, int], examples: Sequence[Encoded], config: GSNRConfig, stack: int = 1) -> int:
    """G-SNR's FLOPs as computed, padding included: M x T training passes and M x 2 scoring passes (none online),
    training with `stack` members per step."""
    lengths = [len(e.input_ids) for e in examples]
    response = sum(e.num_response for e in examples)
    train = training_tokens(lengths, config, stack)
    score = padded_tokens(lengths, scoring_batches(lengths, config))
    m = config.num_members
    return (2 * forward_flops(weights, train, m * config.num_epochs * response)
            + 2 * m * scoring_passes(config) * forward_flops(weights, score, response))


def ifd_flops(weights: tuple[int, int], examples: Sequence[Encoded]) -> int:
    """FLOPs of IFD as Data-Juicer computes it: a forward pass over prompt+response and one over the
    response alone, each with full-vocabulary logits at every position (same token counts as G-SNR)."""
    tokens = sum(len(e.input_ids) + e.num_response for e in examples)
    return forward_flops(weights, tokens, tokens)


def top_overlap(a: Sequence[float], b: Sequence[float], ratio: float = 0.1) -> float:
    """Share of the rows `select_top_k` keeps by `a` that it also keeps by `b`."""
    keep_a = set(select_top_k([float(x) for x in a], top_ratio=ratio))
    keep_b = set(select_top_k([float(x) for x in b], top_ratio=ratio))
    return len(keep_a & keep_b) / len(keep_a)


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else \
        platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version()}


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def verdict(value: float, target: float, higher_is_better: bool) -> str:
    met = value >= target if higher_is_better else value <= target
    return f"target {'>=' if higher_is_better else '<='} {target:g}x: {'PASS' if met else 'MISS'}"


def say(text: str = "") -> None:
    print(text, flush=True)


def say_side_by_side(title: str, setup: str, seconds: dict[str, list[float]], verdict: str) -> None:
    say(f"== {title} ==")
    say(setup)
    say("seconds: " + ", ".join(f"{name} {statistics.median(v):.1f}" for name, v in seconds.items()))
    say(verdict)


# -- data --------------------------------------------------------------------------------------------
def read_rows(path: Path, limit: int) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for _, line in zip(range(limit), f)]


def frozen_proxy(args: argparse.Namespace) -> FrozenProxy:
    return load_frozen_proxy(args.proxy, device=args.device)


def proxy_and_rows(args: argparse.Namespace, rows: int, **options: Any):
    """The frozen proxy, its device, a config (the arguments' precision and max length, plus `options`),
    the first `rows` scoreable rows of `--data` encoded with it, and the pad id."""
    proxy = frozen_proxy(args)
    config = GSNRConfig(hf_model=args.proxy, precision=args.precision, max_length=args.max_length, **options)
    formatter = PromptFormatter(config, proxy.tokenizer)
    examples = [e for e in (formatter.encode(r) for r in read_rows(args.data, rows)) if e.ok]
    return proxy.model, proxy.device, config, examples, proxy.pad_id


# -- 1 and 2: the per-example norm pass ----------------------------------------------------------------
def pick_batch(examples: Sequence[Encoded], batch_size: int) -> list[Encoded]:
    """The length bucket (as the scorer forms them) whose median length is nearest the pool's median."""
    lengths = [len(e.input_ids) for e in examples]
    full = [b for b in length_buckets(lengths, batch_size) if len(b) == batch_size] or [list(range(len(examples)))]
    middle = statistics.median(lengths)
    bucket = min(full, key=lambda b: abs(statistics.median(lengths[i] for i in b) - middle))
    return [examples[i] for i in bucket]


def compare_norm_passes(model: torch.nn.Module, examples: Sequence[Encoded], pad_id: int, config: GSNRConfig,
                        rounds: int) -> dict[str, Any]:
    """Sections 1 and 2 on one batch of `examples`, with a fresh LoRA adapter on the frozen `model`.

    The adapter's B is random (`lora_init: random`), as after training: with peft's B = 0 the
    gradients with respect to A vanish. Variants, interleaved: `batched` (one pass, the scorer's
    path), `loop` (one backward pass per row) and `step` (the forward+backward of a training step as
    `train_ensemble` takes it, without the optimizer update, tiny for LoRA) and `online_step` (the
    same step as `score_mode: online` takes it in the snapshot epochs, with every row's norm). All use
    the config's precision."""
    from peft import get_peft_model

    device = next(model.parameters()).device
    autocast = resolve_precision(config.precision, device).autocast_dtype
    torch.manual_seed(config.seed)
    peft_model = get_peft_model(model, lora_config(replace(config, lora_init="random"), model)).eval()
    activations = LoraActivations(peft_model)
    params = [p for p in peft_model.parameters() if p.requires_grad]

    def precision():
        return torch.autocast(device.type, dtype=autocast) if autocast is not None else nullcontext()

    def variants(rows: Sequence[Encoded]) -> dict[str, Callable[[], Any]]:
        batch = collate(rows, pad_id, device)

        def step() -> None:
            with precision():
                sums, counts = response_loss_sums(peft_model, batch)
            (sums.sum() / counts.sum().clamp_min(1)).backward()
            peft_model.zero_grad(set_to_none=True)

        def online_step() -> torch.Tensor:
            with activations.recording(), precision():
                sums, counts = response_loss_sums(peft_model, batch)
            norms = backward_with_sq_norms(sums.sum() / counts.sum().clamp_min(1), counts, activations, params,
                                           config.grad_params)
            peft_model.zero_grad(set_to_none=True)
            return norms

        def loop() -> torch.Tensor:
            with precision():
                return per_example_grad_sq_norms_loop(peft_model, rows, pad_id, config.grad_params)

        return {"batched": lambda: per_example_grad_sq_norms(peft_model, activations, batch, config.grad_params,
                                                             autocast),
                "loop": loop, "step": step, "online_step": online_step}

    try:
        interleaved(variants(examples[:2]), 1, device)  # warm-up: kernels, allocator, autocast caches
        seconds, results = interleaved(variants(examples), rounds, device)
    finally:
        activations.remove()
        peft_model.unload()
    batched, looped = results["batched"].cpu(), results["loop"].cpu()
    lengths = [len(e.input_ids) for e in examples]
    return {
        "rows": len(examples), "min_tokens": min(lengths), "max_tokens": max(lengths),
        "padding_share": padding_share(lengths, [range(len(lengths))]),
        "precision": str(autocast or torch.float32).replace("torch.", ""), "device": device.type,
        "seconds": seconds,
        "max_rel_diff": float(((batched - looped).abs() / looped.abs()).max()),
        "online_max_rel_diff": float(((results["online_step"].cpu() - looped).abs() / looped.abs()).max()),
        "online_step_overhead": statistics.median(round_ratios(seconds["online_step"], seconds["step"])),
        "loop_speedup": statistics.median(round_ratios(seconds["loop"], seconds["batched"])),
        "step_overhead": statistics.median(round_ratios(seconds["batched"], seconds["step"])),
    }


def section_norms(args: argparse.Namespace) -> dict[str, Any]:
    proxy = frozen_proxy(args)
    model, tokenizer, device = proxy.model, proxy.tokenizer, proxy.device
    config = GSNRConfig(hf_model=args.proxy, precision=args.precision, score_batch_size=args.batch_size,
                        max_length=args.max_length)
    formatter = PromptFormatter(config, tokenizer)
    pool = [e for e in (formatter.encode(r) for r in read_rows(args.data, args.pool)) if e.ok]
    result = compare_norm_passes(model, pick_batch(pool, args.batch_size), proxy.pad_id, config, args.rounds)
    speed_target = TARGETS["loop_speedup_gpu" if device.type == "cuda" else "loop_speedup_cpu"]
    say("== 1. per-example norms: one batched pass vs a loop of one-example backward passes ==")
    say(f"batch: {result['rows']} rows of {result['min_tokens']}-{result['max_tokens']} tokens (a length bucket of "
        f"{len(pool)} rows; padding {result['padding_share']:.1%}); {result['precision']} on {device.type}")
    for r in range(args.rounds):
        say(f"round {r + 1}: " + "  ".join(f"{name} {s[r]:.2f} s" for name, s in result["seconds"].items()))
    say(f"same norms: max relative difference {result['max_rel_diff']:.1e}")
    say(f"ratio loop / batched: {result['loop_speedup']:.2f}x  ({verdict(result['loop_speedup'], speed_target, True)})")
    say("== 2. per-example norms vs a plain batched forward+backward (a training step) ==")
    say(f"ratio batched / step: {result['step_overhead']:.3f}x  "
        f"({verdict(result['step_overhead'], TARGETS['step_overhead'], False)})")
    say(f"online: a training step that also yields every row's norm / a plain step: "
        f"{result['online_step_overhead']:.3f}x; its norms vs the loop's: max relative difference "
        f"{result['online_max_rel_diff']:.1e}")
    return result


# -- 3: end to end against IFD ---------------------------------------------------------------------
def section_e2e(args: argparse.Namespace) -> dict[str, Any]:
    """`gsnr_scorer` with its defaults (and with `score_mode: online`, unless left out of --e2e-modes)
    vs IFD, all as Data-Juicer ops in one process, bracketed: IFD, G-SNR, IFD, online, IFD, ...; each
    G-SNR run is divided by the mean of the IFD runs around it."""
    from data_juicer.core.data import NestedDataset
    from data_juicer.ops.filter.instruction_following_difficulty_filter import InstructionFollowingDifficultyFilter
    from data_juicer.utils.constant import Fields, StatsKeys
    from datasets import Dataset

    from gradfilter_ops import fields
    from gradfilter_ops.ops import GSNRScorerOp

    proxy = frozen_proxy(args)
    model, tokenizer, device = proxy.model, proxy.tokenizer, proxy.device
    modes = args.e2e_modes.split(",")
    configs = {mode: GSNRConfig(hf_model=args.proxy, score_mode=mode, max_length=args.max_length) for mode in modes}
    formatter = PromptFormatter(GSNRConfig(hf_model=args.proxy), tokenizer)  # untruncated, for --e2e-max-tokens
    rows, examples = [], []
    for row in read_rows(args.data, 10**9):
        encoded = formatter.encode(row)
        # Data-Juicer's IFD scores one response token fewer than there are (docs/evaluation.md) and
        # fails on the None it gives a one-token response, so such rows are left out for both.
        ifd_scoreable = len(tokenizer(str(row.get("output", "")), add_special_tokens=False)["input_ids"]) >= 2
        if encoded.ok and ifd_scoreable and (not args.e2e_max_tokens or len(encoded.input_ids) <= args.e2e_max_tokens):
            rows.append({**row, "prompt": alpaca_prompt(row["instruction"], row.get("input"))})
            examples.append(encoded)
        if len(rows) == args.e2e_rows:
            break

    def ifd():
        op = InstructionFollowingDifficultyFilter(hf_model=hf_folder(args.proxy), query_template="{prompt}",
                                                  response_template="{output}", min_score=0.0,
                                                  max_score=float("inf"), num_proc=1)
        return op.run(NestedDataset(Dataset.from_list(rows)))

    def gsnr(mode: str) -> Callable[[], Any]:
        def run():
            op = GSNRScorerOp(hf_model=args.proxy, score_mode=mode, max_length=args.max_length, use_cache=False,
                              num_proc=1)
            return op.run(NestedDataset(Dataset.from_list(rows)))
        return run

    ifd_s, gsnr_s, in_order, outputs = [], {mode: [] for mode in modes}, [], {}
    spent, ifd_out = timed(ifd, device)
    ifd_s.append(spent)
    in_order.append(("ifd", spent))
    for _ in range(args.e2e_rounds):
        for mode in modes:
            spent, outputs[mode] = timed(gsnr(mode), device)
            gsnr_s[mode].append(spent)
            in_order.append((mode, spent))
            spent = timed(ifd, device)[0]
            ifd_s.append(spent)
            in_order.append(("ifd", spent))
    ifd_ok = sum(math.isfinite(s[StatsKeys.ifd_score]) for s in ifd_out[Fields.stats])
    weights = matmul_weights(model)
    ifd_flop_count = ifd_flops(weights, examples)
    lengths = [len(e.input_ids) for e in examples]
    per_mode = {}
    for k, mode in enumerate(modes):
        # run j of this mode sits between IFD runs j * len(modes) + k and the next one
        around = [(ifd_s[j * len(modes) + k] + ifd_s[j * len(modes) + k + 1]) / 2 for j in range(args.e2e_rounds)]
        config = configs[mode]
        flops = {"gsnr": gsnr_flops(weights, examples, config),
                 "gsnr_executed": executed_flops(weights, examples, config)}
        per_mode[mode] = {
            "seconds": gsnr_s[mode], "scored": sum(s[fields.STATUS] == fields.OK for s in outputs[mode][Fields.stats]),
            "wall_ratio": statistics.median(g / i for g, i in zip(gsnr_s[mode], around)),
            "flops": flops, "flop_ratio": flops["gsnr"] / ifd_flop_count,
            "gflops_per_s": flops["gsnr_executed"] / statistics.mean(gsnr_s[mode]) / 1e9,
            "passes_per_member": config.num_epochs + scoring_passes(config),
        }
    base = configs[modes[0]]
    result = {
        "rows": len(rows), "mean_tokens": statistics.mean(lengths),
        "mean_response_tokens": statistics.mean(e.num_response for e in examples),
        "ifd_seconds": ifd_s, "ifd_scored": ifd_ok, "ifd_flops": ifd_flop_count, "modes": per_mode,
        "members": base.num_members, "epochs": base.num_epochs,
        "train_padding_share": padding_share(lengths, training_batches(lengths, base)),
        "score_padding_share": padding_share(lengths, scoring_batches(lengths, base)),
        "ifd_gflops_per_s": ifd_flop_count / statistics.mean(ifd_s) / 1e9,
    }
    if {"snapshot", "online"} <= set(modes):
        result["online_vs_snapshot"] = statistics.median(
            round_ratios(gsnr_s["online"], gsnr_s["snapshot"]))
    say(f"== 3. end to end: gsnr_scorer (defaults: M={base.num_members}, T={base.num_epochs}, batch "
        f"{base.train_batch_size}, precision {base.precision}; modes {', '.join(modes)}) vs "
        "instruction_following_difficulty_filter ==")
    say(f"rows: {len(rows)} (mean {result['mean_tokens']:.0f} tokens, {result['mean_response_tokens']:.0f} in the "
        f"response); scored: " + ", ".join(f"{m} {r['scored']}" for m, r in per_mode.items()) +
        f", ifd {ifd_ok}; proxy {args.proxy} on {device.type}")
    say("seconds, in run order: " + ", ".join(f"{name} {s:.1f}" for name, s in in_order))
    say(f"padding: training batches {result['train_padding_share']:.0%}, scoring batches "
        f"{result['score_padding_share']:.0%}; ifd {ifd_flop_count / 1e12:.3f} TFLOP at "
        f"{result['ifd_gflops_per_s']:.1f} GFLOP/s")
    for mode, r in per_mode.items():
        say(f"{mode} ({r['passes_per_member']} passes per member): {r['flops']['gsnr'] / 1e12:.2f} TFLOP arithmetic, "
            f"{r['flops']['gsnr_executed'] / 1e12:.2f} with padding, {r['gflops_per_s']:.1f} GFLOP/s; ratio FLOPs "
            f"{r['flop_ratio']:.1f}x, ratio wall {r['wall_ratio']:.1f}x  "
            f"({verdict(r['wall_ratio'], TARGETS['e2e_vs_ifd'], False)})")
    if "online_vs_snapshot" in result:
        say(f"ratio wall online / snapshot: {result['online_vs_snapshot']:.2f}x")
    return result


# -- 4: memory -----------------------------------------------------------------------------------------
def memory_child(args: argparse.Namespace) -> None:
    """Score `--memory-child` rows (the first `--mem-rows` rows, repeated) with `GSNRScorer`; print the
    peak RSS after loading the proxy and at the end, as one JSON line."""
    from datasets import Dataset

    from gradfilter_ops import GSNRScorer

    base = read_rows(args.data, args.mem_rows)
    rows = [base[i % len(base)] for i in range(args.memory_child)]
    scorer = GSNRScorer(GSNRConfig(hf_model=args.proxy, num_members=args.mem_members, precision=args.precision,
                                   device=args.device, max_length=args.max_length, use_cache=False))
    scorer.encode([])  # loads the proxy
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scored = scorer.score(Dataset.from_list(rows))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rows": len(scored), "loaded_mib": loaded / 1024, "peak_mib": peak / 1024}))


def run_child(argv: Sequence[str]) -> subprocess.CompletedProcess:
    """This script in a fresh process with `argv`, its output captured."""
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], capture_output=True, text=True)


def child_json(what: str, argv: Sequence[str]) -> dict[str, Any]:
    """Run this script in a fresh process with `argv` (`run_child`); its last stdout line is a JSON object."""
    run = run_child(argv)
    if run.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def section_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Two fresh processes at once (each measures only itself): N rows and 4N rows."""
    def child(rows: int) -> dict[str, Any]:
        return child_json(f"memory child ({rows} rows)", [
            "--memory-child", str(rows), "--proxy", args.proxy, "--data", str(args.data), "--mem-rows",
            str(args.mem_rows), "--mem-members", str(args.mem_members), "--precision", args.precision, "--device",
            args.device, "--max-length", str(args.max_length), "--threads", str(args.threads)])

    n = args.mem_rows
    with ThreadPoolExecutor(2) as pool:
        small, large = pool.map(child, (n, 4 * n))
    growth = large["peak_mib"] / small["peak_mib"]
    say(f"== 4. memory: peak RSS of a fresh process scoring N and 4N rows (GSNRScorer, M={args.mem_members}) ==")
    for label, r in (("N", small), ("4N", large)):
        say(f"{label} = {r['rows']} rows: peak {r['peak_mib']:.0f} MiB "
            f"(after loading the proxy: {r['loaded_mib']:.0f} MiB)")
    say(f"ratio peak 4N / N: {growth:.3f}x  ({verdict(growth, TARGETS['rss_growth'], False)})")
    return {"small": small, "large": large, "growth": growth, "members": args.mem_members}


# -- the chunked LM head: memory of one long scoring pass ---------------------------------------------------
def head_child(args: argparse.Namespace) -> None:
    """One per-example norm pass over `--head-rows` rows of `--max-length` random tokens (32 of prompt),
    with the frozen LM head fused (`head.token_losses`, the default) or whole through autograd (`--head-child
    whole`); prints one JSON line."""
    from peft import get_peft_model

    from gradfilter_ops.engine import grads

    if args.head_child == "whole":
        grads.FUSED_HEAD, grads.HEAD_CHUNK = False, 1 << 62
    proxy = frozen_proxy(args)
    model, device = proxy.model, proxy.device
    config = GSNRConfig(hf_model=args.proxy, precision=args.precision, max_length=args.max_length)
    rng = np.random.default_rng(0)
    examples = [Encoded("ok", tuple(rng.integers(0, model.config.vocab_size, args.max_length).tolist()), 32)
                for _ in range(args.head_rows)]
    torch.manual_seed(0)
    peft_model = get_peft_model(model, lora_config(replace(config, lora_init="random"), model)).eval()
    activations = LoraActivations(peft_model)
    batch = collate(examples, model.config.eos_token_id or 0, device)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds, norms = timed(
        lambda: per_example_grad_sq_norms(peft_model, activations, batch, config.grad_params,
                                          resolve_precision(config.precision, device).autocast_dtype),
        device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"head": args.head_child, "targets": len(batch["targets"]), "seconds": seconds,
                      "loaded_mib": loaded / 1024, "peak_mib": peak / 1024, "norms": norms.tolist()}))


def section_head(args: argparse.Namespace) -> dict[str, Any]:
    """The same long pass with the LM head fused and whole, in two fresh processes one after the other."""
    def child(mode: str) -> dict[str, Any]:
        return child_json(f"head child ({mode})", [
            "--head-child", mode, "--proxy", args.proxy, "--head-rows", str(args.head_rows), "--precision",
            args.precision, "--device", args.device, "--max-length", str(args.max_length), "--threads",
            str(args.threads)])

    whole, chunked = child("whole"), child("chunked")
    extra = {name: r["peak_mib"] - r["loaded_mib"] for name, r in (("whole", whole), ("chunked", chunked))}
    diff = float(np.max(np.abs(np.subtract(chunked["norms"], whole["norms"])) / np.abs(whole["norms"])))
    say(f"== head: one norm pass over {args.head_rows} rows of {args.max_length} tokens, frozen LM head fused "
        f"(chunks of {CHUNK_LOGITS} logits) vs whole through autograd ==")
    ratio = extra["chunked"] / extra["whole"] if extra["whole"] > 0 else float("nan")  # a tiny pass may add none
    say(f"response positions: {whole['targets']}; peak RSS above the loaded proxy: whole {extra['whole']:.0f} MiB, "
        f"fused {extra['chunked']:.0f} MiB ({ratio:.2f}x)")
    say(f"seconds: whole {whole['seconds']:.1f}, fused {chunked['seconds']:.1f} "
        f"({chunked['seconds'] / whole['seconds']:.2f}x); norms equal to {diff:.1e}")
    return {"whole": {k: v for k, v in whole.items() if k != "norms"},
            "chunked": {k: v for k, v in chunked.items() if k != "norms"}, "extra_mib": extra, "memory_ratio": ratio,
            "max_rel_diff": diff}


# -- online mode: agreement with snapshot mode -----------------------------------------------------------
def snapshot_sq_norms(model: torch.nn.Module, examples: Sequence[Encoded], snapshots: Any, config: GSNRConfig,
                      pad_id: int) -> np.ndarray:
    """Snapshot mode's squared norms of `examples`: `EnsembleScorer` over the trained snapshots."""
    scorer = EnsembleScorer(model, snapshots, config, pad_id)
    try:
        return scorer.sq_norms(examples, progress=False)
    finally:
        scorer.close()


def section_online(args: argparse.Namespace) -> dict[str, Any]:
    """`score_mode: online` vs `snapshot` from one training run (online recording does not change the
    training, so both read the same members); as the yardstick, snapshot mode vs snapshot mode of an
    ensemble whose members have other seeds (seed + M ... seed + 2M - 1)."""
    model, device, config, examples, pad_id = proxy_and_rows(args, args.online_rows, num_members=args.online_members,
                                                             score_mode="online")
    start = time.perf_counter()
    snapshots = train_ensemble(model, examples, config, pad_id, progress=False)
    other = replace(config, seed=config.seed + config.num_members, score_mode="snapshot")
    other_snapshots = train_ensemble(model, examples, other, pad_id, progress=False)
    kw = dict(norm=config.norm, noise=config.noise, eps=config.eps)
    snap = gsnr_from_sq_norms(snapshot_sq_norms(model, examples, snapshots, config, pad_id), **kw)
    online = gsnr_from_sq_norms(snapshots.online_sq_norms(), **kw)
    reseeded = gsnr_from_sq_norms(snapshot_sq_norms(model, examples, other_snapshots, other, pad_id), **kw)
    result = {
        "rows": len(examples), "members": config.num_members, "epochs": config.num_epochs,
        "lora_init": config.lora_init, "seconds": time.perf_counter() - start,
        "spearman_gsnr": spearman(snap.gsnr, online.gsnr), "top10_overlap": top_overlap(snap.gsnr, online.gsnr),
        "spearman_early": spearman(snap.early, online.early), "spearman_late": spearman(snap.late, online.late),
        "reseeded_spearman_gsnr": spearman(snap.gsnr, reseeded.gsnr),
        "reseeded_top10_overlap": top_overlap(snap.gsnr, reseeded.gsnr),
        "negative_drop_share": {"snapshot": snap.negative_drop_share, "online": online.negative_drop_share},
        # the scores the agreements are computed from, per row, so that they can be checked
        "gsnr": {"snapshot": snap.gsnr.tolist(), "online": online.gsnr.tolist(), "reseeded": reseeded.gsnr.tolist()},
    }
    say("== online mode: norms read off the training steps vs snapshot passes, same members ==")
    say(f"rows: {len(examples)}, M={config.num_members}, T={config.num_epochs}, lora_init {config.lora_init}, "
        f"{config.precision}, {args.proxy} on {device.type}, {result['seconds']:.0f} s")
    say(f"online vs snapshot: Spearman of gsnr {result['spearman_gsnr']:.3f}; top-10% overlap "
        f"{result['top10_overlap']:.0%}; Spearman of the mean norm: early {result['spearman_early']:.3f}, late "
        f"{result['spearman_late']:.3f}")
    say(f"yardstick, snapshot vs snapshot with other seeds: Spearman of gsnr {result['reseeded_spearman_gsnr']:.3f}; "
        f"top-10% overlap {result['reseeded_top10_overlap']:.0%}")
    say(f"negative drop share: snapshot {snap.negative_drop_share:.0%}, online {online.negative_drop_share:.0%}")
    return result


# -- member workers: the members' processes side by side with one process ------------------------------
def section_workers(args: argparse.Namespace) -> dict[str, Any]:
    """`train_ensemble` (and snapshot scoring) with `member_workers` 1 vs `--workers`, same rows and config,
    interleaved; the workers' spawn start-up counts. Their norms must equal one process's."""
    model, device, config, examples, pad_id = proxy_and_rows(args, args.workers_rows, num_members=args.workers_members)

    def run(workers: int) -> Callable[[], np.ndarray]:
        def fit_and_score() -> np.ndarray:
            this = replace(config, member_workers=workers)
            snapshots = train_ensemble(model, examples, this, pad_id, progress=False)
            scorer = ensemble_scorer(model, snapshots, this, pad_id, workers=workers)
            try:
                return scorer.sq_norms(examples, progress=False)
            finally:
                scorer.close()
        return fit_and_score

    names = {1: "1 process", args.workers: f"{args.workers} workers"}
    seconds, results = interleaved({names[k]: run(k) for k in names}, args.rounds, device)
    one, many = names[1], names[args.workers]
    result = {
        "rows": len(examples), "members": config.num_members, "workers": args.workers, "device": device.type,
        "torch_threads": torch.get_num_threads(), "seconds": seconds,
        "speedup": statistics.median(round_ratios(seconds[one], seconds[many])),
        "max_rel_diff": max_rel_diff(results[many], results[one]),
    }
    say_side_by_side("member workers: train + snapshot-score the ensemble in k processes vs one",
                     f"rows: {len(examples)}, M={config.num_members}, {args.proxy} on {device.type}, "
                     f"{result['torch_threads']} torch threads in all", seconds,
                     f"{args.workers} workers vs one process: speed-up {result['speedup']:.2f}x; norms equal to "
                     f"{result['max_rel_diff']:.1e}")
    return result


# -- Ray: the distributed path on one machine vs this process ------------------------------------------
def section_ray(args: argparse.Namespace) -> dict[str, Any]:
    """`GSNRScorer.score` on a `datasets.Dataset` vs `distributed.score_dataset` on a local Ray cluster
    of this machine (one training task and one scoring actor, each with every CPU), same rows and config,
    interleaved. Each variant loads the proxy itself (Ray: once in the task, once in the actor); the
    cluster's start-up is timed apart."""
    import ray
    from datasets import Dataset

    from gradfilter_ops import GSNRScorer, fields
    from gradfilter_ops.distributed import score_dataset

    rows = read_rows(args.data, args.ray_rows)
    config = GSNRConfig(hf_model=args.proxy, use_cache=False, device=args.device, precision=args.precision,
                        max_length=args.max_length, num_members=args.ray_members)
    started = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    startup = time.perf_counter() - started
    norms = [fields.EARLY, fields.LATE]

    def here() -> np.ndarray:
        scored = GSNRScorer(config).score(Dataset.from_list(rows), num_proc=1)
        return np.array([[row[name] for name in norms] for row in scored], dtype=float)

    def on_ray() -> np.ndarray:
        scored = score_dataset(GSNRScorer(config), ray.data.from_items(rows)).dataset.take_all()
        return np.array([[row[name] for name in norms] for row in scored], dtype=float)

    try:
        seconds, results = interleaved({"this process": here, "Ray": on_ray}, args.rounds, torch.device("cpu"))
    finally:
        ray.shutdown()
    result = {"rows": len(rows), "members": config.num_members, "max_length": config.max_length,
              "ray_startup_s": startup, "seconds": seconds,
              "ray_overhead": statistics.median(round_ratios(seconds["Ray"], seconds["this process"])),
              "max_rel_diff": max_rel_diff(results["Ray"], results["this process"])}
    say_side_by_side("Ray: distributed.score_dataset on a local cluster vs GSNRScorer.score in this process",
                     f"rows: {len(rows)}, M={config.num_members}, max_length={config.max_length}, {args.proxy}; "
                     f"Ray start-up {startup:.1f} s (not counted)", seconds,
                     f"Ray vs this process: {result['ray_overhead']:.2f}x the wall time; early and late norms "
                     f"equal to {result['max_rel_diff']:.1e}")
    return result


# -- nodes: the Ray path on 1 vs 2 nodes of a local cluster ---------------------------------------------
@contextmanager
def local_cluster(nodes: int, cpus: int):
    """A Ray cluster of `nodes` nodes on this machine (`ray.cluster_utils.Cluster`), `cpus` CPUs, a temp
    folder and a cache folder (`$GRADFILTER_CACHE_DIR`) each, with this process connected as its driver."""
    import ray
    from ray.cluster_utils import Cluster

    from gradfilter_ops.presets import CACHE_ENV_VAR

    root = Path(tempfile.mkdtemp(prefix="gsnr-nodes-", dir="/tmp"))  # short: Ray's socket paths stay < 108 chars
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = str(root)  # Ray's address file goes here, not to the machine's /tmp/ray
    (root / "ray").mkdir()
    cluster = Cluster()
    try:
        for n in range(nodes):
            cluster.add_node(num_cpus=cpus, temp_dir=str(root / f"node{n}"),
                             env_vars={CACHE_ENV_VAR: str(root / f"node{n}" / "cache")},
                             **({} if n else {"include_dashboard": False}))
        ray.init(address=cluster.address, log_to_driver=False)
        yield
    finally:
        ray.shutdown()
        cluster.shutdown()
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        shutil.rmtree(root, ignore_errors=True)


def section_nodes(args: argparse.Namespace) -> dict[str, Any]:
    """`distributed.score_dataset` on a local cluster of 1 node and of 2 nodes, `--nodes-cpus` CPUs each, with
    one training task (the members split over them) and one scoring actor per node; same rows and config,
    rounds interleaved, each on a fresh cluster whose start-up is timed apart. The scores must agree."""
    import ray

    from gradfilter_ops import GSNRScorer, fields
    from gradfilter_ops.distributed import score_dataset

    rows = read_rows(args.data, args.nodes_rows)
    config = GSNRConfig(hf_model=args.proxy, use_cache=False, device="cpu", precision=args.precision,
                        max_length=args.max_length, num_members=args.nodes_members)
    blocks = 4  # scoring batches, shared out among the actors
    names = {1: "1 node", 2: "2 nodes"}
    seconds: dict[str, list[float]] = {name: [] for name in names.values()}
    startup: dict[str, list[float]] = {name: [] for name in names.values()}
    parts: dict[str, dict[str, float]] = {}
    norms: dict[str, np.ndarray] = {}
    for _ in range(args.rounds):
        for nodes, name in names.items():
            started = time.perf_counter()
            with local_cluster(nodes, args.nodes_cpus):
                startup[name].append(time.perf_counter() - started)
                started = time.perf_counter()
                scored = score_dataset(GSNRScorer(config), ray.data.from_items(rows, override_num_blocks=blocks),
                                       concurrency=nodes, train_tasks=nodes,
                                       batch_size=math.ceil(len(rows) / blocks))
                out = sorted(scored.dataset.take_all(), key=lambda row: row["id"])
                seconds[name].append(time.perf_counter() - started)
            parts[name] = {k: scored.scorer.timings[k] for k in ("train_s", "score_s")}
            norms[name] = np.array([[row[k] for k in (fields.EARLY, fields.LATE)] for row in out], dtype=float)
    one, two = names.values()
    result = {"rows": len(rows), "members": config.num_members, "max_length": config.max_length,
              "cpus_per_node": args.nodes_cpus, "seconds": seconds, "startup_s": startup, "parts": parts,
              "rows_per_s": {name: len(rows) / statistics.median(s) for name, s in seconds.items()},
              "speedup": statistics.median(round_ratios(seconds[one], seconds[two])),
              "max_rel_diff": max_rel_diff(norms[two], norms[one])}
    say_side_by_side("nodes: distributed.score_dataset on 1 node vs 2 nodes of a local Ray cluster",
                     f"rows: {len(rows)}, M={config.num_members}, max_length={config.max_length}, {args.proxy}; "
                     f"{args.nodes_cpus} CPU(s) per node; cluster start-up (not counted): "
                     + ", ".join(f"{name} {statistics.median(s):.1f} s" for name, s in startup.items()), seconds,
                     "rows/s: " + ", ".join(f"{name} {v:.2f}" for name, v in result["rows_per_s"].items())
                     + f"; 2 nodes vs 1: speed-up {result['speedup']:.2f}x; early and late norms equal to "
                     f"{result['max_rel_diff']:.1e}")
    say("last round, train / score: " + ", ".join(f"{name} {p['train_s']:.1f} s / {p['score_s']:.1f} s"
                                                  for name, p in parts.items()))
    return result


# -- stacked members: all members in one forward vs one at a time ---------------------------------------
def count_ops(fn: Callable[[], Any]) -> int:
    """The aten operations `fn()` dispatches: on a GPU, each one is a kernel launch from the host."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.ops


def ops_per_batch(model: torch.nn.Module, examples: Sequence[Encoded], config: GSNRConfig, pad_id: int,
                  size: int) -> dict[str, int]:
    """Operations dispatched for one more batch of `size` rows: `train` (every member's training steps over
    it, all epochs) and `score` (its snapshot passes under every adapter). Each is the count for two
    batches less the count for one, so the set-up (adapters, optimizer, hooks) cancels out."""
    config = replace(config, train_batch_size=size, score_batch_size=size)
    one, two = examples[:size], examples[: 2 * size]
    train = count_ops(lambda: train_ensemble(model, two, config, pad_id, progress=False))
    snapshots = train_ensemble(model, one, config, pad_id, progress=False)
    train -= count_ops(lambda: train_ensemble(model, one, config, pad_id, progress=False))
    scorer = EnsembleScorer(model, snapshots, config, pad_id)
    try:
        score = count_ops(lambda: scorer.sq_norms(two, progress=False))
        score -= count_ops(lambda: scorer.sq_norms(one, progress=False))
    finally:
        scorer.close()
    return {"train": train, "score": score}


def section_stack(args: argparse.Namespace) -> dict[str, Any]:
    """`train_ensemble` then snapshot scoring (`EnsembleScorer.sq_norms`) with `stack_members` 1 and M,
    interleaved, same rows and config; plus the operations each dispatches per batch of rows."""
    model, device, config, examples, pad_id = proxy_and_rows(args, args.stack_rows, num_members=args.stack_members)
    stacks = {"one at a time": 1, "stacked": config.num_members}

    def run(stack: int, rows: Sequence[Encoded]) -> Callable[[], dict[str, Any]]:
        def fit_and_score() -> dict[str, Any]:
            this = replace(config, stack_members=stack)
            train_s, snapshots = timed(lambda: train_ensemble(model, rows, this, pad_id, progress=False), device)
            scorer = EnsembleScorer(model, snapshots, this, pad_id)
            try:
                score_s, norms = timed(lambda: scorer.sq_norms(rows, progress=False), device)
            finally:
                scorer.close()
            return {"train_s": train_s, "score_s": score_s, "norms": norms}
        return fit_and_score

    size = min(config.train_batch_size, config.score_batch_size, len(examples) // 2)
    ops = {name: ops_per_batch(model, examples, replace(config, stack_members=stack), pad_id, size)
           for name, stack in stacks.items()} if args.stack_ops else None
    seconds, results = interleaved({name: run(stack, examples) for name, stack in stacks.items()}, args.rounds, device)
    parts = {name: {part: results[name][part] for part in ("train_s", "score_s")} for name in stacks}  # first round
    one, many = results["one at a time"]["norms"], results["stacked"]["norms"]
    lengths = [len(e.input_ids) for e in examples]
    result = {
        "rows": len(examples), "members": config.num_members, "device": device.type, "seconds": seconds,
        "parts": parts, "speedup": statistics.median(round_ratios(seconds["one at a time"], seconds["stacked"])),
        "train_speedup": parts["one at a time"]["train_s"] / parts["stacked"]["train_s"],
        "score_speedup": parts["one at a time"]["score_s"] / parts["stacked"]["score_s"],
        "max_rel_diff": float(np.max(np.abs(many - one) / np.abs(one))),
        "ops_per_batch": ops, "ops_ratio": {part: ops["one at a time"][part] / ops["stacked"][part]
                                            for part in ("train", "score")} if ops else None,
        "train_tokens": {name: training_tokens(lengths, config, stack) for name, stack in stacks.items()},
    }
    say(f"== stacked members: all {config.num_members} members in one forward vs one at a time ==")
    say(f"rows: {len(examples)}, M={config.num_members}, T={config.num_epochs}, {args.proxy} on {device.type}, "
        f"{str(resolve_precision(config.precision, device).autocast_dtype or torch.float32).replace('torch.', '')}")
    for r in range(args.rounds):
        say(f"round {r + 1}: " + "  ".join(f"{name} {s[r]:.2f} s" for name, s in seconds.items()))
    say("first round, train / score: " + ", ".join(f"{name} {p['train_s']:.2f} s / {p['score_s']:.2f} s"
                                                   for name, p in parts.items()))
    say(f"stacked vs one at a time: speed-up {result['speedup']:.2f}x (training {result['train_speedup']:.2f}x, "
        f"scoring {result['score_speedup']:.2f}x); norms equal to {result['max_rel_diff']:.1e}")
    say(f"training token positions (padding included): one at a time {result['train_tokens']['one at a time']}, "
        f"stacked {result['train_tokens']['stacked']}")
    if not ops:
        return result
    say(f"operations dispatched per batch of {size} rows, trained by every member / scored under every adapter: " +
        ", ".join(f"{name} {n['train']} / {n['score']}" for name, n in ops.items()) +
        f" ({result['ops_ratio']['train']:.2f}x / {result['ops_ratio']['score']:.2f}x fewer stacked)")
    return result


# -- frozen prefix: adapters on the top layers vs on every layer -----------------------------------------
def section_prefix(args: argparse.Namespace) -> dict[str, Any]:
    """`train_ensemble` then snapshot scoring with adapters on the top `--prefix-fraction` of the layers and on
    every layer (two seeds), interleaved, same rows; seconds and the G-SNR ranking's agreement."""
    from gradfilter_ops.engine.gsnr import gsnr_from_sq_norms

    model, device, config, examples, pad_id = proxy_and_rows(args, args.prefix_rows, num_members=args.prefix_members)
    variants = {"every layer": replace(config, lora_layer_fraction=1.0),
                "every layer, other seeds": replace(config, lora_layer_fraction=1.0, seed=config.seed + 1000),
                f"top {args.prefix_fraction:g}": replace(config, lora_layer_fraction=args.prefix_fraction)}

    def run(this: GSNRConfig) -> Callable[[], dict[str, Any]]:
        def fit_and_score() -> dict[str, Any]:
            train_s, snapshots = timed(lambda: train_ensemble(model, examples, this, pad_id, progress=False), device)
            scorer = EnsembleScorer(model, snapshots, this, pad_id)
            try:
                score_s, norms = timed(lambda: scorer.sq_norms(examples, progress=False), device)
            finally:
                scorer.close()
            return {"train_s": train_s, "score_s": score_s, "gsnr": gsnr_from_sq_norms(norms).gsnr}
        return fit_and_score

    seconds, results = interleaved({name: run(this) for name, this in variants.items()}, args.rounds, device)
    every, other, top = (results[name]["gsnr"] for name in variants)
    fast = f"top {args.prefix_fraction:g}"
    result = {
        "rows": len(examples), "members": config.num_members, "fraction": args.prefix_fraction, "seconds": seconds,
        "parts": {name: {part: results[name][part] for part in ("train_s", "score_s")} for name in variants},
        "speedup": statistics.median(round_ratios(seconds["every layer"], seconds[fast])),
        "spearman_vs_every_layer": spearman(top, every), "spearman_other_seeds": spearman(other, every),
        "top10_overlap_vs_every_layer": top_overlap(top, every), "top10_overlap_other_seeds": top_overlap(other, every),
    }
    say(f"== frozen prefix: adapters on the top {args.prefix_fraction:g} of the layers vs on every layer ==")
    say(f"rows: {len(examples)}, M={config.num_members}, T={config.num_epochs}, {args.proxy} on {device.type}, "
        f"{resolve_precision(config.precision, device).name}")
    for r in range(args.rounds):
        say(f"round {r + 1}: " + "  ".join(f"{name} {s[r]:.2f} s" for name, s in seconds.items()))
    say("first round, train / score: " + ", ".join(f"{name} {p['train_s']:.2f} s / {p['score_s']:.2f} s"
                                                   for name, p in result["parts"].items()))
    say(f"{fast} vs every layer: speed-up {result['speedup']:.2f}x; "
        f"G-SNR Spearman {result['spearman_vs_every_layer']:.3f}"
        f", top-10% overlap {result['top10_overlap_vs_every_layer']:.0%} (every layer with other seeds: "
        f"{result['spearman_other_seeds']:.3f}, {result['top10_overlap_other_seeds']:.0%})")
    return result


# -- command line ---------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--proxy", default="smollm2-135m", help="proxy: preset, local folder or Hub id")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Alpaca-style jsonl")
    parser.add_argument("--sections", default="norms,e2e,memory", help=f"comma-separated, from {','.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help=f"small sizes for a smoke test: {QUICK}")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="for norms, memory and online; e2e runs the op's defaults")
    parser.add_argument("--max-length", type=int, default=GSNRConfig.max_length,
                        help="tokens per row, for norms, memory and online; e2e runs the op's defaults")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--batch-size", type=int, default=16, help="norms: rows in the batch")
    parser.add_argument("--pool", type=int, default=256, help="norms: rows bucketed by length to pick the batch from")
    parser.add_argument("--rounds", type=int, default=2, help="norms: interleaved rounds")
    parser.add_argument("--e2e-rows", type=int, default=16, help="e2e: rows, the first that fit --e2e-max-tokens")
    parser.add_argument("--e2e-max-tokens", type=int, default=96, help="e2e: skip longer rows (0: none)")
    parser.add_argument("--e2e-rounds", type=int, default=1, help="e2e: G-SNR runs per mode, each between two IFD runs")
    parser.add_argument("--e2e-modes", default="snapshot,online", help="e2e: score modes of gsnr_scorer to time")
    parser.add_argument("--mem-rows", type=int, default=16, help="memory: N (>= the batch size of 16, so both fill it)")
    parser.add_argument("--mem-members", type=int, default=2, help="memory: M >= 2 (memory does not grow with M)")
    parser.add_argument("--online-rows", type=int, default=96, help="online: rows")
    parser.add_argument("--online-members", type=int, default=4, help="online: M")
    parser.add_argument("--workers", type=int, default=2, help="workers: member_workers to compare with 1")
    parser.add_argument("--workers-rows", type=int, default=32, help="workers: rows")
    parser.add_argument("--workers-members", type=int, default=2, help="workers: M")
    parser.add_argument("--head-rows", type=int, default=8, help="head: rows of --max-length random tokens")
    parser.add_argument("--stack-rows", type=int, default=48, help="stack: rows")
    parser.add_argument("--prefix-rows", type=int, default=64, help="prefix: rows")
    parser.add_argument("--prefix-members", type=int, default=GSNRConfig.num_members, help="prefix: M")
    parser.add_argument("--prefix-fraction", type=float, default=0.25, help="prefix: lora_layer_fraction")
    parser.add_argument("--stack-members", type=int, default=GSNRConfig.num_members, help="stack: M")
    parser.add_argument("--stack-ops", type=int, default=1, choices=(0, 1),
                        help="stack: also count the operations per batch (1), which trains 2 x 3 more times")
    parser.add_argument("--ray-rows", type=int, default=32, help="ray: rows")
    parser.add_argument("--ray-members", type=int, default=GSNRConfig.num_members, help="ray: M")
    parser.add_argument("--nodes-rows", type=int, default=32, help="nodes: rows")
    parser.add_argument("--nodes-members", type=int, default=2, help="nodes: M (split over one task per node)")
    parser.add_argument("--nodes-cpus", type=int, default=1, help="nodes: CPUs per node")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--head-child", choices=("chunked", "whole"), help=argparse.SUPPRESS)
    if "--quick" in (sys.argv[1:] if argv is None else argv):
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return {}
    if args.head_child:
        head_child(args)
        return {}
    results: dict[str, Any] = {"machine": machine(), "command": " ".join(["tools/bench_speed.py", *(
        sys.argv[1:] if argv is None else argv)])}
    say(f"machine: {results['machine']}")
    runners = {"norms": section_norms, "e2e": section_e2e, "memory": section_memory, "online": section_online,
               "workers": section_workers, "head": section_head, "stack": section_stack, "ray": section_ray,
               "nodes": section_nodes, "prefix": section_prefix}
    for name in args.sections.split(","):
        before = load_avg()
        start = time.perf_counter()
        results[name] = runners[name](args)
        results[name]["load_avg"] = [before, load_avg()]
        say(f"({name}: {time.perf_counter() - start:.0f} s wall; load average before {before}, after {load_avg()})")
        say()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
