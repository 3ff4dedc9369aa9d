# Copyright 2026 The SafeLlava authors. Licensed under the Apache License, Version 2.0.
"""What every SafeLlava base's processor shares: the LLM safety token count, the image checks in front of the stock
processor, the safety texts' token ids, and `from_base`.

A base's processor is `class SafeXProcessor(SafetyProcessorMixin, XProcessor)`; it reserves
`num_llm_safety_tokens` more image placeholders per image, where the base's stock processor sizes an image (LLaVA:
`replace_image_token` and `_get_num_multimodal_tokens`).

This file is remote code: it imports only torch, transformers and its sibling files.
"""

from transformers import AutoProcessor
from transformers.image_transforms import convert_to_rgb

from .chat_template_safe_llava import assistant_prefix_ids
from .checks_safe_llava import check_integer
from .policy_safe_llava import SafetyPolicy


# Pillow modes with 16-bit samples: Pillow's convert("RGB") clips them at 255 instead of scaling (65535 / 257 = 255).
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class SafetyProcessorMixin:
    """
    Put in front of a base's stock processor. `num_llm_safety_tokens` must equal the model's config field; the stock
    processor's `__init__` arguments are passed on unchanged.

    Class attribute a base sets:
        stock_class: the stock processor class (`from_base` accepts its instances, folders and Hub ids).
    """

    stock_class = None
    # Settings of the stock processor that `from_base` carries over (besides its sub-processors and chat template).
    stock_settings = ()

    def __init__(self, *args, num_llm_safety_tokens=0, **kwargs):
        self.num_llm_safety_tokens = check_integer("num_llm_safety_tokens", num_llm_safety_tokens, minimum=0)
        super().__init__(*args, **kwargs)

    @classmethod
    def from_base(cls, processor_or_path, num_llm_safety_tokens: int, chat_template: str | None = None, **kwargs):
        """
        The SafeLlava processor of a stock processor of `cls.stock_class` (instance, folder or Hub id), keeping its
        tokenizer, image processor, settings and chat template; sets left padding for generation.
        """
        if isinstance(processor_or_path, cls.stock_class):
            stock = processor_or_path
        else:
            stock = AutoProcessor.from_pretrained(processor_or_path, **kwargs)
        stock.tokenizer.padding_side = "left"
        settings = {name: getattr(stock, name) for name in cls.stock_settings if hasattr(stock, name)}
        return cls(
            **{name: getattr(stock, name) for name in stock.get_attributes()},
            **settings,
            chat_template=chat_template or stock.chat_template,
            num_llm_safety_tokens=num_llm_safety_tokens,
        )

    def __call__(self, images=None, text=None, **kwargs):
        if images is not None and text is None:
            raise ValueError(
                f"{type(self).__name__} needs text with an {self.image_token} placeholder for each image (the safety head reads the "
                "prompt's first token), e.g. processor.apply_chat_template(...) or 'USER: <image>\\n... ASSISTANT:'."
            )
        if images is not None:
            images = _prepare_images(images, counter=[0])
            if kwargs.get("do_rescale", getattr(self.image_processor, "do_rescale", False)) is not False:
                _refuse_rescaled_floats(images, counter=[0])
        return super().__call__(images=images, text=text, **kwargs)

    def assistant_prefix_ids(self) -> list[int]:
        """Token ids the chat template adds for `add_generation_prompt=True` (where an answer starts)."""
        return assistant_prefix_ids(self)

    def encode_safety_texts(self, hints: dict | None, refusals: dict | None) -> dict:
        """
        Token ids of the safety texts, as `model.tokenize_safety_texts` stores them:
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


__all__ = ["SafetyProcessorMixin", "rgb_array", "to_rgb_image"]
