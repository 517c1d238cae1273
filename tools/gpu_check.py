#!/usr/bin/env python
"""GPU check of G-SNR scoring at Alpaca scale (GitHub issue 3): one command on one GPU.

    python tools/gpu_check.py --out gpu_check.json                        # one H200: target < 10 min
    python tools/gpu_check.py --examples 64 --tiny --out /tmp/check.json  # CPU smoke test, seconds

It runs the scorer's own code on synthetic rows:
- data: `--examples` token sequences with Alpaca-like lengths (seeded, see `alpaca_like_examples`);
- proxy: GPT-2 124M's architecture (12 layers, width 768, vocabulary 50257) with random weights,
  which cost the same as trained ones; `--tiny`: 2 layers of width 32, 1000 tokens, rows cut to 128;
- settings: the `GSNRConfig` defaults (M = 4 members, T = 2 epochs, batch 16, r = 8, max_length 512),
  precision `auto` (bf16 autocast on CUDA, fp32 on CPU);
- phases: `micro` (bench_speed's sections 1 and 2 on one batch: batched norms vs a one-example loop
  and vs a training step), `train` (`train_ensemble`), `score` (`EnsembleScorer.sq_norms` per 256-row
  chunk, as the op's map batches, then `gsnr_from_sq_norms`); with `--score-mode online` the norms
  are recorded during `train` and `score` only reads them; with `--count-ops`, first `ops` (the
  operations, each a kernel launch, that one more batch costs in training and in scoring);
- `--stack-members` (default: all members on CUDA, `GSNRConfig.stack_members`) stacks members in
  one forward; `--stack-members 1` trains and scores them one at a time.

It reports the wall time of each phase, the time per training step and per scoring pass (in each
worker's own time with `--member-workers`), examples per second, FLOPs (bench_speed's accounting,
arithmetic and as executed with padding), the achieved FLOP/s and its share of the GPU's dense bf16
peak. The JSON at `--out` is rewritten after every phase, so a run cut short says how far it got.
Needs torch (a CUDA build for the GPU), transformers, peft, numpy, loguru and tqdm; no Data-Juicer,
no Hub, no tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

import bench_speed  # noqa: E402  (tools/, next to this file)
from gradfilter_ops import fields  # noqa: E402
from gradfilter_ops.config import SCORE_MODES, GSNRConfig  # noqa: E402
from gradfilter_ops.engine import adapters_per_pass, ensemble_scorer, stack_size, train_ensemble  # noqa: E402
from gradfilter_ops.engine.gsnr import gsnr_from_sq_norms  # noqa: E402
from gradfilter_ops.prompts import Encoded, truncate  # noqa: E402
from gradfilter_ops.proxy import freeze, resolve_device  # noqa: E402

ALPACA_ROWS = 52_000
TARGET_S = 600
# Dense bf16 peak in TFLOP/s, matched against the device name in this order.
PEAK_BF16_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0))


def alpaca_like_examples(n: int, vocab_size: int, max_length: int, seed: int) -> list[Encoded]:
    """Random token ids shaped like Alpaca rows in GPT-2 tokens: the prompt template (40 tokens, 10
    more with an input block), an instruction (log-normal, median 13), an input for 40 % of the rows
    (median 20), a response (log-normal, median 45, a long tail) and EOS; cut to `max_length` as the
    core cuts (`prompts.truncate`). Mean about 140 tokens, as Alpaca with its template."""
    rng = np.random.default_rng(seed)
    instruction = np.rint(rng.lognormal(np.log(13), 0.5, n))
    context = np.where(rng.random(n) < 0.4, 10 + np.rint(rng.lognormal(np.log(20), 0.9, n)), 0)
    prompts = (40 + instruction + context).astype(int)
    responses = (1 + np.rint(rng.lognormal(np.log(45), 0.9, n))).astype(int)
    examples = []
    for p, r in zip(prompts, responses):
        ids = rng.integers(0, vocab_size, p + r).tolist()
        prompt, response, truncated = truncate(ids[:p], ids[p:], max_length)
        examples.append(Encoded(fields.OK, tuple(prompt + response), len(prompt), truncated))
    return examples


def random_proxy(tiny: bool) -> torch.nn.Module:
    """GPT-2 124M (transformers' `GPT2Config()` defaults) or a tiny one, randomly initialised."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tiny_config = dict(n_layer=2, n_embd=32, n_head=2, n_positions=128, vocab_size=1000, bos_token_id=999,
                       eos_token_id=999)
    config = GPT2Config(**tiny_config) if tiny else GPT2Config()
    return GPT2LMHeadModel(config).eval()


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def dump(result: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON result, rewritten after every phase")
    parser.add_argument("--examples", type=int, default=ALPACA_ROWS, help="synthetic rows")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer proxy of width 32 instead of GPT-2 124M")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--precision", default=GSNRConfig.precision, choices=("auto", "bf16", "fp32"),
                        help="GSNRConfig.precision")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument("--micro-rounds", type=int, default=3,
                        help="interleaved rounds of the micro benchmark; 0 skips it")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, if not in the table")
    parser.add_argument("--score-mode", default="snapshot", choices=SCORE_MODES,
                        help="online: the norms come with training and the score phase only reads them")
    parser.add_argument("--score-batch-size", type=int, help="rows per scoring pass (default: GSNRConfig's)")
    parser.add_argument("--count-ops", action="store_true",
                        help="phase `ops`: operations dispatched (kernel launches) per batch trained and scored")
    parser.add_argument("--stack-members", type=int, default=GSNRConfig.stack_members,
                        help="members per stacked forward (default: GSNRConfig's, all of them on CUDA)")
    parser.add_argument("--member-workers", type=int, default=GSNRConfig.member_workers,
                        help="processes that train and score members at once (GSNRConfig.member_workers)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = resolve_device(args.device)
    started = time.perf_counter()
    result: dict[str, Any] = {"status": "running", "command": " ".join(["tools/gpu_check.py", *(
        sys.argv[1:] if argv is None else argv)]), "machine": bench_speed.machine(), "phases": {}}

    def phase(name: str, values: dict[str, Any]) -> None:
        result["phases"][name] = values
        result["elapsed_s"] = time.perf_counter() - started
        dump(result, args.out)
        print(f"gpu_check: {name}: {json.dumps(values)}", file=sys.stderr, flush=True)

    model = freeze(random_proxy(args.tiny), device)
    speed = {"score_batch_size": args.score_batch_size} if args.score_batch_size else {}
    config = GSNRConfig(hf_model="random GPT-2", device=device.type, precision=args.precision,
                        score_mode=args.score_mode,
                        member_workers=args.member_workers, stack_members=args.stack_members, **speed)
    stack = stack_size(config, device)
    pad_id = model.config.eos_token_id
    examples = alpaca_like_examples(args.examples, model.config.vocab_size,
                                    min(config.max_length, model.config.n_positions), args.seed)
    lengths = np.array([len(e.input_ids) for e in examples])
    weights = bench_speed.matmul_weights(model)
    result.update(examples=len(examples), tiny=args.tiny, members=config.num_members, epochs=config.num_epochs,
                  score_mode=config.score_mode, score_batch_size=config.score_batch_size,
                  member_workers=config.member_workers, stack_members=stack,
                  weights={"decoder": weights[0], "lm_head": weights[1]},
                  tokens={"mean": float(lengths.mean()), "median": float(np.median(lengths)),
                          "p99": float(np.percentile(lengths, 99)), "max": int(lengths.max()),
                          "response_mean": float(np.mean([e.num_response for e in examples]))})

    if args.micro_rounds > 0:
        batch = bench_speed.pick_batch(examples[:4096], config.score_batch_size)
        phase("micro", bench_speed.compare_norm_passes(model, batch, pad_id, config, args.micro_rounds))

    if args.count_ops:
        rows = min(config.train_batch_size, config.score_batch_size)
        phase("ops", {"batch_rows": rows, **bench_speed.ops_per_batch(model, examples, config, pad_id, rows)})

    train_s, snapshots = bench_speed.timed(lambda: train_ensemble(model, examples, config, pad_id), device)
    steps = len(bench_speed.training_batches(lengths.tolist(), config))  # all members and epochs
    forward_steps = steps / stack  # a stacked step trains `stack` members
    phase("train", {"seconds": train_s, "steps": steps, "forward_steps": forward_steps,
                    "ms_per_step": 1000 * train_s * min(config.member_workers, config.num_members) / forward_steps,
                    "row_passes_per_s": len(examples) * config.num_epochs * config.num_members / train_s})

    def score() -> np.ndarray:
        if config.score_mode == "online":
            return snapshots.online_sq_norms()
        scorer = ensemble_scorer(model, snapshots, config, pad_id, workers=config.member_workers)
        try:
            return np.concatenate([scorer.sq_norms(examples[i: i + bench_speed.SCORE_CHUNK], progress=False)
                                   for i in range(0, len(examples), bench_speed.SCORE_CHUNK)], axis=2)
        finally:
            scorer.close()

    score_s, sq_norms = bench_speed.timed(score, device)
    parts = gsnr_from_sq_norms(sq_norms, norm=config.norm, noise=config.noise, eps=config.eps)
    passes = 0 if config.score_mode == "online" else (
        2 * config.num_members * len(bench_speed.scoring_batches(lengths.tolist(), config))
        // adapters_per_pass(config, device))
    phase("score", {"seconds": score_s, "passes": passes,
                    "ms_per_pass": 1000 * score_s * min(config.member_workers, config.num_members) / passes
                    if passes else None,
                    "finite_share": float(np.isfinite(parts.gsnr).mean()),
                    "negative_drop_share": parts.negative_drop_share})

    wall = train_s + score_s
    flops = {"arithmetic": bench_speed.gsnr_flops(weights, examples, config),
             "executed": bench_speed.executed_flops(weights, examples, config, stack)}
    peak = peak_flops(device, args.peak_tflops)
    result.update(
        status="done", wall_s=wall, examples_per_s=len(examples) / wall, flops=flops,
        achieved_flops_per_s=flops["executed"] / wall, useful_flops_per_s=flops["arithmetic"] / wall,
        padding_share=1 - flops["arithmetic"] / flops["executed"], peak_flops_per_s=peak,
        share_of_peak=flops["executed"] / wall / peak if peak else None,
        target_s=TARGET_S, target_met=wall < TARGET_S if len(examples) >= ALPACA_ROWS else None,
        gpu_peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    )
    result["elapsed_s"] = time.perf_counter() - started
    dump(result, args.out)
    print(json.dumps({k: v for k, v in result.items() if k != "phases"}, indent=2))
    return result


if __name__ == "__main__":
    main()
