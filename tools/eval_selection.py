#!/usr/bin/env python
"""How well does G-SNR keep corrupted rows out? Inject known corruptions into real instruction data,
score every row with G-SNR and with the usual baselines, and measure the separation.

    python tools/eval_selection.py \
        --data recipes/data/self_instruct_seed_tasks.jsonl --data tools/data/chatterbot_english_qa.jsonl \
        --rows-per-file 150 --corrupt-fraction 0.3 --seed 0 --hf-model smollm2-135m \
        --set num_members=8 --set num_epochs=3 --set max_length=160 --set precision=bf16 \
        --out docs/eval/run

What it does:
1. Reads Alpaca-style jsonl (`instruction`, optional `input`, `output`; other field names through
   `--set instruction_field=...`) and corrupts a seeded `--corrupt-fraction` of the rows, kinds
   spread evenly: `swap` (another row's response), `truncate` (first 30 % of the words), `shuffle`
   (words in random order), `repeat` (the first words looped), `echo` (the prompt copied back),
   `refusal` (a canned "as an AI I cannot" reply).
2. Scores every row with: G-SNR (this package, the config given by `--set`), random, response
   length (longer kept), proxy perplexity (the proxy's mean response-token loss, lower kept), IFD
   with Superfiltering's rule (Data-Juicer's `instruction_following_difficulty_filter` on the same
   proxy; IFD >= 1 dropped, then the highest kept), and the paper's ablations: the plain gradient norm
   (smaller kept), the raw drop and the normalized drop without the variance term.
3. Measures how each score separates clean from corrupted rows: AUROC (the chance that a random
   clean row outranks a random corrupted one; 0.5 is chance) with a bootstrap 95 % interval, and the
   share of corrupted rows among the top 10 % and 30 % kept. Overall and per corruption kind.
4. Trains the LoRA ensemble once, keeps every epoch's adapters, and takes the per-example gradient
   norms with respect to A and B separately (and, as an experiment, with respect to the adapted
   frozen weight W), so that `grad_params`, `norm`, `noise`, `eps`, the snapshot pair and
   `num_members` (the first M members are exactly what `num_members=M` trains) are all compared
   from one training run ("readings" table).
5. Writes `report.md` (tables), `roc.png` (ROC curves and G-SNR histograms; needs matplotlib),
   `scores.jsonl` (every row with every score), `readings.csv` and `norms.npz` (the raw norms, so
   `--reuse` re-analyses without training again).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

KINDS = ("swap", "truncate", "shuffle", "repeat", "echo", "refusal")
CLEAN = "clean"
TRUNCATE_KEEP = 0.3  # share of the words a truncated response keeps
REPEAT_PHRASE_WORDS = 6  # a degenerate response loops its first words
REFUSALS = (
    "I'm sorry, but as an AI language model, I cannot help with that request.",
    "As an AI language model, I do not have personal opinions or the ability to do that.",
    "I apologize, but I am unable to provide an answer to this question.",
    "Sorry, I can't assist with that.",
    "I'm sorry, I don't understand the question. Could you please rephrase it?",
)
DEFAULT_CONFIG = {"hf_model": "smollm2-135m", "device": "cpu"}


# ------------------------------------------------------------------------------------------------
# data and corruptions
# ------------------------------------------------------------------------------------------------

def read_jsonl(path: str | Path) -> list[dict]:
    from gradfilter_ops.cache import read_jsonl as read_rows  # errors name the file and the line

    return read_rows(path)


def load_rows(paths: Sequence[str | Path], rows_per_file: Optional[int] = None, seed: int = 0,
              instruction_field: str = "instruction", output_field: str = "output") -> list[dict]:
    """Rows with a non-empty instruction and response from each file; at most `rows_per_file` of each
    (a seeded sample, kept in file order)."""
    rows: list[dict] = []
    for number, path in enumerate(paths):
        usable = [r for r in read_jsonl(path)
                  if isinstance(r.get(instruction_field), str) and r[instruction_field].strip()
                  and isinstance(r.get(output_field), str) and r[output_field].strip()]
        if rows_per_file is not None and len(usable) > rows_per_file:
            picked = np.random.default_rng([seed, number]).choice(len(usable), rows_per_file, replace=False)
            usable = [usable[i] for i in sorted(picked)]
        rows.extend(usable)
    return rows


def _words(text: str) -> list[str]:
    return text.split()


def corrupt_response(kind: str, response: str, prompt: str, rng: np.random.Generator,
                     donor: Optional[str] = None) -> str:
    """The corrupted response of one row. Every kind returns text that differs from `response`."""
    words = _words(response)
    if kind == "swap":
        if donor is None or donor.strip() == response.strip():
            raise ValueError("`swap` needs a donor response that differs from the row's own.")
        return donor
    if kind == "truncate":
        if len(words) >= 2:
            return " ".join(words[: max(1, int(len(words) * TRUNCATE_KEEP))])
        return response.strip()[: max(1, len(response.strip()) // 3)]
    if kind == "shuffle":
        units = words if len(set(words)) >= 2 else list(response.strip())
        joiner = " " if len(set(words)) >= 2 else ""
        if len(set(units)) < 2:
            return response + " " + response  # nothing to shuffle: degenerate anyway
        for _ in range(100):
            order = rng.permutation(len(units))
            shuffled = [units[i] for i in order]
            if shuffled != units:
                return joiner.join(shuffled)
        return joiner.join(reversed(units))
    if kind == "repeat":
        phrase = words[:REPEAT_PHRASE_WORDS] or [response.strip()]
        times = max(3, math.ceil(len(words) / len(phrase)))
        return " ".join(phrase * times)
    if kind == "echo":
        return prompt
    if kind == "refusal":
        choices = [r for r in REFUSALS if r != response.strip()]
        return choices[int(rng.integers(len(choices)))]
    raise ValueError(f"Unknown corruption kind {kind!r}; known: {list(KINDS)}.")


def corrupt_dataset(rows: Sequence[Mapping[str, Any]], fraction: float, seed: int,
                    kinds: Sequence[str] = KINDS, instruction_field: str = "instruction",
                    input_field: str = "input", output_field: str = "output") -> list[dict]:
    """A copy of `rows` in which round(fraction * N) seeded rows are corrupted, the kinds spread evenly.

    Each row gets `eval_corruption` (`clean` or the kind), `eval_index` (its position) and, when
    corrupted, `eval_original_output`. A swapped response comes from the original response of another
    row. The same rows, kinds and seed give the same result.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"--corrupt-fraction must be in [0, 1), got {fraction}.")
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"Unknown corruption kind {kind!r}; known: {list(KINDS)}.")
    rng = np.random.default_rng(seed)
    n = len(rows)
    n_bad = int(round(fraction * n))
    bad = rng.choice(n, n_bad, replace=False) if n_bad else np.array([], dtype=int)
    assigned = [kinds[i % len(kinds)] for i in range(n_bad)]
    assigned = [assigned[i] for i in rng.permutation(n_bad)]
    kind_of = {int(i): k for i, k in zip(bad, assigned)}
    originals = [str(r[output_field]) for r in rows]
    out = []
    for i, row in enumerate(rows):
        new = dict(row)
        new["eval_index"] = i
        kind = kind_of.get(i, CLEAN)
        new["eval_corruption"] = kind
        if kind != CLEAN:
            instruction = str(row[instruction_field])
            context = row.get(input_field)
            prompt = instruction + (f"\n{context}" if isinstance(context, str) and context.strip() else "")
            donor = None
            if kind == "swap":
                candidates = [j for j in range(n) if j != i and originals[j].strip() != originals[i].strip()]
                donor = originals[candidates[int(rng.integers(len(candidates)))]]
            new[output_field] = corrupt_response(kind, originals[i], prompt, rng, donor)
            new["eval_original_output"] = originals[i]
        out.append(new)
    return out


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------

def _clean_scores(scores: Sequence[float]) -> np.ndarray:
    """Scores as floats, higher = keep; NaN, None and -inf all rank last (as one tie)."""
    s = np.array([np.nan if v is None else v for v in scores], dtype=np.float64)
    return np.where(np.isfinite(s) | (s == np.inf), s, -np.inf)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (like scipy.stats.rankdata)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return (starts + (counts + 1) / 2.0)[inverse]


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """P(score of a random positive row > that of a random negative one), ties counted as 1/2.

    Higher score = keep; here positive = clean. Missing or non-finite scores rank last.
    """
    s = _clean_scores(scores)
    pos = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(s)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def bootstrap_auroc(scores: Sequence[float], positive: Sequence[bool], rng: np.random.Generator,
                    rounds: int = 1000) -> tuple[float, float]:
    """2.5 % and 97.5 % quantiles of the AUROC over `rounds` resamples of the rows."""
    s, pos = _clean_scores(scores), np.asarray(positive, dtype=bool)
    values = []
    for _ in range(rounds):
        idx = rng.integers(0, len(s), len(s))
        value = auroc(s[idx], pos[idx])
        if math.isfinite(value):
            values.append(value)
    if not values:
        return float("nan"), float("nan")
    return float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))


def paired_auroc_difference(first: Sequence[float], second: Sequence[float], positive: Sequence[bool],
                            rng: np.random.Generator, rounds: int = 1000) -> tuple[float, float, float]:
    """AUROC(first) - AUROC(second) on the same rows, with a paired bootstrap 95 % interval."""
    a, b, pos = _clean_scores(first), _clean_scores(second), np.asarray(positive, dtype=bool)
    diffs = []
    for _ in range(rounds):
        idx = rng.integers(0, len(a), len(a))
        d = auroc(a[idx], pos[idx]) - auroc(b[idx], pos[idx])
        if math.isfinite(d):
            diffs.append(d)
    point = auroc(a, pos) - auroc(b, pos)
    if not diffs:
        return point, float("nan"), float("nan")
    return point, float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975))


def kept_indices(scores: Sequence[float], ratio: float, drop_non_finite: bool = False) -> np.ndarray:
    """The floor(ratio * N) (at least 1) rows with the highest scores, ties by row order.

    Missing or non-finite scores rank last; with `drop_non_finite` they are never kept, so fewer rows
    may come back (Superfiltering drops IFD >= 1 before it keeps the top k).
    """
    s = _clean_scores(scores)
    k = max(1, math.floor(ratio * len(s) + 1e-9))
    order = sorted(range(len(s)), key=lambda i: (-s[i], i))
    if drop_non_finite:
        order = [i for i in order if np.isfinite(s[i])]
    return np.array(sorted(order[:k]), dtype=int)


def contamination(scores: Sequence[float], corrupted: Sequence[bool], ratio: float,
                  drop_non_finite: bool = False) -> float:
    """Share of corrupted rows among the kept top `ratio`."""
    kept = kept_indices(scores, ratio, drop_non_finite)
    return float(np.asarray(corrupted, dtype=bool)[kept].mean()) if len(kept) else float("nan")


def kind_survival(scores: Sequence[float], kinds: Sequence[str], ratio: float,
                  drop_non_finite: bool = False) -> dict[str, float]:
    """For each corruption kind, the share of its rows that make it into the kept top `ratio`."""
    kept = set(kept_indices(scores, ratio, drop_non_finite).tolist())
    out = {}
    for kind in sorted(set(kinds) - {CLEAN}):
        rows = [i for i, k in enumerate(kinds) if k == kind]
        out[kind] = sum(i in kept for i in rows) / len(rows)
    return out


# ------------------------------------------------------------------------------------------------
# G-SNR readings from raw norms
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Reading:
    """One way to turn the raw norms into a score."""

    # AB, B, A, W (gradient w.r.t. the adapted frozen weight, experimental) or online (AB, read off the
    # training steps of each epoch: score_mode online)
    params: str = "AB"
    early: int = 1
    late: int = 2
    members: int = 4
    norm: str = "l2sq"
    noise: str = "var"
    eps: float = 1e-8
    signal: str = "gsnr"  # gsnr | drop (normalized, no variance) | raw_drop | neg_late_norm | loss_drop

    def label(self) -> str:
        return (f"{self.signal} {self.params} s{self.early}-t{self.late} M{self.members} {self.norm} "
                f"{self.noise} eps={self.eps:g}")


def sq_norms_for(norms: Mapping[str, np.ndarray], epochs: Sequence[int], reading: Reading) -> np.ndarray:
    """[members, 2, N] squared norms of one reading, cut out of the per-part norms of all epochs."""
    if reading.params == "AB":
        part = norms["A"] + norms["B"]
    else:
        part = norms[reading.params]
    s, t = list(epochs).index(reading.early), list(epochs).index(reading.late)
    if reading.members > part.shape[0]:
        raise ValueError(f"Reading asks for {reading.members} members; the run trained {part.shape[0]}.")
    return part[: reading.members][:, [s, t], :]


def reading_scores(norms: Mapping[str, np.ndarray], epochs: Sequence[int], reading: Reading) -> dict[str, np.ndarray]:
    """The reading's keep-score (higher = keep) and the G-SNR parts it came from."""
    from gradfilter_ops.gsnr import gsnr_from_sq_norms

    sq = sq_norms_for(norms, epochs, reading)
    parts = gsnr_from_sq_norms(sq, norm=reading.norm, noise=reading.noise, eps=reading.eps)
    if reading.signal == "gsnr":
        score = parts.gsnr
    elif reading.signal == "drop":
        score = parts.drop
    elif reading.signal == "raw_drop":
        score = parts.early - parts.late
    elif reading.signal == "neg_late_norm":
        score = -parts.late
    elif reading.signal == "loss_drop":
        loss = norms["loss"][: reading.members]
        s, t = list(epochs).index(reading.early), list(epochs).index(reading.late)
        ls, lt = loss[:, s].mean(axis=0), loss[:, t].mean(axis=0)
        score = (ls - lt) / (ls + reading.eps)
    else:
        raise ValueError(f"Unknown signal {reading.signal!r}.")
    negative = parts.negative_drop_share
    if reading.signal == "loss_drop":  # here the drop is the loss's: the share of rows whose loss rose
        finite = np.isfinite(score)
        negative = float((score[finite] < 0).mean()) if finite.any() else 0.0
    return {"score": score, "early": parts.early, "late": parts.late, "drop": parts.drop,
            "noise": parts.noise, "gsnr": parts.gsnr, "negative_drop_share": negative}


# ------------------------------------------------------------------------------------------------
# the proxy: training with every epoch kept, per-example gradient norms by part, losses
# ------------------------------------------------------------------------------------------------

def train_all_epochs(model, examples, config, pad_id: int, progress: bool = True):
    """The package's own ensemble training (`gradfilter_ops.ensemble`), keeping every epoch's adapters.

    `train_ensemble` keeps only the early and the late epoch; here each member is trained by the same
    per-member routine with every epoch asked for, so any snapshot pair can be read off one run. The
    test suite checks that the early and late adapters equal those of `train_ensemble`. Returns
    `Snapshots` whose `epochs` are 1..num_epochs; its `online_norms` hold, for every epoch, each row's
    squared `A`+`B` norm read off that epoch's training steps (what `score_mode: online` uses).
    """
    from tqdm.auto import tqdm

    from gradfilter_ops.ensemble import Snapshots, _train_member, lora_config

    lora = lora_config(config, model)
    epochs = tuple(range(1, config.num_epochs + 1))
    steps_per_epoch = -(-len(examples) // config.train_batch_size)
    bar = tqdm(total=config.num_members * config.num_epochs * steps_per_epoch, desc="eval: training LoRA ensemble",
               disable=not progress, unit="step", mininterval=30)
    states, online = {}, {}
    recording = dataclasses.replace(config, grad_params="AB")
    for member in range(config.num_members):
        online[member] = np.full((len(epochs), len(examples)), np.nan)
        states.update(_train_member(model, lora, examples, recording, pad_id, member, epochs, bar,
                                    online_norms=online[member]))
    bar.close()
    return Snapshots(epochs=epochs, states=states, lora=lora.to_dict(), online_norms=online)


def per_example_parts(model, activations, batch, autocast_dtype=None, scaling: float = 1.0) -> dict:
    """Per-example squared gradient norms w.r.t. all LoRA `A`s, all `B`s, and the adapted weights W.

    `A` + `B` is `grad_params: AB` and `B` is `grad_params: B` of `per_example_grad_sq_norms` (the
    tests check both). `W` is the norm of the gradient w.r.t. the frozen weight each adapter sits on,
    sum_t delta_t x_t^T per layer (delta: the loss gradient at the layer's output, x: its input),
    computed with the Gram trick; it does not depend on the size of A or B, only on what the adapted
    model computes. `scaling` is the adapters' alpha / r: the gradient at B's output is scaling
    times the gradient at the layer's output. Also returns each example's mean response loss (`loss`).
    Assumes lora_dropout 0 (A's input is then the layer's input).
    """
    import torch

    device_type = batch["input_ids"].device.type
    from gradfilter_ops.grads import response_loss_sums

    with activations.recording(), torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16,
                                                 enabled=autocast_dtype is not None):
        sums, counts = response_loss_sums(model, batch)
        losses = sums / counts.clamp_min(1)
    records = activations.records
    if not records:
        raise RuntimeError("No LoRA layer ran in the forward pass; is an adapter active?")
    grads = torch.autograd.grad(losses.sum(), [out for _, _, out in records])
    out = {key: torch.zeros(losses.shape[0], dtype=torch.float32, device=losses.device) for key in "ABW"}
    pending_x = None
    with torch.no_grad():
        for (kind, inp, _), grad in zip(records, grads):
            g, h = grad.float(), inp.float()
            out[kind] += torch.bmm(g.transpose(1, 2), h).pow(2).sum(dim=(1, 2))
            if kind == "A":
                pending_x = h  # the layer input x; B of the same layer runs next
            else:
                # ||sum_t g_t x_t^T||^2 = sum_{t,t'} (g_t . g_t')(x_t . x_t'), g = scaling * delta.
                gram = torch.bmm(g, g.transpose(1, 2)) * torch.bmm(pending_x, pending_x.transpose(1, 2))
                out["W"] += gram.sum(dim=(1, 2)) / scaling ** 2
                pending_x = None
    out["loss"] = losses.detach().float()
    return out


def snapshot_norms(model, snapshots, config, examples, pad_id: int, progress: bool = True) -> dict[str, np.ndarray]:
    """Per-part squared norms and losses of every example at every kept snapshot:
    {"A"|"B"|"W"|"loss": [members, epochs, N]}."""
    from tqdm.auto import tqdm

    from gradfilter_ops.ensemble import EnsembleScorer
    from gradfilter_ops.precision import resolve as resolve_precision
    from gradfilter_ops.grads import collate, length_buckets

    scorer = EnsembleScorer(model, snapshots, config, pad_id)  # loads every adapter, hooks A and B
    try:
        epochs = list(snapshots.epochs)
        shape = (snapshots.num_members, len(epochs), len(examples))
        out = {key: np.zeros(shape) for key in ("A", "B", "W", "loss")}
        autocast_dtype = resolve_precision(config.precision, scorer.device).autocast_dtype
        buckets = length_buckets([len(e.input_ids) for e in examples], config.score_batch_size)
        bar = tqdm(total=len(buckets) * len(scorer.names), desc="eval: per-example gradients", disable=not progress,
                   mininterval=30)
        for indices in buckets:
            batch = collate([examples[i] for i in indices], pad_id, scorer.device)
            for (member, epoch), name in scorer.names.items():
                scorer.model.set_adapter(name)
                parts = per_example_parts(scorer.model, scorer.activations, batch, autocast_dtype,
                                          config.lora_alpha / config.lora_r)
                for key in out:
                    out[key][member, epochs.index(epoch), indices] = parts[key].double().cpu().numpy()
                bar.update()
        bar.close()
    finally:
        scorer.close()
    return out


def proxy_losses(model, examples, pad_id: int, batch_size: int, precision: str) -> np.ndarray:
    """Mean response-token loss of each example under the bare proxy (log perplexity)."""
    import torch

    from gradfilter_ops.precision import resolve as resolve_precision
    from gradfilter_ops.grads import collate, length_buckets, response_loss_sums

    device = next(model.parameters()).device
    autocast_dtype = resolve_precision(precision, device).autocast_dtype
    out = np.zeros(len(examples))
    with torch.no_grad():
        for indices in length_buckets([len(e.input_ids) for e in examples], batch_size):
            batch = collate([examples[i] for i in indices], pad_id, device)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
                sums, counts = response_loss_sums(model, batch)
            out[indices] = (sums / counts.clamp_min(1)).double().cpu().numpy()
    return out


def proxy_folder(hf_model: str, cache_dir: Optional[str]) -> Optional[str]:
    """What Data-Juicer can load for the proxy: the converted preset folder, a local folder or a Hub id."""
    from gradfilter_ops.proxy import PRESETS, resolve_cache_dir

    if hf_model in PRESETS:
        return str(resolve_cache_dir(cache_dir) / "proxies" / hf_model)
    if hf_model.endswith(".gguf"):
        return None
    return hf_model


def ifd_scores(rows: Sequence[Mapping[str, Any]], prompts: Sequence[str], folder: str, output_field: str,
               max_length: Optional[int] = None, progress: bool = True) -> np.ndarray:
    """IFD of every row from Data-Juicer's own `instruction_following_difficulty_filter`.

    The query is the same Alpaca prompt the G-SNR proxy sees; the op joins it and the response with
    a space and takes loss(response | query) / loss(response) from the proxy, one row at a time.
    With `max_length`, the op cuts both texts to that many tokens (the full text from the left).
    """
    from data_juicer.ops.filter.instruction_following_difficulty_filter import InstructionFollowingDifficultyFilter
    from data_juicer.utils.constant import Fields, StatsKeys
    from tqdm.auto import tqdm

    op = InstructionFollowingDifficultyFilter(hf_model=folder, min_score=0.0, max_score=1.0,
                                              query_template="{eval_query}",
                                              response_template="{" + output_field + "}")
    if max_length:
        # `_loss` reads max_length from model_params, but the op also hands model_params to
        # from_pretrained, which rejects it; so it is set after the model loader was prepared.
        op.model_params = {**op.model_params, "max_length": max_length}
    out = np.full(len(rows), np.nan)
    for i, (row, prompt) in enumerate(tqdm(list(zip(rows, prompts)), desc="eval: IFD (Data-Juicer)",
                                           disable=not progress, mininterval=30)):
        sample = {**row, "eval_query": prompt, Fields.stats: {}}
        out[i] = float(op.compute_stats_single(sample)[Fields.stats][StatsKeys.ifd_score])
    return out


def superfiltering_keep_score(ifd: np.ndarray) -> np.ndarray:
    """Superfiltering's rule as a keep-score: IFD >= 1 (or missing) is dropped, else higher is kept."""
    ifd = np.asarray(ifd, dtype=np.float64)
    return np.where(np.isfinite(ifd) & (ifd < 1), ifd, -np.inf)


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------

def parse_set(items: Iterable[str]) -> dict[str, Any]:
    """`key=value` pairs; values are read as JSON where they parse (numbers, true, null, lists)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}.")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def parse_reading(text: Optional[str]) -> dict[str, Any]:
    """`params=W,early=1,late=2` -> changes to the config's own reading (see `Reading`)."""
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in Reading.__dataclass_fields__:
            raise ValueError(f"--main-reading: unknown field {key!r}; known: {list(Reading.__dataclass_fields__)}.")
        kind = type(getattr(Reading(), key))
        out[key] = kind(value.strip())
    return out


def build_config(hf_model: Optional[str], overrides: Mapping[str, Any]):
    from gradfilter_ops import GSNRConfig

    values = dict(DEFAULT_CONFIG)
    if hf_model:
        values["hf_model"] = hf_model
    values.update(overrides)
    return GSNRConfig.from_dict(values)


IGNORED_KEYS = ("cache_dir", "use_cache", "device", "score_batch_size")


def _same_run(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Same rows, same IFD choice and the same value for every config field both runs know (fields
    added to GSNRConfig later, and those that only change speed, are ignored)."""
    if old["rows"] != new["rows"] or old.get("skip_ifd") != new.get("skip_ifd"):
        return False
    shared = (set(old["config"]) & set(new["config"])) - set(IGNORED_KEYS)
    return all(old["config"][k] == new["config"][k] for k in shared)


BASELINE_KEYS = ("hf_model", "max_length", "precision", "format", "instruction_field", "input_field",
                 "output_field", "messages_field", "prompt_template", "response_field")


def _baselines_from(folder: Optional[str], key: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Perplexity and IFD of an earlier run on the same rows with the same proxy, or nothing."""
    if not folder:
        return {}
    meta_path, cache = Path(folder) / "meta.json", Path(folder) / "norms.npz"
    if not (meta_path.exists() and cache.exists()):
        print(f"eval: --baselines-from {folder}: no earlier run there", file=sys.stderr)
        return {}
    old = json.loads(meta_path.read_text())["key"]
    same = old["rows"] == key["rows"] and all(old["config"].get(k) == key["config"].get(k) for k in BASELINE_KEYS)
    if not same:
        print(f"eval: --baselines-from {folder} ignored: other rows or another proxy setup", file=sys.stderr)
        return {}
    data = np.load(cache)
    return {k: data[k] for k in ("proxy_loss", "ifd") if k in data.files}


def compute(rows: list[dict], config, out_dir: Path, skip_ifd: bool, reuse: bool, progress: bool,
            timings: dict[str, float], baselines_from: Optional[str] = None) -> dict[str, Any]:
    """Every raw quantity the report needs; cached in `norms.npz` (+ `meta.json`) for `--reuse`."""
    import torch

    from gradfilter_ops.prompts import PromptFormatter
    from gradfilter_ops.proxy import load_proxy

    cache, meta_path = out_dir / "norms.npz", out_dir / "meta.json"
    key = {"config": config.to_dict(), "rows": [(r["eval_index"], r["eval_corruption"], r[config.output_field])
                                                for r in rows], "skip_ifd": skip_ifd}
    if reuse and cache.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if _same_run(meta["key"], json.loads(json.dumps(key))):
            data = dict(np.load(cache))
            timings.update(meta.get("timings", {}))
            return {**{k: data[k] for k in data}, "epochs": tuple(meta["epochs"])}
        print("eval: --reuse ignored: the cached run used other rows or another config", file=sys.stderr)

    start = time.time()
    model, tokenizer = load_proxy(config.hf_model, cache_dir=config.cache_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    device = torch.device("cuda" if config.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    model.to(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    formatter = PromptFormatter(config, tokenizer)
    encoded = [formatter.encode(r) for r in rows]
    bad = [i for i, e in enumerate(encoded) if not e.ok]
    if bad:
        raise ValueError(f"{len(bad)} rows cannot be encoded (statuses {[encoded[i].status for i in bad[:5]]}); "
                         "clean the data first.")
    result: dict[str, Any] = {
        "response_tokens": np.array([len(tokenizer(str(r[config.output_field]), add_special_tokens=False)["input_ids"])
                                     for r in rows], dtype=np.float64),
        "truncated": np.array([e.truncated for e in encoded], dtype=bool),
    }
    timings["load and encode"] = time.time() - start

    earlier = _baselines_from(baselines_from, json.loads(json.dumps(key)))
    result.update({k: v for k, v in earlier.items() if k != "ifd" or not skip_ifd})
    if "proxy_loss" not in result:
        start = time.time()
        result["proxy_loss"] = proxy_losses(model, encoded, pad_id, config.score_batch_size, config.precision)
        timings["proxy perplexity"] = time.time() - start

    if not skip_ifd and "ifd" not in result:
        start = time.time()
        folder = proxy_folder(config.hf_model, config.cache_dir)
        if folder is None:
            print("eval: IFD skipped: Data-Juicer cannot load a .gguf proxy", file=sys.stderr)
        else:
            # The prompt as text, exactly as the formatter builds it (not the decoded, possibly cut ids).
            texts = [_alpaca_prompt(r, config) for r in rows]
            result["ifd"] = ifd_scores(rows, texts, folder, config.output_field, config.max_length, progress)
        timings["IFD (Data-Juicer)"] = time.time() - start

    start = time.time()
    snapshots = train_all_epochs(model, encoded, config, pad_id, progress)
    timings["train ensemble"] = time.time() - start
    start = time.time()
    norms = snapshot_norms(model, snapshots, config, encoded, pad_id, progress)
    timings["per-example gradients"] = time.time() - start
    for k, v in norms.items():
        result[f"norm_{k}"] = v
    result["norm_online"] = snapshots.online_sq_norms()
    result["epochs"] = tuple(snapshots.epochs)

    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(cache, **{k: v for k, v in result.items() if k != "epochs"})
    meta_path.write_text(json.dumps({"key": key, "epochs": list(result["epochs"]), "timings": timings}))
    return result


def _alpaca_prompt(row: Mapping[str, Any], config) -> str:
    from gradfilter_ops.prompts import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT

    context = row.get(config.input_field)
    if isinstance(context, str) and context.strip():
        return ALPACA_PROMPT.format(instruction=row[config.instruction_field], input=context)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=row[config.instruction_field])


def norms_of(result: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: result[f"norm_{k}"] for k in ("A", "B", "W", "loss", "online") if f"norm_{k}" in result}


def config_reading(config, members: Optional[int] = None, **changes) -> Reading:
    base = Reading(params=config.grad_params, early=config.early_epoch, late=config.resolved_late_epoch,
                   members=members or config.num_members, norm=config.norm, noise=config.noise, eps=config.eps)
    return dataclasses.replace(base, **changes)


@dataclasses.dataclass
class Signal:
    name: str
    score: np.ndarray  # higher = keep
    note: str
    drop_non_finite: bool = False
    negative_drop_share: Optional[float] = None


def signals_for(result: Mapping[str, Any], config, seed: int, reading: Optional[Reading] = None) -> list[Signal]:
    """The compared signals; G-SNR and its ablations use `reading` (default: the config's own)."""
    norms, epochs = norms_of(result), result["epochs"]
    reading = reading or config_reading(config)
    n = len(result["proxy_loss"])
    g = reading_scores(norms, epochs, reading)
    out = [
        Signal("G-SNR", g["score"], f"this package, {reading.label()}",
               negative_drop_share=g["negative_drop_share"]),
        Signal("random", np.random.default_rng([seed, 7]).random(n), "uniform, seeded"),
        Signal("response length", result["response_tokens"], "proxy tokens of the response, longer kept"),
        Signal("proxy perplexity", -result["proxy_loss"], "mean response-token loss of the bare proxy, lower kept"),
    ]
    if "ifd" in result:
        out.append(Signal("IFD (Superfiltering)", superfiltering_keep_score(result["ifd"]),
                          "Data-Juicer instruction_following_difficulty_filter; IFD >= 1 dropped, highest kept",
                          drop_non_finite=True))
    for signal, name, note in (
        ("neg_late_norm", "ablation: gradient norm", "late mean gradient norm, smaller kept"),
        ("raw_drop", "ablation: raw drop", "early - late mean norm, higher kept"),
        ("drop", "ablation: normalized drop", "(early - late) / early, no variance term"),
    ):
        out.append(Signal(name, reading_scores(norms, epochs, dataclasses.replace(reading, signal=signal))["score"],
                          note))
    return out


def evaluate_signal(signal: Signal, kinds: Sequence[str], rng: Optional[np.random.Generator],
                    bootstrap: int = 1000, reference: Optional[np.ndarray] = None) -> dict[str, Any]:
    """AUROC (+ bootstrap interval, + paired difference to `reference`, the G-SNR score), top-k
    contamination, and the per-kind views."""
    clean = np.array([k == CLEAN for k in kinds])
    row = {
        "auroc": auroc(signal.score, clean),
        "top10": contamination(signal.score, ~clean, 0.10, signal.drop_non_finite),
        "top30": contamination(signal.score, ~clean, 0.30, signal.drop_non_finite),
        "kept10": len(kept_indices(signal.score, 0.10, signal.drop_non_finite)),
        "kept30": len(kept_indices(signal.score, 0.30, signal.drop_non_finite)),
        "per_kind_auroc": {},
        "per_kind_survival30": kind_survival(signal.score, kinds, 0.30, signal.drop_non_finite),
    }
    if rng is not None and bootstrap:
        row["ci"] = bootstrap_auroc(signal.score, clean, rng, bootstrap)
        if reference is not None and reference is not signal.score:
            row["gsnr_minus"] = paired_auroc_difference(reference, signal.score, clean, rng, bootstrap)
    for kind in sorted(set(kinds) - {CLEAN}):
        mask = np.array([k in (CLEAN, kind) for k in kinds])
        row["per_kind_auroc"][kind] = auroc(np.asarray(signal.score)[mask], clean[mask])
    return row


def reading_grid(config, result) -> list[Reading]:
    """Readings compared in one run: every part, snapshot pair, M, norm, noise and eps around the config."""
    epochs = result["epochs"]
    members = norms_of(result)["A"].shape[0]
    ms = sorted({m for m in (2, 4, 8, members) if m <= members})
    pairs = [(s, t) for s, t in itertools.combinations(epochs, 2)]
    grid = []
    for params, (s, t), m, norm, noise, eps in itertools.product(
            ("AB", "B", "W"), pairs, ms, ("l2sq", "l2"), ("var", "std"), (1e-8, 1e-4, 1e-2, 1.0)):
        grid.append(Reading(params=params, early=s, late=t, members=m, norm=norm, noise=noise, eps=eps))
    for params, (s, t), m in itertools.product(("AB", "B", "W"), pairs, ms):
        for signal in ("drop", "raw_drop", "neg_late_norm"):
            grid.append(Reading(params=params, early=s, late=t, members=m, signal=signal))
        grid.append(Reading(params="AB", early=s, late=t, members=m, signal="loss_drop"))
    if "online" in norms_of(result):
        for (s, t), m in itertools.product(pairs, ms):
            for signal in ("gsnr", "drop", "raw_drop", "neg_late_norm"):
                grid.append(Reading(params="online", early=s, late=t, members=m, signal=signal))
    return list(dict.fromkeys(grid))


def _fmt(x: Optional[float], digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _pct(x: Optional[float]) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{100 * x:.0f} %"


def main_table(signals: Sequence[Signal], evals: Sequence[Mapping[str, Any]], fraction: float) -> str:
    lines = ["| signal | AUROC (95 % CI) | G-SNR's AUROC minus this (paired 95 % CI) | corrupted in top 10 % | "
             "corrupted in top 30 % | rows with negative drop | how |",
             "|---|---|---|---|---|---|---|"]
    for sig, ev in zip(signals, evals):
        ci = ev.get("ci")
        auc = _fmt(ev["auroc"]) + (f" ({_fmt(ci[0], 2)}-{_fmt(ci[1], 2)})" if ci else "")
        t10 = _pct(ev["top10"]) + ("" if ev["kept10"] == ev.get("want10", ev["kept10"]) else f" of {ev['kept10']}")
        t30 = _pct(ev["top30"]) + ("" if ev["kept30"] == ev.get("want30", ev["kept30"]) else f" of {ev['kept30']}")
        neg = _pct(sig.negative_drop_share) if sig.negative_drop_share is not None else ""
        diff = ev.get("gsnr_minus")
        versus = f"{diff[0]:+.3f} ({diff[1]:+.2f} to {diff[2]:+.2f})" if diff else ""
        lines.append(f"| {sig.name} | {auc} | {versus} | {t10} | {t30} | {neg} | {sig.note} |")
    lines.append(f"| *chance* | 0.500 | | {_pct(fraction)} | {_pct(fraction)} | | |")
    return "\n".join(lines)


def kind_table(signals: Sequence[Signal], evals: Sequence[Mapping[str, Any]], key: str, kinds: Sequence[str],
               fmt: Callable[[float], str]) -> str:
    present = sorted(set(kinds) - {CLEAN})
    counts = {k: sum(x == k for x in kinds) for k in present}
    lines = ["| signal | " + " | ".join(f"{k} ({counts[k]})" for k in present) + " |",
             "|---|" + "---|" * len(present)]
    for sig, ev in zip(signals, evals):
        lines.append(f"| {sig.name} | " + " | ".join(fmt(ev[key][k]) for k in present) + " |")
    return "\n".join(lines)


def parts_table(result: Mapping[str, Any], reading: Reading, kinds: Sequence[str]) -> str:
    """Median G-SNR parts per corruption kind: where do the kinds sit on the signal and the noise?"""
    g = reading_scores(norms_of(result), result["epochs"], reading)
    loss = norms_of(result)["loss"][: reading.members]
    epochs = list(result["epochs"])
    ls = loss[:, epochs.index(reading.early)].mean(axis=0)
    lt = loss[:, epochs.index(reading.late)].mean(axis=0)
    lines = ["| rows | n | early norm | late norm | drop | noise | G-SNR | loss early | loss late | "
             "proxy loss | share with negative drop |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind in [CLEAN] + sorted(set(kinds) - {CLEAN}):
        m = np.array([k == kind for k in kinds])
        med = lambda a: float(np.median(np.asarray(a)[m]))  # noqa: E731
        lines.append(f"| {kind} | {int(m.sum())} | {med(g['early']):.3g} | {med(g['late']):.3g} | {med(g['drop']):.3f} | "
                     f"{med(g['noise']):.3g} | {med(g['gsnr']):.3g} | {med(ls):.3f} | {med(lt):.3f} | "
                     f"{med(result['proxy_loss']):.3f} | {_pct(float((g['drop'][m] < 0).mean()))} |")
    return "\n".join(lines)


def evaluate_readings(result, kinds, grid: Sequence[Reading]) -> list[dict[str, Any]]:
    clean = np.array([k == CLEAN for k in kinds])
    rows = []
    for r in grid:
        g = reading_scores(norms_of(result), result["epochs"], r)
        rows.append({**dataclasses.asdict(r), "auroc": auroc(g["score"], clean),
                     "top10": contamination(g["score"], ~clean, 0.10), "top30": contamination(g["score"], ~clean, 0.30),
                     "negative_drop_share": g["negative_drop_share"]})
    return rows


def readings_markdown(rows: Sequence[Mapping[str, Any]], base: Reading, epochs: Sequence[int]) -> str:
    """One-factor-at-a-time views of the grid around the config's reading, plus the best readings."""
    def pick(**fixed):
        want = {**dataclasses.asdict(base), **fixed}
        return next((r for r in rows if all(r[k] == v for k, v in want.items() if k in r)), None)

    def line(label, r):
        if r is None:
            return None
        return (f"| {label} | {_fmt(r['auroc'])} | {_pct(r['top10'])} | {_pct(r['top30'])} | "
                f"{_pct(r['negative_drop_share'])} |")

    header = ["| reading | AUROC | corrupted in top 10 % | corrupted in top 30 % | rows with negative drop |",
              "|---|---|---|---|---|"]
    out = []
    sections = [
        ("grad_params (A+B, B only, W = the adapted frozen weight, experimental; online = A+B read off the "
         "training steps, `score_mode: online`)",
         [(f"`{p}`", pick(params=p)) for p in ("AB", "B", "W", "online")]),
        ("snapshots (early_epoch, late_epoch)",
         [(f"s={s}, t={t}", pick(early=s, late=t)) for s, t in itertools.combinations(epochs, 2)]),
        ("num_members", [(f"M={m}", pick(members=m)) for m in (2, 4, 8)]),
        ("norm", [(f"`{n}`", pick(norm=n)) for n in ("l2sq", "l2")]),
        ("noise", [(f"`{n}`", pick(noise=n)) for n in ("var", "std")]),
        ("eps", [(f"{e:g}", pick(eps=e)) for e in (1e-8, 1e-4, 1e-2, 1.0)]),
        ("signal (paper ablations; loss drop = the ensemble's own loss drop, a reference)",
         [(s, pick(signal=s, norm="l2sq", noise="var", eps=1e-8, **({"params": "AB"} if s == "loss_drop" else {})))
          for s in ("gsnr", "drop", "raw_drop", "neg_late_norm", "loss_drop")]),
    ]
    for title, items in sections:
        body = [line(label, r) for label, r in items]
        body = [b for b in body if b]
        if len(body) > 1:
            out += [f"**{title}** (everything else as `{base.label()}`)", "", *header, *body, ""]
    best = sorted((r for r in rows if r["signal"] == "gsnr"), key=lambda r: -r["auroc"])[:8]
    out += ["**the 8 G-SNR readings with the highest AUROC in this run**", "",
            "| reading | AUROC | corrupted in top 10 % | corrupted in top 30 % | rows with negative drop |",
            "|---|---|---|---|---|"]
    for r in best:
        label = Reading(**{k: r[k] for k in Reading.__dataclass_fields__}).label()
        out.append(line(label, r))
    return "\n".join(out)


def plot(path: Path, signals: Sequence[Signal], kinds: Sequence[str], result: Mapping[str, Any],
         reading: Reading) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("eval: matplotlib is not installed, so no plot (pip install matplotlib)", file=sys.stderr)
        return False
    clean = np.array([k == CLEAN for k in kinds])
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    ax = axes[0]
    for sig in signals:
        s = _clean_scores(sig.score)
        order = np.argsort(-s, kind="stable")
        tpr = np.concatenate([[0], np.cumsum(clean[order]) / max(1, clean.sum())])
        fpr = np.concatenate([[0], np.cumsum(~clean[order]) / max(1, (~clean).sum())])
        style = "-" if not sig.name.startswith("ablation") else ":"
        ax.plot(fpr, tpr, style, label=f"{sig.name} ({auroc(sig.score, clean):.2f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
    ax.set_xlabel("corrupted rows kept (false positive rate)")
    ax.set_ylabel("clean rows kept (true positive rate)")
    ax.set_title("ROC: keeping rows by each score")
    ax.legend(fontsize=7, loc="lower right")

    g = reading_scores(norms_of(result), result["epochs"], reading)
    ax = axes[1]
    raw = np.asarray(g["score"], dtype=float)
    finite = np.isfinite(raw)
    scale = float(np.median(np.abs(raw[finite]))) if finite.any() else 1.0
    scale = scale if scale > 0 else 1.0
    values = np.sign(raw) * np.log10(1 + np.abs(raw) / scale)  # heavy tails on both sides: a signed log
    lo, hi = (float(values[finite].min()), float(values[finite].max())) if finite.any() else (0.0, 1.0)
    bins = np.linspace(lo, hi + 1e-9, 40)
    for kind in [CLEAN] + sorted(set(kinds) - {CLEAN}):
        m = np.array([k == kind for k in kinds]) & finite
        ax.hist(np.clip(values[m], lo, hi), bins=bins, histtype="step" if kind != CLEAN else "stepfilled",
                alpha=0.35 if kind == CLEAN else 1.0, density=True, label=f"{kind} ({m.sum()})", lw=1.4)
    ax.set_xlabel(f"sign(G-SNR) * log10(1 + |G-SNR| / {scale:.3g})   (higher = kept first)")
    ax.set_title("G-SNR of clean and corrupted rows")
    ax.legend(fontsize=7)

    ax = axes[2]
    ax.scatter(g["early"][clean], g["late"][clean], s=8, alpha=0.6, label="clean")
    ax.scatter(g["early"][~clean], g["late"][~clean], s=8, alpha=0.8, marker="x", label="corrupted")
    both = np.concatenate([g["early"], g["late"]])
    both = both[np.isfinite(both) & (both > 0)]
    if len(both):
        ax.plot([both.min(), both.max()], [both.min(), both.max()], color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel(f"early mean {reading.norm} gradient norm (epoch {reading.early})")
    ax.set_ylabel(f"late mean norm (epoch {reading.late})")
    ax.set_title("rows above the line: the gradient grew")
    ax.legend(fontsize=7)
    fig.suptitle(f"G-SNR reading: {reading.label()}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def compare_runs(folders: Sequence[str], readings: Sequence[str]) -> str:
    """One markdown table of chosen readings (`readings.csv` labels, or `*` for the config's own G-SNR)
    across earlier runs: how the training configuration changes the drop and the separation."""
    lines = ["| run | training | reading | AUROC | corrupted in top 10 % | corrupted in top 30 % | "
             "rows with negative drop |", "|---|---|---|---|---|---|---|"]
    for folder in folders:
        meta = json.loads((Path(folder) / "meta.json").read_text())
        cfg = meta["key"]["config"]
        training = (f"lr {cfg['learning_rate']:g}, batch {cfg['train_batch_size']}, {cfg['lora_init']}, "
                    f"T={cfg['num_epochs']}, M={cfg['num_members']}")
        with open(Path(folder) / "readings.csv") as f:
            table = list(csv.DictReader(f))
        for row in table:
            reading = Reading(params=row["params"], early=int(row["early"]), late=int(row["late"]),
                              members=int(row["members"]), norm=row["norm"], noise=row["noise"],
                              eps=float(row["eps"]), signal=row["signal"])
            if reading.label() in readings:
                lines.append(f"| {Path(folder).name} | {training} | {reading.label()} | {float(row['auroc']):.3f} | "
                             f"{_pct(float(row['top10']))} | {_pct(float(row['top30']))} | "
                             f"{_pct(float(row['negative_drop_share']))} |")
    return "\n".join(lines)


def merge_members(first: str, second: str, out: str) -> int:
    """Join two runs into one larger ensemble. Member m trains with seed + m and nothing else, so a run
    with `seed: s + M` holds members M.. of a run with `seed: s`: the norms are simply concatenated.
    The merged folder then answers `--reuse` for `--set num_members=<M1 + M2>`."""
    metas = [json.loads((Path(d) / "meta.json").read_text()) for d in (first, second)]
    a, b = (m["key"]["config"] for m in metas)
    if metas[0]["key"]["rows"] != metas[1]["key"]["rows"]:
        raise ValueError("--merge: the runs scored different rows.")
    if b["seed"] != a["seed"] + a["num_members"]:
        raise ValueError(f"--merge: the second run must use seed {a['seed'] + a['num_members']} "
                         f"(first seed + its num_members), got {b['seed']}.")
    differ = [k for k in (set(a) & set(b)) - set(IGNORED_KEYS) - {"seed", "num_members"} if a[k] != b[k]]
    if differ:
        raise ValueError(f"--merge: the runs differ in {sorted(differ)}.")
    data = [dict(np.load(Path(d) / "norms.npz")) for d in (first, second)]
    merged = dict(data[0])
    for key in data[0]:
        if key.startswith("norm_"):
            merged[key] = np.concatenate([data[0][key], data[1][key]], axis=0)
    meta = json.loads(json.dumps(metas[0]))
    meta["key"]["config"]["num_members"] = a["num_members"] + b["num_members"]
    meta["timings"] = {k: metas[0]["timings"].get(k, 0) + metas[1]["timings"].get(k, 0)
                       for k in ("train ensemble", "per-example gradients")}
    Path(out).mkdir(parents=True, exist_ok=True)
    np.savez_compressed(Path(out) / "norms.npz", **merged)
    (Path(out) / "meta.json").write_text(json.dumps(meta))
    return meta["key"]["config"]["num_members"]


def run(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.merge:
        members = merge_members(args.merge[0], args.merge[1], args.out)
        print(f"wrote a {members}-member run to {args.out}; analyse it with --reuse --set num_members={members}")
        return {"members": members}
    if args.compare:
        print(compare_runs(args.compare, args.reading or []))
        return {}
    if args.build_chatterbot:
        n = build_chatterbot(args.build_chatterbot, args.build_out)
        print(f"wrote {n} rows to {args.build_out}")
        return {"rows": n}
    if not args.data:
        raise SystemExit("--data is required")
    overrides = parse_set(args.set or [])
    config = build_config(args.hf_model, overrides)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = load_rows(args.data, args.rows_per_file, args.seed, config.instruction_field, config.output_field)
    kinds_wanted = tuple(args.kinds.split(",")) if args.kinds else KINDS
    rows = corrupt_dataset(rows, args.corrupt_fraction, args.seed, kinds_wanted, config.instruction_field,
                           config.input_field, config.output_field)
    kinds = [r["eval_corruption"] for r in rows]
    timings: dict[str, float] = {}
    started = time.time()
    result = compute(rows, config, out_dir, args.skip_ifd, args.reuse, not args.quiet, timings, args.baselines_from)

    base = config_reading(config, **parse_reading(args.main_reading))
    signals = signals_for(result, config, args.seed, base)
    rng = np.random.default_rng(args.seed)
    evals = [evaluate_signal(s, kinds, rng, args.bootstrap, reference=signals[0].score) for s in signals]
    for ev in evals:
        ev["want10"] = max(1, math.floor(0.10 * len(rows) + 1e-9))
        ev["want30"] = max(1, math.floor(0.30 * len(rows) + 1e-9))
    grid_rows = evaluate_readings(result, kinds, reading_grid(config, result))
    with open(out_dir / "readings.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(grid_rows[0]))
        writer.writeheader()
        writer.writerows(grid_rows)

    with open(out_dir / "scores.jsonl", "w", encoding="utf-8") as f:
        g = reading_scores(norms_of(result), result["epochs"], base)
        for i, row in enumerate(rows):
            rec = {k: row.get(k) for k in ("eval_index", "eval_corruption", "id", config.instruction_field,
                                           config.input_field, config.output_field)}
            rec.update({s.name: (float(s.score[i]) if np.isfinite(s.score[i]) else None) for s in signals})
            rec.update({f"gsnr_{k}": float(g[k][i]) for k in ("early", "late", "drop", "noise")})
            if "ifd" in result:
                rec["ifd"] = float(result["ifd"][i])
            rec["proxy_loss"] = float(result["proxy_loss"][i])
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")

    plotted = plot(out_dir / "roc.png", signals, kinds, result, base)
    command = "python tools/eval_selection.py " + " ".join(_quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    report = render_report(command, config, rows, kinds, signals, evals, result, base, grid_rows, timings,
                           args.corrupt_fraction, plotted)
    (out_dir / "report.md").write_text(report)
    summary = {
        "rows": len(rows), "corrupted": int(sum(k != CLEAN for k in kinds)),
        "signals": {s.name: {k: v for k, v in ev.items() if k not in ("want10", "want30")}
                    for s, ev in zip(signals, evals)},
        "negative_drop_share": signals[0].negative_drop_share,
        "snapshot_loss": norms_of(result)["loss"].mean(axis=(0, 2)).tolist(),
        "timings": timings, "total_s": time.time() - started,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    if not args.quiet:
        print(main_table(signals, evals, args.corrupt_fraction))
        print(f"\nwrote {out_dir / 'report.md'}")
    return summary


def _quote(arg: str) -> str:
    return arg if all(c.isalnum() or c in "-_=./:,+" for c in arg) else json.dumps(arg)


def render_report(command, config, rows, kinds, signals, evals, result, base, grid_rows, timings, fraction,
                  plotted) -> str:
    counts = {k: sum(x == k for x in kinds) for k in [CLEAN] + sorted(set(kinds) - {CLEAN})}
    snap_loss = norms_of(result)["loss"]  # [members, epochs, N]
    lines = [
        "# Selection evaluation",
        "",
        "```bash",
        command,
        "```",
        "",
        f"{len(rows)} rows: " + ", ".join(f"{v} {k}" for k, v in counts.items()) +
        f"; {int(np.asarray(result['truncated']).sum())} cut to max_length={config.max_length}. "
        f"Proxy `{config.hf_model}`; G-SNR reading `{base.label()}`.",
        "",
        f"Mean response loss per row: bare proxy {np.mean(result['proxy_loss']):.3f}; after "
        + ", ".join(f"epoch {e}: {snap_loss[:, i].mean():.3f}" for i, e in enumerate(result["epochs"]))
        + " (mean over members).",
        "",
        "Run time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ".",
        "",
        "## Separation of clean and corrupted rows",
        "",
        "AUROC: the chance that a random clean row outranks a random corrupted one (1 = perfect, 0.5 = "
        "chance, below 0.5 = prefers corrupted rows). Top k %: the share of corrupted rows among the "
        "rows a selection of that size keeps (lower is better).",
        "",
        main_table(signals, evals, fraction),
        "",
        "### AUROC per corruption kind (clean rows against that kind only)",
        "",
        kind_table(signals, evals, "per_kind_auroc", kinds, _fmt),
        "",
        "### Share of each kind's rows that survive into the top 30 % (30 % = chance)",
        "",
        kind_table(signals, evals, "per_kind_survival30", kinds, _pct),
        "",
        "### G-SNR parts by kind (medians)",
        "",
        parts_table(result, base, kinds),
        "",
    ]
    if plotted:
        lines += ["![ROC curves, G-SNR histograms and early against late norms](roc.png)", ""]
    lines += ["## Readings from the same training run", "", readings_markdown(grid_rows, base, result["epochs"]), "",
              "Every reading of the grid is in `readings.csv`."]
    return "\n".join(lines) + "\n"


def build_chatterbot(folder: str, out: Optional[str]) -> int:
    """Rebuild tools/data/chatterbot_english_qa.jsonl from the corpus' English YAML files."""
    import yaml

    seen, rows = set(), []
    for path in sorted(Path(folder).glob("*.yml")):
        category = path.stem
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        for j, conv in enumerate(data.get("conversations") or []):
            if len(conv) >= 2 and isinstance(conv[0], str) and isinstance(conv[1], str):
                question, answer = conv[0].strip(), conv[1].strip()
                if question.lower() in seen or len(answer.split()) < 6:
                    continue
                seen.add(question.lower())
                rows.append({"id": f"chatterbot_{category}_{j}", "instruction": question, "input": "",
                             "output": answer, "source": f"chatterbot-corpus-1.3.3/english/{category}"})
    with open(out or "chatterbot_english_qa.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(rows)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", action="append", help="Alpaca-style jsonl; repeat for several files")
    p.add_argument("--rows-per-file", type=int, default=None, help="at most this many rows of each file (seeded)")
    p.add_argument("--corrupt-fraction", type=float, default=0.3, help="share of rows to corrupt (default 0.3)")
    p.add_argument("--kinds", default=None, help=f"comma-separated corruption kinds (default: all of {','.join(KINDS)})")
    p.add_argument("--seed", type=int, default=0, help="seeds the sample, the corruptions, random and the bootstrap")
    p.add_argument("--hf-model", default=None, help="the proxy (default: the smollm2-135m preset)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a GSNRConfig override; repeat")
    p.add_argument("--out", default="eval_out", help="output folder")
    p.add_argument("--skip-ifd", action="store_true", help="leave out the Data-Juicer IFD baseline")
    p.add_argument("--reuse", action="store_true", help="reuse norms.npz of an earlier run with the same rows and config")
    p.add_argument("--baselines-from", metavar="DIR",
                   help="take perplexity and IFD from an earlier run's folder (same rows and proxy setup)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap rounds for the AUROC interval (0: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no table on stdout")
    p.add_argument("--main-reading", metavar="K=V,...",
                   help="score the main table's G-SNR (and ablations) with another reading of the same run, "
                        "e.g. params=W,early=1,late=2 (fields of Reading)")
    p.add_argument("--merge", nargs=2, metavar="DIR",
                   help="join two runs whose seeds follow on (seed, seed + num_members) into one ensemble in --out")
    p.add_argument("--compare", nargs="+", metavar="DIR", help="print chosen readings of earlier runs side by side")
    p.add_argument("--reading", action="append", help="with --compare: a reading label as in readings.csv; repeat")
    p.add_argument("--build-chatterbot", metavar="FOLDER", help=argparse.SUPPRESS)
    p.add_argument("--build-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    run()
