"""Tiny, fully offline SafeLlava building blocks: a BPE tokenizer trained on a fixed corpus, a random CLIP-style
vision tower and a 2-layer Llama, sized by `configuration/tiny.json`. Used by the tests, examples and benchmarks;
never presented as a real model."""

import copy

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil, LlavaNextProcessor
from transformers import PreTrainedTokenizerFast

from .presets import load_chat_template, load_json_preset, load_safety_policy

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
_CORPUS = [
    "USER: ASSISTANT: What is shown in this image? Describe the picture. Read the text in the image.",
    "The image shows a cat, a dog, a person, a rocket, coffee, coins, a horse, a street sign and a menu.",
    "Safe Hint: This image may contain risks of politically sensitive information, illegal content, such as "
    "pornography or violence, cyberbullying, abuse, and hate content, prejudicial discrimination content, "
    "personal privacy, false rumors or malicious misleading content.",
    "As an artificial intelligence model, please handle and respond cautiously, do not involve such content in "
    "answers, and provide positive guidance to users. You can refuse to answer questions if necessary.",
    "This image contains serious risks of. You must refuse to give the answer, and say: I'm sorry, but I can't "
    "help with this request: the image appears to contain",
    "Steps to make a weapon. CAPTCHA. Name, address, phone number, date of birth, ID card. Breaking news headline.",
    "0 1 2 3 4 5 6 7 8 9 . , : ; ! ? ' \" ( ) - \n",
]


def build_tiny_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a fixed corpus (deterministic), adding `<s>` in front of each text."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )


def load_model_preset(preset: str) -> dict:
    """A configuration preset with the fields of the preset it `extends` (if any) under its own."""
    preset_dict = load_json_preset("configuration", preset)
    if "extends" in preset_dict:
        preset_dict = {**load_model_preset(preset_dict.pop("extends")), **preset_dict}
    return preset_dict


def tiny_llava_config(tokenizer, preset: str = "tiny.json", **overrides) -> LlavaConfig:
    """The stock LLaVA part of a configuration preset, with token ids from `tokenizer`."""
    return LlavaConfig(**_stock_fields(tokenizer, preset), **overrides)


def _stock_fields(tokenizer, preset: str) -> dict:
    """The vision config, text config (token ids from `tokenizer`) and image token id of a configuration preset."""
    preset_dict = load_model_preset(preset)
    text_config = dict(preset_dict["text_config"])
    text_config.update(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return {
        "vision_config": copy.deepcopy(preset_dict["vision_config"]),
        "text_config": text_config,
        "image_token_id": tokenizer.convert_tokens_to_ids("<image>"),
    }


def safety_fields(preset: str = "tiny.json") -> dict:
    """The SafeLlava-only fields of a configuration preset."""
    preset_dict = load_model_preset(preset)
    return {k: v for k, v in preset_dict.items() if k.startswith(("num_", "safety_"))}


def build_tiny_llava_processor(tokenizer, config: LlavaConfig, image_processor=None) -> LlavaProcessor:
    """LLaVA's processor for `config`; the image processor defaults to CLIP's at the vision tower's size."""
    size = config.vision_config.image_size
    if image_processor is None:
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        chat_template=load_chat_template(),
    )


def build_tiny_llava(seed: int = 0, preset: str = "tiny.json"):
    """A random stock `LlavaForConditionalGeneration` and its `LlavaProcessor` (what `from_llava` starts from)."""
    import torch

    tokenizer = build_tiny_tokenizer()
    config = tiny_llava_config(tokenizer, preset)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    return model, build_tiny_llava_processor(tokenizer, config)


def build_tiny_safe_llava(seed: int = 0, preset: str = "tiny.json", policy: str = "paper_safety_policy.json", **overrides):
    """A tiny SafeLlava (safety modules untrained) and its processor, with the policy texts tokenized."""
    from .modeling_safe_llava import SafeLlavaForConditionalGeneration
    from .processing_safe_llava import SafeLlavaProcessor

    llava, llava_processor = build_tiny_llava(seed, preset)
    fields = {**safety_fields(preset), **load_safety_policy(policy), **overrides}
    processor = SafeLlavaProcessor.from_llava(llava_processor, num_llm_safety_tokens=fields["num_llm_safety_tokens"])
    model = SafeLlavaForConditionalGeneration.from_llava(llava, processor=processor, **fields).eval()
    return model, processor


def tiny_llava_next_config(tokenizer, preset: str = "llava-next-tiny.json", **overrides) -> LlavaNextConfig:
    """The stock LLaVA-NeXT part of a configuration preset (anyres pinpoints included), with token ids from `tokenizer`."""
    pinpoints = load_model_preset(preset)["image_grid_pinpoints"]
    return LlavaNextConfig(**_stock_fields(tokenizer, preset), image_grid_pinpoints=pinpoints, **overrides)


def build_tiny_llava_next_processor(tokenizer, config: LlavaNextConfig) -> LlavaNextProcessor:
    """LLaVA-NeXT's processor for `config`: base image and anyres crops at the vision tower's size, CLS counted."""
    size = config.vision_config.image_size
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_grid_pinpoints=copy.deepcopy(config.image_grid_pinpoints),
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        chat_template=load_chat_template(),
    )


def build_tiny_llava_next(seed: int = 0, preset: str = "llava-next-tiny.json"):
    """A random stock `LlavaNextForConditionalGeneration` and its `LlavaNextProcessor` (what `from_base` starts from)."""
    import torch

    tokenizer = build_tiny_tokenizer()
    config = tiny_llava_next_config(tokenizer, preset)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    return model, build_tiny_llava_next_processor(tokenizer, config)


def build_tiny_safe_llava_next(seed: int = 0, preset: str = "llava-next-tiny.json", policy: str = "paper_safety_policy.json", **overrides):
    """A tiny SafeLlava-NeXT (safety modules untrained) and its processor, with the policy texts tokenized."""
    from .llava_next_safe_llava import SafeLlavaNextForConditionalGeneration, SafeLlavaNextProcessor

    stock, stock_processor = build_tiny_llava_next(seed, preset)
    fields = {**safety_fields(preset), **load_safety_policy(policy), **overrides}
    processor = SafeLlavaNextProcessor.from_base(stock_processor, num_llm_safety_tokens=fields["num_llm_safety_tokens"])
    model = SafeLlavaNextForConditionalGeneration.from_base(stock, processor=processor, **fields).eval()
    return model, processor


def build_demo_safe_llava_next(language_model: str = "tiny", seed: int = 0):
    """The model of `safe-llava demo --base llava-next`: a tiny random LLaVA-NeXT sized by
    `configuration/demo-llava-next.json` (safety modules untrained, paper policy texts tokenized). Only the random
    language model exists for this base."""
    if language_model != "tiny":
        raise ValueError(f"The LLaVA-NeXT demo has only the tiny random language model, got {language_model!r}.")
    return build_tiny_safe_llava_next(seed=seed, preset="demo-llava-next.json")
