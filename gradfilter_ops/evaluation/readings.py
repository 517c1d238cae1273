"""Readings: the ways to turn one training run's raw per-example norms into a score (gradient part,
snapshot pair, number of members, norm, noise, eps, signal), so that they are compared on one run."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ..config import NOISES, NORMS
from ..engine.gsnr import negative_drop_share, sum_loss_sq_norms
from .corrupt import CLEAN
from .metrics import auroc, contamination


EPS_GRID = (1e-8, 1e-4, 1e-2, 1.0)  # the eps values every grid reads


@dataclasses.dataclass(frozen=True)
class NormReading:
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
    example_loss: str = "mean"  # mean | sum: the per-example loss whose gradient is read

    def label(self) -> str:
        loss = " sum-loss" if self.example_loss == "sum" else ""
        return (f"{self.signal} {self.params} s{self.early}-t{self.late} M{self.members} {self.norm} "
                f"{self.noise} eps={self.eps:g}{loss}")


def sq_norms_for(norms: Mapping[str, np.ndarray], epochs: Sequence[int], reading: NormReading) -> np.ndarray:
    """[members, 2, N] squared norms of one reading, cut out of the per-part norms of all epochs."""
    if reading.params == "AB":
        part = norms["A"] + norms["B"]
    else:
        part = norms[reading.params]
    s, t = list(epochs).index(reading.early), list(epochs).index(reading.late)
    if reading.members > part.shape[0]:
        raise ValueError(f"The reading asks for {reading.members} members; the run trained {part.shape[0]}.")
    sq = part[: reading.members][:, [s, t], :]
    if reading.example_loss == "sum":
        if "tokens" not in norms:
            raise ValueError("A sum-loss reading needs the rows' loss tokens; this run did not record them.")
        sq = sum_loss_sq_norms(sq, norms["tokens"])
    return sq


def reading_scores(norms: Mapping[str, np.ndarray], epochs: Sequence[int],
                   reading: NormReading) -> dict[str, np.ndarray]:
    """The reading's keep-score (higher = keep) and the G-SNR parts it came from."""
    from ..engine.gsnr import gsnr_from_sq_norms

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
        negative = negative_drop_share(score) or 0.0
    return {"score": score, "early": parts.early, "late": parts.late, "drop": parts.drop,
            "noise": parts.noise, "gsnr": parts.gsnr, "negative_drop_share": negative}


def parse_reading(text: Optional[str]) -> dict[str, Any]:
    """`params=W,early=1,late=2` -> changes to the config's own reading (see `NormReading`)."""
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in NormReading.__dataclass_fields__:
            raise ValueError(f"--main-reading: unknown field {key!r}; known: {list(NormReading.__dataclass_fields__)}.")
        kind = type(getattr(NormReading(), key))
        out[key] = kind(value.strip())
    return out



def norms_of(result: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The raw norms of a run (`compute`'s result) by part: A, B, W, loss and, when recorded, online; and
    `tokens`, each row's loss tokens (for the sum-loss readings)."""
    norms = {k: result[f"norm_{k}"] for k in ("A", "B", "W", "loss", "online") if f"norm_{k}" in result}
    if "loss_tokens" in result:
        norms["tokens"] = result["loss_tokens"]
    return norms


def config_reading(config, members: Optional[int] = None, **changes) -> NormReading:
    """The reading a `GSNRConfig` scores with, with `changes` (fields of `NormReading`) on top: with
    `score_mode: online` (the package default) the online norms, which the evaluation records over `A`
    and `B` only."""
    params = config.grad_params
    if config.score_mode == "online":
        if config.grad_params != "AB":
            raise ValueError("The evaluation records online norms over A and B only: with grad_params "
                             f"{config.grad_params!r} set score_mode=snapshot, or read params=online.")
        params = "online"
    base = NormReading(params=params, early=config.early_epoch, late=config.resolved_late_epoch,
                   members=members or config.num_members, norm=config.norm, noise=config.noise, eps=config.eps,
                   example_loss=config.example_loss)
    return dataclasses.replace(base, **changes)


def reading_grid(config, result) -> list[NormReading]:
    """Readings compared in one run: every part, snapshot pair, M, norm, noise and eps around the config."""
    epochs = result["epochs"]
    members = norms_of(result)["A"].shape[0]
    ms = sorted({m for m in (2, 4, 8, members) if m <= members})
    pairs = [(s, t) for s, t in itertools.combinations(epochs, 2)]
    grid = []
    for params, (s, t), m, norm, noise, eps in itertools.product(
            ("AB", "B", "W"), pairs, ms, NORMS, NOISES, EPS_GRID):
        grid.append(NormReading(params=params, early=s, late=t, members=m, norm=norm, noise=noise, eps=eps))
    for params, (s, t), m in itertools.product(("AB", "B", "W"), pairs, ms):
        for signal in ("drop", "raw_drop", "neg_late_norm"):
            grid.append(NormReading(params=params, early=s, late=t, members=m, signal=signal))
        grid.append(NormReading(params="AB", early=s, late=t, members=m, signal="loss_drop"))
    if "online" in norms_of(result):
        for (s, t), m in itertools.product(pairs, ms):
            for signal in ("gsnr", "drop", "raw_drop", "neg_late_norm"):
                grid.append(NormReading(params="online", early=s, late=t, members=m, signal=signal))
            for norm, noise, eps in itertools.product(NORMS, NOISES, EPS_GRID):
                grid.append(NormReading(params="online", early=s, late=t, members=m, norm=norm, noise=noise, eps=eps))
    if "loss_tokens" in result:  # the gradient of the summed loss, for the config's parts, pair and M
        base = config_reading(config, members=min(config.num_members, members))
        for norm, noise in itertools.product(NORMS, NOISES):
            grid.append(dataclasses.replace(base, norm=norm, noise=noise, example_loss="sum"))
    return list(dict.fromkeys(grid))


def evaluate_readings(result, kinds, grid: Sequence[NormReading]) -> list[dict[str, Any]]:
    """One `readings.csv` row per reading: its fields, AUROC, top-k contamination, negative-drop share."""
    clean = np.array([k == CLEAN for k in kinds])
    rows = []
    for r in grid:
        g = reading_scores(norms_of(result), result["epochs"], r)
        rows.append({**dataclasses.asdict(r), "auroc": auroc(g["score"], clean),
                     "top10": contamination(g["score"], ~clean, 0.10), "top30": contamination(g["score"], ~clean, 0.30),
                     "negative_drop_share": g["negative_drop_share"]})
    return rows
