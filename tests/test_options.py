"""Every `GSNRConfig` option is checked for its type and range when the config is built, with a
message that names the option; nothing is coerced."""

import dataclasses
import math
from pathlib import Path

import pytest

from gradfilter_ops import GSNRConfig, GSNRScorer
from gradfilter_ops.config import check_option, require_positive_int

from warm_commands import run_command

# A value of the wrong type for every option (a new option without an entry fails this test).
WRONG_TYPE = {
    "hf_model": None, "cache_dir": 3, "use_cache": "false", "device": "gpu", "precision": "fp16", "seed": "1",
    "format": "json", "instruction_field": "", "input_field": None, "output_field": 0, "messages_field": [],
    "prompt_template": 1, "response_field": 2.5, "max_length": "512", "num_members": 2.0, "num_epochs": True,
    "early_epoch": "1", "late_epoch": 1.5, "lora_r": None, "lora_alpha": "16", "lora_dropout": "0.1",
    "lora_init": "zeros", "target_modules": "c_attn", "lora_layer_fraction": "0.25", "learning_rate": "2e-4",
    "weight_decay": None, "train_batch_size": 0.5, "member_workers": "2", "stack_members": "all",
    "score_mode": "offline", "score_batch_size": [16], "grad_params": "A", "example_loss": "total",
    "norm": "l1", "noise": "mad", "eps": "1e-8", "clusters": 1, "num_clusters": "8", "near_duplicate_threshold": "0.95",
}

# Values of the right type outside the option's range.
OUT_OF_RANGE = [
    ("seed", -1), ("max_length", 0), ("num_members", 0), ("num_members", 1), ("num_epochs", -2), ("lora_r", 0),
    ("lora_alpha", 0),
    ("lora_alpha", math.inf), ("lora_dropout", 1.0), ("lora_dropout", -0.1), ("lora_layer_fraction", 0.0),
    ("lora_layer_fraction", 1.5), ("learning_rate", -1e-4), ("learning_rate", math.nan), ("weight_decay", -0.01),
    ("train_batch_size", 0), ("member_workers", 0), ("stack_members", 0), ("score_batch_size", -16),
    ("eps", -1e-8), ("eps", math.inf), ("target_modules", []), ("target_modules", ["c_attn", ""]),
    ("num_clusters", 0), ("near_duplicate_threshold", 1.01), ("near_duplicate_threshold", -0.5),
]


def test_every_option_has_a_wrong_type_case():
    assert set(WRONG_TYPE) == {f.name for f in dataclasses.fields(GSNRConfig)}


@pytest.mark.parametrize("name", sorted(WRONG_TYPE))
def test_a_value_of_the_wrong_type_is_refused_and_named(name):
    value = WRONG_TYPE[name]
    with pytest.raises(ValueError) as error:
        GSNRConfig(**{name: value})
    message = str(error.value)
    assert message.startswith(f"`{name}` must be ") and repr(value) in message


@pytest.mark.parametrize("name, value", OUT_OF_RANGE)
def test_a_value_out_of_range_is_refused_and_named(name, value):
    with pytest.raises(ValueError, match=f"^`{name}` must be "):
        GSNRConfig(**{name: value})


def test_one_member_is_refused_with_the_reason():
    # One member has no spread, so the noise term would be 0 and every gsnr drop / eps.
    with pytest.raises(ValueError, match=r"^`num_members` must be at least 2: the noise term is the spread .* got 1"):
        GSNRConfig(num_members=1)


def test_the_messages_say_what_the_option_takes():
    cases = {("learning_rate", "2e-4"): "`learning_rate` must be a finite number > 0, got '2e-4' (str).",
             ("use_cache", "false"): "`use_cache` must be true or false, got 'false' (str).",
             ("stack_members", 0): "`stack_members` must be a positive integer or null, got 0 (int).",
             ("lora_layer_fraction", 0): "`lora_layer_fraction` must be a number in (0, 1], got 0 (int).",
             ("norm", "l1"): "`norm` must be one of ['l2sq', 'l2'], got 'l1' (str)."}
    for (name, value), message in cases.items():
        with pytest.raises(ValueError) as error:
            GSNRConfig(**{name: value})
        assert str(error.value) == message


def test_good_values_are_kept_as_given(tmp_path):
    config = GSNRConfig(cache_dir=tmp_path, lora_alpha=16, eps=0, weight_decay=0, late_epoch=None, stack_members=None,
                        target_modules=["c_attn"], lora_layer_fraction=1, seed=0)
    assert config.cache_dir == str(tmp_path) and isinstance(config.cache_dir, str)  # a Path is taken as its text
    assert config.lora_alpha == 16 and type(config.lora_alpha) is int  # an int is a number; not converted
    assert GSNRConfig.from_dict(config.to_dict()) == config


def test_the_scorer_and_the_helpers_check_the_same_way(tiny_gpt2_dir):
    with pytest.raises(ValueError, match="^`eps` must be a finite number >= 0, got inf"):
        GSNRScorer(hf_model=str(tiny_gpt2_dir), eps=math.inf)
    assert require_positive_int("rows", 3) == 3 and require_positive_int("rows", None, nullable=True) is None
    with pytest.raises(ValueError, match="^`rows` must be a positive integer, got True"):
        require_positive_int("rows", True)
    with pytest.raises(TypeError, match="no check for options of type"):
        check_option("path", Path("."), Path)


@pytest.mark.integration
@pytest.mark.parametrize("option, message", [
    # Data-Juicer's preflight reads the op's typed signature (built from GSNRConfig) and refuses a wrong type
    ('use_cache: "false"', "Parameter 'use_cache' expects type 'bool', got 'str' (value: 'false')"),
    # a value of the right type out of range reaches GSNRConfig's own check
    ("num_epochs: 0", "ValueError: `num_epochs` must be a positive integer, got 0 (int)."),
])
def test_a_recipe_with_a_bad_option_fails_before_any_work_and_names_it(tmp_path, option, message):
    """Through the real `dj-process`: YAML's `2e-4` arrives as a number, a quoted "false" as text."""
    data = tmp_path / "rows.jsonl"
    data.write_text('{"instruction": "Add 2 and 2.", "input": "", "output": "4"}\n')
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"dataset_path: {data}\nexport_path: {tmp_path / 'out.jsonl'}\ntext_keys: instruction\n"
                      "process:\n  - gsnr_scorer:\n      hf_model: /no/such/proxy\n      learning_rate: 2e-4\n"
                      f"      {option}\n")
    run = run_command("dj-process", ["--config", recipe], cwd=tmp_path)
    assert run.returncode != 0
    assert message in run.log
    assert "Parameter 'learning_rate'" not in run.log and "`learning_rate`" not in run.log  # 2e-4 is a number
    assert not (tmp_path / "out.jsonl").exists()
