"""SafeLlava: safety projector, safety tokens and safety head for vision-language models, as a transformers model.

Importing the package registers every base in `bases.BASES` (LLaVA-1.5: `safe_llava`, ...) with transformers' Auto
classes: `AutoConfig`, `AutoModel` and `AutoModelForImageTextToText` (both give the base's
ForConditionalGeneration class) and `AutoProcessor`.
"""

import inspect

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

from .configuration_safe_llava import SafeLlavaConfig
from .gemma3_safe_llava import (
    SafeGemma3CausalLMOutputWithPast,
    SafeGemma3Config,
    SafeGemma3ForConditionalGeneration,
    SafeGemma3Model,
    SafeGemma3ModelOutputWithPast,
    SafeGemma3PreTrainedModel,
    SafeGemma3Processor,
)
from .generation_safe_llava import SafeLlavaGenerateBeamDecoderOnlyOutput, SafeLlavaGenerateDecoderOnlyOutput
from .llava_next_safe_llava import (
    SafeLlavaNextCausalLMOutputWithPast,
    SafeLlavaNextConfig,
    SafeLlavaNextForConditionalGeneration,
    SafeLlavaNextModel,
    SafeLlavaNextModelOutputWithPast,
    SafeLlavaNextPreTrainedModel,
    SafeLlavaNextProcessor,
)
from .modeling_safe_llava import (
    SafeLlavaCausalLMOutputWithPast,
    SafeLlavaForConditionalGeneration,
    SafeLlavaModel,
    SafeLlavaModelOutputWithPast,
    SafeLlavaPreTrainedModel,
)
from .policy_safe_llava import SafeLlavaSafetyAssessment, SafetyPolicy, decide_safety_actions
from .processing_safe_llava import SafeLlavaProcessor
from .qwen2_5_vl_safe_llava import (
    SafeQwen2_5_VLCausalLMOutputWithPast,
    SafeQwen2_5_VLConfig,
    SafeQwen2_5_VLForConditionalGeneration,
    SafeQwen2_5_VLModel,
    SafeQwen2_5_VLModelOutputWithPast,
    SafeQwen2_5_VLPreTrainedModel,
    SafeQwen2_5_VLProcessor,
)
from .safety_config_safe_llava import SafetyConfigMixin
from .safety_loading_safe_llava import SafetyPreTrainedMixin
from .safety_model_safe_llava import SafetyForConditionalGenerationMixin, SafetyModelMixin
from .safety_processing_safe_llava import SafetyProcessorMixin
from .presets import load_chat_template, load_safety_policy
from .bases import BASES, Base


__version__ = "0.1.0"

for _base in BASES:
    AutoConfig.register(_base.model_type, _base.config_class, exist_ok=True)
    AutoModel.register(_base.config_class, _base.model_class, exist_ok=True)
    AutoModelForImageTextToText.register(_base.config_class, _base.model_class, exist_ok=True)
    AutoProcessor.register(_base.config_class, _base.processor_class, exist_ok=True)
    # Remote code: save_pretrained copies the model files (and their siblings) next to the weights, writes `auto_map`.
    _base.config_class.register_for_auto_class()
    _base.model_class.register_for_auto_class("AutoModelForImageTextToText")
    _base.processor_class.register_for_auto_class("AutoProcessor")


def _compute_forward_signatures(cls):
    """
    transformers' `prepare_inputs_for_generation` calls `inspect.signature(self.forward)` on every decoding step of a
    remote-code model (`is_remote_code()`: a class registered for an auto class, as above) to look for
    `cache_position`; stock classes skip it. Each SafeLlava `forward`'s signature is computed here once, so that a step
    reads it instead of inspecting the function again. (Remote code may not import `inspect`: a checkpoint run from
    its Hub files without this package inspects on every step, as any remote-code model does.)
    """
    for subclass in cls.__subclasses__():
        forward = subclass.__dict__.get("forward")
        if forward is not None and "__signature__" not in vars(forward):
            forward.__signature__ = inspect.signature(forward)
        _compute_forward_signatures(subclass)


_compute_forward_signatures(SafetyPreTrainedMixin)
# As stock Gemma 3, whose AutoModelForCausalLM is its ForConditionalGeneration class.
AutoModelForCausalLM.register(SafeGemma3Config, SafeGemma3ForConditionalGeneration, exist_ok=True)

__all__ = [
    "SafeLlavaConfig",
    "SafeLlavaPreTrainedModel",
    "SafeLlavaModel",
    "SafeLlavaForConditionalGeneration",
    "SafeLlavaCausalLMOutputWithPast",
    "SafeLlavaModelOutputWithPast",
    "SafeLlavaGenerateDecoderOnlyOutput",
    "SafeLlavaGenerateBeamDecoderOnlyOutput",
    "SafeLlavaSafetyAssessment",
    "SafetyPolicy",
    "SafeLlavaProcessor",
    "SafeGemma3Config",
    "SafeGemma3PreTrainedModel",
    "SafeGemma3Model",
    "SafeGemma3ForConditionalGeneration",
    "SafeGemma3CausalLMOutputWithPast",
    "SafeGemma3ModelOutputWithPast",
    "SafeGemma3Processor",
    "SafeQwen2_5_VLConfig",
    "SafeQwen2_5_VLPreTrainedModel",
    "SafeQwen2_5_VLModel",
    "SafeQwen2_5_VLForConditionalGeneration",
    "SafeQwen2_5_VLCausalLMOutputWithPast",
    "SafeQwen2_5_VLModelOutputWithPast",
    "SafeQwen2_5_VLProcessor",
    "SafeLlavaNextConfig",
    "SafeLlavaNextPreTrainedModel",
    "SafeLlavaNextModel",
    "SafeLlavaNextForConditionalGeneration",
    "SafeLlavaNextCausalLMOutputWithPast",
    "SafeLlavaNextModelOutputWithPast",
    "SafeLlavaNextProcessor",
    "decide_safety_actions",
    "load_chat_template",
    "load_safety_policy",
    "BASES",
    "Base",
    # The seam every base builds on (docs/bases.md).
    "SafetyConfigMixin",
    "SafetyPreTrainedMixin",
    "SafetyModelMixin",
    "SafetyForConditionalGenerationMixin",
    "SafetyProcessorMixin",
]
