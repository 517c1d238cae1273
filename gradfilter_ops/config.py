"""`GSNRConfig`: every knob of G-SNR scoring; defaults as in the method spec but `lora_init`, `score_mode`, `noise`.

One definition drives the Python API, the Data-Juicer op's parameters and their help text. Fields
marked *(reading)* are choices the paper leaves open; see ``docs/method.md``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union, get_args, get_origin, get_type_hints

from jsonargparse.typing import (ClosedUnitInterval, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt,
                                 restricted_number_type)

from .template import template_fields

# The proxy when none is named: GPT-2 small, on the Hub (`proxy.load_proxy` takes it as its default too).
DEFAULT_PROXY = "openai-community/gpt2"

# Types of the fields: `__post_init__` checks every value against its field's type.
Format = Literal["auto", "alpaca", "chat", "custom"]
Norm = Literal["l2sq", "l2"]
Noise = Literal["var", "std", "relvar"]
ExampleLoss = Literal["mean", "sum"]
GradParams = Literal["AB", "B"]
LoraInit = Literal["zero_b", "random"]
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16"]
ScoreMode = Literal["snapshot", "online"]
LayerFraction = restricted_number_type("LayerFraction", float, [(">", 0), ("<=", 1)])  # (0, 1]
DropoutRate = restricted_number_type("DropoutRate", float, [(">=", 0), ("<", 1)])  # [0, 1)
Similarity = ClosedUnitInterval  # a cosine similarity in [0, 1]

FORMATS, NORMS, NOISES = get_args(Format), get_args(Norm), get_args(Noise)
EXAMPLE_LOSSES = get_args(ExampleLoss)
GRAD_PARAMS, LORA_INITS, DEVICES = get_args(GradParams), get_args(LoraInit), get_args(Device)
PRECISIONS, SCORE_MODES = get_args(Precision), get_args(ScoreMode)


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class GSNRConfig:
    """Configuration of the proxy, the LoRA ensemble, the gradient pass and the G-SNR formula."""

    # --- proxy ---------------------------------------------------------------------------------
    hf_model: str = _help("Proxy causal LM: a Hub id, a local folder, a `.gguf` file, or the offline preset "
                          "`smollm2-135m`.", default=DEFAULT_PROXY)
    cache_dir: Optional[str] = _help(
        "Folder for converted proxies; defaults to $GRADFILTER_CACHE_DIR or ~/.cache/gradfilter_ops.",
        default=None,
    )
    use_cache: bool = _help("Keep trained ensembles and scores in `cache_dir`: a re-run does no proxy work, a "
                            "killed run resumes.", default=True)
    device: Device = _help("`auto` (CUDA when available), `cpu` or `cuda`.", default="auto")
    precision: Precision = _help("Forward passes in `auto` (bf16 where the device computes it natively, else "
                                 "fp32), `fp32` or `bf16`.", default="auto")
    seed: NonNegativeInt = _help("Base seed; member m uses seed + m for its adapter init and data order.", default=42)

    # --- prompt formatting ---------------------------------------------------------------------
    format: Format = _help("`alpaca`, `chat`, `custom` (`prompt_template` + `response_field`), or `auto` (chat "
                           "when `messages_field` is present).", default="auto")
    instruction_field: str = _help("Alpaca instruction field.", default="instruction")
    input_field: str = _help("Alpaca optional input field; missing or null means no input.", default="input")
    output_field: str = _help("Alpaca response field.", default="output")
    messages_field: str = _help("Chat field: a list of {role, content}; the last assistant turn is the response.",
                                default="messages")
    prompt_template: Optional[str] = _help("Custom format: a Python format string over the sample's fields, e.g. "
                                           "`Q: {question}\\nA: `.", default=None)
    response_field: Optional[str] = _help("Custom format: the field holding the response.", default=None)
    max_length: PositiveInt = _help("Token limit per example: the prompt is cut from the left first, then the "
                                    "response from the right.", default=512)

    # --- LoRA ensemble (phase 1) ---------------------------------------------------------------
    num_members: PositiveInt = _help("Ensemble size M, at least 2 (reading): the noise term is the spread over "
                                     "members.", default=4)
    num_epochs: PositiveInt = _help("Training epochs T per member.", default=2)
    early_epoch: PositiveInt = _help("Epoch of the early snapshot s (reading).", default=1)
    late_epoch: Optional[PositiveInt] = _help("Epoch of the late snapshot t; defaults to `num_epochs`.", default=None)
    lora_r: PositiveInt = _help("LoRA rank (reading).", default=8)
    lora_alpha: PositiveFloat = _help("LoRA alpha (reading).", default=16)
    lora_dropout: DropoutRate = _help("LoRA dropout during training.", default=0.0)
    lora_init: LoraInit = _help("`random` (A and B both random) or `zero_b` (peft's default, B = 0).",
                                default="random")
    target_modules: Optional[list[str]] = _help("Modules that get adapters; default: peft's attention "
                                                "projections for the architecture.", default=None)
    lora_layer_fraction: LayerFraction = _help("Share of the decoder layers, from the top, that get adapters "
                                               "(at least one); 1.0: every layer.", default=1.0)
    learning_rate: PositiveFloat = _help("AdamW learning rate (reading).", default=2e-4)
    weight_decay: NonNegativeFloat = _help("AdamW weight decay.", default=0.0)
    train_batch_size: PositiveInt = _help("Examples per optimizer step (reading).", default=16)
    member_workers: PositiveInt = _help("Members trained and scored at once, each in a worker process of its own "
                                        "on the same device; the same scores.", default=1)
    stack_members: Optional[PositiveInt] = _help("Members run in one stacked forward pass (with `member_workers: "
                                                 "1`); default: all on CUDA, 1 on a CPU.", default=None)

    # --- gradient pass (phase 2) and G-SNR (phase 3) -------------------------------------------
    score_mode: ScoreMode = _help("`online` (norms read off the training steps of epochs s and t) or `snapshot` ("
                                  "passes over the adapters saved after them; docs/method.md).", default="online")
    score_batch_size: PositiveInt = _help("Examples per per-example-gradient pass.", default=16)
    grad_params: GradParams = _help("LoRA parameters the gradient norm covers: `AB` (both) or `B` only.", default="AB")
    example_loss: ExampleLoss = _help("The per-example loss whose gradient is read: `mean` over the response "
                                      "tokens (reading) or their `sum` (that gradient times the response token "
                                      "count); training is the same either way.", default="mean")
    norm: Norm = _help("`l2sq` (squared L2 norm, reading) or `l2` (plain norm).", default="l2sq")
    noise: Noise = _help("Noise term: `relvar` (variance / mean^2 over members: scale-free, so the score does not "
                         "follow the gradient's size; the protocol's pick, docs/evaluation.md), `var` (population "
                         "variance, the method's reading) or `std`.", default="relvar")
    eps: NonNegativeFloat = _help("Added to both denominators of the G-SNR.", default=1e-8)

    # --- groups of rows by the proxy's pooled hidden states ------------------------------------
    clusters: bool = _help("Write each row's k-means cluster of the frozen proxy's mean-pooled last hidden states "
                           "(`gsnr_cluster`), for the top-k filter's `diversity: clusters`.", default=False)
    num_clusters: Optional[PositiveInt] = _help("k of `clusters`; null: round(sqrt(rows / 2)), at most 64.",
                                                default=None)
    near_duplicate_threshold: Optional[Similarity] = _help(
        "Cosine similarity (of the pooled hidden states, centred on the pool's mean) at or above which rows are "
        "near-duplicates (`gsnr_duplicate_group`), for the top-k filter's `near_duplicates: drop`, e.g. 0.95; "
        "null: off.", default=None)

    def __post_init__(self) -> None:
        if isinstance(self.cache_dir, os.PathLike):
            self.cache_dir = os.fspath(self.cache_dir)
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            check_option(f.name, getattr(self, f.name), hints[f.name])
        if self.max_length < 2:
            raise ValueError(f"`max_length` must be at least 2 (a prompt token and a response token), "
                             f"got {self.max_length}.")
        if self.num_members < 2:
            raise ValueError(f"`num_members` must be at least 2: the noise term is the spread of the members' "
                             f"gradient norms, which is zero for one member (gsnr would be drop / eps), got "
                             f"{self.num_members}.")
        late = self.resolved_late_epoch
        if not 1 <= self.early_epoch < late <= self.num_epochs:
            raise ValueError(
                f"Snapshots need 1 <= early_epoch < late_epoch <= num_epochs, got early_epoch="
                f"{self.early_epoch}, late_epoch={late}, num_epochs={self.num_epochs}."
            )
        if self.format == "custom" and (not self.prompt_template or not self.response_field):
            raise ValueError("`format: custom` needs both `prompt_template` and `response_field`.")
        if self.format != "custom" and self.prompt_template is not None:
            raise ValueError("`prompt_template` is only used with `format: custom`; set `format: custom`.")
        if self.prompt_template is not None:
            template_fields(self.prompt_template)
        if self.num_clusters is not None and not self.clusters:
            raise ValueError("`num_clusters` is the k of `clusters`; set `clusters: true` as well.")

    @property
    def group_fields(self) -> tuple[str, ...]:
        """The stats of `fields.GROUP_FIELDS` that these options ask the scorer for."""
        from . import fields

        wanted = {fields.CLUSTER: self.clusters, fields.DUPLICATE_GROUP: self.near_duplicate_threshold is not None}
        return tuple(name for name in fields.GROUP_FIELDS if wanted[name])

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
# Options of the row groups, computed anew on every run from the cached pooled hidden states: left out of the
# cache key and the scores' proofs too, so that changing them trains and scores nothing again.
GROUP_OPTIONS = ("clusters", "num_clusters", "near_duplicate_threshold")


def require_positive_int(name: str, value: Any, nullable: bool = False) -> Any:
    """`value`, if it is a positive integer (or None when `nullable`); else a ValueError naming `name`."""
    return check_option(name, value, Optional[PositiveInt] if nullable else PositiveInt)


def check_option(name: str, value: Any, kind: Any) -> Any:
    """`value`, if it is of type `kind` (a field annotation of `GSNRConfig`: a number type of
    `TAKES`, a `Literal`, `Optional[...]`, `list[str]`, `str` or `bool`); else a ValueError that
    names the option, what it takes and what it got. Nothing is coerced: `"false"` is not a bool,
    `"2e-4"` is not a number."""
    nullable = ""
    if get_origin(kind) is Union:
        if value is None:
            return value
        kind, nullable = next(k for k in get_args(kind) if k is not type(None)), " or null"
    if get_origin(kind) is Literal:
        ok, takes = value in get_args(kind), f"one of {list(get_args(kind))}"
    elif get_origin(kind) is list:
        ok = isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, str) and v for v in value)
        takes = "a non-empty list of names"
    elif kind in TAKES:
        takes = TAKES[kind]
        number = int if issubclass(kind, int) else (int, float)
        ok = isinstance(value, number) and not isinstance(value, bool) and math.isfinite(value)
        try:
            ok = ok and (kind in (int, float) or kind(value) is not None)
        except ValueError:
            ok = False
    elif kind is bool:
        ok, takes = isinstance(value, bool), "true or false"
    elif kind is str:
        ok, takes = isinstance(value, str) and bool(value), "a non-empty string"
    else:  # a field of a new type needs a rule here
        raise TypeError(f"`{name}`: no check for options of type {kind!r}.")
    if not ok:
        raise ValueError(f"`{name}` must be {takes}{nullable}, got {value!r} ({type(value).__name__}).")
    return value


# What each number type of the fields takes, for the messages of `check_option`.
TAKES = {int: "an integer", float: "a finite number", PositiveInt: "a positive integer",
         NonNegativeInt: "an integer >= 0", PositiveFloat: "a finite number > 0",
         NonNegativeFloat: "a finite number >= 0", LayerFraction: "a number in (0, 1]",
         DropoutRate: "a number in [0, 1)", Similarity: "a cosine similarity in [0, 1]"}

