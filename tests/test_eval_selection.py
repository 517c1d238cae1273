"""gradfilter_ops.evaluation (`gsnr-eval`): the corruptions, the metrics, the gradient parts and one tiny
end-to-end run."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import itertools
import json

import numpy as np
import pytest

from gradfilter_ops.evaluation.baselines import superfiltering_keep_score
from gradfilter_ops.evaluation.arguments import parse_set
from gradfilter_ops.evaluation.cli import run
from gradfilter_ops.evaluation.corrupt import (CLEAN, KINDS, REFUSALS, REPEAT_PHRASE_WORDS, TRUNCATE_KEEP,
                                              corrupt_dataset, corrupt_response)
from gradfilter_ops.evaluation.data import read_instruction_rows
from gradfilter_ops.evaluation.gradients import per_example_parts, snapshot_norms, train_all_epochs
from gradfilter_ops.evaluation.metrics import (auroc, bootstrap_auroc, contamination, kept_indices, kind_survival,
                                              paired_auroc_difference, spearman)
from gradfilter_ops.evaluation.readings import NormReading, reading_scores
from gradfilter_ops.evaluation.runs import merge_members
from helpers import DEMO_DATA, seed_tasks


# --- corruptions ----------------------------------------------------------------------------------

def test_corruption_is_deterministic_balanced_and_leaves_clean_rows_alone():
    rows = seed_tasks(60)
    a = corrupt_dataset(rows, 0.3, seed=3)
    b = corrupt_dataset(rows, 0.3, seed=3)
    c = corrupt_dataset(rows, 0.3, seed=4)
    assert a == b
    assert [r["eval_corruption"] for r in a] != [r["eval_corruption"] for r in c]
    kinds = [r["eval_corruption"] for r in a]
    assert sum(k != CLEAN for k in kinds) == 18
    counts = [kinds.count(k) for k in KINDS]
    assert max(counts) - min(counts) <= 1
    for row, new in zip(rows, a):
        if new["eval_corruption"] == CLEAN:
            assert {k: new[k] for k in row} == row and "eval_original_output" not in new
        else:
            assert new["output"] != row["output"] and new["eval_original_output"] == row["output"]
    assert rows == seed_tasks(60)  # the input is not modified


def test_each_corruption_kind_does_what_it_says():
    rows = seed_tasks(120)
    originals = [r["output"] for r in rows]
    out = corrupt_dataset(rows, 0.5, seed=0)
    seen = set()
    for row, new in zip(rows, out):
        kind, text, words = new["eval_corruption"], new["output"], row["output"].split()
        seen.add(kind)
        if kind == "swap":
            assert text in originals and text.strip() != row["output"].strip()
        elif kind == "truncate":
            if len(words) >= 2:
                assert text.split() == words[: max(1, int(len(words) * TRUNCATE_KEEP))]
            else:
                assert row["output"].strip().startswith(text) and len(text) < len(row["output"].strip())
        elif kind == "shuffle":
            assert sorted(text.split()) == sorted(words) and text.split() != words
        elif kind == "repeat":
            phrase = words[: REPEAT_PHRASE_WORDS]
            got = text.split()
            assert len(got) >= 3 * len(phrase) and len(got) % len(phrase) == 0
            assert got == phrase * (len(got) // len(phrase))
        elif kind == "echo":
            expected = row["instruction"] + (f"\n{row['input']}" if row.get("input", "").strip() else "")
            assert text == expected
        elif kind == "refusal":
            assert text in REFUSALS
    assert seen == {CLEAN, *KINDS}


def test_corruption_edge_cases():
    rng = np.random.default_rng(0)
    assert corrupt_response("truncate", "Yes", "q", rng) == "Y"
    assert corrupt_response("shuffle", "a b", "q", rng) == "b a"
    assert corrupt_response("repeat", "Yes.", "q", rng) == "Yes. Yes. Yes."
    with pytest.raises(ValueError, match="donor"):
        corrupt_response("swap", "same", "q", rng, donor="same")
    with pytest.raises(ValueError, match="Unknown corruption"):
        corrupt_dataset(seed_tasks(4), 0.5, 0, kinds=("typo",))
    only = corrupt_dataset(seed_tasks(20), 0.5, 0, kinds=("echo",))
    assert {r["eval_corruption"] for r in only} == {CLEAN, "echo"}


def test_load_rows_caps_each_file_with_a_seeded_sample(tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(json.dumps({"instruction": f"q{i}", "output": f"a {i}" if i % 5 else " "})
                               for i in range(30)) + "\n")
    rows = read_instruction_rows([DEMO_DATA, other], rows_per_file=10, seed=1)
    assert len(rows) == 20
    assert rows[:10] == [r for r in seed_tasks(175) if r in rows[:10]]  # file order kept
    assert all(r["output"].strip() for r in rows[10:])  # empty responses skipped
    assert rows == read_instruction_rows([DEMO_DATA, other], rows_per_file=10, seed=1)


# --- metrics --------------------------------------------------------------------------------------

def _brute_auroc(scores, positive):
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_on_hand_made_scores():
    assert auroc([4, 3, 2, 1], [True, True, False, False]) == 1.0
    assert auroc([1, 2, 3, 4], [True, True, False, False]) == 0.0
    assert auroc([3, 2, 1, 0], [True, False, True, False]) == 0.75
    assert auroc([1, 1, 1, 1], [True, False, True, False]) == 0.5
    # missing or non-finite scores rank last, tied with each other
    assert auroc([float("nan"), 1.0], [False, True]) == 1.0
    assert auroc([None, -np.inf, 0.0], [True, False, False]) == 0.25
    assert np.isnan(auroc([1, 2], [True, True]))
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, 40).astype(float)  # many ties
    positive = rng.random(40) < 0.6
    assert auroc(scores, positive) == pytest.approx(_brute_auroc(scores, positive))
    low, high = bootstrap_auroc(scores, positive, np.random.default_rng(1), rounds=200)
    assert low <= auroc(scores, positive) <= high
    # a perfect ranking stays perfect in every resample that holds both classes; one class has no AUROC
    perfect = bootstrap_auroc([6, 5, 4, 3, 2, 1], [True] * 3 + [False] * 3, np.random.default_rng(1), rounds=50)
    assert perfect == (1.0, 1.0)
    assert all(np.isnan(bootstrap_auroc([1, 2, 3], [True] * 3, np.random.default_rng(1), rounds=20)))


def test_spearman_on_hand_made_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4, np.nan], [1, 3, 2, 4, 0]) == pytest.approx(0.8)  # the nan pair is left out
    assert np.isnan(spearman([1, 2], [1, 2]))


def test_top_k_contamination_on_hand_made_scores():
    scores = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    corrupted = [False, True, True, False, False, False, False, False, False, True]
    assert kept_indices(scores, 0.1).tolist() == [0]
    assert contamination(scores, corrupted, 0.1) == 0.0
    assert contamination(scores, corrupted, 0.3) == pytest.approx(2 / 3)
    # ties go by row order; non-finite scores rank last
    assert kept_indices([1, 1, 1, float("nan"), 2], 0.4).tolist() == [0, 4]
    assert kept_indices([float("nan"), -np.inf, 0.5, float("nan")], 0.75).tolist() == [0, 1, 2]
    # Superfiltering drops IFD >= 1 before keeping the top k, so fewer rows may be kept
    keep = superfiltering_keep_score(np.array([0.5, 1.0, 1.7, 0.9, np.nan]))
    assert keep[0] == 0.5 and keep[3] == 0.9 and np.all(np.isneginf(keep[[1, 2, 4]]))
    assert kept_indices(keep, 0.6, drop_non_finite=True).tolist() == [0, 3]
    assert contamination(keep, [True, False, False, False, False], 0.6, drop_non_finite=True) == 0.5
    kinds = ["clean", "swap", "swap", "echo", "clean"]
    assert kind_survival([5, 4, 0, 3, 1], kinds, 0.6) == {"echo": 1.0, "swap": 0.5}


def test_readings_from_raw_norms():
    from gradfilter_ops.engine.gsnr import gsnr_from_sq_norms

    rng = np.random.default_rng(0)
    norms = {k: rng.random((4, 3, 10)) + 0.1 for k in ("A", "B", "W", "loss")}
    reading = NormReading(params="AB", early=1, late=3, members=2, norm="l2", noise="std", eps=1e-3)
    got = reading_scores(norms, (1, 2, 3), reading)
    want = gsnr_from_sq_norms((norms["A"] + norms["B"])[:2][:, [0, 2]], norm="l2", noise="std", eps=1e-3)
    np.testing.assert_allclose(got["score"], want.gsnr)
    late = reading_scores(norms, (1, 2, 3), dataclasses.replace(reading, params="B", signal="neg_late_norm"))
    np.testing.assert_allclose(late["score"], -np.sqrt(norms["B"][:2, 2]).mean(axis=0))
    with pytest.raises(ValueError, match="members"):
        reading_scores(norms, (1, 2, 3), dataclasses.replace(reading, members=8))
    summed = dataclasses.replace(reading, norm="l2sq", noise="var", example_loss="sum")
    with pytest.raises(ValueError, match="loss tokens"):
        reading_scores(norms, (1, 2, 3), summed)
    tokens = np.arange(1.0, 11.0)
    got = reading_scores({**norms, "tokens": tokens}, (1, 2, 3), summed)
    sq = (norms["A"] + norms["B"])[:2][:, [0, 2]] * tokens**2
    np.testing.assert_allclose(got["score"], gsnr_from_sq_norms(sq, eps=1e-3).gsnr)
    assert "sum-loss" in summed.label()


def test_parse_set_reads_json_values():
    assert parse_set(["num_members=4", "eps=1e-3", "grad_params=B", "late_epoch=null", "a=x=y"]) == {
        "num_members": 4, "eps": 1e-3, "grad_params": "B", "late_epoch": None, "a": "x=y"}
    with pytest.raises(ValueError):
        parse_set(["novalue"])


# --- the proxy side: equal to the package, and W against autograd -----------------------------------

@pytest.fixture(scope="module")
def tiny_setup(tiny_gpt2_dir):
    from gradfilter_ops import GSNRConfig
    from gradfilter_ops.prompts import PromptFormatter
    from gradfilter_ops.proxy import load_frozen_proxy

    config = GSNRConfig(hf_model=str(tiny_gpt2_dir), device="cpu", num_members=2, num_epochs=3, early_epoch=1,
                        late_epoch=3, train_batch_size=3, score_batch_size=6, max_length=40, learning_rate=1e-3)
    proxy = load_frozen_proxy(config.hf_model, device=config.device)
    encoded = [PromptFormatter(config, proxy.tokenizer).encode(r) for r in seed_tasks(6)]
    return config, proxy.model, proxy.pad_id, encoded


def test_training_and_norm_parts_match_the_package(tiny_setup):
    import torch

    from gradfilter_ops.engine import EnsembleScorer, train_ensemble

    config, model, pad_id, encoded = tiny_setup
    package = train_ensemble(model, encoded, config, pad_id, progress=False)
    online_config = dataclasses.replace(config, score_mode="online")
    package_online = train_ensemble(model, encoded, online_config, pad_id, progress=False).online_sq_norms()
    ours = train_all_epochs(model, encoded, config, pad_id, progress=False)
    assert ours.epochs == (1, 2, 3) and ours.num_members == 2
    assert sorted(ours.states) == [(m, e) for m in (0, 1) for e in (1, 2, 3)]
    online = ours.online_sq_norms()  # read off the training steps of every epoch
    assert online.shape == (2, 3, len(encoded))
    np.testing.assert_allclose(online[:, [0, 2]], package_online, rtol=1e-6)  # epochs 1 and 3 of `online` mode
    for key, state in package.states.items():
        for name, tensor in state.items():
            assert torch.equal(tensor, ours.states[key][name])
    parts = snapshot_norms(model, ours, config, encoded, pad_id, progress=False)
    for grad_params in ("AB", "B"):
        scorer = EnsembleScorer(model, package, dataclasses.replace(config, grad_params=grad_params), pad_id)
        want = scorer.sq_norms(encoded)
        scorer.close()
        got = (parts["A"] + parts["B"] if grad_params == "AB" else parts["B"])[:, [0, 2]]
        np.testing.assert_allclose(got, want, rtol=1e-4)


def test_w_norm_is_the_gradient_of_the_adapted_frozen_weights(tiny_setup):
    import torch
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    from gradfilter_ops.engine import lora_config
    from gradfilter_ops.engine.grads import LoraActivations, collate, response_loss_sums

    config, model, pad_id, encoded = tiny_setup
    torch.manual_seed(0)
    peft_model = get_peft_model(model, dataclasses.replace(lora_config(config, model), init_lora_weights=False))
    try:
        activations = LoraActivations(peft_model)
        batch = collate(encoded[:4], pad_id)
        got = per_example_parts(peft_model, activations, batch, scaling=config.lora_alpha / config.lora_r)
        activations.remove()
        bases = [m.base_layer.weight for m in peft_model.modules() if isinstance(m, LoraLayer)]
        for i, example in enumerate(encoded[:4]):
            for w in bases:
                w.requires_grad_(True)
            sums, counts = response_loss_sums(peft_model, collate([example], pad_id))
            grads = torch.autograd.grad((sums / counts).sum(), bases)
            for w in bases:
                w.requires_grad_(False)
            want = sum(float(g.pow(2).sum()) for g in grads)
            assert float(got["W"][i]) == pytest.approx(want, rel=1e-4)
            assert float(got["loss"][i]) == pytest.approx(float((sums / counts).detach()), rel=1e-5)
    finally:
        peft_model.unload()


# --- end to end -----------------------------------------------------------------------------------

@pytest.mark.integration
def test_tool_runs_end_to_end_on_a_tiny_proxy(tiny_gpt2_dir, tmp_path):
    out = tmp_path / "eval"
    argv = ["--data", str(DEMO_DATA), "--rows-per-file", "20", "--corrupt-fraction", "0.3", "--seed", "1",
            "--hf-model", str(tiny_gpt2_dir), "--set", "num_members=2", "--set", "num_epochs=2",
            "--set", "max_length=40", "--set", "train_batch_size=10", "--set", "score_batch_size=20",
            "--set", "device=cpu", "--out", str(out), "--bootstrap", "10", "--quiet"]
    summary = run(argv)
    assert summary["rows"] == 20 and summary["corrupted"] == 6
    names = set(summary["signals"])
    assert {"G-SNR", "random", "response length", "proxy perplexity", "IFD (Superfiltering)",
            "ablation: gradient norm", "ablation: raw drop", "ablation: normalized drop"} <= names
    report = (out / "report.md").read_text()
    assert "| G-SNR |" in report and "AUROC per corruption kind" in report
    assert "gsnr-eval --data " in report and "--rows-per-file 20" in report  # the command that made it
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 20 and sum(s["eval_corruption"] != "clean" for s in scores) == 6
    clean = [s["eval_corruption"] == "clean" for s in scores]
    for name, values in summary["signals"].items():  # each AUROC is that of the scores written per row
        written = [-np.inf if s[name] is None else s[name] for s in scores]
        assert values["auroc"] == pytest.approx(_brute_auroc(written, clean)), name
    random = np.random.default_rng([1, 7]).random(20)  # the `random` signal: uniform, seeded with --seed 1
    np.testing.assert_allclose([s["random"] for s in scores], random)
    with open(out / "readings.csv", newline="") as f:
        readings = list(csv.DictReader(f))
    # 1 snapshot pair (epochs 1, 2) and M=2: 3 parts x 2 norms x 3 noises x 4 eps = 72 G-SNR readings,
    # 3 parts x 3 ablation signals + the loss drop = 10, 3 online ablation signals and the online G-SNR
    # readings (2 norms x 3 noises x 4 eps = 24), and the summed-loss reading of the config's parts, pair and
    # M for 2 norms x 3 noises = 6
    assert len(readings) == 72 + 10 + 3 + 24 + 6
    assert sum(r["example_loss"] == "sum" for r in readings) == 6
    online = next(r for r in readings if r["params"] == "online" and r["signal"] == "gsnr" and r["noise"] == "relvar")
    assert (online["early"], online["late"], online["members"], online["norm"], online["eps"]) == \
        ("1", "2", "2", "l2sq", "1e-08")
    # score_mode: online and noise: relvar are the package defaults, so the main table's G-SNR is this reading
    assert summary["signals"]["G-SNR"]["auroc"] == pytest.approx(float(online["auroc"]))
    assert "How the parts follow the response's length" in report and "online s1-t2 M2 l2sq relvar" in report
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "roc.png").stat().st_size > 1000
    # --reuse re-analyses the saved norms without training again
    again = run(argv + ["--reuse"])
    assert again["signals"]["G-SNR"]["auroc"] == summary["signals"]["G-SNR"]["auroc"]


def test_paired_difference_and_member_merge(tmp_path):
    clean = np.array([True, True, False, False, True, False])
    good, bad = np.array([6, 5, 1, 2, 4, 0.0]), np.array([0, 1, 5, 6, 2, 4.0])
    point, low, high = paired_auroc_difference(good, bad, clean, np.random.default_rng(0), rounds=200)
    # `good` ranks every clean row first and `bad` every one last, in each resample too
    assert point == auroc(good, clean) - auroc(bad, clean) == 1.0 and low == high == 1.0

    def fake_run(folder, seed, members, fill):
        folder.mkdir()
        config = {"seed": seed, "num_members": members, "lr": 1, "cache_dir": str(folder)}
        (folder / "meta.json").write_text(json.dumps({"key": {"config": config, "rows": [[0, "clean", "x"]]},
                                                      "epochs": [1, 2], "timings": {"train ensemble": 1.0}}))
        norms = {f"norm_{k}": np.full((members, 2, 1), fill) for k in ("A", "B", "W", "loss")}
        np.savez(folder / "norms.npz", proxy_loss=np.array([fill]), **norms)

    fake_run(tmp_path / "a", 42, 4, 1.0)
    fake_run(tmp_path / "b", 46, 4, 2.0)
    fake_run(tmp_path / "c", 47, 4, 3.0)
    assert merge_members(str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "m")) == 8
    merged = np.load(tmp_path / "m" / "norms.npz")
    assert merged["norm_A"].shape == (8, 2, 1) and merged["norm_W"][:4].max() == 1 and merged["norm_W"][4:].min() == 2
    assert merged["proxy_loss"][0] == 1.0
    assert json.loads((tmp_path / "m" / "meta.json").read_text())["key"]["config"]["num_members"] == 8
    with pytest.raises(ValueError, match="seed 46"):
        merge_members(str(tmp_path / "a"), str(tmp_path / "c"), str(tmp_path / "n"))
