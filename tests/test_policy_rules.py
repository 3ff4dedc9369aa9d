"""Policy rules live in `SafetyPolicy` alone: the texts every action needs, token ids that match a processor, and the
one [0, 1] check that thresholds, generation configs and evaluation sweeps share."""

import pytest
from transformers import GenerationConfig

from modeling_safe_llava.policy_safe_llava import SafetyPolicy, check_probability, generation_config_with_threshold
from modeling_safe_llava.tiny import build_tiny_safe_llava
from modeling_safe_llava.tools.evaluation import check_thresholds


def test_a_hint_without_its_text_is_refused_when_the_policy_is_built():
    hints = {"Privacy": ["", "Careful.", "  ", ""]}
    with pytest.raises(ValueError, match=r"hints at \('Privacy', level 2\).*is empty"):
        SafetyPolicy(hints=hints)
    # The same texts are fine where no level hints.
    SafetyPolicy(hints=hints, actions={"Privacy": ["allow", "refuse", "refuse", "refuse"]})


def test_a_call_time_hint_without_its_text_is_refused():
    policy = SafetyPolicy(hints={"Privacy": ["", "", "", ""]}, actions={"Privacy": "refuse"})
    with pytest.raises(ValueError, match=r"hints at \('Privacy', level 1\)"):
        policy.resolve_actions({"Privacy": "hint"})


def test_token_ids_must_be_the_texts_tokenized_by_the_processor():
    model, processor = build_tiny_safe_llava()
    policy = SafetyPolicy.from_config(model.config)
    policy.check_tokenized_by(processor)  # as built: they match
    policy.refusals["Privacy"] = "A different refusal."
    with pytest.raises(ValueError, match="do not match the hints/refusals tokenized by this processor"):
        policy.check_tokenized_by(processor)
    SafetyPolicy(actions={name: "allow" for name in policy.risky_types}).check_tokenized_by(processor)  # needs none


@pytest.mark.parametrize("own, default, expected", [(None, 0.3, 0.3), (0.7, 0.3, 0.7)])
def test_the_one_generation_config_builder_keeps_its_own_threshold_else_the_default(own, default, expected, tmp_path):
    base = GenerationConfig(max_new_tokens=5)
    if own is not None:
        base.safety_threshold = own
    built = generation_config_with_threshold(base, default)
    built.save_pretrained(tmp_path)
    assert GenerationConfig.from_pretrained(tmp_path).safety_threshold == expected


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), True, "0.5"])
def test_one_probability_check_serves_generation_configs_and_sweeps(bad):
    with pytest.raises(ValueError, match="cannot be applied"):
        check_probability("safety_threshold", bad)
    with pytest.raises(ValueError, match=r"generation_config.safety_threshold .* cannot be applied"):
        generation_config_with_threshold(GenerationConfig(), bad)
    with pytest.raises(ValueError, match=r"cannot be applied; accepted: a list of numbers in \[0, 1\]"):
        check_thresholds([0.2, bad])
