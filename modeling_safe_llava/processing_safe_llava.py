# Copyright 2026 The SafeLlava authors. Licensed under the Apache License, Version 2.0.
"""SafeLlava processor: LLaVA's processor with room for the LLM safety tokens in front of every image.

This file is remote code: it imports only torch, transformers and its sibling files.
"""

from transformers import LlavaProcessor

from .safety_processing_safe_llava import SafetyProcessorMixin, rgb_array, to_rgb_image


class SafeLlavaProcessor(SafetyProcessorMixin, LlavaProcessor):
    r"""
    [`LlavaProcessor`] for SafeLlava: each `<image>` expands to `num_llm_safety_tokens` + one placeholder per
    patch, the positions that [`SafeLlavaForConditionalGeneration`] fills with its LLM safety tokens and the image
    features. Tokenizes with left padding by default, as batched generation needs.

    Args:
        num_llm_safety_tokens (`int`, *optional*, defaults to 0):
            Must equal the model's `config.num_llm_safety_tokens`.
        (the other arguments are [`LlavaProcessor`]'s.)

    Example:

    ```python
    >>> processor = SafeLlavaProcessor.from_llava("llava-hf/llava-1.5-7b-hf", num_llm_safety_tokens=64)
    >>> inputs = processor(images=image, text="USER: <image>\nWhat is shown? ASSISTANT:", return_tensors="pt")
    >>> int((inputs["input_ids"] == processor.image_token_id).sum())  # 64 safety tokens + 576 patches
    640
    ```
    """

    stock_class = LlavaProcessor
    stock_settings = ("patch_size", "vision_feature_select_strategy", "image_token", "num_additional_image_tokens")
    # `from_base` under LLaVA's name.
    from_llava = classmethod(SafetyProcessorMixin.from_base.__func__)

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        patch_size=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        num_additional_image_tokens=0,
        num_llm_safety_tokens=0,
        **kwargs,
    ):
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            num_additional_image_tokens=num_additional_image_tokens,
            num_llm_safety_tokens=num_llm_safety_tokens,
            **kwargs,
        )

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return super().replace_image_token(image_inputs, image_idx, **kwargs) + self.image_token * self.num_llm_safety_tokens

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        data = super()._get_num_multimodal_tokens(image_sizes=image_sizes, **kwargs)
        if image_sizes is not None:
            data["num_image_tokens"] = [n + self.num_llm_safety_tokens for n in data["num_image_tokens"]]
        return data


__all__ = ["SafeLlavaProcessor", "rgb_array", "to_rgb_image"]
