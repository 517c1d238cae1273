"""The downstream check: does a selection train a better model? The pool is scored once with every
signal; each budget's selection of each signal, and the full pool, is fine-tuned with one recipe over
several seeds; the held-out clean rows, which no selection sees, measure the result.

`gsnr-eval downstream` (`downstream_cli`) is the command; `downstream_report` writes the tables,
curves and plot.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ..selection import rows_for_ratio
from ..timing import Stopwatch
from .finetune import FinetuneRecipe, FinetuneResult, finetune, target_lora

DEFAULT_SIGNALS = ("G-SNR", "random", "response length", "proxy perplexity", "IFD (Superfiltering)")
FULL_POOL = "full pool"


def content_key(row: Mapping[str, Any], config) -> str:
    """What a row says (the fields the prompt formatting reads), to find a held-out row in the pool."""
    from ..prompts import source

    return json.dumps(source(config, row), sort_keys=True, ensure_ascii=False)


def split_heldout(rows: Sequence[Mapping[str, Any]], heldout: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(pool, held-out): a seeded `heldout` share (< 1) or count (>= 1) of the rows held out, each part
    in file order. Done before any corruption, so the held-out rows are clean."""
    n = len(rows)
    count = int(heldout) if heldout >= 1 else int(round(heldout * n))
    if not 1 <= count < n:
        raise ValueError(f"--heldout {heldout} holds out {count} of {n} rows; it must leave at least one row "
                         "on each side.")
    picked = set(np.random.default_rng([seed, 15]).choice(n, count, replace=False).tolist())
    pool = [dict(r) for i, r in enumerate(rows) if i not in picked]
    return pool, [dict(r) for i, r in enumerate(rows) if i in picked]


def drop_heldout_rows(pool: Sequence[Mapping[str, Any]], heldout: Sequence[Mapping[str, Any]],
                      config) -> tuple[list[dict], int]:
    """The pool without any row whose content equals a held-out row's (duplicates in the data, or a
    held-out file that overlaps the pool), and how many were dropped."""
    seen = {content_key(r, config) for r in heldout}
    kept = [dict(r) for r in pool if content_key(r, config) not in seen]
    return kept, len(pool) - len(kept)


def budget_label(ratio: float) -> str:
    return f"{100 * ratio:g}%"


@dataclass
class SignalSelection:
    """The rows one signal keeps at one budget (indices into the pool, sorted)."""

    budget: str
    signal: str
    indices: np.ndarray
    rule_dropped: int = 0  # rows kept although the signal's rule drops them (IFD >= 1), to fill the budget


def select_budgets(signals: Sequence, budgets: Sequence[float], rows: int) -> list[SignalSelection]:
    """Every signal's top rows at every budget, the same count for all: a signal whose rule drops rows
    (Superfiltering's IFD >= 1) fills the budget with them last, in row order, and says how many. Scores
    are made once; each budget cuts the same ranking."""
    from .metrics import keep_scores, kept_indices

    out = []
    for ratio in budgets:
        for signal in signals:
            kept = kept_indices(signal.score, ratio)
            dropped = int((~np.isfinite(keep_scores(signal.score)[kept])).sum()) if signal.drop_non_finite else 0
            assert len(kept) == rows_for_ratio(rows, ratio)
            out.append(SignalSelection(budget_label(ratio), signal.name, kept, dropped))
    out.append(SignalSelection("all", FULL_POOL, np.arange(rows)))
    return out


def pick_signals(signals: Sequence, wanted: Sequence[str]) -> list:
    by_name = {s.name: s for s in signals}
    missing = [w for w in wanted if w not in by_name]
    if missing:
        raise ValueError(f"--signals: no signal {missing}; this run has {list(by_name)} (IFD needs no --skip-ifd).")
    return [by_name[w] for w in wanted]


def load_target(name: str, config):
    """The fine-tuned model (a preset, folder or Hub id, as `hf_model`), frozen, on the config's device,
    and the encoder of rows for it (the package's prompt formatting with the config's fields and
    `max_length`)."""
    import torch

    from ..prompts import PromptFormatter
    from ..proxy import check_proxy_limits, load_proxy

    model, tokenizer = load_proxy(name, cache_dir=config.cache_dir)
    check_proxy_limits(model, tokenizer, config.max_length)
    for p in model.parameters():
        p.requires_grad_(False)
    device = torch.device("cuda" if config.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return model.to(device), PromptFormatter(config, tokenizer), pad_id


def encode_all(formatter, rows: Sequence[Mapping[str, Any]], what: str) -> list:
    encoded = [formatter.encode(r) for r in rows]
    bad = [e.status for e in encoded if not e.ok]
    if bad:
        raise ValueError(f"{len(bad)} {what} rows cannot be encoded for the target (statuses {bad[:5]}); "
                         "clean the data first.")
    return encoded


def run_grid(model, pool_encoded: Sequence, heldout_encoded: Sequence, selections: Sequence[SignalSelection],
             recipe: FinetuneRecipe, config, seeds: Sequence[int], pad_id: int, progress: bool = True,
             timings: Optional[dict[str, float]] = None) -> list[dict[str, Any]]:
    """Fine-tune every selection with every seed; one record per pair. Two selections with the same rows
    (two signals that agree, at one seed) train once: the same rows and seed give the same curve."""
    lora = target_lora(recipe, config, model)
    done: dict[tuple, FinetuneResult] = {}
    records = []
    started = Stopwatch()
    total = len(selections) * len(seeds)
    for seed in seeds:
        for sel in selections:
            key = (tuple(sel.indices.tolist()), seed)
            reused = key in done
            if not reused:
                train = [pool_encoded[i] for i in sel.indices]
                done[key] = finetune(model, train, heldout_encoded, recipe, lora, seed, pad_id, config.precision)
            result = done[key]
            records.append({"budget": sel.budget, "signal": sel.signal, "seed": seed, "rows": len(sel.indices),
                            "reused": reused, "result": result})
            if progress:
                print(f"downstream: {len(records)}/{total} seed {seed} {sel.budget} {sel.signal}: held-out loss "
                      f"{result.heldout_loss[0]:.3f} -> {result.heldout_loss[-1]:.3f}"
                      f"{' (same rows as an earlier selection)' if reused else ''} [{started.seconds:.0f} s]",
                      file=sys.stderr, flush=True)
    if timings is not None:
        timings["fine-tunes"] = started.seconds
        timings["fine-tunes trained"] = float(len(done))
    return records
