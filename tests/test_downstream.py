"""`gsnr-eval downstream`: one end-to-end run on the tiny GPT-2 through the installed command's entry
(40 pool rows, 8 held out, 2 seeds, 4 steps), and the fine-tune itself: it is deterministic, takes
the same steps on every selection, and actually trains."""

from __future__ import annotations

import csv
import importlib.util
import json
import math

import numpy as np
import pytest

from gradfilter_ops.evaluation.cli import main
from gradfilter_ops.evaluation.downstream import (FULL_POOL, drop_heldout_rows, select_budgets,
                                                  split_heldout)
from gradfilter_ops.evaluation.downstream_report import t_interval
from gradfilter_ops.evaluation.finetune import FinetuneRecipe, finetune, target_lora, training_batches
from gradfilter_ops.evaluation.signals import Signal
from gradfilter_ops.selection import rows_for_ratio
from helpers import DEMO_DATA, seed_tasks, write_tiny_gpt2

# One worker runs the whole file (`--dist loadgroup`): its module fixtures (the downstream run) are built once.
pytestmark = pytest.mark.xdist_group("test_downstream")

SIGNALS = ("G-SNR", "random", "response length", "proxy perplexity", "IFD (Superfiltering)")
STEPS, BATCH, SEEDS = 4, 2, (3, 4)
CURVE = [0, 2, 4]


@pytest.fixture(scope="module")
def learnable_gpt2_dir(tiny_gpt2_dir, tmp_path_factory):
    """conftest's tiny GPT-2, built the same way but with initializer_range 0.3: the fine-tune target.

    conftest's own sits at the uniform loss (ln 4096 = 8.3; with weights of scale 0.02 its logits span
    about +-0.6), so a few LoRA steps barely move it and a check that training works would test noise.
    It stays the proxy that scores; this one is what gets fine-tuned (`--target`).
    """
    import shutil

    from transformers import GPT2Config, GPT2TokenizerFast

    path = tmp_path_factory.mktemp("learnable-gpt2")
    write_tiny_gpt2(path, GPT2Config.from_pretrained(tiny_gpt2_dir).vocab_size, initializer_range=0.3)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(tiny_gpt2_dir / name, path / name)
    GPT2TokenizerFast.from_pretrained(path).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def downstream_run(tiny_gpt2_dir, learnable_gpt2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("downstream")
    argv = ["downstream", "--data", str(DEMO_DATA), "--rows-per-file", "48", "--heldout", "8",
            "--corrupt-fraction", "0.3", "--seed", "3", "--hf-model", str(tiny_gpt2_dir),
            "--target", str(learnable_gpt2_dir), "--set", "num_members=2", "--set", "max_length=32",
            "--set", "train_batch_size=20",
            "--set", "score_batch_size=20", "--set", "precision=fp32", "--seeds", "2",
            "--steps", str(STEPS), "--batch-size", str(BATCH), "--eval-every", "2", "--learning-rate", "2e-2",
            "--out", str(out), "--quiet"]
    assert main(argv) == 0
    return out


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.integration  # the downstream run: 22 fine-tunes and Data-Juicer's IFD
def test_it_runs_end_to_end_and_writes_the_table_curves_plot_and_meta(downstream_run):
    out = downstream_run
    results = json.loads((out / "results.json").read_text())
    assert results["pool_rows"] == 40 and results["heldout_rows"] == 8
    cells = {(r["budget"], r["signal"]) for r in results["rows"]}
    assert cells == {(b, s) for b in ("10%", "30%") for s in SIGNALS} | {("all", FULL_POOL)}
    report = (out / "report.md").read_text()
    for signal in SIGNALS:
        assert f"| 10% | {signal} | 4 |" in report and f"| 30% | {signal} | 12 |" in report
    assert f"| all | {FULL_POOL} | 40 |" in report
    meta = json.loads((out / "meta.json").read_text())
    assert meta["command"].startswith("gsnr-eval downstream --data ") and "--heldout 8" in meta["command"]
    assert meta["recipe"]["steps"] == STEPS and meta["seeds"] == list(SEEDS)
    assert meta["budgets"] == {"10%": 4, "30%": 12}
    assert meta["pool_corrupted"] == 12  # round(0.3 x 40); the held-out rows are never corrupted
    # the same scores also answer the corruption check, for the pool, in OUT/scores
    separation = (out / "scores" / "report.md").read_text()
    assert "| G-SNR |" in separation and "40 rows: 28 clean" in separation
    pool = _read(out / "pool.jsonl")
    scored = {r["eval_index"]: r for r in _read(out / "scores" / "scores.jsonl")}
    assert all(scored[r["eval_index"]]["G-SNR"] == pytest.approx(r["G-SNR"]) for r in pool if r["G-SNR"] is not None)
    with open(out / "curves.csv", newline="") as f:
        points = list(csv.DictReader(f))
    assert len(points) == 11 * len(SEEDS) * len(CURVE)  # 11 selections x 2 seeds x 3 points
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "curves.png").stat().st_size > 5000
    # the paired difference is G-SNR's final loss minus the other's, seed by seed
    curves = json.loads((out / "curves.json").read_text())
    final = {(c["budget"], c["signal"], c["seed"]): c["heldout_loss"][-1] for c in curves}
    row = next(r for r in results["rows"] if (r["budget"], r["signal"]) == ("10%", "random"))
    want = t_interval([final[("10%", "G-SNR", s)] - final[("10%", "random", s)] for s in SEEDS])
    assert row["reference_minus"] == pytest.approx(list(want))


@pytest.mark.integration  # the downstream run: 22 fine-tunes and Data-Juicer's IFD
def test_every_selection_has_the_budget_and_no_heldout_row(downstream_run):
    out = downstream_run
    pool, heldout = _read(out / "pool.jsonl"), _read(out / "heldout.jsonl")
    loaded = seed_tasks(175)
    # pool and held-out split the 48 sampled rows; the held-out ones are clean seed tasks as loaded
    assert len(pool) == 40 and len(heldout) == 8
    assert all(h in loaded for h in heldout)
    heldout_prompts = {(h["instruction"], h.get("input")) for h in heldout}
    by_index = {p["eval_index"]: p for p in pool}
    selections = json.loads((out / "selections.json").read_text())
    assert set(selections) == {f"{b}|{s}" for b in ("10%", "30%") for s in SIGNALS} | {f"all|{FULL_POOL}"}
    for key, indices in selections.items():
        want = 40 if key.startswith("all") else rows_for_ratio(40, 0.1 if key.startswith("10%") else 0.3)
        assert len(indices) == len(set(indices)) == want, key
        assert not {(by_index[i]["instruction"], by_index[i].get("input")) for i in indices} & heldout_prompts, key
    # G-SNR's 10 % are its 4 best-scored pool rows
    order = sorted(pool, key=lambda p: (-(p["G-SNR"] if p["G-SNR"] is not None else -math.inf), p["eval_index"]))
    assert sorted(selections["10%|G-SNR"]) == sorted(p["eval_index"] for p in order[:4])


@pytest.mark.integration  # the downstream run: 22 fine-tunes and Data-Juicer's IFD
def test_every_fine_tune_gets_the_same_steps_and_moves_the_model(downstream_run):
    curves = json.loads((downstream_run / "curves.json").read_text())
    assert len(curves) == 11 * len(SEEDS)
    for c in curves:
        assert c["optimizer_steps"] == STEPS and c["rows_seen"] == STEPS * BATCH, (c["budget"], c["signal"])
        assert c["steps"] == CURVE
    full = [c for c in curves if c["signal"] == FULL_POOL]
    # Every fine-tune moves the model: the evaluation is exact and the adapter starts as a no-op, so one
    # that does not train would stay exactly where it starts. Four steps of two rows are too few to
    # ask for a lower loss here (the pool is 30 % corrupted and the steps are noisy); that training
    # lowers the held-out loss, and more so on rows like the held-out ones, is checked below.
    for c in curves:
        assert c["heldout_loss"][-1] != c["heldout_loss"][0] and c["heldout_loss"][1] != c["heldout_loss"][0]
    assert full[0]["heldout_loss"] != full[1]["heldout_loss"]  # seeds differ
    assert len({c["heldout_loss"][0] for c in curves}) == 1  # every run starts from the same model


@pytest.fixture(scope="module")
def tiny_target(learnable_gpt2_dir):
    from gradfilter_ops.config import GSNRConfig
    from gradfilter_ops.evaluation.downstream import encode_all, load_target

    config = GSNRConfig(hf_model=str(learnable_gpt2_dir), device="cpu", precision="fp32", max_length=32)
    model, formatter, pad_id = load_target(config.hf_model, config)
    return config, model, formatter, pad_id, lambda rows: encode_all(formatter, rows, "test")


def test_same_seed_same_curve_and_a_good_selection_beats_garbage(tiny_target):
    config, model, formatter, pad_id, encode = tiny_target
    rows = seed_tasks(40)
    heldout, like_heldout = encode(rows[:8]), encode(rows[:8] + rows[8:20])
    rng = np.random.default_rng(0)  # garbage: the same prompts, responses of random tokens
    garbage = encode([{**r, "output": formatter.tokenizer.decode(rng.integers(0, len(formatter.tokenizer) - 1,
                                                                              20).tolist())}
                      for r in rows[20:40]])
    recipe = FinetuneRecipe(steps=6, batch_size=2, learning_rate=5e-2, eval_every=3)
    lora = target_lora(recipe, config, model)
    first = finetune(model, like_heldout, heldout, recipe, lora, seed=1, pad_id=pad_id)
    again = finetune(model, like_heldout, heldout, recipe, lora, seed=1, pad_id=pad_id)
    other = finetune(model, like_heldout, heldout, recipe, lora, seed=2, pad_id=pad_id)
    assert first.heldout_loss == again.heldout_loss and first.train_loss[1:] == again.train_loss[1:]
    np.testing.assert_array_equal(first.final_row_losses, again.final_row_losses)
    assert other.heldout_loss != first.heldout_loss
    bad = finetune(model, garbage, heldout, recipe, lora, seed=1, pad_id=pad_id)
    # Rows like the held-out ones (they include them) teach the held-out responses; random tokens do not.
    # A loss on the prompts (the same template in both) or no training at all would leave no gap.
    assert first.heldout_loss[-1] < bad.heldout_loss[-1] - 0.1, (first.heldout_loss, bad.heldout_loss)
    assert first.heldout_loss[-1] < first.heldout_loss[0] - 0.2
    assert bad.optimizer_steps == first.optimizer_steps == 6
    assert not any("lora" in n for n, _ in model.named_parameters())  # the adapter is gone afterwards


def test_training_batches_cycle_a_small_selection_with_fixed_steps():
    batches = training_batches(3, 4, 5, seed=0)
    assert len(batches) == 5 and all(len(b) == 4 for b in batches)
    flat = [i for b in batches for i in b]
    for start in range(0, 18, 3):  # each pass is a permutation of the selection
        assert sorted(flat[start: start + 3]) == [0, 1, 2]
    assert training_batches(3, 4, 5, seed=0) == batches != training_batches(3, 4, 5, seed=1)
    assert len(training_batches(1000, 8, 2, seed=0)) == 2


def test_heldout_split_overlap_and_budgets():
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)]
    pool, heldout = split_heldout(rows, 0.25, seed=0)
    assert len(heldout) == 5 and len(pool) == 15
    assert not {r["instruction"] for r in pool} & {r["instruction"] for r in heldout}
    assert split_heldout(rows, 0.25, seed=0) == (pool, heldout) and split_heldout(rows, 4, seed=0)[1] != heldout[:4]
    from gradfilter_ops.config import GSNRConfig

    # a held-out file that repeats pool rows: those rows leave the pool
    kept, dropped = drop_heldout_rows(rows, rows[:3] + [{"instruction": "new", "output": "x"}], GSNRConfig())
    assert dropped == 3 and kept == rows[3:]
    with pytest.raises(ValueError, match="at least one row"):
        split_heldout(rows, 20, seed=0)
    # a signal whose rule drops rows still fills the budget (IFD >= 1 last, counted)
    ifd = Signal("IFD", np.array([0.5, -np.inf, 0.7, -np.inf, 0.1]), "", drop_non_finite=True)
    sel = select_budgets([ifd], [0.8], 5)
    assert sel[0].indices.tolist() == [0, 1, 2, 4] and sel[0].rule_dropped == 1
    assert sel[1].signal == FULL_POOL and sel[1].indices.tolist() == [0, 1, 2, 3, 4]


def test_t_interval_on_hand_made_numbers():
    mean, _, hi = t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and hi - mean == pytest.approx(4.303 / math.sqrt(3))
    assert math.isnan(t_interval([1.0])[1])


def test_the_existing_invocation_is_unchanged(tiny_gpt2_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "--corrupt-fraction" in text and "gsnr-eval downstream" in text
    with pytest.raises(SystemExit) as done:
        main(["downstream", "--help"])
    assert done.value.code == 0 and "--heldout-data" in capsys.readouterr().out
    out = tmp_path / "eval"
    assert main(["--data", str(DEMO_DATA), "--rows-per-file", "8", "--hf-model", str(tiny_gpt2_dir),
                 "--set", "num_members=2", "--set", "max_length=24", "--set", "train_batch_size=8",
                  "--set", "precision=fp32", "--skip-ifd",
                 "--bootstrap", "5", "--out", str(out), "--quiet"]) == 0
    assert "| G-SNR |" in (out / "report.md").read_text() and (out / "summary.json").exists()
    with pytest.raises(SystemExit):
        main(["downstream", "--data", str(DEMO_DATA), "--heldout-data", str(DEMO_DATA), "--heldout", "3",
              "--out", str(tmp_path / "bad")])
