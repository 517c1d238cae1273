"""The downstream protocol: several pools of different make-up, each with three held-out sets, every
selection fine-tuned over several seeds, so that no single held-out mix decides the verdict.

A protocol file (YAML) names the sources (JSON-lines files of real rows), the careful source whose
clean rows are the held-out set of good answers (never in any pool), and the pools as row counts per
source. Before any pool is drawn, `heldout_per_source` clean rows of every source are set aside, so
that no held-out row is ever in a pool. Each pool then gets:

- `in-distribution`: about `heldout_per_source` of the set-aside rows of its own sources, in the pool's
  proportions;
- `out-of-distribution`: the set-aside rows of a source that is not in the pool (`ood`);
- `good answers`: `good_rows` clean rows of the careful source.

`gsnr-eval protocol` (`protocol_cli`) runs it; `protocol_report` writes the verdict tables.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np

HELDOUT_KINDS = ("in-distribution", "out-of-distribution", "good answers")


@dataclass
class PoolSpec:
    """One pool: how many rows of each source it draws, and the source of its out-of-distribution set."""

    name: str
    rows: dict[str, int]
    ood: str


@dataclass
class ProtocolSpec:
    """The data layout of a protocol: sources, the good-answers file and the pools."""

    sources: dict[str, Path]
    good: Path
    pools: list[PoolSpec]
    heldout_per_source: int = 30
    good_rows: int = 60
    corrupt_fraction: float = 0.25
    budgets: list[float] = field(default_factory=lambda: [0.05, 0.10, 0.15])

    def __post_init__(self) -> None:
        if not self.pools:
            raise ValueError("A protocol needs at least one pool.")
        for pool in self.pools:
            unknown = sorted((set(pool.rows) | {pool.ood}) - set(self.sources))
            if unknown:
                raise ValueError(f"Pool {pool.name!r} names unknown source(s) {unknown}; the sources are "
                                 f"{sorted(self.sources)}.")
            if pool.ood in pool.rows:
                raise ValueError(f"Pool {pool.name!r}: its out-of-distribution source {pool.ood!r} is in the pool.")
            if any(not isinstance(n, int) or n < 1 for n in pool.rows.values()):
                raise ValueError(f"Pool {pool.name!r}: row counts must be positive integers, got {pool.rows}.")
        if len({p.name for p in self.pools}) != len(self.pools):
            raise ValueError("Pool names must differ.")
        if not self.budgets or not all(0 < b < 1 for b in self.budgets):
            raise ValueError(f"`budgets` must be shares in (0, 1), got {self.budgets}.")
        if not 0 <= self.corrupt_fraction < 1:
            raise ValueError(f"`corrupt_fraction` must be in [0, 1), got {self.corrupt_fraction}.")

    @classmethod
    def load(cls, path: str | Path) -> "ProtocolSpec":
        """Read a protocol file; file names in it are relative to the file's folder."""
        import yaml

        path = Path(path)
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown}; known: {sorted(known)}.")
        values = dict(raw)
        values["sources"] = {name: (path.parent / file).resolve() for name, file in raw["sources"].items()}
        values["good"] = (path.parent / raw["good"]).resolve()
        values["pools"] = [PoolSpec(name=name, rows=dict(p["rows"]), ood=p["ood"]) for name, p in raw["pools"].items()]
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON, its files named relative to the working folder when they lie inside it (a report
        written into a repository names no machine's paths)."""
        def shown(value: Any) -> str:
            path = Path(value)
            return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)

        return json.loads(json.dumps(dataclasses.asdict(self), default=shown))


@dataclass
class Pool:
    """A drawn pool (rows corrupted as `gsnr-eval` does) and its held-out sets (clean rows)."""

    name: str
    rows: list[dict]
    heldout: dict[str, list[dict]]  # held-out kind -> rows


def _usable(path: Path, instruction_field: str, output_field: str) -> list[dict]:
    from .data import read_instruction_rows

    return read_instruction_rows([path], None, 0, instruction_field, output_field)


def draw_pools(spec: ProtocolSpec, seed: int, instruction_field: str = "instruction", input_field: str = "input",
               output_field: str = "output") -> list[Pool]:
    """Every pool of `spec` with its held-out sets, the same for the same spec and seed."""
    from .corrupt import corrupt_dataset

    set_aside, rest = {}, {}
    for number, (name, path) in enumerate(sorted(spec.sources.items())):
        rows = _usable(path, instruction_field, output_field)
        wanted = spec.heldout_per_source + max(p.rows.get(name, 0) for p in spec.pools)
        if len(rows) < wanted:
            raise ValueError(f"Source {name!r} ({path}) has {len(rows)} usable rows; the protocol needs {wanted} "
                             f"({spec.heldout_per_source} set aside + the largest pool's draw).")
        order = np.random.default_rng([seed, 26, number]).permutation(len(rows))
        set_aside[name] = [rows[i] for i in order[: spec.heldout_per_source]]
        rest[name] = [rows[i] for i in order[spec.heldout_per_source:]]
    good = _usable(spec.good, instruction_field, output_field)
    if len(good) < spec.good_rows:
        raise ValueError(f"The good-answers file {spec.good} has {len(good)} usable rows; {spec.good_rows} wanted.")
    good = [good[i] for i in sorted(np.random.default_rng([seed, 26]).choice(len(good), spec.good_rows, False))]

    pools = []
    for number, pool in enumerate(spec.pools):
        rng = np.random.default_rng([seed, 27, number])
        rows = [dict(r, eval_source=name) for name, count in pool.rows.items()
                for r in (rest[name][i] for i in sorted(rng.choice(len(rest[name]), count, replace=False)))]
        total = sum(pool.rows.values())
        in_dist = [dict(r, eval_source=name) for name, count in pool.rows.items()
                   for r in set_aside[name][: max(1, round(spec.heldout_per_source * count / total))]]
        corrupted = corrupt_dataset(rows, spec.corrupt_fraction, seed + number, instruction_field=instruction_field,
                                    input_field=input_field, output_field=output_field)
        pools.append(Pool(pool.name, corrupted, {
            "in-distribution": in_dist,
            "out-of-distribution": [dict(r, eval_source=pool.ood) for r in set_aside[pool.ood]],
            "good answers": [dict(r, eval_source="good") for r in good],
        }))
    return pools


def score_statuses(scores: np.ndarray) -> list[str]:
    """`ok` where a score is finite (a row a selection may keep), as `selection.select` reads statuses."""
    from .. import fields

    return [fields.OK if np.isfinite(s) else fields.NON_FINITE for s in scores]


def stratified_top(scores: np.ndarray, groups: Sequence[Hashable], budget: int) -> np.ndarray:
    """The package's own group-quota selection (`selection.select` with `groups`): the budget split over
    the groups in proportion to their size, each filled with its best rows by `scores`."""
    from ..selection import select

    kept = select([float(s) if np.isfinite(s) else None for s in scores], score_statuses(scores), top_k=budget,
                  groups=list(groups))
    return np.array(kept.keep, dtype=np.int64)


def load_records(path: Path) -> dict[tuple, dict[str, Any]]:
    """The fine-tunes an earlier (possibly killed) run of the same protocol finished, by key."""
    done = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                done[(rec["pool"], rec["budget"], rec["selection"], rec["seed"])] = rec
    return done


def finetune_record(pool: str, sel, seed: int, result, sets: Mapping[str, np.ndarray],
                    corrupted_share: float) -> dict[str, Any]:
    """One fine-tune's line in records.jsonl: its held-out loss curve on each held-out set."""
    curves = {kind: result.row_losses[:, idx].mean(axis=1).tolist() for kind, idx in sets.items()}
    return {"pool": pool, "budget": sel.budget, "selection": sel.signal, "seed": seed, "rows": len(sel.indices),
            "corrupted_share": corrupted_share, "steps": result.steps, "curves": curves,
            "train_loss": result.train_loss}


def heldout_index(pool: Pool) -> tuple[list[dict], dict[str, np.ndarray]]:
    """All held-out rows of a pool in one list, and each set's positions in it."""
    rows, sets = [], {}
    for kind in HELDOUT_KINDS:
        sets[kind] = np.arange(len(rows), len(rows) + len(pool.heldout[kind]))
        rows.extend(pool.heldout[kind])
    return rows, sets


# What a protocol compares: readings of G-SNR (with and without quotas), the baselines, and the full pool.
# `G-SNR` is the run's own reading; each noise reading below that is not the run's `noise` is one more.
NOISE_READINGS = {"var": "G-SNR var", "relvar": "G-SNR relvar"}
GSNR_SELECTIONS = ("G-SNR", *NOISE_READINGS.values(), "G-SNR in length bins", "G-SNR in clusters", "G-SNR M2")
BASELINES = ("random", "response length", "IFD (Superfiltering)", "proxy perplexity", "late gradient norm")
STRATIFIED = {"G-SNR in length bins": "length", "G-SNR in clusters": "clusters"}


def default_selections(noise: str) -> list[str]:
    """Every G-SNR reading and baseline, less the noise reading that is the run's own `G-SNR`."""
    return [name for name in GSNR_SELECTIONS + BASELINES if name != NOISE_READINGS.get(noise)]


def pool_signals(result: Mapping[str, Any], config, seed: int) -> dict[str, Any]:
    """Every ranking signal of a scored pool by name: `signals_for`'s, and the G-SNR readings the
    protocol adds (the other noise readings, the first two members only)."""
    from .readings import config_reading, norms_of, reading_scores
    from .signals import Signal, signals_for

    reading = config_reading(config)
    signals = {s.name: s for s in signals_for(result, config, seed, reading)}
    late = signals["ablation: gradient norm"]
    signals["late gradient norm"] = dataclasses.replace(late, name="late gradient norm")
    norms, epochs = norms_of(result), result["epochs"]
    added = [(name, {"noise": noise}, f"noise: {noise}") for noise, name in NOISE_READINGS.items()
             if noise != reading.noise]
    if reading.members >= 2:
        added.append(("G-SNR M2", {"members": 2}, "the first 2 members only"))
    for name, change, note in added:
        scores = reading_scores(norms, epochs, dataclasses.replace(reading, **change))["score"]
        signals[name] = Signal(name, scores, note)
    return signals


def pool_selections(signals: Mapping[str, Any], groups: Mapping[str, np.ndarray], budgets: Sequence[float],
                    rows: int, wanted: Sequence[str]) -> list:
    """Each wanted selection at each budget (`downstream.SignalSelection`), and the full pool. Plain signals keep
    their top rows; the stratified ones rank by G-SNR inside the groups of `groups[kind]`."""
    from ..selection import rows_for_ratio
    from .downstream import SignalSelection, budget_label, select_budgets

    unknown = [w for w in wanted if w not in signals and w not in STRATIFIED]
    if unknown:
        raise ValueError(f"No selection {unknown}; known: {sorted(set(signals) | set(STRATIFIED))}.")
    out = select_budgets([signals[w] for w in wanted if w not in STRATIFIED], budgets, rows)
    for name in (w for w in wanted if w in STRATIFIED):
        for ratio in budgets:
            kept = stratified_top(signals["G-SNR"].score, groups[STRATIFIED[name]], rows_for_ratio(rows, ratio))
            out.append(SignalSelection(budget_label(ratio), name, kept))
    return out
