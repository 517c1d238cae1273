"""Turning a sample into token ids with a response-only loss mask.

Every format reduces to a prompt and a response. The loss covers the response tokens only. When an
example is longer than `max_length`, the prompt loses tokens from the left first (down to a single
context token), then the response loses tokens from the right, so the response survives.

A sample that cannot be encoded gets a reason code (see `fields`) instead of ids; nothing raises for
bad rows.
"""

from __future__ import annotations

import math
import string
from array import array
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from . import fields
from .config import GSNRConfig

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, context: Any = None) -> str:
    """The Alpaca prompt of an instruction, with the input block when `context` is text that is not blank."""
    if isinstance(context, str) and context.strip():
        return ALPACA_PROMPT.format(instruction=instruction, input=context)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


# For tokenizers without a chat template (GPT-2): one block per turn, Alpaca style.
PLAIN_CHAT_TURN = "### {role}:\n{content}\n\n"
PLAIN_CHAT_GENERATION_PROMPT = "### Assistant:\n"


@dataclass(frozen=True)
class Encoded:
    """One example ready for the proxy: `input_ids[num_prompt:]` carry the loss.

    `input_ids` (any sequence of ints when built) is kept as a compact `array('i')`: 4 bytes a token
    instead of a tuple of Python ints, since `fit` holds every row's ids for the training epochs.
    """

    status: str
    input_ids: Sequence[int] = ()
    num_prompt: int = 0
    truncated: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.input_ids, array):
            object.__setattr__(self, "input_ids", array("i", self.input_ids))

    @property
    def ok(self) -> bool:
        return self.status == fields.OK

    @property
    def num_response(self) -> int:
        return len(self.input_ids) - self.num_prompt

    @property
    def num_loss_tokens(self) -> int:
        """Tokens whose prediction carries the loss: the response's, less token 0 (predicted by nothing)."""
        return len(self.input_ids) - max(self.num_prompt, 1)


def format_of(config: GSNRConfig, sample: Mapping[str, Any]) -> str:
    if config.format != "auto":
        return config.format
    return "chat" if sample.get(config.messages_field) is not None else "alpaca"


def source(config: GSNRConfig, sample: Mapping[str, Any]) -> dict[str, Any]:
    """The fields that `encode` reads, with the format: what a row's score depends on (no tokenizer needed)."""
    fmt = format_of(config, sample)
    if fmt == "chat":
        names = [config.messages_field]
    elif fmt == "alpaca":
        names = [config.instruction_field, config.input_field, config.output_field]
    else:
        names = sorted({n for _, n, _, _ in string.Formatter().parse(config.prompt_template) if n})
        names.append(config.response_field)
    return {"format": fmt, "fields": {name: sample.get(name) for name in names}}


def _failed(reason: str) -> Encoded:
    return Encoded(status=reason)


class _BadField(Exception):
    def __init__(self, reason: str):
        self.reason = reason


def _text(sample: Mapping[str, Any], key: str, *, optional: bool = False) -> str:
    value = sample.get(key)
    if value is None:
        if optional:
            return ""
        raise _BadField(fields.MISSING_FIELD)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        value = number_text(value)
    if not isinstance(value, str):
        raise _BadField(fields.INVALID_FIELD)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates (from broken JSON escapes) cannot be tokenized; score them as U+FFFD.
        value = value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return value


def number_text(value: int | float) -> str:
    """A finite number as the text it was read from: Data-Juicer's loader (pandas) turns a numeric string such
    as `"28"` into 28, or 28.0 when the column also holds fractions, where other rows hold numbers."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 53:
        return str(int(value))
    return str(value)


def truncate(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int], bool]:
    """Cut the prompt from the left (keeping one context token), then the response from the right."""
    overflow = len(prompt) + len(response) - max_length
    if overflow <= 0:
        return prompt, response, False
    cut = min(overflow, len(prompt) - 1)
    prompt = prompt[cut:]
    overflow -= cut
    if overflow > 0:
        response = response[: len(response) - overflow]
    return prompt, response, True


class PromptFormatter:
    """Encodes samples of one format with one tokenizer, as configured by `GSNRConfig`."""

    def __init__(self, config: GSNRConfig, tokenizer: Any):
        self.config = config
        self.tokenizer = tokenizer
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        if tokenizer.eos_token_id is None:
            raise ValueError("The proxy's tokenizer has no EOS token; it is needed to end responses.")

    def format_of(self, sample: Mapping[str, Any]) -> str:
        return format_of(self.config, sample)

    def source(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        return source(self.config, sample)

    def encode(self, sample: Mapping[str, Any]) -> Encoded:
        try:
            fmt = self.format_of(sample)
            if fmt == "chat":
                prompt_ids, response_ids = self._chat(sample)
            else:
                prompt_text, response_text = self._alpaca(sample) if fmt == "alpaca" else self._custom(sample)
                if not response_text.strip():
                    return _failed(fields.EMPTY_RESPONSE)
                prompt_ids = self._ids(prompt_text, special=True)
                response_ids = self._ids(response_text) + [self.tokenizer.eos_token_id]
        except _BadField as bad:
            return _failed(bad.reason)
        if not prompt_ids:
            # The first response token needs a context token to be predicted from.
            prompt_ids = [self.tokenizer.bos_token_id or self.tokenizer.eos_token_id]
        prompt_ids, response_ids, truncated = truncate(prompt_ids, response_ids, self.config.max_length)
        return Encoded(fields.OK, prompt_ids + response_ids, len(prompt_ids), truncated)

    def _ids(self, text: str, special: bool = False) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def _alpaca(self, sample: Mapping[str, Any]) -> tuple[str, str]:
        cfg = self.config
        instruction = _text(sample, cfg.instruction_field)
        context = _text(sample, cfg.input_field, optional=True)
        return alpaca_prompt(instruction, context), _text(sample, cfg.output_field)

    def _custom(self, sample: Mapping[str, Any]) -> tuple[str, str]:
        template = self.config.prompt_template
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name}
        values = {name: _text(sample, name) for name in names}
        return template.format(**values), _text(sample, self.config.response_field)

    def _chat(self, sample: Mapping[str, Any]) -> tuple[list[int], list[int]]:
        messages = sample.get(self.config.messages_field)
        if messages is None:
            raise _BadField(fields.MISSING_FIELD)
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, Mapping) for m in messages):
            raise _BadField(fields.INVALID_FIELD)
        turns = [{"role": _text(m, "role"), "content": _text(m, "content")} for m in messages]
        last = _last_assistant(turns)
        if last is None:
            raise _BadField(fields.MISSING_FIELD)
        if not turns[last]["content"].strip():
            raise _BadField(fields.EMPTY_RESPONSE)
        # Turns after the last assistant turn are not part of the example.
        context, reply = turns[:last], turns[: last + 1]
        if self.has_chat_template:
            prompt = self.tokenizer.apply_chat_template(context, add_generation_prompt=True, tokenize=False)
            full = self.tokenizer.apply_chat_template(reply, tokenize=False)
            if not full.startswith(prompt):
                raise ValueError(
                    "The tokenizer's chat template does not render a conversation as its prefix plus "
                    "the last assistant turn, so the response cannot be located; use `format: custom`."
                )
            return self._ids(prompt), self._ids(full[len(prompt):])
        prompt = "".join(PLAIN_CHAT_TURN.format(role=t["role"].capitalize(), content=t["content"])
                         for t in context) + PLAIN_CHAT_GENERATION_PROMPT
        return self._ids(prompt, special=True), self._ids(reply[-1]["content"]) + [self.tokenizer.eos_token_id]


def _last_assistant(turns: list[dict[str, str]]) -> Optional[int]:
    for index in range(len(turns) - 1, -1, -1):
        if turns[index]["role"] == "assistant":
            return index
    return None
