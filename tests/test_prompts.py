"""Prompt formatting, response-only loss masks, truncation and the reason codes for bad rows."""

import copy

import pytest
from transformers import AutoTokenizer

from gradfilter_ops import fields
from gradfilter_ops.config import GSNRConfig
from gradfilter_ops.prompts import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, PromptFormatter, truncate

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(tiny_gpt2_dir):
    return AutoTokenizer.from_pretrained(tiny_gpt2_dir)


def formatter(tokenizer, **overrides):
    return PromptFormatter(GSNRConfig(**overrides), tokenizer)


def decode_parts(tokenizer, encoded):
    ids = list(encoded.input_ids)
    return tokenizer.decode(ids[: encoded.num_prompt]), tokenizer.decode(ids[encoded.num_prompt:])


def test_alpaca_with_and_without_input(tokenizer):
    fmt = formatter(tokenizer)
    enc = fmt.encode({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"})
    prompt, response = decode_parts(tokenizer, enc)
    assert prompt == ALPACA_PROMPT.format(instruction="Add the numbers.", input="2 and 3")
    assert response == "5" + tokenizer.eos_token
    for missing_input in ({"input": None}, {"input": "  "}, {}):
        enc = fmt.encode({"instruction": "Say hi.", "output": "Hi!", **missing_input})
        assert decode_parts(tokenizer, enc)[0] == ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi.")
        assert enc.ok and not enc.truncated


def test_custom_fields_and_template(tokenizer):
    fmt = formatter(tokenizer, format="custom", prompt_template="Q: {question}\nA:", response_field="answer")
    enc = fmt.encode({"question": "Capital of France?", "answer": " Paris"})
    assert decode_parts(tokenizer, enc) == ("Q: Capital of France?\nA:", " Paris" + tokenizer.eos_token)
    assert fmt.encode({"answer": "x"}).status == fields.MISSING_FIELD


def test_chat_without_template_uses_plain_turns(tokenizer):
    fmt = formatter(tokenizer)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you"}]
    prompt, response = decode_parts(tokenizer, fmt.encode({"messages": messages}))
    assert prompt == "### User:\nHi\n\n### Assistant:\nHello\n\n### User:\nBye\n\n### Assistant:\n"
    assert response == "See you" + tokenizer.eos_token


def test_chat_template_puts_loss_on_last_assistant_turn(tokenizer):
    chat_tokenizer = copy.deepcopy(tokenizer)
    chat_tokenizer.chat_template = CHATML
    fmt = formatter(chat_tokenizer)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    prompt, response = decode_parts(chat_tokenizer, fmt.encode({"messages": messages}))
    assert prompt.endswith("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert response == "4<|im_end|>\n"


@pytest.mark.parametrize("sample, reason", [
    ({"output": "x"}, fields.MISSING_FIELD),
    ({"instruction": None, "output": "x"}, fields.MISSING_FIELD),
    ({"instruction": "Do it."}, fields.MISSING_FIELD),
    ({"instruction": True, "output": "x"}, fields.INVALID_FIELD),
    ({"instruction": "Do it.", "output": False}, fields.INVALID_FIELD),
    ({"instruction": "Do it.", "output": {"text": "x"}}, fields.INVALID_FIELD),
    ({"instruction": "Do it.", "output": float("nan")}, fields.INVALID_FIELD),
    ({"instruction": "Do it.", "output": ["x"]}, fields.INVALID_FIELD),
    ({"instruction": "Do it.", "output": ""}, fields.EMPTY_RESPONSE),
    ({"instruction": "Do it.", "output": " \n\t "}, fields.EMPTY_RESPONSE),
    ({"messages": [{"role": "user", "content": "Hi"}]}, fields.MISSING_FIELD),
    ({"messages": "not a list"}, fields.INVALID_FIELD),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}]},
     fields.MISSING_FIELD),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]},
     fields.EMPTY_RESPONSE),
])
def test_bad_rows_get_reason_codes(tokenizer, sample, reason):
    encoded = formatter(tokenizer).encode(sample)
    assert encoded.status == reason
    assert len(encoded.input_ids) == 0


@pytest.mark.parametrize("number, text", [(28, "28"), (2.5, "2.5"), (28.0, "28"), (-3, "-3"), (1e-7, "1e-07")])
def test_a_number_is_scored_as_its_text(tokenizer, number, text):
    """Data-Juicer's loader reads a numeric-string `output` as a number when other rows hold numbers."""
    fmt = formatter(tokenizer)
    as_number = fmt.encode({"instruction": "How many?", "input": 7, "output": number})
    as_text = fmt.encode({"instruction": "How many?", "input": "7", "output": text})
    assert as_number.ok and as_number == as_text
    assert decode_parts(tokenizer, as_number)[1] == text + tokenizer.eos_token
    messages = [{"role": "user", "content": 6}, {"role": "assistant", "content": number}]
    assert formatter(tokenizer).encode({"messages": messages}).ok


def test_truncation_cuts_prompt_from_the_left_first():
    assert truncate([1, 2, 3, 4], [5, 6], 4) == ([3, 4], [5, 6], True)
    # The prompt keeps one context token; then the response loses tokens from the right.
    assert truncate([1, 2, 3], [4, 5, 6, 7], 3) == ([3], [4, 5], True)
    assert truncate([1, 2], [3], 8) == ([1, 2], [3], False)


def test_huge_example_keeps_its_response(tokenizer):
    fmt = formatter(tokenizer, max_length=64)
    enc = fmt.encode({"instruction": "word " * 20_000, "output": "The short answer."})
    assert enc.ok and enc.truncated and len(enc.input_ids) == 64
    assert decode_parts(tokenizer, enc)[1] == "The short answer." + tokenizer.eos_token
    long_response = fmt.encode({"instruction": "Write.", "output": "x" * 100_000})
    assert long_response.ok and long_response.truncated
    assert long_response.num_prompt == 1 and long_response.num_response == 63


def test_unusual_text_is_encoded(tokenizer):
    fmt = formatter(tokenizer)
    for text in ("🙂🚀 emoji", "مرحبا بالعالم", "bad surrogate \ud800 here", "\u200b"):
        enc = fmt.encode({"instruction": "Echo.", "output": text})
        assert enc.ok and enc.num_response >= 2
