"""The seam and the LLaVA-1.5 class's shape: one route from images to the head, inputs validated once and the policy
built once per public call, a checkpoint mapping that depends on the config, and head projections that the usual
LoRA targets do not match."""

import re

import pytest
import torch
from conftest import chat_prompt, random_image
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightRenaming

from modeling_safe_llava import SafeLlavaForConditionalGeneration, SafetyPolicy
from modeling_safe_llava import generation_safe_llava, safety_model_safe_llava, safety_module_safe_llava
from modeling_safe_llava.tiny import build_tiny_safe_llava


def inputs_with_images(processor):
    images = [random_image(0), random_image(1)]
    texts = [chat_prompt(processor), chat_prompt(processor, "Describe the picture please.")]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


@pytest.fixture
def counters(monkeypatch, trained_tiny_safe_llava):
    """Counts, per public call, input-id validations, placeholder counts, policies built and trips to the head."""
    model, _ = trained_tiny_safe_llava
    counts = {"check_input_ids": 0, "images_per_row": 0, "policy": 0, "safety_logits": 0}

    def counting(name, function):
        def counted(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)

        return counted

    check = counting("check_input_ids", safety_module_safe_llava.check_input_ids)
    for module in (safety_module_safe_llava, generation_safe_llava, safety_model_safe_llava):
        monkeypatch.setattr(module, "check_input_ids", check)
    monkeypatch.setattr(SafetyPolicy, "__post_init__", counting("policy", SafetyPolicy.__post_init__))
    monkeypatch.setattr(model.model, "images_per_row", counting("images_per_row", model.model.images_per_row))
    monkeypatch.setattr(model.model, "safety_logits", counting("safety_logits", model.model.safety_logits))
    return counts


@pytest.mark.parametrize("call", ["generate", "assess_safety", "forward"])
def test_each_public_call_validates_once_builds_the_policy_once_and_reaches_the_head_once(
    trained_tiny_safe_llava, counters, call
):
    model, processor = trained_tiny_safe_llava
    inputs = inputs_with_images(processor)
    if call == "generate":
        model.generate(**inputs, max_new_tokens=3, do_sample=False, safety_threshold=0.0, allow_untrained_safety=True)
    elif call == "assess_safety":
        model.assess_safety(**inputs, safety_threshold=0.0)
    else:
        with torch.no_grad():
            model(**inputs)
    expected_policies = 0 if call == "forward" else 1  # forward applies no policy
    assert counters == {"check_input_ids": 1, "images_per_row": 1, "policy": expected_policies, "safety_logits": 1}


def test_generate_assess_and_forward_give_the_same_verdict_through_the_one_route(trained_tiny_safe_llava):
    model, processor = trained_tiny_safe_llava
    inputs = inputs_with_images(processor)
    with torch.no_grad():
        forward = model(**inputs)
    assessed = model.assess_safety(**inputs, safety_threshold=0.0)
    generated = model.generate(**inputs, max_new_tokens=2, safety_threshold=0.0, return_dict_in_generate=True)
    level_probs = forward.safety_level_logits.float().softmax(-1)
    assert torch.allclose(assessed.level_probs, level_probs, atol=1e-5)
    assert torch.allclose(generated.safety_assessment.level_probs, level_probs, atol=1e-5)


# -- checkpoint names --------------------------------------------------------------------------------------------


def safety_renamings(model) -> list:
    """The model's own safety renamings: a sub-model's (the headless model's, scoped to its prefix) are checked on the
    sub-model's class, as transformers' `test_reverse_loading_mapping` does."""
    return [
        rule
        for rule in get_model_conversion_mapping(model, add_legacy=False)
        if isinstance(rule, WeightRenaming)
        and "safety" in "".join(rule.source_patterns)
        and getattr(rule, "scope_prefix", None) is None
    ]


@pytest.mark.parametrize("num_llm_safety_tokens", [0, 4])
def test_every_safety_renaming_matches_a_saved_key_in_both_modes(num_llm_safety_tokens, tmp_path):
    """transformers' `test_reverse_loading_mapping` rule: each renaming maps at least one key. In head-only mode
    (no LLM safety tokens) the config has no `llm_tokens`, so the mapping has no rule for them."""
    model, _ = build_tiny_safe_llava(num_llm_safety_tokens=num_llm_safety_tokens)
    rules = safety_renamings(model)
    has_llm_rule = any("llm_safety_tokens" in pattern for rule in rules for pattern in rule.source_patterns)
    assert has_llm_rule == (num_llm_safety_tokens > 0)
    for part in (model, type(model.model)(model.config)):  # the generation class, then the headless one
        rules = safety_renamings(part)
        assert rules, type(part).__name__
        part.save_pretrained(tmp_path / type(part).__name__)
        saved = set(load_file(tmp_path / type(part).__name__ / "model.safetensors"))
        for rule in rules:
            assert any(re.search(p, key) for p in rule.source_patterns for key in saved), rule.source_patterns


@pytest.mark.parametrize("names", ["flat (as saved)", "in-memory"])
def test_checkpoints_with_old_or_new_head_names_load_alike(tiny_safe_llava, tmp_path, names):
    """Both directions: the on-disk names (`model.safety_head.q_proj.*`, as every SafeLlava checkpoint has them) and
    the in-memory names (`model.safety_module.head.query_projection.*`) load into the same weights."""
    model, _ = tiny_safe_llava
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    assert "model.safety_head.q_proj.weight" in weights and "model.safety_head.o_proj.bias" in weights
    if names == "in-memory":
        weights = {k: v for k, v in weights.items() if not k.startswith(("model.safety", "model.llm_safety"))}
        weights.update({k: v for k, v in model.state_dict().items() if k.startswith("model.safety_module.")})
        save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    reloaded, info = SafeLlavaForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_the_usual_lora_targets_wrap_what_they_wrap_on_stock_and_none_of_the_head(tiny_llava, tiny_safe_llava):
    """`LoraConfig(target_modules=["q_proj", "v_proj"])`, the usual LLaVA recipe: the same modules as on stock LLaVA
    (the language model's and the vision tower's attention), none of the safety head's."""
    stock, _ = tiny_llava
    safe, _ = tiny_safe_llava

    def wrapped(model):
        peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        return sorted(
            name.removeprefix("base_model.model.") for name, module in peft_model.named_modules() if hasattr(module, "lora_A")
        )

    stock_wrapped, safe_wrapped = wrapped(stock), wrapped(safe)
    assert len(stock_wrapped) == 8
    assert safe_wrapped == stock_wrapped
    assert not any("safety" in name for name in safe_wrapped)


# -- the registry of bases ---------------------------------------------------------------------------------------


def test_an_export_ships_exactly_the_remote_code_its_base_needs(trained_tiny_safe_llava, tmp_path):
    from modeling_safe_llava.bases import BASES, base_for_model_type
    from modeling_safe_llava.tools.hub import export_for_hub

    model, processor = trained_tiny_safe_llava
    folder = export_for_hub(model, processor, tmp_path / "export")
    base = base_for_model_type(model.config.model_type)
    assert base is BASES[0]
    assert sorted(path.name for path in folder.glob("*.py")) == sorted(base.remote_code_files())
    assert "safety_model_safe_llava.py" in base.remote_code_files()  # the shared seam files travel with each base


def test_stock_and_safellava_model_types_resolve_through_the_registry_and_others_are_named():
    from modeling_safe_llava.bases import base_for_model_type, base_for_stock_model_type

    assert base_for_stock_model_type("llava").model_class is SafeLlavaForConditionalGeneration
    assert base_for_stock_model_type("bert") is None
    with pytest.raises(ValueError, match=r"model_type 'llava' is not a SafeLlava model; accepted: \['safe_llava'"):
        base_for_model_type("llava")


def test_bases_are_picked_by_name_for_the_command_line():
    from modeling_safe_llava.bases import base_named
    from modeling_safe_llava.tools.demo import build_demo_model

    llava = base_named("llava")
    assert llava.model_class is SafeLlavaForConditionalGeneration and llava.large_preset == "7b.json"
    with pytest.raises(ValueError, match="Unknown base 'llava2'; accepted: llava"):
        base_named("llava2")
    with pytest.raises(ValueError, match="--language-model 'gpt' is not available with --base llava"):
        build_demo_model("llava", "gpt")
    with pytest.raises(ValueError, match="--vision-tower 'clip' is not available with --base llava; accepted: "
                       "efficientnet-lite0, random"):  # fmt: skip
        build_demo_model("llava", "tiny", vision_tower="clip")


def test_every_base_has_a_demo_and_the_registry_holds_no_demo_metadata():
    from dataclasses import fields

    from modeling_safe_llava.bases import BASES, Base
    from modeling_safe_llava.tools.demo import DEMO_MODELS

    assert set(DEMO_MODELS) == {base.name for base in BASES}
    assert not [field.name for field in fields(Base) if field.name.startswith("demo")]


@pytest.mark.parametrize(
    "extra", [{"vision_feature_layer": -2}, {"vision_feature_select_strategy": "default"}, {"logits_to_keep": 1}]
)
def test_generate_accepts_the_image_arguments_stock_llavas_forward_names(tiny_llava, trained_tiny_safe_llava, extra):
    """`generate` accepts a model kwarg only when `forward` names it: SafeLlava's names stock LLaVA's arguments."""
    stock, stock_processor = tiny_llava
    model, processor = trained_tiny_safe_llava
    for generator, batch in ((stock, inputs_with_images(stock_processor)), (model, inputs_with_images(processor))):
        tokens = generator.generate(**batch, **extra, max_new_tokens=3, do_sample=False)
        assert tokens.shape[1] == batch["input_ids"].shape[1] + 3


def test_several_grids_per_image_are_judged_by_the_riskiest(trained_tiny_safe_llava, monkeypatch):
    """`safety_units_per_image` (LLaVA-NeXT's crops): a row's verdict is its riskiest unit's. Each image given as two
    units, as is and blanked, gives per row the riskier of the two one-unit verdicts."""
    model, processor = trained_tiny_safe_llava
    inputs = inputs_with_images(processor)
    base = model.model
    torch.manual_seed(0)
    torch.nn.init.normal_(base.safety_module.head.level_classifier.weight, std=1.0)  # risks that differ per image
    grids = base.safety_vision_states
    as_is = model.assess_safety(**inputs, safety_threshold=0.0)
    monkeypatch.setattr(base, "safety_vision_states", lambda outputs: 0 * grids(outputs))
    blanked = model.assess_safety(**inputs, safety_threshold=0.0)
    assert not torch.allclose(as_is.risk, blanked.risk)
    two_units = lambda outputs: torch.stack([grids(outputs), 0 * grids(outputs)], dim=1).flatten(0, 1)  # noqa: E731
    monkeypatch.setattr(base, "safety_vision_states", two_units)
    monkeypatch.setattr(base, "safety_units_per_image", lambda outputs: torch.tensor([2, 2]))
    both = model.assess_safety(**inputs, safety_threshold=0.0)
    assert torch.allclose(both.risk, torch.maximum(as_is.risk, blanked.risk), atol=1e-6)
    assert (blanked.risk > as_is.risk).any() and (as_is.risk > blanked.risk).any()  # each unit wins somewhere
    assert both.images_per_row.tolist() == [1, 1]


@pytest.mark.parametrize(
    "projector_type, grid_size", [("cabstractor", None), ("cabstractor", 2), ("mlp", None)]
)
def test_grids_of_one_size_go_through_the_projector_together_with_the_same_tokens(projector_type, grid_size):
    """Grids of different sizes (Qwen2.5-VL: each image its own grid) are projected once per size, stacked; each
    grid's tokens equal those of projecting it alone, in the grids' order."""
    model, _ = build_tiny_safe_llava()
    config = model.config
    config.safety_projector_type, config.safety_projector_grid_size = projector_type, grid_size
    torch.manual_seed(0)
    module = safety_module_safe_llava.SafeLlavaSafetyModule(config).eval()
    for parameter in module.parameters():  # random, not the zero/one init, so that every grid's tokens differ
        torch.nn.init.normal_(parameter, std=0.2)
    shapes = [(3, 4), (2, 2), (3, 4), (5, 1), (2, 2), (3, 4)]
    grids = [torch.randn(h, w, config.safety_vision_dim) for h, w in shapes]
    calls = []
    module.projector.register_forward_hook(lambda _, args, __: calls.append(args[0].shape[0]))
    with torch.no_grad():
        padded, mask = module.project(grids)
        alone = [module.projector(grid.unsqueeze(0))[0] for grid in grids]
    assert calls[:3] == [3, 2, 1]  # one call per size, in the order the sizes first appear
    assert mask.sum(1).tolist() == [len(tokens) for tokens in alone]
    for index, tokens in enumerate(alone):
        torch.testing.assert_close(padded[index, : len(tokens)], tokens, rtol=0, atol=1e-6)
    assert len({tuple(tokens[0].tolist()) for tokens in alone}) == len(grids)  # the comparison can tell grids apart
