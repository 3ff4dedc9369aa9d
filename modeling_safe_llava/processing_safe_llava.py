# Copyright 2026 The SafeLlava authors. Licensed under the Apache License, Version 2.0.
"""SafeLlava processor: LLaVA's processor with room for the LLM safety tokens in front of every image.

This file is remote code: it imports only torch, transformers and its sibling files.
"""

from transformers import AutoProcessor, LlavaProcessor
from transformers.image_transforms import convert_to_rgb
from transformers.utils import logging

from .policy_safe_llava import SafetyPolicy, assistant_prefix_ids


logger = logging.get_logger(__name__)

# Pillow modes with 16-bit samples: Pillow's convert("RGB") clips them at 255 instead of scaling (65535 / 257 = 255).
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


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
        if images is not None:
            images = _prepare_images(images, counter=[0])
            if kwargs.get("do_rescale", getattr(self.image_processor, "do_rescale", False)) is not False:
                _refuse_rescaled_floats(images, counter=[0])
        return super().__call__(images=images, text=text, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return super().replace_image_token(image_inputs, image_idx, **kwargs) + self.image_token * self.num_llm_safety_tokens

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        data = super()._get_num_multimodal_tokens(image_sizes=image_sizes, **kwargs)
        if image_sizes is not None:
            data["num_image_tokens"] = [n + self.num_llm_safety_tokens for n in data["num_image_tokens"]]
        return data

    def assistant_prefix_ids(self) -> list[int]:
        """Token ids the chat template adds for `add_generation_prompt=True` (where an answer starts)."""
        return assistant_prefix_ids(self)

    def encode_safety_texts(self, hints: dict | None, refusals: dict | None) -> dict:
        """
        Token ids of the safety texts, as [`SafeLlavaForConditionalGeneration.tokenize_safety_texts`] stores them:
        `{"assistant_prefix": ids of the generation prompt, "hints": {type: [ids per level]}, "refusals": {type: ids}}`.
        """
        policy = SafetyPolicy(type_names=[*(hints or refusals or {}), "Clean"], hints=hints, refusals=refusals)
        token_ids = policy.tokenize(self)
        return {
            "assistant_prefix": token_ids["assistant_prefix"],
            "hints": {name: token_ids["hints"][name] for name in hints or {}},
            "refusals": {name: token_ids["refusals"][name] for name in refusals or {}},
        }


def _prepare_images(images, counter: list[int]):
    """`images` (one image, a list, or a list of lists) with every PIL image decoded and converted by `to_rgb_image`;
    `counter` numbers the images in order for error messages."""
    if isinstance(images, (list, tuple)):
        return [_prepare_images(image, counter) for image in images]
    index = counter[0]
    counter[0] += 1
    return to_rgb_image(images, index)


def _refuse_rescaled_floats(images, counter: list[int]):
    """Raises for a floating-point array or tensor whose samples already lie in [0, 1]: the image processor would
    divide it by 255 a second time, silently (stock does), and the model would judge a black image."""
    if isinstance(images, (list, tuple)):
        for image in images:
            _refuse_rescaled_floats(image, counter)
        return
    index = counter[0]
    counter[0] += 1
    is_float = getattr(images, "dtype", None) is not None and "float" in str(images.dtype)
    if is_float and images.size and 0 <= float(images.min()) and float(images.max()) <= 1:
        raise ValueError(
            f"Image {index} is a float array with samples in [0, 1]: it looks already rescaled, and rescaling it again "
            "would give a black image. Pass do_rescale=False, or uint8 / 0-255 pixels, or a PIL image."
        )


def rgb_array(image, index: int = 0):
    """
    `image` as the `(height, width, 3)` uint8 RGB array this processor feeds the image processor: 16-bit samples
    scaled to 8 bits, transparency composited onto white. For code outside the processor that must decode images
    exactly as it does (training data, audits).
    """
    return convert_to_rgb(to_rgb_image(image, index), return_numpy=True)


def to_rgb_image(image, index: int = 0):
    """
    Decodes a PIL image fully and makes its samples 8-bit, so that the image processor's RGB conversion (which
    composites transparency onto white) gives the right colours for every Pillow mode. Numpy arrays and torch tensors
    are returned unchanged (the image processor checks them).

    Args:
        image: a `PIL.Image.Image`, `numpy.ndarray`, `torch.Tensor`, or a path / URL / base64 string, which is returned
            unchanged: stock `LlavaProcessor` loads it (EXIF orientation applied, converted to RGB).
        index: the image's position in the call, named in error messages.

    Raises:
        ValueError: a string, an image that cannot be decoded, an empty image, or 32-bit samples without a known range.
    """
    if not hasattr(image, "getbands"):  # not a PIL image
        return image
    try:
        image.load()
    except (OSError, SyntaxError, EOFError) as error:  # Pillow's errors for truncated and corrupt files
        raise ValueError(f"Image {index} could not be decoded ({type(error).__name__}: {error}).") from error
    width, height = image.size
    if width == 0 or height == 0:
        raise ValueError(f"Image {index} is empty ({width}x{height} pixels).")
    if image.mode in _SIXTEEN_BIT_MODES:
        return image.convert("I").point(lambda value: value * (1 / 257)).convert("L")
    if image.mode in ("I", "F"):
        low, high = image.getextrema()
        if image.mode == "F" or low < 0 or high > 255:
            raise ValueError(
                f"Image {index} has mode {image.mode!r} with samples in [{low}, {high}]: no standard 8-bit range. "
                "Convert it to 'L' or 'RGB' with the scaling you intend."
            )
        return image.convert("L")
    return image


__all__ = ["SafeLlavaProcessor", "rgb_array", "to_rgb_image"]
