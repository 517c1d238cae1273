"""Importing the package is cheap: torch, transformers and peft load on first use (the package docstring's
promise, which Data-Juicer's op discovery and `--help` rely on)."""

import subprocess
import sys


def test_importing_the_package_and_the_engine_loads_no_torch():
    code = ("import sys, gradfilter_ops, gradfilter_ops.engine; "
            "from gradfilter_ops.engine.gsnr import gsnr_from_sq_norms; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_engine_names_load_on_first_use():
    import gradfilter_ops.engine as engine
    from gradfilter_ops.engine.snapshots import Snapshots

    assert engine.Snapshots is Snapshots
    assert set(engine.__all__) >= {"EnsembleTrainer", "train_ensemble", "ensemble_scorer", "lora_config"}
