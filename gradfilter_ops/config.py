"""`GSNRConfig`: every knob of G-SNR scoring, with the defaults of the method spec.

One definition drives the Python API, the Data-Juicer op's parameters and their help text. Fields
marked *(reading)* are choices the paper leaves open; see ``docs/method.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from .proxy import DEFAULT_PROXY

FORMATS = ("auto", "alpaca", "chat", "custom")
NORMS = ("l2sq", "l2")
NOISES = ("var", "std")
GRAD_PARAMS = ("AB", "B")
LORA_INITS = ("zero_b", "random")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
SCORE_MODES = ("snapshot", "online")
NULLABLE = ("stack_members",)  # integer options whose null means "chosen automatically"


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class GSNRConfig:
    """Configuration of the proxy, the LoRA ensemble, the gradient pass and the G-SNR formula."""

    # --- proxy ---------------------------------------------------------------------------------
    hf_model: str = _help(
        "Proxy causal LM: a Hugging Face Hub id, a local model folder, a `.gguf` file, or the "
        "offline preset `smollm2-135m`.",
        default=DEFAULT_PROXY,
    )
    cache_dir: Optional[str] = _help(
        "Folder for converted proxies; defaults to $GRADFILTER_CACHE_DIR or ~/.cache/gradfilter_ops.",
        default=None,
    )
    use_cache: bool = _help(
        "Keep trained ensembles and per-example scores in `cache_dir`, so a re-run does no proxy work and "
        "a killed run resumes where it stopped.",
        default=True,
    )
    device: str = _help("`auto` (CUDA when available), `cpu` or `cuda`.", default="auto")
    precision: str = _help(
        "Forward-pass precision: `auto` (bf16 autocast where the GPU or CPU computes bf16 natively, else "
        "fp32; the manifest records what it chose and why), `fp32`, or `bf16`. Gradient norms accumulate in fp32.",
        default="auto",
    )
    seed: int = _help("Base seed; member m uses seed + m for its adapter init and data order.", default=42)

    # --- prompt formatting ---------------------------------------------------------------------
    format: str = _help(
        "`alpaca` (instruction/input/output), `chat` (a list of messages), `custom` "
        "(`prompt_template` + `response_field`), or `auto` (chat when `messages_field` is present).",
        default="auto",
    )
    instruction_field: str = _help("Alpaca instruction field.", default="instruction")
    input_field: str = _help("Alpaca optional input field; missing or null means no input.", default="input")
    output_field: str = _help("Alpaca response field.", default="output")
    messages_field: str = _help("Chat field: a list of {role, content}; the last assistant turn is the response.",
                                default="messages")
    prompt_template: Optional[str] = _help(
        "Custom format: a Python format string over the sample's fields, e.g. `Q: {question}\\nA: `.",
        default=None,
    )
    response_field: Optional[str] = _help("Custom format: the field holding the response.", default=None)
    max_length: int = _help(
        "Token limit per example. Longer examples lose prompt tokens from the left first, then "
        "response tokens from the right; `gsnr_truncated` records it.",
        default=512,
    )

    # --- LoRA ensemble (phase 1) ---------------------------------------------------------------
    num_members: int = _help("Ensemble size M (reading).", default=4)
    num_epochs: int = _help("Training epochs T per member.", default=2)
    early_epoch: int = _help("Epoch of the early snapshot s (reading).", default=1)
    late_epoch: Optional[int] = _help("Epoch of the late snapshot t; defaults to `num_epochs`.", default=None)
    lora_r: int = _help("LoRA rank (reading).", default=8)
    lora_alpha: float = _help("LoRA alpha (reading).", default=16)
    lora_dropout: float = _help("LoRA dropout during training.", default=0.0)
    lora_init: str = _help(
        "`random` (A and B both random, so the drop measures learning rather than the adapter's growth "
        "from B = 0; docs/evaluation.md) or `zero_b` (peft's default: B = 0, the adapter starts as a no-op).",
        default="random",
    )
    target_modules: Optional[list[str]] = _help(
        "Modules that get adapters; default: peft's attention projections for the architecture.",
        default=None,
    )
    lora_layer_fraction: float = _help(
        "Share of the proxy's decoder layers, counted from the top, that get adapters (at least one). The "
        "frozen layers below run once per row instead of in every pass (0.25: about 3x less arithmetic); "
        "1.0: every layer.",
        default=1.0,
    )
    learning_rate: float = _help("AdamW learning rate (reading).", default=2e-4)
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    train_batch_size: int = _help("Examples per optimizer step (reading).", default=16)
    member_workers: int = _help(
        "Members handled at once, each in a spawned worker process of its own on the same device: their "
        "training, and snapshot mode's scoring passes. Members are independent, so the scores are the same. "
        "On a GPU a small proxy's steps wait on the host launching kernels, and k workers keep the GPU "
        "busier (docs/speed.md); on a CPU each worker takes its share of the cores. A script that scores at "
        "import time needs an `if __name__ == \"__main__\":` guard (spawned processes import it).",
        default=1,
    )

    stack_members: Optional[int] = _help(
        "Members run in one stacked forward pass: k members' training steps at once (each its own batch, "
        "padded to the longest), and in snapshot scoring the 2k adapters of k members over copies of one "
        "batch; a stacked step or pass needs about k (2k) times the memory of one. The same arithmetic as one "
        "member at a time, so the same scores (with a proxy that has dropout, other dropout draws in "
        "training). Default (null): every member on CUDA, where a small proxy's steps wait on the host "
        "launching kernels, 1 on a CPU, where stacking is slower (docs/speed.md). Used when `member_workers` "
        "is 1.",
        default=None,
    )

    # --- gradient pass (phase 2) and G-SNR (phase 3) -------------------------------------------
    score_mode: str = _help(
        "`snapshot` (the method: per-example norms from separate passes over the adapters saved after "
        "the early and the late epoch) or `online` (norms read off the training steps of those two "
        "epochs, at each step's weights and in training mode, so with the proxy's dropout if it has any: "
        "M x T passes instead of M x (T + 2); it scores only the rows it trained on; agreement with "
        "`snapshot` in docs/speed.md).",
        default="snapshot",
    )
    score_batch_size: int = _help("Examples per per-example-gradient pass.", default=16)
    grad_params: str = _help("LoRA parameters the gradient norm covers: `AB` (both) or `B` only.", default="AB")
    norm: str = _help("`l2sq` (squared L2 norm, reading) or `l2` (plain norm).", default="l2sq")
    noise: str = _help("Noise term: `var` (population variance over members, reading) or `std`.", default="var")
    eps: float = _help("Added to both denominators of the G-SNR.", default=1e-8)

    def __post_init__(self) -> None:
        _choice("format", self.format, FORMATS)
        _choice("norm", self.norm, NORMS)
        _choice("noise", self.noise, NOISES)
        _choice("grad_params", self.grad_params, GRAD_PARAMS)
        _choice("lora_init", self.lora_init, LORA_INITS)
        _choice("device", self.device, DEVICES)
        _choice("precision", self.precision, PRECISIONS)
        _choice("score_mode", self.score_mode, SCORE_MODES)
        for name in ("num_members", "num_epochs", "early_epoch", "lora_r", "train_batch_size", "member_workers",
                     "score_batch_size", "max_length", "stack_members"):
            require_positive_int(name, getattr(self, name), nullable=name in NULLABLE)
        if self.max_length < 2:
            raise ValueError(f"`max_length` must be at least 2 (a prompt token and a response token), "
                             f"got {self.max_length}.")
        late = self.resolved_late_epoch
        if not 1 <= self.early_epoch < late <= self.num_epochs:
            raise ValueError(
                f"Snapshots need 1 <= early_epoch < late_epoch <= num_epochs, got early_epoch="
                f"{self.early_epoch}, late_epoch={late}, num_epochs={self.num_epochs}."
            )
        if self.learning_rate <= 0:
            raise ValueError(f"`learning_rate` must be > 0, got {self.learning_rate}.")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout}.")
        if not 0 < self.lora_layer_fraction <= 1:
            raise ValueError(f"`lora_layer_fraction` must be in (0, 1], got {self.lora_layer_fraction}.")
        if self.eps < 0:
            raise ValueError(f"`eps` must be >= 0, got {self.eps}.")
        if self.format == "custom" and (not self.prompt_template or not self.response_field):
            raise ValueError("`format: custom` needs both `prompt_template` and `response_field`.")
        if self.format != "custom" and self.prompt_template is not None:
            raise ValueError("`prompt_template` is only used with `format: custom`; set `format: custom`.")

    @property
    def resolved_late_epoch(self) -> int:
        return self.num_epochs if self.late_epoch is None else self.late_epoch

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "GSNRConfig":
        """Build a config, rejecting unknown keys with the list of known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown GSNRConfig key(s) {unknown}; known keys: {sorted(known)}.")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Options that change how fast scores are computed, not what they are: left out of the cache key.
NON_SCORE_OPTIONS = ("cache_dir", "use_cache", "device", "score_batch_size", "member_workers", "stack_members")


def require_positive_int(name: str, value: Any, nullable: bool = False) -> Any:
    """`value`, if it is a positive integer (or None when `nullable`); else a ValueError naming `name`."""
    if nullable and value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        null = " or null (automatic)" if nullable else ""
        raise ValueError(f"`{name}` must be a positive integer{null}, got {value!r}.")
    return value


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}.")


def field_help() -> dict[str, str]:
    """The help text of every field, for the Data-Juicer op docstring and the README table."""
    return {f.name: f.metadata["help"] for f in dataclasses.fields(GSNRConfig)}

