# Copyright 2026 The SafeLlava authors. Licensed under the Apache License, Version 2.0.
"""SafeLlava configuration: LLaVA-1.5 plus the safety projector, safety tokens and safety head.

This file is remote code: it is copied next to the weights on the Hub and imports only torch,
transformers and its sibling files.
"""

from transformers import LlavaConfig

from .policy_safe_llava import SAFETY_LEVEL_LABELS, SAFETY_TYPE_LABELS  # noqa: F401 (re-exported)
from .safety_config_safe_llava import SafetyConfigMixin


# Remote code: transformers records only one auto class per model class, so both entries are written here.
AUTO_MAP = {
    "AutoConfig": "configuration_safe_llava.SafeLlavaConfig",
    "AutoModel": "modeling_safe_llava.SafeLlavaForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_safe_llava.SafeLlavaForConditionalGeneration",
}


class SafeLlavaConfig(SafetyConfigMixin, LlavaConfig):
    r"""
    Configuration of a [`SafeLlavaForConditionalGeneration`]: every field of [`LlavaConfig`] plus the safety fields of
    [`SafetyConfigMixin`] (safety projector, safety tokens, safety head and policy; arXiv 2405.13581).

    The LLaVA placeholder count per image, `image_seq_length`, is the patch count plus `num_llm_safety_tokens`: the
    LLM safety tokens sit before each image's patches.

    Example:

    ```python
    >>> from modeling_safe_llava import SafeLlavaConfig
    >>> config = SafeLlavaConfig(num_llm_safety_tokens=0, safety_projector_type="mlp")
    >>> config.image_seq_length  # 576 patches, no LLM safety tokens
    576
    ```
    """

    model_type = "safe_llava"
    safety_auto_map = AUTO_MAP

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        num_patches = (self.vision_config.image_size // self.vision_config.patch_size) ** 2
        if self.vision_feature_select_strategy == "full":
            num_patches += 1
        self.image_seq_length = num_patches + self.num_llm_safety_tokens

    @classmethod
    def from_llava_config(cls, llava_config, **safety_fields) -> "SafeLlavaConfig":
        """[`SafetyConfigMixin.from_base_config`] for a stock `LlavaConfig`."""
        return cls.from_base_config(llava_config, **safety_fields)

    @property
    def safety_vision_dim(self) -> int:
        """The vision layer(s) LLaVA projects, concatenated: `vision hidden size * number of vision_feature_layer`."""
        layers = self.vision_feature_layer
        return self.vision_config.hidden_size * (1 if isinstance(layers, int) else len(layers))


__all__ = ["SafeLlavaConfig"]
