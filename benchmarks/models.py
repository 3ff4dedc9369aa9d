"""Stock LLaVA and SafeLlava models with identical weights, and the inputs both are given."""

import contextlib
import copy
from dataclasses import dataclass

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from modeling_safe_llava import SafeLlavaConfig, SafeLlavaForConditionalGeneration, SafeLlavaProcessor
from modeling_safe_llava.modeling_safe_llava import SAFETY_PARAMETER_PREFIXES
from modeling_safe_llava.presets import load_json_preset, load_safety_policy
from modeling_safe_llava.tiny import build_tiny_llava_processor, build_tiny_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETY_FIELD_PREFIXES = ("num_", "safety_")
NOTHING_FLAGGED = {"safety_threshold": 1.0}


@dataclass
class BenchmarkModels:
    """The three models every measurement compares. They share one copy of the stock weights (the same tensors), so
    a 7B shape needs the memory of one model, not three.

    Attributes:
        stock: `LlavaForConditionalGeneration` with random weights.
        safe: `SafeLlavaForConditionalGeneration.from_llava(stock)` with the configured LLM safety tokens (paper: 64).
        head_only: the same with `num_llm_safety_tokens=0` (safety projector, head tokens and head only).
        tokenizer: the tiny offline tokenizer (prompt text only; image placeholders are inserted by id).
        safety_fields: the SafeLlava config fields used for `safe` (`head_only` overrides the LLM token count).
    """

    stock: LlavaForConditionalGeneration
    safe: SafeLlavaForConditionalGeneration
    head_only: SafeLlavaForConditionalGeneration
    tokenizer: object
    safety_fields: dict


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}; accepted: {sorted(DTYPES)}.")
    return DTYPES[name]


def model_spec_dict(model_spec: dict) -> dict:
    """The model part of a benchmark config as a flat dict: `{"preset": "7b.json"}` or inline fields."""
    if "preset" in model_spec:
        spec = load_json_preset("configuration", model_spec["preset"])
    else:
        spec = copy.deepcopy(model_spec)
    return {k: v for k, v in spec.items() if not k.startswith("_") and k != "base_checkpoint"}


def split_model_spec(model_spec: dict, tokenizer=None) -> tuple[dict, dict]:
    """
    `(llava_fields, safety_fields)` of a model spec. Token ids missing from the spec (pad/bos/eos, image token) are
    taken from `tokenizer`; a spec that names them (the 7B preset) keeps its own.
    """
    spec = model_spec_dict(model_spec)
    safety = {k: v for k, v in spec.items() if k.startswith(SAFETY_FIELD_PREFIXES)}
    llava = {k: copy.deepcopy(v) for k, v in spec.items() if not k.startswith(SAFETY_FIELD_PREFIXES)}
    vision = llava["vision_config"]
    num_patches = (vision["image_size"] // vision["patch_size"]) ** 2
    if llava.get("vision_feature_select_strategy") == "full":
        num_patches += 1
    llava.setdefault("image_seq_length", num_patches)  # stock LLaVA's <image> placeholders per image
    text_config = llava["text_config"]
    if tokenizer is not None:
        text_config.setdefault("vocab_size", len(tokenizer))
        text_config.setdefault("pad_token_id", tokenizer.pad_token_id)
        text_config.setdefault("bos_token_id", tokenizer.bos_token_id)
        text_config.setdefault("eos_token_id", tokenizer.eos_token_id)
        llava.setdefault("image_token_id", tokenizer.convert_tokens_to_ids("<image>"))
    if tokenizer is not None and text_config["vocab_size"] < len(tokenizer):
        raise ValueError(
            f"text_config.vocab_size={text_config['vocab_size']} is smaller than the tokenizer ({len(tokenizer)} ids)."
        )
    return llava, safety


@contextlib.contextmanager
def build_context(device: str, dtype: torch.dtype):
    """Create parameters directly on `device` in `dtype` (a 7B model is never materialised in fp32 on the CPU)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_models(config: dict) -> BenchmarkModels:
    """
    Builds stock LLaVA with random weights (seeded), then SafeLlava (LLM safety tokens as configured) and a head-only
    SafeLlava from it with `SafeLlavaForConditionalGeneration.from_llava`, both marked trained and in eval mode.
    The SafeLlava models hold stock's own weight tensors; head-only SafeLlava also holds SafeLlava's safety modules.
    """
    device, dtype = config["device"], resolve_dtype(config["dtype"])
    tokenizer = build_tiny_tokenizer()
    llava_fields, safety_fields = split_model_spec(config["model"], tokenizer)
    llava_config = LlavaConfig(**llava_fields)
    policy = load_safety_policy()
    torch.manual_seed(config["seed"])
    with build_context(device, dtype):
        stock = LlavaForConditionalGeneration(llava_config).eval()
        safety_modules = _safe_from_stock(_shallow_stock(llava_fields), tokenizer, safety_fields, policy)
    with build_context("meta", dtype):
        safe = _safe_from_stock(LlavaForConditionalGeneration(llava_config), tokenizer, safety_fields, policy)
        head_only_fields = {**safety_fields, "num_llm_safety_tokens": 0}
        head_only = _safe_from_stock(LlavaForConditionalGeneration(llava_config), tokenizer, head_only_fields, policy)
    share_tensors(safe, stock_weights=stock, safety_weights=safety_modules)
    share_tensors(head_only, stock_weights=stock, safety_weights=safe)
    for model in (stock, safe, head_only):
        _pin_generation_config(model, config["new_tokens"])
    return BenchmarkModels(stock, safe, head_only, tokenizer, safety_fields)


def _shallow_stock(llava_fields: dict) -> LlavaForConditionalGeneration:
    """Stock LLaVA of the same widths with one layer per tower: enough to initialise safety modules of the right
    shapes (they depend on widths and token counts only) without a second full-size model."""
    fields = copy.deepcopy(llava_fields)
    fields["vision_config"]["num_hidden_layers"] = 1
    fields["text_config"]["num_hidden_layers"] = 1
    return LlavaForConditionalGeneration(LlavaConfig(**fields))


def share_tensors(model, stock_weights, safety_weights):
    """
    Points every parameter and buffer of `model` (built on the meta device) at the tensor of the same name in
    `safety_weights` (safety modules) or `stock_weights` (everything else): no copy, no new memory.
    """
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        source = safety_weights if name.startswith(SAFETY_PARAMETER_PREFIXES) else stock_weights
        owner_name, _, leaf = name.rpartition(".")
        owner, source_owner = model.get_submodule(owner_name), source.get_submodule(owner_name)
        slot = "_parameters" if isinstance(tensor, torch.nn.Parameter) else "_buffers"
        shared = getattr(source_owner, slot).get(leaf)
        if shared is None or shared.shape != tensor.shape:
            raise ValueError(f"{type(source).__name__} has no {name} of shape {tuple(tensor.shape)} to share.")
        getattr(owner, slot)[leaf] = shared


def _safe_from_stock(stock, tokenizer, safety_fields, policy):
    llava_processor = build_tiny_llava_processor(tokenizer, stock.config)
    processor = SafeLlavaProcessor.from_llava(llava_processor, num_llm_safety_tokens=safety_fields["num_llm_safety_tokens"])
    model = SafeLlavaForConditionalGeneration.from_llava(stock, processor=processor, **safety_fields, **policy).eval()
    model.config.safety_modules_trained = True  # random head stands in for a trained one: timings only
    return model


def _pin_generation_config(model, new_tokens: int):
    """Greedy decoding of exactly `new_tokens` tokens (eos suppressed until then) on both sides."""
    generation_config = model.generation_config
    generation_config.do_sample = False
    generation_config.max_new_tokens = new_tokens
    generation_config.min_new_tokens = new_tokens
    if generation_config.pad_token_id is None:
        generation_config.pad_token_id = model.config.text_config.pad_token_id


def build_meta_pair(model_spec: dict) -> tuple[LlavaForConditionalGeneration, SafeLlavaForConditionalGeneration]:
    """Stock LLaVA and SafeLlava of a model spec on the meta device (no memory, for parameter and FLOP counts)."""
    llava_fields, safety_fields = split_model_spec(model_spec, build_tiny_tokenizer())  # same id filling as build_models
    with torch.device("meta"):
        stock = LlavaForConditionalGeneration(LlavaConfig(**llava_fields))
        safe = SafeLlavaForConditionalGeneration(SafeLlavaConfig(**llava_fields, **safety_fields))
    return stock, safe


def prompt_token_ids(tokenizer, config, prompt: str) -> list[int]:
    """
    `"USER: <image>\\n{prompt} ASSISTANT:"` as token ids with `config.image_seq_length` image placeholders
    (`config.image_token_id`): 576 for stock LLaVA-1.5, 576 + LLM safety tokens for SafeLlava.
    """
    ids = tokenizer(f"USER: <image>\n{prompt} ASSISTANT:")["input_ids"]
    placeholder = tokenizer.convert_tokens_to_ids("<image>")
    if ids.count(placeholder) != 1:
        raise ValueError(f"The prompt {prompt!r} must not contain '<image>' itself.")
    at = ids.index(placeholder)
    return ids[:at] + [config.image_token_id] * config.image_seq_length + ids[at + 1 :]


def make_pixel_values(config, batch_size: int, seed: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    """Normalised-looking random images `(batch_size, 3, image_size, image_size)` (one image per row)."""
    size = config.vision_config.image_size
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 3, size, size, generator=generator).to(device=device, dtype=dtype)


def make_inputs(model, tokenizer, prompt: str, batch_size: int, seed: int = 0) -> dict:
    """`input_ids`, `attention_mask`, `pixel_values` for `model`: the same prompt and images in every row."""
    config = model.config
    ids = torch.tensor([prompt_token_ids(tokenizer, config, prompt)] * batch_size, device=model.device)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": make_pixel_values(config, batch_size, seed, model.device, model.dtype),
    }


def make_training_batch(model, tokenizer, prompt: str, batch_size: int, answer_tokens: int, seed: int = 0) -> dict:
    """
    A supervised batch: prompt (labels -100) followed by `answer_tokens` answer tokens (labelled); for SafeLlava also
    one `(level, type)` safety label per row.
    """
    inputs = make_inputs(model, tokenizer, prompt, batch_size, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    low = max(tokenizer.convert_tokens_to_ids("<image>") + 1, 5)
    answers = torch.randint(low, len(tokenizer), (batch_size, answer_tokens), generator=generator).to(model.device)
    input_ids = torch.cat([inputs["input_ids"], answers], dim=1)
    labels = torch.cat([torch.full_like(inputs["input_ids"], -100), answers], dim=1)
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": inputs["pixel_values"],
        "labels": labels,
    }
    if isinstance(model.config, SafeLlavaConfig):
        rows = torch.arange(batch_size)
        levels, types = len(model.config.safety_level_labels), len(model.config.safety_type_labels)
        batch["safety_labels"] = torch.stack([rows % levels, rows % types], dim=1).to(model.device)
    return batch
