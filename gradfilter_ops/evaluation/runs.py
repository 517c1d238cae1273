"""One evaluation run's raw quantities (per-part norms of every epoch, baselines, lengths), cached in
`norms.npz` + `meta.json` so that `--reuse` re-analyses without training again; and the merge of two
runs into one larger ensemble."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from ..config import NON_SCORE_OPTIONS
from .baselines import ifd_scores, proxy_losses
from .gradients import snapshot_norms, train_all_epochs
from ..timing import Stopwatch

# Fields that change neither the raw norms nor the baselines: speed (the options that never change a
# score), and how the norms are read (the report reads every way from the same norms).
IGNORED_KEYS = (*NON_SCORE_OPTIONS, "example_loss", "norm", "noise", "eps")


def _same_run(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Same rows, same IFD choice and the same value for every config field both runs know (fields
    added to GSNRConfig later, and those that only change speed, are ignored)."""
    if old["rows"] != new["rows"] or old.get("skip_ifd") != new.get("skip_ifd"):
        return False
    if old.get("snapshot_pass", True) != new.get("snapshot_pass", True):
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
            timings: dict[str, float], baselines_from: Optional[str] = None,
            snapshot_pass: bool = True) -> dict[str, Any]:
    """Every raw quantity the report needs; cached in `norms.npz` (+ `meta.json`) for `--reuse`.

    Without `snapshot_pass` only the online norms are recorded (what `score_mode: online` reads): the
    per-part passes over the saved adapters (A, B, W and the snapshot readings) are skipped."""
    from ..prompts import PromptFormatter, alpaca_prompt
    from ..proxy import hf_folder, load_frozen_proxy

    cache, meta_path = out_dir / "norms.npz", out_dir / "meta.json"
    key = {"config": config.to_dict(), "rows": [(r["eval_index"], r["eval_corruption"], r[config.output_field])
                                                for r in rows], "skip_ifd": skip_ifd}
    if not snapshot_pass:  # only then, so that the caches of earlier runs (which all made the pass) still match
        key["snapshot_pass"] = False
    if reuse and cache.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if _same_run(meta["key"], json.loads(json.dumps(key))):
            data = dict(np.load(cache))
            if "loss_tokens" not in data:  # a run cached before they were recorded: encode the rows again
                from ..proxy import load_proxy

                formatter = PromptFormatter(config, load_proxy(config.hf_model, cache_dir=config.cache_dir)[1])
                data["loss_tokens"] = np.array([formatter.encode(r).num_loss_tokens for r in rows], dtype=np.float64)
                np.savez_compressed(cache, **data)
            timings.update(meta.get("timings", {}))
            return {**{k: data[k] for k in data}, "epochs": tuple(meta["epochs"])}
        print("eval: --reuse ignored: the cached run used other rows or another config", file=sys.stderr)

    start = Stopwatch()
    proxy = load_frozen_proxy(config.hf_model, cache_dir=config.cache_dir, device=config.device)
    model, tokenizer, pad_id = proxy.model, proxy.tokenizer, proxy.pad_id
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
        "loss_tokens": np.array([e.num_loss_tokens for e in encoded], dtype=np.float64),
    }
    timings["load and encode"] = start.seconds

    earlier = _baselines_from(baselines_from, json.loads(json.dumps(key)))
    result.update({k: v for k, v in earlier.items() if k != "ifd" or not skip_ifd})
    if "proxy_loss" not in result:
        start = Stopwatch()
        result["proxy_loss"] = proxy_losses(model, encoded, pad_id, config.score_batch_size, config.precision)
        timings["proxy perplexity"] = start.seconds

    if not skip_ifd and "ifd" not in result:
        start = Stopwatch()
        folder = hf_folder(config.hf_model, config.cache_dir)
        if folder is None:
            print("eval: IFD skipped: Data-Juicer cannot load a .gguf proxy", file=sys.stderr)
        else:
            # The prompt as text, exactly as the formatter builds it (not the decoded, possibly cut ids).
            texts = [alpaca_prompt(r[config.instruction_field], r.get(config.input_field)) for r in rows]
            result["ifd"] = ifd_scores(rows, texts, folder, config.output_field, config.max_length, progress)
        timings["IFD (Data-Juicer)"] = start.seconds

    start = Stopwatch()
    snapshots = train_all_epochs(model, encoded, config, pad_id, progress)
    timings["train ensemble"] = start.seconds
    if snapshot_pass:
        start = Stopwatch()
        norms = snapshot_norms(model, snapshots, config, encoded, pad_id, progress)
        timings["per-example gradients"] = start.seconds
        for k, v in norms.items():
            result[f"norm_{k}"] = v
    result["norm_online"] = snapshots.online_sq_norms()
    result["epochs"] = tuple(snapshots.epochs)

    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(cache, **{k: v for k, v in result.items() if k != "epochs"})
    meta_path.write_text(json.dumps({"key": key, "epochs": list(result["epochs"]), "timings": timings}))
    return result


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
