"""The Data-Juicer ops: registration through the entry point, and real `dj-process` runs."""

import dataclasses
import inspect
import json
import math
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml
from datasets import Dataset

from gradfilter_ops import GSNRConfig, fields

from helpers import seed_tasks
from warm_commands import run_command

# One worker runs the whole file (`--dist loadgroup`): its dj-process runs and their score cache are built once.
pytestmark = pytest.mark.xdist_group("test_ops")

STATS = "__dj__stats__"


def test_entry_point_registers_both_ops_without_importing_torch():
    assert "gradfilter_ops" in {ep.name for ep in entry_points(group="data_juicer.ops")}
    code = ("import sys; from data_juicer.ops import OPERATORS; "
            "assert {'gsnr_scorer', 'gsnr_top_k_filter'} <= set(OPERATORS.modules), 'not registered'; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("op", ["GSNRScorerOp", "RayGSNRScorerOp"])
def test_scorer_op_parameters_mirror_the_config(op):
    from typing import get_type_hints

    from gradfilter_ops import ops
    from gradfilter_ops.ops._options import recipe_type

    init = getattr(ops, op).__init__
    params, hints = inspect.signature(init).parameters, get_type_hints(GSNRConfig)
    for f in dataclasses.fields(GSNRConfig):
        assert params[f.name].default == f.default, f.name
        assert params[f.name].annotation == recipe_type(hints[f.name]), f.name
        assert f":param {f.name}: {f.metadata['help']}" in init.__doc__
    assert recipe_type(hints["num_members"]) is int and recipe_type(hints["lora_alpha"]) is float


def test_top_k_filter_without_scores_names_the_scorer():
    from data_juicer.core.data import NestedDataset

    from gradfilter_ops.ops import GSNRTopKFilter

    with pytest.raises(ValueError, match="put a `gsnr_scorer` step before it"):
        GSNRTopKFilter(top_ratio=0.5).run(NestedDataset(Dataset.from_list(seed_tasks(4))))
    with pytest.raises(ValueError, match="exactly one"):
        GSNRTopKFilter(top_k=3, top_ratio=0.5)


def test_one_process_on_cpu_scores_in_this_process_with_every_thread(tiny_gpt2_dir, tmp_path, monkeypatch):
    """`datasets` forks a worker even for num_proc=1, where torch must run on one thread; the op maps
    in this process instead, and still reports an int to Data-Juicer outside its own map."""
    import os

    import torch
    from data_juicer.core.data import NestedDataset

    from gradfilter_ops.ops import GSNRScorerOp
    from gradfilter_ops.scorer import GSNRScorer

    calls = []
    real = GSNRScorer.score_batch

    def spy(self, batch, rank=None):
        calls.append((os.getpid(), torch.get_num_threads()))
        return real(self, batch, rank)

    monkeypatch.setattr(GSNRScorer, "score_batch", spy)
    op = GSNRScorerOp(hf_model=str(tiny_gpt2_dir), device="cpu", use_cache=False, num_members=2, max_length=64,
                      train_batch_size=4, num_proc=1)
    assert op.runtime_np() == 1
    out = op.run(NestedDataset(Dataset.from_list(seed_tasks(6))))
    assert [s[fields.STATUS] for s in out[STATS]] == [fields.OK] * 6
    assert calls and all(call == (os.getpid(), torch.get_num_threads()) for call in calls)


def write_recipe(tmp_path: Path, name: str, dataset: Path, scorer_args: dict, np_: int = 1, ray: bool = False,
                 **top_k) -> Path:
    prefix = "ray_" if ray else ""
    recipe = {
        "project_name": name,
        "dataset_path": str(dataset),
        "export_path": str(tmp_path / name / "result.jsonl"),
        "np": np_,
        "keep_stats_in_res_ds": True,
        # Data-Juicer's loader drops rows whose text_keys field is null; `id` is never null here.
        "text_keys": "id",
        "process": [{f"{prefix}gsnr_scorer": scorer_args}, {f"{prefix}gsnr_top_k_filter": top_k}],
    }
    if ray:
        recipe.update(executor_type="ray", ray_address="local")
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def dj_process(recipe: Path) -> tuple[list[dict], str]:
    run = run_command("dj-process", ["--config", recipe])
    assert run.returncode == 0, run.log[-6000:]
    export = Path(yaml.safe_load(recipe.read_text())["export_path"])
    files = sorted(export.glob("*.json")) if export.is_dir() else [export]  # Ray's exporter writes a folder
    return [json.loads(line) for f in files for line in f.open()], run.log


@pytest.fixture(scope="module")
def scorer_args(tiny_gpt2_dir, tmp_path_factory):
    return {"hf_model": str(tiny_gpt2_dir), "cache_dir": str(tmp_path_factory.mktemp("cache")), "device": "cpu",
            "num_members": 2, "train_batch_size": 4, "score_batch_size": 4, "max_length": 96,
            "learning_rate": 1e-3, "precision": "fp32"}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """24 demo rows plus two bad ones (an empty and a missing response)."""
    path = tmp_path_factory.mktemp("data") / "data.jsonl"
    rows = seed_tasks(24) + [{"id": "bad_empty", "instruction": "Say something.", "input": "", "output": " "},
                             {"id": "bad_missing", "instruction": "Say something.", "input": ""}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, data_file, scorer_args):
    tmp = tmp_path_factory.mktemp("run1")
    return dj_process(write_recipe(tmp, "run1", data_file, scorer_args, top_ratio=0.25))


@pytest.mark.integration
def test_dj_process_scores_and_keeps_the_top_ratio(first_run, data_file):
    rows, log = first_run
    assert len(rows) == math.floor(0.25 * 26)
    assert all(r[STATS][fields.STATUS] == fields.OK and math.isfinite(r[STATS][fields.GSNR]) for r in rows)
    assert "kept 6 of 26 rows; dropped by reason: {'below_top_k_cutoff': 18, 'empty_response': 1, " \
           "'missing_field': 1}" in log


@pytest.mark.integration
def test_every_input_row_is_kept_or_in_the_dropped_file(first_run, data_file, tmp_path_factory):
    rows, _ = first_run
    # Data-Juicer's work_dir is a job folder next to the export.
    job_dir = next(tmp_path_factory.getbasetemp().glob("run1*/run1/*/gsnr_dropped.jsonl")).parent
    dropped = [json.loads(line) for line in (job_dir / "gsnr_dropped.jsonl").open()]
    inputs = [json.loads(line)["id"] for line in data_file.open()]
    assert sorted([r["id"] for r in rows] + [r["id"] for r in dropped]) == sorted(inputs)
    reasons = {r["id"]: r["gsnr_drop_reason"] for r in dropped}
    assert reasons["bad_empty"] == fields.EMPTY_RESPONSE and reasons["bad_missing"] == fields.MISSING_FIELD
    assert sum(reason == fields.BELOW_CUTOFF for reason in reasons.values()) == 18
    manifest = json.loads((job_dir / "gsnr_manifest.json").read_text())
    assert manifest["member_seeds"] == [42, 43] and manifest["versions"]["gradfilter-ops"]
    assert manifest["rows"] == {"ok": 24, "empty_response": 1, "missing_field": 1}


@pytest.mark.integration
def test_dj_process_never_selects_an_unscored_row(tmp_path, data_file, scorer_args):
    rows, log = dj_process(write_recipe(tmp_path, "all", data_file, scorer_args, top_ratio=1.0))
    assert len(rows) == 24 and all(r[STATS][fields.STATUS] == fields.OK for r in rows)
    dropped = [json.loads(line) for line in next((tmp_path / "all").glob("*/gsnr_dropped.jsonl")).open()]
    by_id = {r["id"]: r for r in dropped}
    assert by_id["bad_empty"]["gsnr_drop_reason"] == fields.EMPTY_RESPONSE
    assert by_id["bad_empty"][STATS][fields.GSNR] is None
    assert by_id["bad_missing"]["gsnr_drop_reason"] == fields.MISSING_FIELD and len(dropped) == 2
    assert "only 24 of 26 rows have a score" in log


@pytest.mark.integration
def test_rerun_on_scored_rows_trains_nothing(tmp_path, first_run, scorer_args):
    rows, _ = first_run
    scored = tmp_path / "scored.jsonl"
    scored.write_text("".join(json.dumps(r) + "\n" for r in rows))
    again, log = dj_process(write_recipe(tmp_path, "rerun", scored, scorer_args, top_k=2))
    assert "every row already has a G-SNR score; training nothing" in log
    assert "training LoRA ensemble" not in log
    best = sorted(rows, key=lambda r: -r[STATS][fields.GSNR])[:2]
    assert [r["id"] for r in again] == [r["id"] for r in rows if r in best]


@pytest.mark.integration
def test_two_processes_give_the_same_scores(tmp_path, first_run, data_file, scorer_args):
    rows, _ = first_run
    args = {**scorer_args, "use_cache": False}  # no cache: the two map processes must compute the scores
    two, log = dj_process(write_recipe(tmp_path, "np2", data_file, args, np_=2, top_ratio=0.25))
    assert "gsnr_scorer_compute_stats (num_proc=2)" in log and "training LoRA ensemble" in log
    assert [r["id"] for r in two] == [r["id"] for r in rows]
    for a, b in zip(rows, two):
        assert b[STATS][fields.EARLY] == pytest.approx(a[STATS][fields.EARLY], rel=1e-4)
        assert b[STATS][fields.LATE] == pytest.approx(a[STATS][fields.LATE], rel=1e-4)


@pytest.mark.parametrize("recipe", ["gsnr.yaml", "gsnr_demo.yaml", "gsnr_ray.yaml"])
def test_shipped_recipes_name_known_ops_and_valid_options(recipe):
    from data_juicer.ops import OPERATORS

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / recipe).read_text())
    steps = [next(iter(step.items())) for step in config["process"]]
    assert all(name in OPERATORS.modules for name, _ in steps)
    executor = config.get("executor_type", "default")
    assert all(executor in OPERATORS.modules[name]._supported_exec_modes for name, _ in steps)
    prefix = "ray_" if executor == "ray" else ""
    assert [name for name, _ in steps][-2:] == [f"{prefix}gsnr_scorer", f"{prefix}gsnr_top_k_filter"]
    for name, args in steps[-2:]:
        OPERATORS.modules[name](**args)  # validates every G-SNR option


def readme_option_rows() -> dict[str, tuple[str, list[str]]]:
    """The README's option tables: option name -> (its default as written, the row's code spans)."""
    import re

    rows = {}
    for line in (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("| `") else []
        if len(cells) != 3:
            continue
        names, defaults = re.findall(r"`([^`]+)`", cells[0]), re.findall(r"`([^`]+)`", cells[1])
        spans = re.findall(r"`([^`]+)`", line)
        for i, name in enumerate(names):
            rows[name] = (defaults[i] if len(defaults) == len(names) else cells[1], spans)
    return rows


def test_readme_documents_every_option_with_its_default_and_choices():
    import typing

    rows = readme_option_rows()
    hints = typing.get_type_hints(GSNRConfig, include_extras=True)
    for f in dataclasses.fields(GSNRConfig):
        assert f.name in rows, f"{f.name} has no row in the README's option table"
        written, spans = rows[f.name]
        if isinstance(f.default, bool):
            assert written == str(f.default).lower(), f.name
        elif isinstance(f.default, (int, float)):
            assert float(written) == f.default, f.name
        elif isinstance(f.default, str):
            assert written == f.default, f.name
        # else None: the README says what it stands for (`num_epochs`, peft's attention projections, ...)
        choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is typing.Literal else ()
        assert set(choices) <= set(spans), f"{f.name}: choices {set(choices) - set(spans)} not in the README"


@pytest.mark.integration
def test_member_workers_through_dj_process_give_the_same_scores(tmp_path, first_run, data_file, scorer_args):
    rows, _ = first_run
    args = {**scorer_args, "member_workers": 2, "use_cache": False}  # no cache: the workers must do the work
    workers, log = dj_process(write_recipe(tmp_path, "workers", data_file, args, top_ratio=0.25))
    assert "training 2 members in 2 worker processes" in log
    assert [r["id"] for r in workers] == [r["id"] for r in rows]
    for a, b in zip(rows, workers):
        assert b[STATS][fields.GSNR] == pytest.approx(a[STATS][fields.GSNR], rel=1e-3)


@pytest.fixture(scope="module")
def grouped_run(tmp_path_factory, data_file, scorer_args):
    """dj-process with clusters and near-duplicates, on the data plus a copy of its row 1 and its row 6 with a null
    input (the same prompt); returns (exported rows, dropped rows, the log, the input rows)."""
    tmp = tmp_path_factory.mktemp("grouped")
    inputs = [json.loads(line) for line in data_file.open()]
    inputs += [{**inputs[1], "id": "copy_of_1"}, {**inputs[6], "id": "null_input_6", "input": None}]
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in inputs))
    args = {**scorer_args, "clusters": True, "num_clusters": 3, "near_duplicate_threshold": 0.999}
    rows, log = dj_process(write_recipe(tmp, "grouped", data, args, top_ratio=0.25, diversity="clusters",
                                        near_duplicates="drop"))
    dropped = [json.loads(line) for line in next((tmp / "grouped").glob("*/gsnr_dropped.jsonl")).open()]
    return rows, dropped, log, inputs


@pytest.mark.integration
def test_dj_process_keeps_the_mix_and_the_best_of_each_near_duplicate_group(grouped_run):
    from gradfilter_ops.selection import select, stat_selection_inputs

    rows, dropped, log, inputs = grouped_run
    every = {r["id"]: r for r in rows + dropped}
    assert sorted(every) == sorted(r["id"] for r in inputs)
    stats = {key: r[STATS] for key, r in every.items()}
    assert set(stats["copy_of_1"]) == set(fields.STATS_FIELDS + fields.GROUP_FIELDS)  # no vectors in the stats
    for first, twin in ((inputs[1]["id"], "copy_of_1"), (inputs[6]["id"], "null_input_6")):
        assert stats[first][fields.DUPLICATE_GROUP] == stats[twin][fields.DUPLICATE_GROUP] is not None
        loser = twin if stats[first][fields.GSNR] >= stats[twin][fields.GSNR] else first
        assert every[loser]["gsnr_drop_reason"] == fields.NEAR_DUPLICATE
    assert sum(r["gsnr_drop_reason"] == fields.NEAR_DUPLICATE for r in dropped) == 2
    assert {stats[k][fields.CLUSTER] for k in stats if stats[k][fields.STATUS] == fields.OK} == {0, 1, 2}
    # The op's choice is `select` over the clusters and groups it wrote.
    ordered = [stats[r["id"]] for r in inputs]
    statuses = [s[fields.STATUS] for s in ordered]
    groups, duplicates = stat_selection_inputs("clusters", "drop", statuses, [s[fields.CLUSTER] for s in ordered],
                                               [s[fields.DUPLICATE_GROUP] for s in ordered])
    expected = select([s[fields.GSNR] for s in ordered], statuses, top_ratio=0.25, groups=groups,
                      duplicate_groups=duplicates)
    assert [r["id"] for r in rows] == [inputs[i]["id"] for i in expected.keep]
    assert {r["id"]: r["gsnr_drop_reason"] for r in dropped} == {inputs[i]["id"]: why
                                                                 for i, why in expected.reasons.items()}
    assert "kept per gsnr_cluster" in log


@pytest.mark.integration
def test_ray_executor_trains_in_ray_tasks_and_keeps_the_scores_rows_and_reasons_of_the_default_one(
        tmp_path, grouped_run, scorer_args):
    from collections import Counter

    rows, dropped, _, inputs = grouped_run
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in inputs))
    args = {**scorer_args, "clusters": True, "num_clusters": 3, "near_duplicate_threshold": 0.999,
            "train_tasks": 2, "use_cache": False}  # no cache: the Ray tasks must train
    on_ray, log = dj_process(write_recipe(tmp_path, "ray", data, args, ray=True, top_ratio=0.25,
                                          diversity="clusters", near_duplicates="drop"))
    assert "training members [[0], [1]] in 2 Ray task(s)" in log
    assert [r["id"] for r in on_ray] == [r["id"] for r in rows]
    for a, b in zip(rows, on_ray):
        assert b[STATS][fields.EARLY] == pytest.approx(a[STATS][fields.EARLY], rel=1e-4)
        assert b[STATS][fields.LATE] == pytest.approx(a[STATS][fields.LATE], rel=1e-4)
        assert (b[STATS][fields.CLUSTER], b[STATS][fields.DUPLICATE_GROUP]) == \
            (a[STATS][fields.CLUSTER], a[STATS][fields.DUPLICATE_GROUP])
    job_dir = next((tmp_path / "ray").glob("*/gsnr_dropped.jsonl")).parent
    ray_dropped = [json.loads(line) for line in (job_dir / "gsnr_dropped.jsonl").open()]
    assert {r["id"]: r["gsnr_drop_reason"] for r in ray_dropped} == {r["id"]: r["gsnr_drop_reason"] for r in dropped}
    assert sorted(r["id"] for r in on_ray + ray_dropped) == sorted(r["id"] for r in inputs)
    statuses = Counter(r[STATS][fields.STATUS] for r in rows + dropped)
    assert json.loads((job_dir / "gsnr_manifest.json").read_text())["rows"] == dict(statuses)
