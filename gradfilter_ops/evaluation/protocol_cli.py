"""`gsnr-eval protocol`: the downstream verdict over several pools, held-out sets, budgets and seeds.

    gsnr-eval protocol --spec tools/data/protocol.yaml --hf-model smollm2-135m --set max_length=128 \
        --seeds 3 --steps 30 --batch-size 8 --out docs/eval/protocol

Each pool of the protocol file (`protocol.ProtocolSpec`) is scored once with every signal (cached in
OUT/<pool>/scores, with its corruption report), its rows are embedded with the proxy and clustered,
and every selection at every budget, and the full pool, is fine-tuned with one recipe per seed. Each
fine-tune's loss curve on the pool's three held-out sets goes to OUT/records.jsonl as soon as it ends,
so a killed run resumes where it stopped; `protocol_report` writes OUT/report.md and OUT/verdict.json.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from jsonargparse import ArgumentParser

from ..timing import Stopwatch

PROG = "gsnr-eval protocol"


def build_parser() -> ArgumentParser:
    from .downstream_cli import add_recipe_arguments
    from .protocol import BASELINES, GSNR_SELECTIONS

    p = ArgumentParser(prog=PROG, description="The downstream verdict: several pools of different make-up, each "
                       "with an in-distribution, an out-of-distribution and a good-answers held-out set; every "
                       "selection fine-tuned with one recipe over several seeds; wins, ties and losses of each "
                       "G-SNR reading against each baseline.")
    p.add_argument("--spec", type=str, required=True, help="the protocol file (YAML): sources, good answers, pools")
    p.add_argument("--seed", type=int, default=0, help="seeds the draw of the pools, the corruptions and random; "
                   "the fine-tunes use seed, seed + 1, ...")
    p.add_argument("--seeds", type=int, default=3, help="fine-tunes per selection")
    p.add_argument("--pools", type=Optional[list[str]], help="run only these pools of the spec (null: all)")
    p.add_argument("--budgets", type=Optional[list[float]], help="shares of each pool to select (null: the spec's)")
    p.add_argument("--hf-model", type=Optional[str], help="the proxy that scores (null: the smollm2-135m preset)")
    p.add_argument("--set", type=str, action="append", metavar="KEY=VALUE",
                   help="a GSNRConfig override for the scoring (and the fields, max_length, device and precision "
                        "of the fine-tune), the value read as JSON; repeat")
    p.add_argument("--target", type=Optional[str], help="the fine-tuned model (null: the proxy)")
    p.add_argument("--selections", type=Optional[list[str]],
                   help="what to fine-tune on at each budget (the full pool is always added; null: every G-SNR "
                        f"reading and baseline: {', '.join(GSNR_SELECTIONS + BASELINES)}, less the noise reading "
                        "that is the run's own `G-SNR`)")
    p.add_argument("--reading", type=str, action="append", metavar="NAME=JSON",
                   help="another scoring setting judged as a G-SNR reading, e.g. "
                        "'G-SNR 1/4 layers={\"lora_layer_fraction\": 0.25}': the pool is scored again with these "
                        "GSNRConfig overrides (cached in OUT/<pool>/scores-<k>) and its G-SNR is one more selection "
                        "and candidate of the rule; repeat")
    add_recipe_arguments(p)
    p.add_argument("--skip-ifd", action="store_true", help="leave out the Data-Juicer IFD baseline")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap rounds of each pool's corruption report")
    p.add_argument("--out", type=str, default="protocol_out", help="output folder (resumed when it holds a run "
                   "of the same protocol, config and recipe)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


def spec_identity(spec) -> dict[str, Any]:
    """What the records depend on in the protocol file: its numbers and the content of its data files, not
    where they lie, so that a folder of records moved to another checkout or machine resumes there."""
    import hashlib

    def content(path) -> str:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]

    out = {k: v for k, v in spec.to_dict().items() if k != "budgets"}
    out["sources"] = {name: content(path) for name, path in spec.sources.items()}
    out["good"] = content(spec.good)
    return out


def _check_resume(out_dir: Path, identity: dict[str, Any]) -> None:
    """OUT/protocol.json names what the folder's records were made with; a run with anything else stops
    instead of mixing records."""
    path = out_dir / "protocol.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != identity:
            differ = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
            raise SystemExit(f"{out_dir} holds a run with other {differ}; use another --out.")
    else:
        path.write_text(json.dumps(identity, indent=2))


def parse_readings(items: Sequence[str], hf_model: Optional[str], overrides: dict[str, Any]) -> dict[str, Any]:
    """`--reading NAME=JSON` items as {name: the GSNRConfig that scores it}: the run's config with the
    reading's overrides on top. A name must start with `G-SNR` and name no other selection."""
    from .arguments import build_config
    from .protocol import BASELINES, GSNR_SELECTIONS

    readings: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        try:
            changes = json.loads(value) if sep else None
        except json.JSONDecodeError:
            changes = None
        if not isinstance(changes, dict) or not changes:
            raise SystemExit(f"--reading expects NAME={{\"option\": value, ...}}, got {item!r}.")
        if not name.startswith("G-SNR") or name in GSNR_SELECTIONS + BASELINES or name in readings:
            raise SystemExit(f"--reading {name!r}: a reading's name starts with 'G-SNR' and names no other selection.")
        readings[name] = build_config(hf_model, {**overrides, **changes})
    return readings


def score_pool(pool, config, out_dir: Path, proxy, skip_ifd: bool, seed: int, bootstrap: int,
               progress: bool, readings: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """A pool's raw scores (cached), its signals, its groups for the stratified selections, and how
    well each signal ranks the clean rows above the corrupted ones (OUT/<pool>/scores/separation.json).
    Each extra reading scores the pool again with its own config (OUT/<pool>/scores-<k>, the proxy's
    perplexity and IFD reused) and adds its G-SNR as a signal."""
    from .. import fields
    from ..clusters import row_groups
    from ..embeddings import pooled_hidden_states
    from ..precision import resolve as resolve_precision
    from ..selection import length_bins, length_groups
    from .protocol import pool_signals, score_statuses
    from .runs import compute
    from .signals import evaluate_signal

    folder = out_dir / pool.name / "scores"
    timings: dict[str, float] = {}
    result = compute(pool.rows, config, folder, skip_ifd, True, progress, timings,
                     snapshot_pass=config.score_mode == "snapshot")
    folder.mkdir(parents=True, exist_ok=True)
    embedded = folder / "embeddings.npy"
    if embedded.exists():
        embeddings = np.load(embedded)
    else:
        start = Stopwatch()
        model, formatter, pad_id = proxy
        autocast = resolve_precision(config.precision, next(model.parameters()).device).autocast_dtype
        embeddings = pooled_hidden_states(model, [formatter.encode(r) for r in pool.rows], pad_id,
                                          config.score_batch_size, autocast)
        np.save(embedded, embeddings)
        timings["embeddings"] = start.seconds
    signals = pool_signals(result, config, seed)
    for k, (name, reading_config) in enumerate((readings or {}).items(), 1):
        started = Stopwatch()
        extra = compute(pool.rows, reading_config, out_dir / pool.name / f"scores-{k}", True, True, progress, {},
                        baselines_from=str(folder), snapshot_pass=reading_config.score_mode == "snapshot")
        score = pool_signals(extra, reading_config, seed)["G-SNR"]
        signals[name] = dataclasses.replace(score, name=name, note=f"{score.note}; {name}")
        timings[f"scoring {name}"] = started.seconds
    kinds, rng = [r["eval_corruption"] for r in pool.rows], np.random.default_rng(seed)
    bins = length_bins(result["response_tokens"])
    separation = {name: evaluate_signal(s, kinds, rng, bootstrap, signals["G-SNR"].score, bins)
                  for name, s in signals.items()}
    (folder / "separation.json").write_text(json.dumps(separation, indent=1, default=float))
    # the selections' groups as the top-k ops make them: `diversity: length` and `diversity: clusters`
    groups = {"length": length_groups([int(t) for t in result["response_tokens"]],
                                      score_statuses(signals["G-SNR"].score)),
              "clusters": row_groups(embeddings, clusters=True, num_clusters=config.num_clusters, threshold=None,
                                     seed=config.seed)[fields.CLUSTER]}
    return {"signals": signals, "groups": groups, "timings": timings, "separation": separation}


def run(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Parse `argv` (the arguments after `protocol`) and run; returns what verdict.json holds."""
    from ..precision import resolve as resolve_precision
    from ..proxy import resolve_device
    from .arguments import build_config, parse_set, quote
    from .downstream import load_target
    from .finetune import FinetuneRecipe, target_lora
    from .protocol import ProtocolSpec, draw_pools, load_records
    from .protocol_report import write_report

    argv = list(sys.argv[2:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.seeds < 1:
        raise SystemExit("--seeds must be >= 1")
    spec = ProtocolSpec.load(args.spec)
    config = build_config(args.hf_model, parse_set(args.set or []))
    readings = parse_readings(args.reading or [], args.hf_model, parse_set(args.set or []))
    recipe = FinetuneRecipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneRecipe)})
    budgets = args.budgets or spec.budgets
    if not all(0 < b < 1 for b in budgets):
        raise SystemExit("every --budgets value must be in (0, 1)")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # What the records depend on; the pools, budgets, seeds and selections run may grow from run to run.
    precision = resolve_precision(config.precision, resolve_device(config.device)).name
    _check_resume(out_dir, {"spec": spec_identity(spec),
                            "config": config.to_dict(), "recipe": dataclasses.asdict(recipe), "seed": args.seed,
                            "target": args.target, "skip_ifd": args.skip_ifd, "precision": precision})
    command = f"{PROG} " + " ".join(quote(a) for a in argv)
    started = Stopwatch()

    pools = draw_pools(spec, args.seed, config.instruction_field, config.input_field, config.output_field)
    if args.pools:
        unknown = sorted(set(args.pools) - {p.name for p in pools})
        if unknown:
            raise SystemExit(f"--pools: no pool {unknown} in {args.spec}")
        pools = [p for p in pools if p.name in args.pools]
    proxy = load_target(config.hf_model, config)
    target = load_target(args.target, config) if args.target else proxy
    prepared = {pool.name: prepare_pool(pool, config, recipe, budgets, args, out_dir, proxy, target, readings)
                for pool in pools}
    seeds = [args.seed + j for j in range(args.seeds)]
    records_path = out_dir / "records.jsonl"
    done = load_records(records_path)
    finetune_started = Stopwatch()
    run_finetunes(pools, prepared, seeds, target, target_lora(recipe, config, target[0]), recipe, config, done,
                  records_path, not args.quiet)

    timings = {"total": started.seconds, "fine-tunes": finetune_started.seconds,
               **{f"{name}: {k}": v for name, p in prepared.items() for k, v in p["timings"].items()}}
    spec_rows = {s.name: s.rows for s in spec.pools}
    pools_meta = {pool.name: {"rows": len(pool.rows), "corrupted": int(sum(prepared[pool.name]["corrupted"])),
                              "heldout": {k: len(v) for k, v in pool.heldout.items()},
                              "sources": dict(spec_rows[pool.name]),
                              "auroc": {name: ev["auroc"] for name, ev in prepared[pool.name]["separation"].items()},
                              "auroc_in_length_bins": {name: ev["auroc_in_length_bins"]
                                                       for name, ev in prepared[pool.name]["separation"].items()}}
                  for pool in pools}
    meta = {"command": command, "spec": spec.to_dict(), "config": config.to_dict(), "precision": precision,
            "recipe": dataclasses.asdict(recipe), "seeds": seeds, "target": args.target or config.hf_model,
            "pools": pools_meta, "timings": timings,
            "readings": {name: {k: v for k, v in c.to_dict().items() if config.to_dict().get(k) != v}
                         for name, c in readings.items()}}
    wanted = {p.name for p in pools}
    return write_report(out_dir, [r for r in done.values() if r["pool"] in wanted and r["seed"] in seeds], meta,
                        [p.name for p in pools])


def prepare_pool(pool, config, recipe, budgets: Sequence[float], args, out_dir: Path, proxy, target,
                 readings: Optional[dict[str, Any]] = None) -> dict:
    """A pool's selections at every budget, its rows and held-out rows encoded for the target, and the
    bare target's held-out losses (every fine-tune starts from them: the adapter starts as a no-op)."""
    from .corrupt import CLEAN
    from .downstream import encode_all
    from .finetune import heldout_losses
    from .protocol import default_selections, heldout_index, pool_selections

    scored = score_pool(pool, config, out_dir, proxy, args.skip_ifd, args.seed, args.bootstrap, not args.quiet,
                        readings)
    model, formatter, pad_id = target
    heldout, sets = heldout_index(pool)
    encoded_heldout = encode_all(formatter, heldout, "held-out")
    return {"selections": pool_selections(scored["signals"], scored["groups"], budgets, len(pool.rows),
                                          [*(args.selections or default_selections(config.noise)),
                                           *(readings or {})]),
            "train": encode_all(formatter, pool.rows, "pool"), "heldout": encoded_heldout, "sets": sets,
            "start": heldout_losses(model, encoded_heldout, pad_id, recipe.eval_batch_size, config.precision),
            "timings": scored["timings"], "separation": scored["separation"],
            "corrupted": [r["eval_corruption"] != CLEAN for r in pool.rows]}


def run_finetunes(pools, prepared: dict, seeds: Sequence[int], target, lora, recipe, config,
                  done: dict[tuple, dict], records_path: Path, progress: bool) -> None:
    """Fine-tune every selection of every pool with every seed that `done` lacks, seed-major (a run
    stopped early still pairs every selection of its finished seeds); each record is appended to
    `records_path` as soon as it ends. Two selections with the same rows share one fine-tune per seed."""
    from .finetune import finetune
    from .protocol import finetune_record

    model, _, pad_id = target
    total = sum(len(p["selections"]) for p in prepared.values()) * len(seeds)
    count, started = 0, Stopwatch()
    with open(records_path, "a", encoding="utf-8") as sink:
        for seed in seeds:
            for pool in pools:
                p = prepared[pool.name]
                by_rows: dict[tuple, dict] = {}
                for sel in p["selections"]:
                    count += 1
                    key, rows_key = (pool.name, sel.budget, sel.signal, seed), tuple(sel.indices.tolist())
                    if key not in done:
                        if rows_key in by_rows:
                            rec = dict(by_rows[rows_key], selection=sel.signal, budget=sel.budget)
                        else:
                            result = finetune(model, [p["train"][i] for i in sel.indices], p["heldout"], recipe,
                                              lora, seed, pad_id, config.precision, p["start"])
                            share = float(np.mean([p["corrupted"][i] for i in sel.indices]))
                            rec = finetune_record(pool.name, sel, seed, result, p["sets"], share)
                        sink.write(json.dumps(rec) + "\n")
                        sink.flush()
                        done[key] = rec
                        if progress:
                            final = {k: round(v[-1], 3) for k, v in rec["curves"].items()}
                            print(f"protocol: {count}/{total} seed {seed} {pool.name} {sel.budget} {sel.signal}: "
                                  f"{final} [{started.seconds:.0f} s]", file=sys.stderr, flush=True)
                    by_rows.setdefault(rows_key, done[key])


def main(argv: Optional[Sequence[str]] = None) -> int:
    run(argv)
    return 0
