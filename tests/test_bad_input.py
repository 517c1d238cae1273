"""Bad and hostile input through the real `dj-process`: no row lost, no unscored row selected, no
made-up score trusted (issue 14). The runs are shared by module-scoped fixtures."""

import copy
import json
from pathlib import Path

import pytest
import yaml
from datasets import load_dataset

from gradfilter_ops import GSNRConfig, GSNRScorer, fields

from helpers import seed_tasks
from warm_commands import run_command

# One worker runs the whole file (`--dist loadgroup`): its dj-process runs and their score cache are built once.
pytestmark = pytest.mark.xdist_group("test_bad_input")

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
    run = run_command("dj-process", ["--config", path], cwd=REPO)
    export = tmp / "out" / "result.jsonl"
    rows = [json.loads(line) for line in export.open()] if export.exists() else []
    dropped = [json.loads(line) for f in (tmp / "out").glob("*/*dropped.jsonl") for line in f.open()]
    return run.returncode, run.log, rows, dropped


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
    (b'{"a": "ok \\ud83d\\ude00"}\n{"a": ["x", {"b": "\\ud800 alone"}]}\n',
     r"rows.jsonl:2: a string with a lone surrogate"),
])
def test_unreadable_input_files_name_the_file_and_line(tmp_path, content, message):
    from gradfilter_ops.jsonl import InputFileError, read_jsonl

    path = tmp_path / "rows.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputFileError, match=message):
        read_jsonl(path)


def test_a_gsnr_range_that_keeps_nothing_is_refused_when_the_op_is_built():
    from gradfilter_ops.ops import GSNRScorerOp, RayGSNRScorerOp

    for op in (GSNRScorerOp, RayGSNRScorerOp):
        with pytest.raises(ValueError, match=r"`min_gsnr` \(5.0\) is greater than `max_gsnr` \(1.0\)"):
            op(hf_model="x", min_gsnr=5.0, max_gsnr=1.0)
        with pytest.raises(ValueError, match="`max_gsnr` must be a finite number or null, got nan"):
            op(hf_model="x", max_gsnr=float("nan"))
    assert GSNRScorerOp(hf_model="x", min_gsnr=1.0, max_gsnr=1.0).max_gsnr == 1.0


@pytest.mark.parametrize("template, message", [
    ("Q: {question\nA: ", r"is not a valid format string \(unmatched '\{' in format spec\)"),
    ("Q: {}\nA: ", r"has a positional field \{\}"),
    ("Q: {0}\nA: ", r"has a positional field \{0\}"),
    ("Q: {q.text}\nA: ", r"looks up \{q.text\} inside a field"),
    ("Q: {q!x}\nA: ", r"unknown conversion !x in \{q\}"),
    ("Q: {q:d}\nA: ", r"cannot format text fields: ValueError: Unknown format code 'd'"),
])
def test_a_malformed_prompt_template_is_refused_when_the_config_is_built(template, message):
    from gradfilter_ops.ops import GSNRScorerOp

    with pytest.raises(ValueError, match=message):
        GSNRConfig(format="custom", prompt_template=template, response_field="a")
    with pytest.raises(ValueError, match=message):
        GSNRScorerOp(hf_model="x", format="custom", prompt_template=template, response_field="a")


def test_a_prompt_template_field_no_row_has_is_refused_before_training(tiny_config):
    from datasets import Dataset

    rows = [{"id": i, "question": f"What is {i} + 1?", "answer": f"It is {i + 1}."} for i in range(4)]
    scorer = GSNRScorer(tiny_config(format="custom", prompt_template="Q: {question}\nHint: {hint}\nA: ",
                                    response_field="answer"))
    with pytest.raises(ValueError, match=r"`prompt_template` 'Q: \{question\}\\nHint: \{hint\}\\nA: ' reads the field "
                                         r"'hint', which no row has; the rows' fields: \['answer', 'id', 'question'\]"):
        scorer.fit(Dataset.from_list(rows))
    assert scorer.fitted is None  # nothing trained
    wrong_response = GSNRScorer(tiny_config(format="custom", prompt_template="Q: {question}\nA: ",
                                            response_field="answr"))
    with pytest.raises(ValueError, match="`response_field` 'answr' is not a field of any row"):
        wrong_response.fit(rows)


def test_stats_that_are_not_a_mapping_name_the_row(tiny_gpt2_dir):
    from data_juicer.core.data import NestedDataset
    from datasets import Dataset

    from gradfilter_ops.ops import GSNRScorerOp, GSNRTopKFilter

    rows = [{**row, STATS: "high"} for row in seed_tasks(3)]
    dataset = NestedDataset(Dataset.from_list(rows))
    message = rf"row 0 \(id '{rows[0]['id']}'\) has `__dj__stats__` = 'high' \(str\), not a mapping of stats"
    with pytest.raises(ValueError, match="gsnr_scorer: " + message):
        GSNRScorerOp(hf_model=str(tiny_gpt2_dir), device="cpu", use_cache=False).run(dataset)
    with pytest.raises(ValueError, match="gsnr_top_k_filter: " + message):
        GSNRTopKFilter(top_k=1).run(dataset)


def demo_recipe(scorer_args: dict, data: Path, **top_k) -> dict:
    """The shipped demo recipe (its loader settings and text ops) with the tiny proxy, on `data`."""
    recipe = yaml.safe_load((REPO / "recipes" / "gsnr_demo.yaml").read_text())
    for step in recipe["process"]:
        if "gsnr_scorer" in step:
            step["gsnr_scorer"] = scorer_args
        if "gsnr_top_k_filter" in step:
            step["gsnr_top_k_filter"] = top_k
    return {**recipe, "dataset_path": str(data)}


@pytest.mark.integration
def test_our_export_fed_back_with_new_rows_loses_no_row(mixed_run, scorer_args, tmp_path):
    """The shipped recipe on its own output plus new rows: the loader used to drop every new row, since the
    exported rows carried `__dj__suffix__` and so it was not added to the new ones."""
    exported, dropped_before, _, _ = mixed_run
    assert all("__dj__suffix__" not in r for r in exported + dropped_before)
    new = [{k: r[k] for k in ("id", "instruction", "input", "output")} for r in seed_tasks(21)[8:]]
    inputs = exported + new
    assert len(inputs) == 20
    rc, log, rows, dropped = run_dj(demo_recipe(scorer_args, write_jsonl(tmp_path / "again.jsonl", inputs),
                                                top_ratio=0.5), tmp_path)
    assert rc == 0, log[-3000:]
    assert sorted(r["id"] for r in rows + dropped) == sorted(r["id"] for r in inputs), log[-5000:]
    assert len(rows) == 10 and {r["gsnr_drop_reason"] for r in dropped} == {fields.BELOW_CUTOFF}


@pytest.mark.integration
def test_two_top_k_steps_write_a_dropped_file_each(tmp_path, scorer_args):
    rows = [{k: r[k] for k in ("id", "instruction", "input", "output")} for r in seed_tasks(20)]
    recipe = {"project_name": "two", "dataset_path": str(write_jsonl(tmp_path / "rows.jsonl", rows)), "text_keys": "id",
              "process": [{"gsnr_scorer": scorer_args}, {"gsnr_top_k_filter": {"top_ratio": 0.5}},
                          {"gsnr_top_k_filter": {"top_ratio": 0.3}}]}  # Data-Juicer merges a repeated op's
    rc, log, kept, _ = run_dj(recipe, tmp_path)  # options over its earlier steps': the same budget kind in both
    assert rc == 0, log[-3000:]
    job = next((tmp_path / "out").glob("*/gsnr_dropped_step2.jsonl")).parent
    second, third = ([json.loads(line) for line in (job / f"gsnr_dropped_step{n}.jsonl").open()] for n in (2, 3))
    assert not (job / "gsnr_dropped.jsonl").exists()
    assert (len(kept), len(second), len(third)) == (3, 10, 7)
    assert sorted(r["id"] for r in kept + second + third) == sorted(r["id"] for r in rows)  # each row once
    best = sorted(second + third + kept, key=lambda r: -r[STATS][fields.GSNR])
    assert {r["id"] for r in kept} == {r["id"] for r in best[:3]}


@pytest.mark.integration
@pytest.mark.parametrize("case", ["dropped_path_is_the_dataset", "not_utf8", "suffix_in_some_rows"])
def test_bad_recipes_and_files_fail_before_training_and_name_the_cause(tmp_path, scorer_args, case):
    rows = [{k: r[k] for k in ("id", "instruction", "input", "output")} for r in seed_tasks(6)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    if case == "dropped_path_is_the_dataset":
        recipe = {"project_name": case, "dataset_path": str(data), "text_keys": "id",
                  "process": [{"gsnr_scorer": scorer_args},
                              {"gsnr_top_k_filter": {"top_k": 2, "dropped_path": str(data)}}]}
        message = f"step 2 (`gsnr_top_k_filter`): its dropped-rows file {data} is the dataset (`dataset_path`)"
    elif case == "not_utf8":
        data.write_bytes(data.read_bytes() + b'{"id": "x", "output": "caf\xe9"}\n')
        recipe = demo_recipe(scorer_args, data, top_k=2)
        message = f"{data}:7: not valid UTF-8"
    else:  # an old export (with the loader's `__dj__suffix__`) plus new rows, in the shipped recipe
        data = write_jsonl(data, [{**r, "__dj__suffix__": ".jsonl"} for r in rows[:3]] + rows[3:])
        recipe = demo_recipe(scorer_args, data, top_k=2)
        message = f"{data}:4: 3 of 6 rows have no `__dj__suffix__`"
    before = data.read_bytes()
    rc, log, kept, dropped = run_dj(recipe, tmp_path)
    assert rc != 0 and kept == [] and dropped == []
    assert message in log, log[-3000:]
    assert "training LoRA ensemble" not in log
    assert data.read_bytes() == before


def test_dropped_files_that_would_replace_rows_are_refused(tmp_path):
    from jsonargparse import Namespace

    from gradfilter_ops.ops._recipe import check_dropped_files, dropped_files

    def recipe(*steps, work_dir=str(tmp_path / "job")):
        return Namespace(dataset_path=str(tmp_path / "rows.jsonl"), export_path=str(tmp_path / "out.jsonl"),
                         work_dir=work_dir, process=list(steps))

    scorer = {"gsnr_scorer": {"min_gsnr": 0.0}}
    two = recipe(scorer, {"gsnr_top_k_filter": {"top_ratio": 0.5}}, {"gsnr_top_k_filter": {"top_k": 1}})
    check_dropped_files(two)
    assert [Path(p).name for _, p in dropped_files(two)] == ["gsnr_scorer_dropped.jsonl", "gsnr_dropped_step2.jsonl",
                                                            "gsnr_dropped_step3.jsonl"]
    cases = [
        (recipe({"gsnr_top_k_filter": {"top_k": 1, "dropped_path": str(tmp_path / "out.jsonl")}}),
         "step 1 \\(`gsnr_top_k_filter`\\): its dropped-rows file .*out.jsonl is the export \\(`export_path`\\)"),
        (recipe({"gsnr_top_k_filter": {"top_k": 1, "dropped_path": str(tmp_path / "out_stats.jsonl")}}),
         "is the export's stats file"),
        (recipe({"gsnr_top_k_filter": {"top_k": 2, "dropped_path": str(tmp_path / "d.jsonl")}},
                {"ray_gsnr_top_k_filter": {"top_k": 1, "dropped_path": str(tmp_path / "d.jsonl")}}),
         "step 2 \\(`ray_gsnr_top_k_filter`\\): .* is the dropped-rows file of step 1 \\(`gsnr_top_k_filter`\\)"),
        (recipe(scorer, {"gsnr_top_k_filter": {"top_k": 1, "dropped_path": str(tmp_path / "job" /
                                                                                 "gsnr_scorer_dropped.jsonl")}}),
         "is the dropped-rows file of step 1 \\(`gsnr_scorer`\\)"),
    ]
    for cfg, message in cases:
        with pytest.raises(ValueError, match=message):
            check_dropped_files(cfg)
    kept = recipe({"gsnr_top_k_filter": {"top_k": 1, "keep_dropped": False,
                                         "dropped_path": str(tmp_path / "out.jsonl")}})
    check_dropped_files(kept)  # writes no dropped rows at all


def test_a_token_budget_that_keeps_nothing_warns_through_the_op(tmp_path):
    from data_juicer.core.data import NestedDataset
    from datasets import Dataset
    from loguru import logger

    from gradfilter_ops.ops import GSNRTopKFilter

    rows = [{"id": f"r{i}", STATS: {fields.GSNR: 1.0 + i, fields.STATUS: fields.OK, fields.TOTAL_TOKENS: 90 - 10 * i}}
            for i in range(3)]  # the best row, r2, has the fewest tokens: 70
    seen = []
    handle = logger.add(lambda message: seen.append(str(message)), level="WARNING")
    try:
        out = GSNRTopKFilter(max_tokens=50, dropped_path=str(tmp_path / "dropped.jsonl")).run(
            NestedDataset(Dataset.from_list(rows)))
    finally:
        logger.remove(handle)
    assert len(out) == 0
    assert any("max_tokens=50 keeps no row: the best row has 70 tokens and the smallest scored row 70" in m
               for m in seen), seen
    dropped = [json.loads(line) for line in (tmp_path / "dropped.jsonl").open()]
    assert [(r["id"], r["gsnr_drop_reason"]) for r in dropped] == [(f"r{i}", fields.OVER_TOKEN_BUDGET)
                                                                   for i in range(3)]
