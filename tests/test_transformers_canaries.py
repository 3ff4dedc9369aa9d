"""Canaries: the internal transformers APIs SafeLlava still relies on, where no public one exists. Each test fails
when the internal API changes shape, so that a transformers upgrade names what to revisit instead of breaking
silently. (Public APIs need no canary: their behaviour is tested where it is used.)

- `PreTrainedModel._load_pretrained_model(model, state_dict, checkpoint_files, ...)`: the one place that sees every
  weight file before it is opened (`SafetyPreTrainedMixin` refuses pickles there).
- the conversion-mapping registry (`register_checkpoint_conversion_mapping`, `get_model_conversion_mapping`,
  `WeightRenaming`, `PreTrainedModel.is_custom_code`): config-dependent flat checkpoint names.
- `LlavaProcessor.replace_image_token` / `_get_num_multimodal_tokens`: where LLaVA's processor sizes an image.
"""

import inspect

from transformers import LlavaProcessor, PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming

from modeling_safe_llava import SafeLlavaForConditionalGeneration
from modeling_safe_llava.safety_loading_safe_llava import safety_checkpoint_mapping


def test_load_pretrained_model_is_a_static_method_that_receives_the_weight_files(tiny_safe_llava, tmp_path, monkeypatch):
    assert isinstance(inspect.getattr_static(PreTrainedModel, "_load_pretrained_model"), staticmethod)
    assert list(inspect.signature(PreTrainedModel._load_pretrained_model).parameters)[:3] == [
        "model", "state_dict", "checkpoint_files"
    ]
    model, _ = tiny_safe_llava
    model.save_pretrained(tmp_path)
    seen = []
    original = PreTrainedModel._load_pretrained_model

    def spy(model, state_dict, checkpoint_files, *args, **kwargs):
        seen.append(list(checkpoint_files or ()))
        return original(model, state_dict, checkpoint_files, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "_load_pretrained_model", staticmethod(spy))
    SafeLlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert seen and all(str(name).endswith("model.safetensors") for name in seen[0])


def test_the_conversion_registry_is_looked_up_by_class_name_for_non_custom_code(tiny_safe_llava):
    model, _ = tiny_safe_llava
    assert type(model).is_custom_code() is False  # else transformers skips the class's registered mapping
    assert "model" in inspect.signature(get_model_conversion_mapping).parameters
    register_checkpoint_conversion_mapping(type(model).__name__, safety_checkpoint_mapping(model.config, "llava"), overwrite=True)
    sources = [p for rule in get_model_conversion_mapping(model, add_legacy=False) for p in rule.source_patterns]
    assert r"^model\.safety_head\.q_proj\." in sources and r"^model\.llm_safety_tokens" in sources


def test_weight_renaming_takes_regex_sources_and_reverses():
    rule = WeightRenaming(source_patterns=r"^model\.safety_tokens", target_patterns="model.safety_module.tokens")
    assert rule.rename_source_key("model.safety_tokens")[0] == "model.safety_module.tokens"
    reverse = rule.reverse_transform()
    assert reverse.rename_source_key("model.safety_module.tokens")[0] == "model.safety_tokens"


def test_llava_processor_sizes_images_where_safellava_adds_its_placeholders():
    replace = list(inspect.signature(LlavaProcessor.replace_image_token).parameters)
    assert replace[:3] == ["self", "image_inputs", "image_idx"]
    assert "image_sizes" in inspect.signature(LlavaProcessor._get_num_multimodal_tokens).parameters
