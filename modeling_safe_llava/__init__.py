"""SafeLlava: safety projector, safety tokens and safety head for LLaVA-1.5, as a transformers model.

Importing the package registers `safe_llava` and `safe_gemma3` with transformers' Auto classes:
`AutoConfig`, `AutoModel` and `AutoModelForImageTextToText` (both give `SafeLlavaForConditionalGeneration`)
and `AutoProcessor`.
"""

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
from .policy_safe_llava import (
    SafeLlavaGenerateBeamDecoderOnlyOutput,
    SafeLlavaGenerateDecoderOnlyOutput,
    SafeLlavaSafetyAssessment,
    SafetyPolicy,
    decide_safety_actions,
)
from .processing_safe_llava import SafeLlavaProcessor
from .safety_config_safe_llava import SafetyConfigMixin
from .safety_loading_safe_llava import SafetyPreTrainedMixin
from .safety_model_safe_llava import SafetyForConditionalGenerationMixin, SafetyModelMixin
from .safety_processing_safe_llava import SafetyProcessorMixin
from .presets import load_chat_template, load_safety_policy


__version__ = "0.1.0"

AutoConfig.register(SafeLlavaConfig.model_type, SafeLlavaConfig, exist_ok=True)
AutoModel.register(SafeLlavaConfig, SafeLlavaForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(SafeLlavaConfig, SafeLlavaForConditionalGeneration, exist_ok=True)
AutoProcessor.register(SafeLlavaConfig, SafeLlavaProcessor, exist_ok=True)
AutoConfig.register(SafeGemma3Config.model_type, SafeGemma3Config, exist_ok=True)
AutoModel.register(SafeGemma3Config, SafeGemma3ForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(SafeGemma3Config, SafeGemma3ForConditionalGeneration, exist_ok=True)
AutoProcessor.register(SafeGemma3Config, SafeGemma3Processor, exist_ok=True)
# As stock Gemma 3 (whose AutoModelForCausalLM is its ForConditionalGeneration class).
AutoModelForCausalLM.register(SafeGemma3Config, SafeGemma3ForConditionalGeneration, exist_ok=True)
AutoConfig.register(SafeLlavaNextConfig.model_type, SafeLlavaNextConfig, exist_ok=True)
AutoModel.register(SafeLlavaNextConfig, SafeLlavaNextForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(SafeLlavaNextConfig, SafeLlavaNextForConditionalGeneration, exist_ok=True)
AutoProcessor.register(SafeLlavaNextConfig, SafeLlavaNextProcessor, exist_ok=True)

# Remote code: save_pretrained copies the three model files next to the weights and writes `auto_map`.
SafeLlavaConfig.register_for_auto_class()
SafeLlavaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
SafeLlavaProcessor.register_for_auto_class("AutoProcessor")
SafeGemma3Config.register_for_auto_class()
SafeGemma3ForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
SafeGemma3Processor.register_for_auto_class("AutoProcessor")
SafeLlavaNextConfig.register_for_auto_class()
SafeLlavaNextForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
SafeLlavaNextProcessor.register_for_auto_class("AutoProcessor")

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
    # The seam every base builds on (docs/bases.md).
    "SafetyConfigMixin",
    "SafetyPreTrainedMixin",
    "SafetyModelMixin",
    "SafetyForConditionalGenerationMixin",
    "SafetyProcessorMixin",
]
