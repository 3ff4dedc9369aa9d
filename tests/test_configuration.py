"""SafeLlavaConfig: fields, defaults, validation and serialisation."""

import json

import pytest

from modeling_safe_llava import SafeLlavaConfig
from modeling_safe_llava.configuration_safe_llava import SAFETY_LEVEL_LABELS, SAFETY_TYPE_LABELS
from modeling_safe_llava.presets import load_safety_policy
from modeling_safe_llava.tiny import build_tiny_tokenizer, safety_fields, tiny_llava_config


def tiny_config(**overrides) -> SafeLlavaConfig:
    tokenizer = build_tiny_tokenizer()
    llava = tiny_llava_config(tokenizer).to_dict()
    for key in ("model_type", "architectures", "image_seq_length", "transformers_version"):
        llava.pop(key, None)
    return SafeLlavaConfig(**llava, **{**safety_fields(), **overrides})


def test_paper_defaults():
    config = SafeLlavaConfig()
    assert config.model_type == "safe_llava"
    assert (config.num_safety_tokens, config.num_llm_safety_tokens) == (64, 64)
    assert config.safety_projector_type == "cabstractor"
    assert config.safety_projector_hidden_size == 1024 + 64  # the paper's 1088 channels
    assert config.safety_head_num_heads == 8
    assert config.safety_level_labels == SAFETY_LEVEL_LABELS and len(config.safety_level_labels) == 4
    assert config.safety_type_labels == SAFETY_TYPE_LABELS and config.safety_type_labels[-1] == "Clean"
    assert config.safety_loss_weight == 10.0 and config.safety_threshold == 0.5
    assert config.image_seq_length == 576 + 64  # 24x24 patches + LLM safety tokens
    assert config.safety_actions["Politics"] == ["allow", "hint", "hint", "refuse"]
    assert config.safety_modules_trained is False


def test_zero_llm_safety_tokens_keeps_stock_sequence_length():
    assert SafeLlavaConfig(num_llm_safety_tokens=0).image_seq_length == 576


def test_json_round_trip(tmp_path):
    config = tiny_config(**load_safety_policy(), safety_threshold=0.3)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "safe_llava" and saved["safety_threshold"] == 0.3
    reloaded = SafeLlavaConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()
    assert SafeLlavaConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    assert SafeLlavaConfig.from_json_file(tmp_path / "config.json").to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"num_safety_tokens": 0}, "num_safety_tokens must be an integer in [1, 4096], got 0"),
        ({"num_llm_safety_tokens": -1}, "num_llm_safety_tokens must be an integer in [0, 4096], got -1"),
        # Sizes are bounded: a typo gets this message, not a raw allocation error from the first torch.zeros.
        ({"num_safety_tokens": 10**12}, "num_safety_tokens must be an integer in [1, 4096], got 1000000000000"),
        ({"num_llm_safety_tokens": 10**9}, "num_llm_safety_tokens must be an integer in [0, 4096], got 1000000000"),
        ({"safety_projector_hidden_size": 10**12}, "safety_projector_hidden_size must be an integer in [1, 65536]"),
        ({"safety_projector_depth": 10**6}, "safety_projector_depth must be an integer in [1, 64], got 1000000"),
        ({"safety_projector_grid_size": 0}, "safety_projector_grid_size must be an integer in [1, 256], got 0"),
        ({"safety_head_num_heads": 10**6}, "safety_head_num_heads must be an integer in [1, 64], got 1000000"),
        ({"safety_type_labels": [f"t{i}" for i in range(10**4)]}, "at most 256 names"),
        ({"num_llm_safety_tokens": 2.5}, "got 2.5"),
        ({"safety_projector_type": "resampler"}, "safety_projector_type='resampler' is not supported"),
        ({"safety_head_num_heads": 3}, "safety_head_num_heads=3 must divide the text hidden size (64)"),
        ({"safety_level_labels": ["a", "b"]}, "safety_level_labels must have 4 names"),
        ({"safety_type_labels": ["Clean"]}, "needs at least one risky type"),
        ({"safety_type_labels": ["A", "A", "Clean"]}, "duplicate names"),
        ({"safety_threshold": 1.5}, "safety_threshold 1.5 cannot be applied"),
        ({"safety_threshold": "high"}, "safety_threshold 'high' cannot be applied"),
        ({"safety_threshold": True}, "safety_threshold True cannot be applied"),
        ({"safety_loss_weight": -1.0}, "safety_loss_weight must be a finite number >= 0"),
        ({"safety_actions": {"Weather": "refuse"}}, "unknown risk type(s) ['Weather']"),
        ({"safety_actions": {"Privacy": "block"}}, "Unknown safety action 'block'"),
        ({"safety_actions": {"Privacy": ["refuse"] * 4}}, "Level 0 ('safe to answer') of 'Privacy' must be 'allow'"),
        ({"safety_hints": {"Privacy": ["only one"]}}, "must be a list of 4 strings"),
        ({"safety_refusals": {"Privacy": ""}}, "must be a non-empty string"),
        ({"safety_modules_trained": "yes"}, "safety_modules_trained must be True or False"),
    ],
)
def test_bad_values_raise_value_errors_naming_them(overrides, fragment):
    with pytest.raises(ValueError) as error:
        tiny_config(**overrides)
    assert fragment in str(error.value)


def test_single_action_applies_to_every_risky_level():
    config = tiny_config(safety_actions={"Illegal Risk": "allow"})
    assert config.safety_actions["Illegal Risk"] == ["allow"] * 4
    assert config.safety_actions["Privacy"] == ["allow", "hint", "hint", "refuse"]


@pytest.mark.parametrize("field", ["safety_level_temperature", "safety_type_temperature"])
@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), "2", True])
def test_temperatures_must_be_positive_finite_numbers(field, value):
    with pytest.raises(ValueError, match=field):
        SafeLlavaConfig(**{field: value})
