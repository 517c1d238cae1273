"""Bad and hostile input through the real `dj-process`: no row lost, no unscored row selected, no
made-up score trusted (issue 14). The runs are shared by module-scoped fixtures."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from datasets import load_dataset

from gradfilter_ops import GSNRConfig, GSNRScorer, fields

from helpers import seed_tasks

STATS = "__dj__stats__"
REPO = Path(__file__).resolve().parents[1]


def chat(i: int, assistant: bool = True) -> dict:
    turns = [{"role": "user", "content": f"Please tell me what {i} plus one makes, in words."}]
    if assistant:
        turns.append({"role": "assistant", "content": f"{i} plus one makes {i + 1}, written out in words."})
    return {"id": f"chat{i}" if assistant else f"noreply{i}", "messages": turns}


def mixed_rows() -> list[dict]:
    """Alpaca rows, Alpaca rows whose instruction is null or missing, chat rows with and without a reply."""
    alpaca = [{k: r[k] for k in ("id", "instruction", "input", "output")} for r in seed_tasks(8)]
    no_instruction = [{"id": "null_instruction", "instruction": None, "input": "", "output": "A long enough answer."},
                      {"id": "no_instruction_key", "input": "", "output": "Another long enough answer."}]
    return alpaca + no_instruction + [chat(i) for i in range(3)] + [chat(i, assistant=False) for i in range(2)]


def run_dj(recipe: dict, tmp: Path) -> tuple[int, str, list[dict], list[dict]]:
    """(rc, log, exported rows, rows of every `*dropped.jsonl` in the job folder) of one `dj-process` run."""
    path = tmp / "recipe.yaml"
    recipe = {**recipe, "export_path": str(tmp / "out" / "result.jsonl"), "np": 1, "keep_stats_in_res_ds": True}
    path.write_text(yaml.safe_dump(recipe))
    dj = Path(sys.executable).parent / "dj-process"
    run = subprocess.run([str(dj), "--config", str(path)], capture_output=True, text=True, cwd=REPO)
    export = tmp / "out" / "result.jsonl"
    rows = [json.loads(line) for line in export.open()] if export.exists() else []
    dropped = [json.loads(line) for f in (tmp / "out").glob("*/*dropped.jsonl") for line in f.open()]
    return run.returncode, run.stdout + run.stderr, rows, dropped


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def scorer_args(tiny_gpt2_dir, tmp_path_factory):
    return {"hf_model": str(tiny_gpt2_dir), "cache_dir": str(tmp_path_factory.mktemp("cache")), "device": "cpu",
            "num_members": 2, "train_batch_size": 4, "score_batch_size": 4, "max_length": 96,
            "learning_rate": 1e-3, "precision": "fp32"}


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, scorer_args):
    """The shipped demo recipe (its loader settings and text ops) on a mixed Alpaca + chat file."""
    tmp = tmp_path_factory.mktemp("mixed")
    recipe = yaml.safe_load((REPO / "recipes" / "gsnr_demo.yaml").read_text())
    for step in recipe["process"]:
        if "gsnr_scorer" in step:
            step["gsnr_scorer"] = scorer_args
        if "gsnr_top_k_filter" in step:
            step["gsnr_top_k_filter"] = {"top_ratio": 0.5}
    recipe["dataset_path"] = str(write_jsonl(tmp / "mixed.jsonl", mixed_rows()))
    rc, log, rows, dropped = run_dj(recipe, tmp)
    assert rc == 0, log[-3000:]
    return rows, dropped, log, recipe["dataset_path"]


@pytest.mark.integration
def test_the_shipped_recipe_loses_no_row_of_a_mixed_file(mixed_run):
    rows, dropped, _, _ = mixed_run
    assert sorted(r["id"] for r in rows + dropped) == sorted(r["id"] for r in mixed_rows())
    reasons = {r["id"]: r["gsnr_drop_reason"] for r in dropped}
    assert reasons["null_instruction"] == reasons["no_instruction_key"] == fields.MISSING_FIELD
    assert len(rows) == 7  # floor(0.5 x 15), every one scored
    assert all(r[STATS][fields.STATUS] == fields.OK for r in rows)


@pytest.mark.integration
def test_chat_rows_without_a_reply_agree_with_the_datasets_api(mixed_run, scorer_args):
    rows, dropped, _, data = mixed_run
    reasons = {r["id"]: r["gsnr_drop_reason"] for r in dropped}
    assert reasons["noreply0"] == reasons["noreply1"] == fields.MISSING_FIELD
    through_dj = {r["id"]: r[STATS][fields.STATUS] for r in rows + dropped}
    # As the README loads a file (`Dataset.from_list` would take its columns from the first row alone).
    api = GSNRScorer(GSNRConfig(**{**scorer_args, "use_cache": False})).score(
        load_dataset("json", data_files=data, split="train"))
    assert dict(zip(api["id"], api[fields.STATUS])) == through_dj


@pytest.mark.integration
def test_no_scoreable_row_fails_and_names_the_cause(tmp_path, scorer_args):
    """A typo in `output_field` makes every row missing_field: the run fails instead of selecting them."""
    data = write_jsonl(tmp_path / "rows.jsonl", [{k: r[k] for k in ("id", "instruction", "input", "output")}
                                                 for r in seed_tasks(6)])
    recipe = {"project_name": "typo", "dataset_path": str(data), "text_keys": "id",
              "process": [{"gsnr_scorer": {**scorer_args, "output_field": "outptu"}},
                          {"gsnr_top_k_filter": {"top_ratio": 0.5}}]}
    rc, log, rows, _ = run_dj(recipe, tmp_path)
    assert rc != 0 and rows == []
    assert "None of the 6 rows has a G-SNR score (statuses {'missing_field': 6})" in log
    assert "`output_field`" in log


@pytest.fixture(scope="module")
def rerun(mixed_run, scorer_args, tmp_path_factory):
    """Earlier output (proven stats) + new rows (no stats) + a forged score + an edited score."""
    rows, _, _, _ = mixed_run
    tmp = tmp_path_factory.mktemp("rerun")
    old = [copy.deepcopy(r) for r in rows]
    forged = {k: v for k, v in seed_tasks(12)[10].items() if k in ("id", "instruction", "input", "output")}
    forged[STATS] = {**old[0][STATS], fields.GSNR: 1e12}
    forged[STATS].pop(fields.PROOF)  # made up: no proof
    edited = copy.deepcopy(old[1])
    edited[STATS][fields.GSNR] = 1e9  # a proof, but not for this score
    new = [{k: r[k] for k in ("id", "instruction", "input", "output")} for r in seed_tasks(10)[8:]]
    data = write_jsonl(tmp / "rows.jsonl", old[2:] + new + [forged, edited])
    recipe = {"project_name": "rerun", "dataset_path": str(data), "text_keys": "id",
              "process": [{"gsnr_scorer": scorer_args}, {"gsnr_top_k_filter": {"top_k": 3}}]}
    rc, log, kept, dropped = run_dj(recipe, tmp)
    assert rc == 0, log[-3000:]  # partly scored input used to end in "'NoneType' object is not a mapping"
    return old, kept, dropped, log, forged["id"], edited["id"], data


@pytest.mark.integration
def test_partly_scored_input_scores_every_row_with_one_ensemble(rerun, scorer_args, tmp_path):
    """The new rows need an ensemble trained on all rows; the old rows' scores, from the ensemble of the first
    run's rows, are not comparable with its scores, so they are scored again (issue 24)."""
    old, kept, dropped, log, forged_id, edited_id, data = rerun
    by_id = {r["id"]: r[STATS] for r in kept + dropped}
    assert len(by_id) == len(old) + 2 and len(kept) == 3
    for new_id in [r["id"] for r in seed_tasks(10)[8:]]:
        assert by_id[new_id][fields.STATUS] == fields.OK and by_id[new_id][fields.PROOF]
    assert len({stats[fields.ENSEMBLE] for stats in by_id.values()}) == 1
    assert all(by_id[row["id"]][fields.ENSEMBLE] != row[STATS][fields.ENSEMBLE] for row in old[2:])
    plain = [{k: v for k, v in json.loads(line).items() if k != STATS} for line in Path(data).open()]
    scratch = GSNRScorer(GSNRConfig(**{**scorer_args, "use_cache": False})).score(
        load_dataset("json", data_files=str(write_jsonl(tmp_path / "plain.jsonl", plain)), split="train"))
    assert [by_id[i][fields.GSNR] for i in scratch["id"]] == pytest.approx(scratch[fields.GSNR], rel=1e-4)
    assert "2 row(s) arrived with G-SNR stats that this scorer did not write" in log
    assert f"{len(old)} row(s) carry scores of another ensemble" in log


@pytest.mark.integration
def test_forged_and_edited_scores_are_scored_again(rerun):
    _, kept, dropped, _, forged_id, edited_id, _ = rerun
    by_id = {r["id"]: r[STATS] for r in kept + dropped}
    assert by_id[forged_id][fields.GSNR] != 1e12 and by_id[edited_id][fields.GSNR] != 1e9
    for row_id in (forged_id, edited_id):
        assert by_id[row_id][fields.STATUS] == fields.OK and by_id[row_id][fields.PROOF]


@pytest.mark.parametrize("content, message", [
    (b'{"a": 1}\n\xff\xfe\n', r"rows.jsonl:2: not valid UTF-8"),
    (b'{"a": 1}\n\n{"a": \n', r"rows.jsonl:3: not JSON"),
    (b'[1, 2]\n', r"rows.jsonl:1: a JSON list, not an object"),
    (b'', r"rows.jsonl: no rows \(the file is empty\)"),
])
def test_unreadable_input_files_name_the_file_and_line(tmp_path, content, message):
    from gradfilter_ops.jsonl import InputFileError, read_jsonl

    path = tmp_path / "rows.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputFileError, match=message):
        read_jsonl(path)
