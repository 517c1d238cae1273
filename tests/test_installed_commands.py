"""The built wheel, installed (not editable) into a fresh venv, provides `gsnr-report` and `gsnr-eval`,
and both run there: the report on scored rows, the evaluation on the tiny proxy.

The venv gets the wheel alone (`--no-deps`); torch, transformers and the rest come from the test
environment, whose site-packages a `.pth` file appends to the venv's path, after the venv's own
site-packages. That directory's own `.pth` files (the editable install's finder among them) are not
processed there, so `gradfilter_ops` can only come from the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from gradfilter_ops import fields
from helpers import DEMO_DATA

# One worker runs the whole file (`--dist loadgroup`): its module fixtures (the wheel and the venv) are built once.
pytestmark = pytest.mark.xdist_group("test_installed_commands")

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"gsnr-report": "gradfilter_ops.report.cli:main", "gsnr-eval": "gradfilter_ops.evaluation.cli:main"}


def _run(args, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources, so that the build writes nothing into the checkout."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT / "gradfilter_ops", src / "gradfilter_ops", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", tmp / "dist", src], cwd=tmp)
    built = list((tmp / "dist").glob("gradfilter_ops-*.whl"))
    assert len(built) == 1, built
    return built[0]


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed by pip; returns its bin folder."""
    root = tmp_path_factory.mktemp("venv") / "env"
    _run([sys.executable, "-m", "venv", "--without-pip", root], cwd=root.parent)
    python = root / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=root).stdout.strip())
    ours = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    (site / "test_environment.pth").write_text("".join(f"{p}\n" for p in ours))
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
         cwd=root)
    return root / "bin"


def test_the_commands_of_this_environment_run():
    """The fast check (the wheel's own are integration tests): the environment running the tests declares both
    commands with their entry points, and each script starts and prints its options."""
    from importlib.metadata import entry_points

    declared = {ep.name: ep.value for ep in entry_points(group="console_scripts") if ep.name in COMMANDS}
    assert declared == COMMANDS
    for command in COMMANDS:
        script = Path(sys.executable).parent / command  # the console script of the interpreter running the tests
        run = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and "--out" in run.stdout, run.stderr[-2000:]


@pytest.mark.integration
def test_wheel_declares_both_commands_and_holds_their_modules(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = next(z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    lines = entry_points[entry_points.index("[console_scripts]"):].splitlines()
    for command, target in COMMANDS.items():
        assert f"{command} = {target}" in lines
    for module in ("report/cli.py", "report/plots.py", "evaluation/cli.py", "evaluation/gradients.py"):
        assert f"gradfilter_ops/{module}" in names


@pytest.mark.integration
def test_installed_commands_run_from_the_wheel(venv, tiny_gpt2_dir, tmp_path):
    where = _run([venv / "python", "-c", "import gradfilter_ops; print(gradfilter_ops.__file__)"], cwd=tmp_path)
    assert Path(where.stdout.strip()).is_relative_to(venv.parent)  # the wheel's copy, not the checkout
    for command in COMMANDS:
        script = venv / command
        assert script.read_text().startswith(f"#!{venv / 'python'}")
        assert "--out" in _run([script, "--help"], cwd=tmp_path).stdout

    # gsnr-report on 60 scored rows: gsnr 0..59, so the top 10 % are the rows scored 54..59
    scored = tmp_path / "scored.jsonl"
    scored.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}", fields.GSNR: float(i),
                                          fields.STATUS: fields.OK}) + "\n" for i in range(60)))
    _run([venv / "gsnr-report", "--scored", scored, "--top-ratio", "0.1", "--no-plots", "--out", tmp_path / "report"],
         cwd=tmp_path)
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert (summary["rows"], summary["kept"], summary["cutoff"]) == (60, 6, 54.0)
    assert "| kept | 6 (10.0%) |" in (tmp_path / "report" / "report.md").read_text()

    # gsnr-eval on the tiny proxy, without the IFD baseline (Data-Juicer's import is slow)
    out = tmp_path / "eval"
    _run([venv / "gsnr-eval", "--data", DEMO_DATA, "--rows-per-file", "12", "--corrupt-fraction", "0.25",
          "--seed", "2", "--hf-model", tiny_gpt2_dir, "--set", "num_members=2", "--set", "num_epochs=2",
          "--set", "max_length=40", "--set", "train_batch_size=6", "--set", "score_batch_size=12",
          "--set", "precision=fp32", "--skip-ifd", "--bootstrap", "0", "--quiet", "--out", out],
         cwd=tmp_path, timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["rows"], summary["corrupted"]) == (12, 3)
    assert "IFD (Superfiltering)" not in summary["signals"] and "G-SNR" in summary["signals"]
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [r["eval_index"] for r in rows] == list(range(12))
    assert (out / "report.md").read_text().startswith("# Selection evaluation")
