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


# -- one rule per row (`assess_safety`; the gate passes each request's own) ----------------------------------------


def _batch(processor, images):
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
        add_generation_prompt=True,
    )
    processor.tokenizer.padding_side = "left"
    return processor(images=images, text=[prompt] * len(images), padding=True, return_tensors="pt")


def test_a_rule_per_row_gives_each_row_the_verdict_of_its_own_rule():
    from conftest import random_image

    model, processor = build_tiny_safe_llava()
    inputs = _batch(processor, [random_image(i) for i in range(4)])
    risky = model.safety_policy.risky_types
    thresholds = [0.0, None, {name: 0.0 for name in risky[:3]}, 1.0]
    actions = [{name: "refuse" for name in risky}, {"Privacy": "hint"}, None, {name: "hint" for name in risky}]
    assess = lambda **rule: model.assess_safety(**inputs, **rule, allow_untrained_safety=True)  # noqa: E731
    per_row = assess(safety_threshold=thresholds, safety_actions=actions)
    for row, (threshold, action) in enumerate(zip(thresholds, actions)):
        alone = assess(safety_threshold=threshold, safety_actions=action)
        assert per_row.to_records()[row] == alone.to_records()[row]
    assert per_row.actions[0] == "refuse" and per_row.actions[3] == "allow"  # the rules differ where it shows
    one_list = assess(safety_threshold=0.0, safety_actions=[None] * 4)  # one list: the other argument for every row
    assert one_list.to_records() == assess(safety_threshold=0.0).to_records()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"safety_threshold": [0.1, 0.2, 0.3]}, r"safety_threshold has 3 entries for a batch of 2 rows; accepted: .*one "
         r"entry per row"),  # fmt: skip
        ({"safety_actions": [None]}, r"safety_actions has 1 entries for a batch of 2 rows"),
        ({"safety_threshold": [0.1, 1.5]}, r"Row 1's safety rule cannot be applied: safety_threshold 1.5 .*accepted: "
         r"None, a number in \[0, 1\], or a dict .*Per row: .*list with one entry per row"),  # fmt: skip
        ({"safety_actions": [{"Privacy": "shout"}, None]}, r"Row 0's safety rule .*Unknown safety action 'shout'.*"
         r"accepted: allow, hint, refuse"),  # fmt: skip
        ({"safety_threshold": [[0.1], 0.2]}, r"Row 0's safety rule .*safety_threshold \[0.1\] cannot be applied"),
    ],
)
def test_a_bad_rule_per_row_names_its_row_and_the_accepted_forms(kwargs, message):
    from conftest import random_image

    model, processor = build_tiny_safe_llava()
    inputs = _batch(processor, [random_image(0), random_image(1)])
    with pytest.raises(ValueError, match=message):
        model.assess_safety(**inputs, **kwargs, allow_untrained_safety=True)


def test_generate_takes_one_rule_for_the_whole_call():
    """Per-row rules are `assess_safety`'s: `generate` refuses a list as it always did, naming the accepted forms."""
    from conftest import random_image

    model, processor = build_tiny_safe_llava()
    inputs = _batch(processor, [random_image(0), random_image(1)])
    with pytest.raises(ValueError, match=r"safety_threshold \[0.0, 0.0\] cannot be applied; accepted: None"):
        model.generate(**inputs, safety_threshold=[0.0, 0.0], max_new_tokens=1, allow_untrained_safety=True)
