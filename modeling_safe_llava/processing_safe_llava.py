# Copyright 2026 The SafeLlava authors. Licensed under the Apache License, Version 2.0.
"""SafeLlava processor: LLaVA's processor with room for the LLM safety tokens in front of every image.

This file is remote code: it imports only torch, transformers and its sibling files.
"""

from transformers import AutoProcessor, LlavaProcessor
from transformers.utils import logging


logger = logging.get_logger(__name__)

_PROBE_CONVERSATION = [{"role": "user", "content": [{"type": "text", "text": "probe"}]}]


class SafeLlavaProcessor(LlavaProcessor):
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
        if isinstance(num_llm_safety_tokens, bool) or not isinstance(num_llm_safety_tokens, int) or num_llm_safety_tokens < 0:
            raise ValueError(f"num_llm_safety_tokens must be an integer >= 0, got {num_llm_safety_tokens!r}.")
        self.num_llm_safety_tokens = num_llm_safety_tokens
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            num_additional_image_tokens=num_additional_image_tokens,
            **kwargs,
        )

    @classmethod
    def from_llava(cls, processor_or_path, num_llm_safety_tokens: int, chat_template: str | None = None, **kwargs):
        """
        Builds a SafeLlava processor from a stock [`LlavaProcessor`] (instance, folder or Hub id), keeping its
        tokenizer, image processor and chat template; sets left padding for generation.
        """
        if isinstance(processor_or_path, LlavaProcessor):
            llava = processor_or_path
        else:
            llava = AutoProcessor.from_pretrained(processor_or_path, **kwargs)
        llava.tokenizer.padding_side = "left"
        return cls(
            image_processor=llava.image_processor,
            tokenizer=llava.tokenizer,
            patch_size=llava.patch_size,
            vision_feature_select_strategy=llava.vision_feature_select_strategy,
            chat_template=chat_template or llava.chat_template,
            image_token=llava.image_token,
            num_additional_image_tokens=llava.num_additional_image_tokens,
            num_llm_safety_tokens=num_llm_safety_tokens,
        )

    def __call__(self, images=None, text=None, **kwargs):
        if images is not None and text is None:
            raise ValueError(
                "SafeLlavaProcessor needs text with an <image> placeholder for each image (the safety head reads the "
                "prompt's first token), e.g. processor.apply_chat_template(...) or 'USER: <image>\\n... ASSISTANT:'."
            )
        return super().__call__(images=images, text=text, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return super().replace_image_token(image_inputs, image_idx, **kwargs) + self.image_token * self.num_llm_safety_tokens

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        data = super()._get_num_multimodal_tokens(image_sizes=image_sizes, **kwargs)
        if image_sizes is not None:
            data["num_image_tokens"] = [n + self.num_llm_safety_tokens for n in data["num_image_tokens"]]
        return data

    def encode_safety_texts(self, hints: dict | None, refusals: dict | None) -> dict:
        """
        Token ids of the safety texts, as [`SafeLlavaForConditionalGeneration.tokenize_safety_texts`] stores them:
        `{"assistant_prefix": ids of the generation prompt (e.g. "ASSISTANT:"), "hints": {type: [ids per level]},
        "refusals": {type: ids}}`. Hints are inserted right before the assistant prefix, as in the paper.
        """
        encode = lambda text: self.tokenizer.encode(text, add_special_tokens=False) if text else []  # noqa: E731
        return {
            "assistant_prefix": self.assistant_prefix_ids(),
            "hints": {name: [encode(text) for text in texts] for name, texts in (hints or {}).items()},
            "refusals": {name: encode(text) for name, text in (refusals or {}).items()},
        }

    def assistant_prefix_ids(self) -> list[int]:
        """Token ids the chat template adds for `add_generation_prompt=True` (where an answer starts)."""
        if self.chat_template is None:
            raise ValueError("This processor has no chat template, so the assistant-turn marker is unknown.")
        with_prompt = self.apply_chat_template(_PROBE_CONVERSATION, add_generation_prompt=True, tokenize=False)
        without = self.apply_chat_template(_PROBE_CONVERSATION, add_generation_prompt=False, tokenize=False)
        ids_with = self.tokenizer.encode(with_prompt, add_special_tokens=False)
        ids_without = self.tokenizer.encode(without, add_special_tokens=False)
        common = 0
        while common < min(len(ids_with), len(ids_without)) and ids_with[common] == ids_without[common]:
            common += 1
        prefix = ids_with[common:]
        if not prefix:
            raise ValueError("The chat template adds nothing for add_generation_prompt=True; hints cannot be placed.")
        return prefix


__all__ = ["SafeLlavaProcessor"]
