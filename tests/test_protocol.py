"""`gsnr-eval protocol`: the protocol file and the draw of its pools (no held-out row is ever in a pool), the
stratified selections, the verdict's wins / ties / losses and the rule's pick, and one end-to-end run on the
tiny GPT-2 through the installed command's entry that resumes without training again."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gradfilter_ops.evaluation.cli import main
from gradfilter_ops.evaluation.downstream import FULL_POOL
from gradfilter_ops.evaluation.protocol import (HELDOUT_KINDS, NOISE_READINGS, PoolSpec, ProtocolSpec,
                                                default_selections, draw_pools, stratified_top)
from gradfilter_ops.evaluation.protocol_report import outcome, verdict
from helpers import seed_tasks


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory):
    """Four "sources" and a good-answers file cut from the 175 seed tasks, and a protocol of two pools."""
    folder = tmp_path_factory.mktemp("protocol-spec")
    rows = seed_tasks(175)
    for name, part in (("a", rows[0:40]), ("b", rows[40:80]), ("c", rows[80:120]), ("d", rows[120:150])):
        _write(folder / f"{name}.jsonl", part)
    _write(folder / "good.jsonl", rows[150:175])
    (folder / "protocol.yaml").write_text(
        "sources: {a: a.jsonl, b: b.jsonl, c: c.jsonl, d: d.jsonl}\n"
        "good: good.jsonl\ngood_rows: 6\nheldout_per_source: 6\ncorrupt_fraction: 0.25\nbudgets: [0.25]\n"
        "pools:\n  first: {rows: {a: 16, b: 8}, ood: c}\n  second: {rows: {c: 12, d: 12}, ood: a}\n")
    return folder / "protocol.yaml"


def test_the_protocol_file_is_checked_when_it_is_read(tmp_path):
    sources = {"a": tmp_path / "a.jsonl", "b": tmp_path / "b.jsonl"}
    with pytest.raises(ValueError, match=r"Pool 'p' names unknown source\(s\) \['z'\]"):
        ProtocolSpec(sources, tmp_path / "g.jsonl", [PoolSpec("p", {"a": 5}, "z")])
    with pytest.raises(ValueError, match="out-of-distribution source 'a' is in the pool"):
        ProtocolSpec(sources, tmp_path / "g.jsonl", [PoolSpec("p", {"a": 5}, "a")])
    with pytest.raises(ValueError, match="budgets"):
        ProtocolSpec(sources, tmp_path / "g.jsonl", [PoolSpec("p", {"a": 5}, "b")], budgets=[1.5])
    (tmp_path / "bad.yaml").write_text("sources: {}\ngood: g.jsonl\npools: {}\nbudget: [0.1]\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['budget'\]"):
        ProtocolSpec.load(tmp_path / "bad.yaml")


def test_a_run_resumes_from_another_checkout_but_not_with_other_data(spec_file, tmp_path):
    import shutil

    from gradfilter_ops.evaluation.protocol_cli import spec_identity

    moved = tmp_path / "elsewhere"
    shutil.copytree(spec_file.parent, moved)
    assert spec_identity(ProtocolSpec.load(moved / spec_file.name)) == spec_identity(ProtocolSpec.load(spec_file))
    good = ProtocolSpec.load(moved / spec_file.name).good
    good.write_text(good.read_text() + good.read_text().splitlines()[0] + "\n")
    assert spec_identity(ProtocolSpec.load(moved / spec_file.name)) != spec_identity(ProtocolSpec.load(spec_file))


def test_the_spec_names_its_files_relative_to_the_working_folder(spec_file, monkeypatch, tmp_path):
    monkeypatch.chdir(spec_file.parent.parent)
    shown = ProtocolSpec.load(spec_file).to_dict()
    assert shown["good"] == f"{spec_file.parent.name}/good.jsonl"
    assert shown["sources"]["a"] == f"{spec_file.parent.name}/a.jsonl"
    monkeypatch.chdir(tmp_path)  # the files lie outside it: their whole paths
    assert ProtocolSpec.load(spec_file).to_dict()["good"] == str(spec_file.parent / "good.jsonl")


def test_no_heldout_row_is_in_any_pool_and_the_draw_is_seeded(spec_file):
    spec = ProtocolSpec.load(spec_file)
    pools = draw_pools(spec, seed=0)
    assert [p.name for p in pools] == ["first", "second"]
    text = lambda r: (r["instruction"], r.get("input"), r.get("eval_original_output", r["output"]))  # noqa: E731
    in_pools = {text(r) for p in pools for r in p.rows}
    for pool in pools:
        assert set(pool.heldout) == set(HELDOUT_KINDS)
        for kind, rows in pool.heldout.items():
            assert rows and not {text(r) for r in rows} & in_pools, kind
    first = pools[0]
    assert len(first.rows) == 24 and sum(r["eval_corruption"] != "clean" for r in first.rows) == 6
    # in-distribution: about heldout_per_source rows in the pool's proportions (16:8 -> 4 + 2); ood: source c
    assert [r["eval_source"] for r in first.heldout["in-distribution"]] == ["a"] * 4 + ["b"] * 2
    assert {r["eval_source"] for r in first.heldout["out-of-distribution"]} == {"c"}
    assert len(first.heldout["good answers"]) == 6
    again = draw_pools(spec, seed=0)
    assert [r["output"] for r in again[1].rows] == [r["output"] for r in pools[1].rows]
    assert [r["output"] for r in draw_pools(spec, seed=1)[1].rows] != [r["output"] for r in pools[1].rows]


def test_stratified_top_fills_each_group_in_proportion_with_its_best_rows():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    groups = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1]  # the best rows are all in group 0
    assert stratified_top(scores, groups, 5).tolist() == [0, 1, 2, 3, 8]  # 8:2 of 5 -> 4 and 1
    assert stratified_top(scores, [0] * 10, 3).tolist() == [0, 1, 2]


@pytest.mark.parametrize("noise", ["var", "relvar", "std"])
def test_the_default_selections_add_each_noise_reading_but_the_runs_own(noise):
    chosen = default_selections(noise)
    assert chosen[0] == "G-SNR" and len(chosen) == len(set(chosen))
    assert {name for other, name in NOISE_READINGS.items() if other != noise} <= set(chosen)
    assert NOISE_READINGS.get(noise) not in chosen


def test_an_outcome_needs_the_whole_interval_on_one_side():
    assert outcome([-0.10, -0.11, -0.09]) == "win"
    assert outcome([0.10, 0.11, 0.09]) == "loss"
    assert outcome([-0.10, 0.10, 0.0]) == "tie"
    assert outcome([-0.5]) == "tie"  # one seed: no interval


def _records(better: str, by: float) -> list[dict]:
    """Two pools x three held-out sets x one budget x three seeds; `better` ends `by` lower than the rest."""
    rng = np.random.default_rng(0)
    out = []
    for pool in ("p", "q"):
        for seed in range(3):
            for name in ("G-SNR", "G-SNR relvar", "random", "response length", "proxy perplexity", FULL_POOL):
                final = 2.0 - (by if name == better else 0.0) + 0.001 * rng.standard_normal()
                out.append({"pool": pool, "budget": "all" if name == FULL_POOL else "10%", "selection": name,
                            "seed": seed, "curves": {k: [2.5, final] for k in HELDOUT_KINDS}})
    return out


def test_the_rule_picks_the_most_net_wins_among_readings_not_below_perplexity_on_corruptions():
    records = _records("G-SNR relvar", 0.1)
    auroc = {"p": {"G-SNR": 0.6, "G-SNR relvar": 0.6, "proxy perplexity": 0.55}, "q": {}}
    result = verdict(records, auroc)
    counts = result["table"]["G-SNR relvar"]["random"]["final"]["counts"]
    assert counts == {"win": 6, "tie": 0, "loss": 0}
    assert result["table"]["G-SNR"]["random"]["final"]["counts"]["win"] == 0
    assert result["pick"] == "G-SNR relvar"
    # the same losses, but relvar reads corruptions worse than perplexity: it may not be the default
    auroc["p"]["G-SNR relvar"] = 0.5
    result = verdict(records, auroc)
    assert [c["eligible"] for c in result["candidates"]] == [True, False]
    assert result["pick"] == "G-SNR"


@pytest.mark.integration
def test_runs_end_to_end_and_resumes_without_training_again(spec_file, tiny_gpt2_dir, tmp_path):
    out = tmp_path / "protocol"
    # `noise: relvar` is the default, so the method's reading is the one more noise reading: `G-SNR var`
    selections = ["G-SNR", "G-SNR var", "G-SNR in clusters", "G-SNR in length bins", "random", "response length"]
    argv = ["protocol", "--spec", str(spec_file), "--hf-model", str(tiny_gpt2_dir), "--set", "num_members=2",
            "--set", "max_length=32", "--set", "train_batch_size=8", "--set", "precision=fp32", "--seeds", "2",
            "--steps", "2", "--batch-size", "2", "--eval-every", "1", "--learning-rate", "2e-2", "--skip-ifd",
            "--selections", json.dumps(selections), "--bootstrap", "0", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    keys = {(r["pool"], r["budget"], r["selection"], r["seed"]) for r in records}
    assert len(records) == len(keys) == 2 * 2 * (len(selections) + 1)
    assert {(p, "all", FULL_POOL, s) for p in ("first", "second") for s in (0, 1)} <= keys
    for r in records:
        assert set(r["curves"]) == set(HELDOUT_KINDS) and r["steps"] == [0, 1, 2]
        assert r["rows"] == (24 if r["selection"] == FULL_POOL else 6)
    # every fine-tune starts from the bare target: one start loss per pool and held-out set
    for pool in ("first", "second"):
        starts = {(k, round(r["curves"][k][0], 9)) for r in records if r["pool"] == pool for k in HELDOUT_KINDS}
        assert len(starts) == len(HELDOUT_KINDS)
    verdict_json = json.loads((out / "verdict.json").read_text())
    cells = 2 * len(HELDOUT_KINDS)  # pools x held-out sets x one budget
    for reading in ("G-SNR", "G-SNR var", "G-SNR in clusters", "G-SNR in length bins"):
        for baseline in ("random", "response length", FULL_POOL):
            assert sum(verdict_json["counts"][reading][baseline]["final"].values()) == cells
    eligible = [c["reading"] for c in verdict_json["candidates"] if c["eligible"]]
    report = (out / "report.md").read_text()
    if eligible:
        assert verdict_json["pick"] in eligible and f"Pick: **{verdict_json['pick']}**" in report
    else:
        assert verdict_json["pick"] is None and "No G-SNR selection is eligible" in report
    assert (out / "first" / "scores" / "embeddings.npy").exists()

    before = (out / "records.jsonl").read_text()
    assert main(argv) == 0  # resumed: the scores are cached and every fine-tune is done
    assert (out / "records.jsonl").read_text() == before
    assert json.loads((out / "verdict.json").read_text())["counts"] == verdict_json["counts"]
    with pytest.raises(SystemExit, match="holds a run with other"):
        main([*argv, "--set", "learning_rate=0.05"])

    # another scoring setting, judged in the same folder: only its own fine-tunes run
    name = "G-SNR 1/2 layers"
    assert main([*argv, "--reading", name + '={"lora_layer_fraction": 0.5}']) == 0
    grown = (out / "records.jsonl").read_text()
    assert grown.startswith(before)
    added = [json.loads(line) for line in grown[len(before):].splitlines()]
    assert {(r["pool"], r["selection"], r["seed"]) for r in added} == {
        (p, name, s) for p in ("first", "second") for s in (0, 1)}
    assert (out / "first" / "scores-1" / "norms.npz").exists()
    verdict_json = json.loads((out / "verdict.json").read_text())
    assert name in [c["reading"] for c in verdict_json["candidates"]]
    assert verdict_json["meta"]["readings"] == {name: {"lora_layer_fraction": 0.5}}


@pytest.mark.parametrize("item", ["G-SNR fast", 'fast={"num_members": 2}', 'G-SNR relvar={"noise": "relvar"}',
                                  'G-SNR x={"no_such_option": 1}'])
def test_a_reading_needs_a_new_g_snr_name_and_valid_overrides(item):
    from gradfilter_ops.evaluation.protocol_cli import parse_readings

    with pytest.raises((SystemExit, ValueError, TypeError)):
        parse_readings([item], None, {})
    assert parse_readings(['G-SNR M3={"num_members": 3}'], None, {})["G-SNR M3"].num_members == 3


def test_the_bare_targets_losses_are_the_first_point_of_every_fine_tune(tiny_gpt2_dir, tiny_config):
    """The adapter starts as a no-op (B = 0), so measuring the start once per pool changes no curve."""
    from gradfilter_ops.evaluation.downstream import encode_all, load_target
    from gradfilter_ops.evaluation.finetune import FinetuneRecipe, finetune, heldout_losses, target_lora

    config = tiny_config(max_length=32)
    model, formatter, pad_id = load_target(str(tiny_gpt2_dir), config)
    rows = encode_all(formatter, seed_tasks(12), "pool")
    recipe = FinetuneRecipe(steps=2, batch_size=2, eval_every=1, learning_rate=2e-2)
    lora = target_lora(recipe, config, model)
    start = heldout_losses(model, rows[8:], pad_id, recipe.eval_batch_size, "fp32")
    measured = finetune(model, rows[:8], rows[8:], recipe, lora, 0, pad_id, "fp32")
    given = finetune(model, rows[:8], rows[8:], recipe, lora, 0, pad_id, "fp32", start)
    np.testing.assert_array_equal(measured.row_losses, given.row_losses)
    assert measured.heldout_loss == given.heldout_loss and measured.heldout_loss[0] != measured.heldout_loss[-1]


def test_the_stratified_auroc_counts_only_pairs_inside_a_group():
    from gradfilter_ops.evaluation.metrics import auroc, stratified_auroc

    # a score that only follows the group (say, the length bin): informative overall, chance inside the groups
    score, clean, groups = [1, 1, 1, 0, 0, 0], [True, True, False, True, False, False], [1, 1, 1, 0, 0, 0]
    assert auroc(score, clean) > 0.6 and stratified_auroc(score, clean, groups) == 0.5
    # right inside group 0 (1 pair), wrong inside group 1 (2 pairs): 1 of 3 pairs ordered right
    assert stratified_auroc([2, 1, 1, 2, 3], [True, False, True, False, False], [0, 0, 1, 1, 1]) == 1 / 3
