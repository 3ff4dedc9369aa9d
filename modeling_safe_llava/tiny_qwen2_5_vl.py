"""Tiny, fully offline Qwen2.5-VL building blocks: a BPE tokenizer with Qwen's special tokens (`<|im_start|>`,
`<|im_end|>`, `<|vision_start|>`, `<|vision_end|>`, `<|image_pad|>`, `<|video_pad|>`), a random 2-block Qwen2.5-VL
vision tower and a 2-layer Qwen2.5-VL language model, sized by `configuration/tiny-qwen2_5_vl.json`. Used by the tests,
the demo and the benchmarks; never presented as a real model."""

import copy

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from .presets import load_chat_template, load_safety_policy
from .tiny import _CORPUS, load_model_preset

# Qwen's order: <|endoftext|> is the pad token, <|im_end|> ends a turn (EOS of the instruct models).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
]
_QWEN_CORPUS = ["system\nYou are a helpful assistant.\nuser\nassistant\n", *_CORPUS]


def build_tiny_qwen2_5_vl_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a fixed corpus (deterministic), without BOS (as Qwen's), with the image
    and video tokens as the attributes `Qwen2_5_VLProcessor` reads (`image_token`, `video_token`)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(_QWEN_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
        padding_side="left",
    )


def tiny_qwen2_5_vl_config(tokenizer, preset: str = "tiny-qwen2_5_vl.json", **overrides) -> Qwen2_5_VLConfig:
    """The stock Qwen2.5-VL part of a configuration preset, with token ids from `tokenizer`."""
    preset_dict = load_model_preset(preset)
    text_config = copy.deepcopy(preset_dict["text_config"])
    text_config.update(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.pad_token_id,  # as Qwen2.5-VL's config: <|endoftext|>, which the tokenizer never adds
        eos_token_id=tokenizer.eos_token_id,
    )
    ids = tokenizer.convert_tokens_to_ids
    return Qwen2_5_VLConfig(
        vision_config=copy.deepcopy(preset_dict["vision_config"]),
        text_config=text_config,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        **overrides,
    )


def build_tiny_qwen2_5_vl_image_processor(
    config: Qwen2_5_VLConfig, preset: str = "tiny-qwen2_5_vl.json", size: dict | None = None
):
    """Qwen's image processor without torchvision (the PIL backend), at the config's patch size. `size`
    (`{"shortest_edge": min_pixels, "longest_edge": max_pixels}`) overrides the preset's pixel limits."""
    from transformers import Qwen2VLImageProcessorPil

    vision = config.vision_config
    if size is None:
        pixels = load_model_preset(preset)["image_processor"]
        size = {"shortest_edge": pixels["min_pixels"], "longest_edge": pixels["max_pixels"]}
    return Qwen2VLImageProcessorPil(
        patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size,
        merge_size=vision.spatial_merge_size,
        size=size,
    )


def build_tiny_qwen2_5_vl_processor(
    tokenizer, config: Qwen2_5_VLConfig, preset: str = "tiny-qwen2_5_vl.json", size: dict | None = None
):
    """The tiny model's processor as stock builds it, images only: stock `Qwen2_5_VLProcessor` cannot be built
    without torchvision (its video processor needs it), so this is `SafeQwen2_5_VLProcessor` with
    `num_llm_safety_tokens=0`, which is stock's processor token for token, with no video processor. `size`: as
    `build_tiny_qwen2_5_vl_image_processor`."""
    from .qwen2_5_vl_safe_llava import SafeQwen2_5_VLProcessor

    return SafeQwen2_5_VLProcessor(
        image_processor=build_tiny_qwen2_5_vl_image_processor(config, preset, size),
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=load_chat_template("chat_template_qwen2_5_vl.jinja"),
        num_llm_safety_tokens=0,
    )


def build_tiny_qwen2_5_vl(seed: int = 0, preset: str = "tiny-qwen2_5_vl.json"):
    """A random stock `Qwen2_5_VLForConditionalGeneration` and its `Qwen2_5_VLProcessor` (what `from_base` starts
    from)."""
    import torch

    tokenizer = build_tiny_qwen2_5_vl_tokenizer()
    config = tiny_qwen2_5_vl_config(tokenizer, preset)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    return model, build_tiny_qwen2_5_vl_processor(tokenizer, config, preset)


def build_tiny_safe_qwen2_5_vl(
    seed: int = 0, preset: str = "tiny-qwen2_5_vl.json", policy: str = "paper_safety_policy.json", **overrides
):
    """A tiny Safe Qwen2.5-VL (safety modules untrained) and its processor, with the policy texts tokenized."""
    from .qwen2_5_vl_safe_llava import SafeQwen2_5_VLForConditionalGeneration, SafeQwen2_5_VLProcessor
    from .tiny import safety_fields

    stock, stock_processor = build_tiny_qwen2_5_vl(seed, preset)
    fields = {**safety_fields(preset), **load_safety_policy(policy), **overrides}
    processor = SafeQwen2_5_VLProcessor.from_base(stock_processor, num_llm_safety_tokens=fields["num_llm_safety_tokens"])
    model = SafeQwen2_5_VLForConditionalGeneration.from_base(stock, processor=processor, **fields).eval()
    return model, processor


def build_demo_safe_qwen2_5_vl(language_model: str = "tiny", seed: int = 0):
    """The model of `safe-llava demo --base qwen2_5_vl`: the tiny random Qwen2.5-VL (safety modules untrained, paper
    policy texts tokenized). Only the random language model exists for this base."""
    if language_model != "tiny":
        raise ValueError(f"The Qwen2.5-VL demo has only the tiny random language model, got {language_model!r}.")
    return build_tiny_safe_qwen2_5_vl(seed=seed)
