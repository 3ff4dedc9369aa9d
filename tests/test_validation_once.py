"""Validation once: the policy is validated once per set of config values (not on every `generate`, `assess_safety`
or `safety_policy` access), and a call checks its image count once."""

from conftest import chat_prompt, random_image

from modeling_safe_llava import policy_safe_llava
from modeling_safe_llava.policy_safe_llava import SafetyPolicy


def count_policy_validations(monkeypatch) -> list:
    built = []
    original = SafetyPolicy.__post_init__

    def counting(self):
        built.append(self)
        original(self)

    monkeypatch.setattr(SafetyPolicy, "__post_init__", counting)
    return built


def test_the_policy_is_validated_once_per_set_of_config_values(trained_tiny_safe_llava, monkeypatch):
    model, processor = trained_tiny_safe_llava
    inputs = processor(images=[random_image(0)], text=[chat_prompt(processor)], return_tensors="pt")
    policy_safe_llava._VALIDATED_POLICIES.clear()
    built = count_policy_validations(monkeypatch)
    for _ in range(2):
        model.generate(**inputs, max_new_tokens=1, do_sample=False, safety_threshold=0.0)
        model.assess_safety(**inputs)
        model.safety_policy
    assert len(built) == 1
    # A changed field, in place too, is validated again (and a bad value still raises).
    model.config.safety_actions["Privacy"][3] = "allow"
    assert model.safety_policy.actions["Privacy"][3] == "allow" and len(built) == 2
    model.config.safety_threshold = 0.25
    assert model.safety_policy.threshold == 0.25 and len(built) == 3


def test_tokenizing_the_policy_a_model_gives_changes_no_other_caller_s(trained_tiny_safe_llava):
    model, processor = trained_tiny_safe_llava
    model.config.safety_text_token_ids = None
    policy = model.safety_policy
    assert policy.tokenize(processor) and policy.text_token_ids
    assert model.safety_policy.text_token_ids is None


def test_a_call_checks_its_image_count_once(base, monkeypatch):
    # SafeLlava's check (`check_images_match`: every image has its placeholders, row by row) runs once per `generate`,
    # `forward` and `assess_safety`. (Stock's merge makes its own check of the total in the language model's input.)
    from modeling_safe_llava import safety_model_safe_llava
    from stock_contract import image_inputs

    _, safe, processor = base.build_pair(num_llm_safety_tokens=2)
    safe.config.safety_modules_trained = True
    checks = []
    original = safety_model_safe_llava.check_images_match
    monkeypatch.setattr(safety_model_safe_llava, "check_images_match", lambda *a: checks.append(1) or original(*a))
    inputs = image_inputs(processor, base=base)
    allow = {name: "allow" for name in safe.config.safety_type_labels[:-1]}
    calls = {
        "generate": lambda: safe.generate(**inputs, max_new_tokens=2, safety_threshold=0.0, return_dict_in_generate=True),
        "generate, all allowed": lambda: safe.generate(
            **inputs, max_new_tokens=2, safety_threshold=0.0, safety_actions=allow, return_dict_in_generate=True
        ),
        "forward": lambda: safe(**inputs),
        "assess_safety": lambda: safe.assess_safety(**inputs),
    }
    for name, call in calls.items():
        checks.clear()
        call()
        assert len(checks) == 1, name
