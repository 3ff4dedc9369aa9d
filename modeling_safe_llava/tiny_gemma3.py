"""Tiny, fully offline Gemma 3 building blocks: a BPE tokenizer with Gemma 3's special tokens (`<start_of_image>`,
`<end_of_image>`, `<image_soft_token>`, turn markers), a random SigLIP-style vision tower and a 2-layer Gemma 3, sized
by `configuration/tiny-gemma3.json`. Used by the tests, the demo and the benchmarks; never presented as a real model."""

import copy

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor
from transformers import PreTrainedTokenizerFast

from .presets import load_chat_template, load_json_preset, load_safety_policy
from .tiny import _CORPUS

# Gemma's order: <pad> 0, <eos> 1, <bos> 2, <unk> 3.
SPECIAL_TOKENS = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
    "<start_of_image>", "<end_of_image>", "<image_soft_token>",
]
_GEMMA3_CORPUS = ["user model\n\n", *_CORPUS]


def build_tiny_gemma3_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a fixed corpus (deterministic), adding `<bos>` in front of each text, with
    Gemma 3's image tokens as the attributes `Gemma3Processor` reads (`boi_token`, `eoi_token`, `image_token`)."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(_GEMMA3_CORPUS * 4, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
        padding_side="left",
    )


def tiny_gemma3_config(tokenizer, preset: str = "tiny-gemma3.json", **overrides) -> Gemma3Config:
    """The stock Gemma 3 part of a configuration preset, with token ids from `tokenizer`."""
    preset_dict = load_json_preset("configuration", preset)
    text_config = dict(preset_dict["text_config"])
    text_config.update(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return Gemma3Config(
        vision_config=copy.deepcopy(preset_dict["vision_config"]),
        text_config=text_config,
        mm_tokens_per_image=preset_dict["mm_tokens_per_image"],
        boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
        **overrides,
    )


def build_tiny_gemma3_processor(tokenizer, config: Gemma3Config) -> Gemma3Processor:
    size = config.vision_config.image_size
    image_processor = Gemma3ImageProcessorPil(size={"height": size, "width": size})
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=config.mm_tokens_per_image,
        chat_template=load_chat_template("chat_template_gemma3.jinja"),
    )


def build_tiny_gemma3(seed: int = 0, preset: str = "tiny-gemma3.json"):
    """A random stock `Gemma3ForConditionalGeneration` and its `Gemma3Processor` (what `from_base` starts from)."""
    import torch

    tokenizer = build_tiny_gemma3_tokenizer()
    config = tiny_gemma3_config(tokenizer, preset)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    # Gemma 3 initialises its image projection to zeros: a random model would then ignore its images entirely.
    projection = model.model.multi_modal_projector.mm_input_projection_weight
    with torch.no_grad():
        projection.normal_(std=config.vision_config.hidden_size**-0.5)
    return model, build_tiny_gemma3_processor(tokenizer, config)


def build_tiny_safe_gemma3(seed: int = 0, preset: str = "tiny-gemma3.json", policy: str = "paper_safety_policy.json", **overrides):
    """A tiny Safe Gemma 3 (safety modules untrained) and its processor, with the policy texts tokenized."""
    from .gemma3_safe_llava import SafeGemma3ForConditionalGeneration, SafeGemma3Processor
    from .tiny import safety_fields

    stock, stock_processor = build_tiny_gemma3(seed, preset)
    fields = {**safety_fields(preset), **load_safety_policy(policy), **overrides}
    processor = SafeGemma3Processor.from_base(stock_processor, num_llm_safety_tokens=fields["num_llm_safety_tokens"])
    model = SafeGemma3ForConditionalGeneration.from_base(stock, processor=processor, **fields).eval()
    return model, processor


def build_demo_safe_gemma3(language_model: str = "tiny", seed: int = 0):
    """The model of `safe-llava demo --base gemma3`: a tiny random Gemma 3 sized by `configuration/demo-gemma3.json`
    (safety modules untrained, paper policy texts tokenized). Only the random language model exists for this base."""
    if language_model != "tiny":
        raise ValueError(f"The Gemma 3 demo has only the tiny random language model, got {language_model!r}.")
    return build_tiny_safe_gemma3(seed=seed, preset="demo-gemma3.json")
