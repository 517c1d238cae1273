"""Trustworthy runs: the score cache, resume after SIGKILL, faults that are recorded, odd datasets."""

import json
import math
import os
import signal
import time

import numpy as np
import pytest
import torch
from datasets import Dataset

from gradfilter_ops.engine import EnsembleTrainer, Snapshots, scoring
from gradfilter_ops import GSNRConfig, GSNRScorer, fields

from helpers import seed_tasks
from warm_commands import run_command, start

ROWS = [{k: r[k] for k in ("instruction", "input", "output")} for r in seed_tasks(16)]


def scored(config, rows=ROWS, **kwargs):
    scorer = GSNRScorer(config)
    return scorer, scorer.score(Dataset.from_list(rows), **kwargs)


@pytest.mark.parametrize("stack_members", [1, 2])
def test_cache_makes_a_rerun_free_and_exact(tiny_config, monkeypatch, stack_members):
    # One member at a time or stacked, proxy work calls torch modules: count every call, whatever the path.
    calls = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: calls.append(module))
    try:
        config = tiny_config(use_cache=True, stack_members=stack_members)
        first, reference = scored(config)
        assert first.snapshots is not None and (first.cache.dir / "manifest.json").exists()
        assert calls, "the counter saw no proxy work on the first run"
        calls.clear()

        def no_proxy_work(*args, **kwargs):
            raise AssertionError("the proxy ran although every score was cached")

        monkeypatch.setattr(EnsembleTrainer, "train", no_proxy_work)
        monkeypatch.setattr(scoring, "per_example_grad_sq_norms", no_proxy_work)
        second, again = scored(config, rows=list(reversed(ROWS)))  # row order does not matter
    finally:
        hook.remove()
    assert not calls, f"the proxy ran {len(calls)} module calls although every score was cached"
    assert second.snapshots is None
    assert again[fields.GSNR] == list(reversed(reference[fields.GSNR]))


def test_cache_key_changes_with_score_options(tiny_config):
    config = tiny_config(use_cache=True)
    base, _ = scored(config)
    other = GSNRScorer(tiny_config(use_cache=True, lora_r=4))
    other.fit(Dataset.from_list(ROWS))
    assert other.cache.dir != base.cache.dir
    speed_only = GSNRScorer(tiny_config(use_cache=True, score_batch_size=2))
    speed_only.fit(Dataset.from_list(ROWS))
    assert speed_only.cache.dir == base.cache.dir and speed_only.snapshots is None


def score_rows_file(config: dict, data: str, out: str) -> None:
    """In a process of its own: score the rows of `data` (JSON lines) with `config`, the scores to `out`."""
    rows = [json.loads(line) for line in open(data)]
    scored = GSNRScorer(GSNRConfig(**config)).score(Dataset.from_list(rows), batch_size=2)
    json.dump(list(scored["gsnr"]), open(out, "w"))


@pytest.mark.integration  # three scoring processes, one killed: the resume without a kill is tested below
def test_sigkill_mid_scoring_resumes_to_identical_scores(tiny_config, tmp_path):
    rows = [{k: r[k] for k in ("instruction", "input", "output")} for r in seed_tasks(24)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tiny_config(use_cache=True, cache_dir=str(tmp_path / "killed")).to_dict()
    out = str(tmp_path / "out.json")

    run = start(score_rows_file, config, str(data), out)
    shards = lambda: sorted((tmp_path / "killed").glob("scores/*/scores/part-*.jsonl"))  # noqa: E731
    deadline = time.time() + 300
    while len(shards()) < 3 and run.exitcode is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(run.pid, signal.SIGKILL)
    run.join()
    before = {p.name: p.stat().st_mtime_ns for p in shards()}
    assert 3 <= len(before) < 12, "the kill did not land in the middle of scoring"

    finish = start(score_rows_file, config, str(data), out)
    finish.join()
    assert finish.exitcode == 0
    resumed = json.loads((tmp_path / "out.json").read_text())
    after = {p.name: p.stat().st_mtime_ns for p in shards()}
    assert len(after) == 12
    assert all(after[name] == mtime for name, mtime in before.items()), "finished batches were scored again"

    clean = start(score_rows_file, dict(config, cache_dir=str(tmp_path / "clean")), str(data), out)
    clean.join()
    assert clean.exitcode == 0
    assert resumed == json.loads((tmp_path / "out.json").read_text())


@pytest.mark.parametrize("score_mode", ["snapshot", "online"])
def test_training_resumes_from_finished_members(tiny_config, monkeypatch, score_mode):
    config = tiny_config(use_cache=True, num_members=3, score_mode=score_mode)
    calls = []  # members as they finish training: each one is saved then
    real = Snapshots.save_member

    def crash_on_member_2(snapshots, directory, member, **kwargs):
        calls.append(member)
        if member == 2 and len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(snapshots, directory, member, **kwargs)

    monkeypatch.setattr(Snapshots, "save_member", crash_on_member_2)
    with pytest.raises(KeyboardInterrupt):
        scored(config)
    _, resumed = scored(config)
    assert calls == [0, 1, 2, 2]  # members 0 and 1 were not trained again
    monkeypatch.setattr(Snapshots, "save_member", real)
    _, clean = scored(tiny_config(use_cache=False, num_members=3, score_mode=score_mode))
    assert resumed[fields.GSNR] == clean[fields.GSNR]


@pytest.mark.parametrize("stack", [1, 2])
def test_out_of_memory_halves_the_batch(tiny_config, monkeypatch, stack):
    _, reference = scored(tiny_config(stack_members=stack))
    real = scoring.per_example_grad_sq_norms
    sizes, stacked = [], set()

    def small_gpu(model, activations, batch, *args, blocks=1):
        rows = batch["input_ids"].shape[0] // blocks  # a stacked pass holds `blocks` copies of the bucket
        sizes.append(rows)
        stacked.add(blocks)
        if rows > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, activations, batch, *args, blocks=blocks)

    monkeypatch.setattr(scoring, "per_example_grad_sq_norms", small_gpu)
    _, halved = scored(tiny_config(stack_members=stack))
    assert 4 in sizes and 2 in sizes and 1 in sizes
    assert stacked == {1 if stack == 1 else 2 * stack}  # the 2 x 2 adapters of 2 members in one pass
    np.testing.assert_allclose(halved[fields.EARLY], reference[fields.EARLY], rtol=1e-4)
    assert halved[fields.STATUS] == reference[fields.STATUS]


def test_non_finite_gradients_are_recorded(tiny_config):
    scorer = GSNRScorer(tiny_config())
    scorer.fit(Dataset.from_list(ROWS))
    state = scorer.snapshots.states[(0, 2)]
    first = next(iter(state))
    state[first] = torch.full_like(state[first], float("nan"))
    out = scorer.score(Dataset.from_list(ROWS))
    assert set(out[fields.STATUS]) == {fields.NON_FINITE}
    assert all(g is None for g in out[fields.GSNR])


def test_a_row_the_proxy_fails_on_gets_scoring_error(tiny_config, monkeypatch):
    real = scoring.per_example_grad_sq_norms
    longest = max(range(len(ROWS)), key=lambda i: len(ROWS[i]["output"]))

    config = tiny_config(max_length=128)  # 3 of the rows fit: they do not fail

    def fails_on_longest(model, activations, batch, *args):
        if batch["attention_mask"].sum(dim=1).max() == config.max_length:  # the truncated rows
            raise ValueError("simulated kernel failure")
        return real(model, activations, batch, *args)

    monkeypatch.setattr(scoring, "per_example_grad_sq_norms", fails_on_longest)
    _, out = scored(config)
    failed = [i for i, s in enumerate(out[fields.STATUS]) if s == fields.SCORING_ERROR]
    assert longest in failed and len(failed) < len(ROWS)
    assert all(out[fields.GSNR][i] is None for i in failed)
    assert all(math.isfinite(out[fields.GSNR][i]) for i in range(len(ROWS)) if i not in failed)


@pytest.mark.parametrize("rows", [ROWS[:1], [ROWS[0]] * 5, ROWS[:3] + ROWS[:3]], ids=["one", "identical", "dups"])
def test_tiny_and_repetitive_datasets(tiny_config, rows):
    _, out = scored(tiny_config(), rows=rows)
    assert out[fields.STATUS] == [fields.OK] * len(rows)
    gsnr = out[fields.GSNR]
    assert all(math.isfinite(g) for g in gsnr)
    if len(rows) == 6:
        # A duplicate gets its twin's score, up to float rounding: on some CPUs (AVX2, one thread) a row's result
        # depends on its place in the batch in the last digits.
        assert gsnr[:3] == pytest.approx(gsnr[3:], rel=1e-5)
        assert len({round(g, 2) for g in gsnr[:3]}) == 3  # while the three distinct rows differ


def test_unusual_text_is_scored_end_to_end(tiny_config):
    scorer = GSNRScorer(tiny_config())
    scorer.fit(Dataset.from_list(ROWS))
    odd = ["🙂🚀 emoji answer", "مرحبا بالعالم", "a lone surrogate \ud800 inside", "word " * 20_000]
    out = scorer.score_batch({"instruction": ["Echo."] * 4, "input": [None] * 4, "output": odd})
    assert out[fields.STATUS] == [fields.OK] * 4
    assert all(math.isfinite(g) for g in out[fields.GSNR])
    assert out[fields.TRUNCATED] == [False, False, False, True]


def test_unknown_op_options_are_rejected():
    from gradfilter_ops.ops import GSNRScorerOp, GSNRTopKFilter

    with pytest.raises(ValueError, match=r"gsnr_scorer: unknown option\(s\) \['num_memebrs'\]"):
        GSNRScorerOp(num_memebrs=3)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['top_ration'\]"):
        GSNRTopKFilter(top_k=3, top_ration=0.1)


# --- a damaged cache is never used (issue 14) ----------------------------------------------------

def test_damaged_score_shards_are_reported_and_scored_again(tiny_config, warnings_logged):
    config = tiny_config(use_cache=True)
    first, reference = scored(config, batch_size=4)
    parts = sorted((first.cache.dir / "scores").glob("part-*.jsonl"))
    edited = parts[0].read_text().replace('"gsnr": ', '"gsnr": 1e9, "was": ', 1)
    parts[0].write_text(edited)
    parts[1].write_text(parts[1].read_text()[:40])  # truncated
    _, again = scored(config, batch_size=4)
    assert again[fields.GSNR] == reference[fields.GSNR]
    assert any(f"damaged cache file {parts[0]}: content does not match its hash" in m for m in warnings_logged)
    assert any(f"damaged cache file {parts[1]}" in m for m in warnings_logged)


def test_damaged_adapters_and_ensemble_manifest_are_trained_again(tiny_config, monkeypatch, warnings_logged):
    config = tiny_config(use_cache=True)
    first, reference = scored(config)
    entry = first.cache.dir
    for part in (entry / "scores").glob("part-*.jsonl"):
        part.unlink()  # so the members are needed again
    swapped = entry / "ensemble" / "member1_epoch2" / "adapter_model.safetensors"
    swapped.write_bytes((entry / "ensemble" / "member0_epoch2" / "adapter_model.safetensors").read_bytes())
    calls = []  # members as they finish training: each one is saved then
    real = Snapshots.save_member

    def spy(snapshots, directory, member, **kwargs):
        calls.append(member)
        return real(snapshots, directory, member, **kwargs)

    monkeypatch.setattr(Snapshots, "save_member", spy)
    _, again = scored(config)
    assert calls == [1] and again[fields.GSNR] == reference[fields.GSNR]
    assert any(f"damaged cache file {swapped}" in m and "member 1 is trained again" in m for m in warnings_logged)

    for part in (entry / "scores").glob("part-*.jsonl"):
        part.unlink()
    manifest = entry / "ensemble" / "ensemble.json"
    manifest.write_text(manifest.read_text()[:20])  # truncated: no bare JSONDecodeError
    _, third = scored(config)
    assert calls == [1, 0, 1] and third[fields.GSNR] == reference[fields.GSNR]
    assert any(f"damaged cache file {manifest}: unreadable" in m for m in warnings_logged)


def test_cache_files_copied_from_another_entry_are_recomputed(tiny_config, warnings_logged):
    """An `ensemble/` folder and score shards copied from an entry with another learning rate are not used."""
    import shutil

    other, other_scores = scored(tiny_config(use_cache=True, learning_rate=3e-3), batch_size=4)
    config = tiny_config(use_cache=True)
    first, reference = scored(config, batch_size=4)
    assert other_scores[fields.GSNR] != reference[fields.GSNR]
    entry = first.cache.dir
    shutil.rmtree(entry)
    shutil.copytree(other.cache.dir, entry)  # every file of the other entry, with intact checksums
    _, again = scored(config, batch_size=4)
    assert again[fields.GSNR] == reference[fields.GSNR]
    copied = "was written for cache entry '" + other.cache.key
    assert any(f"damaged cache file {entry / 'scores'}" in m and copied in m for m in warnings_logged)
    assert any(f"damaged cache file {entry / 'ensemble' / 'ensemble.json'}" in m and copied in m
               for m in warnings_logged)

    # One member's folder copied in alone (its entry's ensemble.json intact) is trained again too.
    for part in (entry / "scores").glob("part-*.jsonl"):
        part.unlink()
    member = entry / "ensemble" / "member1_epoch2"
    shutil.rmtree(member)
    shutil.copytree(other.cache.dir / "ensemble" / "member1_epoch2", member)
    _, third = scored(config, batch_size=4)
    assert third[fields.GSNR] == reference[fields.GSNR]
    assert any(f"damaged cache file {member}: {copied}" in m and "member 1 is trained again" in m
               for m in warnings_logged)


def test_a_number_read_for_a_text_field_is_scored_as_its_text(tiny_config, tmp_path):
    """The `datasets` JSON loader (Data-Juicer's too) reads `"28"` as 28 where other rows hold numbers."""
    from datasets import load_dataset

    rows = [{k: r[k] for k in ("instruction", "input", "output")} for r in seed_tasks(6)]
    rows += [{"instruction": "How many days has February in a leap year?", "input": "", "output": "29"},
             {"instruction": "Half of five?", "input": "", "output": 2.5},
             {"instruction": "Is it true?", "input": "", "output": True},
             {"instruction": "List two.", "input": "", "output": ["a", "b"]}]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_dataset("json", data_files=str(data), split="train")
    assert loaded["output"][6] == 29  # what the loader hands over
    out = GSNRScorer(tiny_config()).score(loaded)
    assert out[fields.STATUS] == [fields.OK] * 8 + [fields.INVALID_FIELD] * 2
    assert all(math.isfinite(g) for g in out[fields.GSNR][:8])
    as_text = GSNRScorer(tiny_config()).encode([{**rows[6], "output": "29"}, {**rows[7], "output": "2.5"}])
    assert out[fields.TOTAL_TOKENS][6:8] == [len(e.input_ids) for e in as_text]


# --- scores of two ensembles are never ranked together (issue 24) ---------------------------------

STATS = "__dj__stats__"


def op_run(tiny_gpt2_dir, rows, warnings=None):
    """`gsnr_scorer` over `rows` (dicts, some with `__dj__stats__`): the output rows by id; the warnings it
    logged are added to `warnings`."""
    from data_juicer.core.data import NestedDataset
    from loguru import logger

    from gradfilter_ops.ops import GSNRScorerOp

    op = GSNRScorerOp(hf_model=str(tiny_gpt2_dir), device="cpu", precision="fp32", use_cache=False, num_members=2,
                      train_batch_size=4, score_batch_size=4, max_length=64, learning_rate=1e-3, num_proc=1)
    # Added after the op is built: building a Data-Juicer op resets loguru's sinks.
    sink = logger.add(lambda message: (warnings if warnings is not None else []).append(str(message)),
                      level="WARNING")
    try:
        out = op.run(NestedDataset(Dataset.from_list(rows)))
    finally:
        logger.remove(sink)
    return {row["id"]: row for row in out.to_list()}


def fresh(rows):
    return [{k: r[k] for k in ("id", "instruction", "input", "output")} for r in rows]


def test_old_output_plus_new_rows_is_scored_by_one_ensemble(tiny_gpt2_dir):
    rows, warnings = seed_tasks(12), []
    first = op_run(tiny_gpt2_dir, fresh(rows[:9]))
    again = op_run(tiny_gpt2_dir, list(first.values()) + fresh(rows[9:]), warnings)
    scratch = op_run(tiny_gpt2_dir, fresh(rows))
    ensembles = {row[STATS][fields.ENSEMBLE] for row in again.values()}
    assert ensembles == {scratch[rows[0]["id"]][STATS][fields.ENSEMBLE]}
    assert ensembles != {first[rows[0]["id"]][STATS][fields.ENSEMBLE]}
    for row in rows:  # the old rows too: scored again by the ensemble trained on all 12 rows
        assert again[row["id"]][STATS][fields.GSNR] == pytest.approx(scratch[row["id"]][STATS][fields.GSNR], rel=1e-5)
    assert any(first[r["id"]][STATS][fields.GSNR] != pytest.approx(scratch[r["id"]][STATS][fields.GSNR], rel=1e-3)
               for r in rows[:9]), "the two ensembles happen to agree: the test shows nothing"
    assert any("9 row(s) carry scores of another ensemble" in m for m in warnings)


def test_rows_of_one_run_keep_their_scores_and_rows_of_two_runs_are_scored_again(tiny_gpt2_dir, monkeypatch):
    rows = seed_tasks(12)
    one = op_run(tiny_gpt2_dir, fresh(rows[:6]))
    two = op_run(tiny_gpt2_dir, fresh(rows[6:]))
    fits = []
    real = GSNRScorer.fit
    monkeypatch.setattr(GSNRScorer, "fit", lambda self, *args, **kwargs: fits.append(1) or real(self, *args, **kwargs))
    subset = op_run(tiny_gpt2_dir, [one[r["id"]] for r in rows[:4]])  # e.g. the exported selection of run one
    assert not fits and {i: r[STATS] for i, r in subset.items()} == {r["id"]: one[r["id"]][STATS] for r in rows[:4]}
    from data_juicer.core.data import NestedDataset

    from gradfilter_ops.ops import GSNRTopKFilter
    from gradfilter_ops.provenance import MixedEnsembles

    with pytest.raises(MixedEnsembles, match="12 rows carry the scores of 2 ensembles .* put a `gsnr_scorer` step"):
        GSNRTopKFilter(top_k=3).process(NestedDataset(Dataset.from_list(list(one.values()) + list(two.values()))))
    both = op_run(tiny_gpt2_dir, list(one.values()) + list(two.values()))
    scratch = op_run(tiny_gpt2_dir, fresh(rows))
    assert len(fits) == 2 and len({row[STATS][fields.ENSEMBLE] for row in both.values()}) == 1
    assert [both[r["id"]][STATS][fields.GSNR] for r in rows] == pytest.approx(
        [scratch[r["id"]][STATS][fields.GSNR] for r in rows], rel=1e-5)


# --- full disks and unwritable files name the path and the fix (issue 24) --------------------------

def test_a_full_cache_disk_names_the_folder_and_the_fix_and_a_rerun_resumes(tiny_config, monkeypatch):
    import errno

    import safetensors.torch

    from gradfilter_ops import cache
    from gradfilter_ops.cache import CacheFullError

    def no_room(*args, **kwargs):  # what a write on a full disk raises
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    config, rows = tiny_config(use_cache=True), ROWS[:8]
    with monkeypatch.context() as full:
        full.setattr(safetensors.torch, "save_file", no_room)
        with pytest.raises(CacheFullError, match=rf"cache_dir {config.cache_dir}: no space left on its disk while "
                                                 r"writing the adapters of member 0 .* set `use_cache: false`"):
            scored(config, rows=rows)
    real = cache.atomic_write_text
    with monkeypatch.context() as full:
        full.setattr(cache, "atomic_write_text",
                     lambda path, text: no_room() if path.name.startswith("part-") else real(path, text))
        with pytest.raises(CacheFullError, match="while writing a score shard .* a re-run resumes from them"):
            scored(config, rows=rows)
    calls = []  # members trained: none, they were kept when the shards found no room
    monkeypatch.setattr(EnsembleTrainer, "_train_group", lambda *args, **kwargs: calls.append(1))
    _, out = scored(config, rows=rows)
    assert not calls and out[fields.STATUS] == [fields.OK] * 8


@pytest.mark.parametrize("where, message", [
    ("/sys/gsnr/dropped.jsonl", r"`dropped_path` /sys/gsnr/dropped.jsonl cannot be written: /sys is not writable"),
    ("{tmp}", r"`dropped_path` {tmp} is a folder, not a file"),
    ("{tmp}/rows.jsonl/dropped.jsonl", r"lies under {tmp}/rows.jsonl, a file, not a folder"),
])
def test_an_unwritable_dropped_path_is_refused_when_the_op_is_built(tmp_path, where, message):
    from gradfilter_ops.dropped import UnwritablePathError
    from gradfilter_ops.ops import GSNRTopKFilter, RayGSNRTopKFilter

    if not os.path.isdir("/sys"):
        pytest.skip("needs /sys, a folder no user can write to")
    (tmp_path / "rows.jsonl").write_text("{}\n")
    path, expected = where.format(tmp=tmp_path), message.format(tmp=tmp_path)
    for op in (GSNRTopKFilter, RayGSNRTopKFilter):
        with pytest.raises(UnwritablePathError, match=expected + ".*`keep_dropped: false`"):
            op(top_k=1, dropped_path=path)
    GSNRTopKFilter(top_k=1, dropped_path=str(tmp_path / "new" / "folder" / "dropped.jsonl"))  # created when written
    GSNRTopKFilter(top_k=1, dropped_path=path, keep_dropped=False)  # writes nothing


@pytest.mark.integration
def test_dj_process_refuses_an_unwritable_dropped_path_before_training(tmp_path, tiny_gpt2_dir):
    import yaml

    if not os.path.isdir("/sys"):
        pytest.skip("needs /sys, a folder no user can write to")
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in seed_tasks(6)))
    recipe = {"project_name": "ro", "dataset_path": str(data), "export_path": str(tmp_path / "out" / "result.jsonl"),
              "np": 1, "text_keys": "id",
              "process": [{"gsnr_scorer": {"hf_model": str(tiny_gpt2_dir), "device": "cpu", "use_cache": False,
                                           "num_members": 2, "max_length": 64}},
                          {"gsnr_top_k_filter": {"top_k": 2, "dropped_path": "/sys/gsnr/dropped.jsonl"}}]}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run = run_command("dj-process", ["--config", tmp_path / "recipe.yaml"])
    log = run.log
    assert run.returncode != 0
    assert "`dropped_path` /sys/gsnr/dropped.jsonl cannot be written: /sys is not writable" in log
    assert "training LoRA ensemble" not in log and "gsnr: precision" not in log
