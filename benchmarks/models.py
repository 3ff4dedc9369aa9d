"""Stock models and SafeLlava models with identical weights, and the inputs both are given, for any base in
`benchmarks/bases.py` (a config picks one with `"base"`; LLaVA-1.5 by default)."""

import contextlib
import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from modeling_safe_llava.presets import load_json_preset, load_safety_policy
from modeling_safe_llava.safety_loading_safe_llava import DTYPES
from modeling_safe_llava.safety_module_safe_llava import SAFETY_PARAMETER_PREFIXES

from .bases import BenchmarkBase, benchmark_base

SAFETY_FIELD_PREFIXES = ("num_", "safety_")
NOTHING_FLAGGED = {"safety_threshold": 1.0}


@dataclass
class BenchmarkModels:
    """The three models every measurement compares. They share one copy of the stock weights (the same tensors), so
    a 7B shape needs the memory of one model, not three.

    Attributes:
        base: the benchmarked base (`benchmarks.bases`): its stock class, SafeLlava classes, tokenizer and processor.
        stock: the base's stock model (e.g. `LlavaForConditionalGeneration`) with random weights.
        safe: its SafeLlava (`from_base(stock)`) with the configured LLM safety tokens (paper: 64).
        head_only: the same with `num_llm_safety_tokens=0` (safety projector, head tokens and head only).
        tokenizer: the tiny offline tokenizer of the base.
        stock_processor: the base's stock processor for `stock`'s config.
        safety_fields: the SafeLlava config fields used for `safe` (`head_only` overrides the LLM token count).
        prompt: the user's text; every row is this prompt with one image, in the base's chat template.
        image_size: `(width, height)` of the random images (anyres bases tile them).
    """

    base: BenchmarkBase
    stock: torch.nn.Module
    safe: torch.nn.Module
    head_only: torch.nn.Module
    tokenizer: object
    stock_processor: object
    safety_fields: dict
    prompt: str
    image_size: tuple
    _processors: dict = field(default_factory=dict, repr=False)

    def processor_for(self, model):
        """The processor whose prompts `model` reads: stock's, or the SafeLlava processor with the model's number
        of LLM safety tokens (placeholders in front of each image)."""
        tokens = getattr(model.config, "num_llm_safety_tokens", None)
        if tokens is None:
            return self.stock_processor
        if tokens not in self._processors:
            self._processors[tokens] = self.base.registry.processor_class.from_base(
                self.stock_processor, num_llm_safety_tokens=tokens
            )
        return self._processors[tokens]


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
    return {k: v for k, v in spec.items() if not k.startswith("_") and k not in ("base_checkpoint", "base_model_type")}


def split_model_spec(model_spec: dict, tokenizer=None, base: BenchmarkBase | None = None) -> tuple[dict, dict]:
    """
    `(stock_fields, safety_fields)` of a model spec. Text token ids missing from the spec (pad/bos/eos, vocabulary
    size) are taken from `tokenizer`; a spec that names them (the 7B preset) keeps its own. The image token ids
    always come from `tokenizer` (the processor writes those), in the fields `base` names.
    """
    base = base or benchmark_base("llava")
    spec = model_spec_dict(model_spec)
    safety = {k: v for k, v in spec.items() if k.startswith(SAFETY_FIELD_PREFIXES)}
    stock = {k: copy.deepcopy(v) for k, v in spec.items() if not k.startswith(SAFETY_FIELD_PREFIXES)}
    stock.update(base.stock_defaults(stock))
    if tokenizer is None:
        return stock, safety
    text_config = stock["text_config"]
    text_config.setdefault("vocab_size", len(tokenizer))
    text_config.setdefault("pad_token_id", tokenizer.pad_token_id)
    text_config.setdefault("bos_token_id", tokenizer.bos_token_id)
    text_config.setdefault("eos_token_id", tokenizer.eos_token_id)
    stock.update(base.image_token_fields(tokenizer))
    if text_config["vocab_size"] < len(tokenizer):
        raise ValueError(
            f"text_config.vocab_size={text_config['vocab_size']} is smaller than the tokenizer ({len(tokenizer)} ids)."
        )
    return stock, safety


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
    Builds the base's stock model with random weights (seeded), then SafeLlava (LLM safety tokens as configured) and
    a head-only SafeLlava from it with the base's `from_base`, both marked trained and in eval mode. The SafeLlava
    models hold stock's own weight tensors; head-only SafeLlava also holds SafeLlava's safety modules.
    """
    base = benchmark_base(config.get("base", "llava"))
    device, dtype = config["device"], resolve_dtype(config["dtype"])
    tokenizer = base.build_tokenizer()
    stock_fields, safety_fields = split_model_spec(config["model"], tokenizer, base)
    stock_config = base.stock_config(stock_fields)
    stock_processor = base.build_processor(tokenizer, stock_config)
    policy = load_safety_policy()
    torch.manual_seed(config["seed"])
    with build_context(device, dtype):
        stock = base.stock_class(stock_config).eval()
        shallow = base.stock_class(base.stock_config(_shallow_fields(stock_fields)))
        safety_modules = _safe_from_stock(base, shallow, stock_processor, safety_fields, policy)
    with build_context("meta", dtype):
        safe = _safe_from_stock(base, base.stock_class(stock_config), stock_processor, safety_fields, policy)
        head_only_fields = {**safety_fields, "num_llm_safety_tokens": 0}
        head_only = _safe_from_stock(base, base.stock_class(stock_config), stock_processor, head_only_fields, policy)
    share_tensors(safe, stock_weights=stock, safety_weights=safety_modules)
    share_tensors(head_only, stock_weights=stock, safety_weights=safe)
    for model in (stock, safe, head_only):
        _pin_generation_config(model, config["new_tokens"])
    image_size = tuple(config.get("image_size") or base.default_image_size(stock_config))
    return BenchmarkModels(
        base, stock, safe, head_only, tokenizer, stock_processor, safety_fields, config["prompt"], image_size
    )


def _shallow_fields(stock_fields: dict) -> dict:
    """The same widths with one layer per tower: enough to initialise safety modules of the right shapes (they depend
    on widths and token counts only) without a second full-size model."""
    fields = copy.deepcopy(stock_fields)
    fields["vision_config"]["num_hidden_layers"] = 1
    fields["text_config"]["num_hidden_layers"] = 1
    fields["text_config"].pop("layer_types", None)
    return fields


def share_tensors(model, stock_weights, safety_weights):
    """
    Points every parameter and buffer of `model` (built on the meta device) at the tensor of the same name in
    `safety_weights` (safety modules) or `stock_weights` (everything else): no copy, no new memory. Tied weights
    (Gemma 3's `lm_head` and input embeddings) are visited under each of their names, so they stay tied.
    """
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        source = safety_weights if name.startswith(SAFETY_PARAMETER_PREFIXES) else stock_weights
        owner_name, _, leaf = name.rpartition(".")
        owner, source_owner = model.get_submodule(owner_name), source.get_submodule(owner_name)
        slot = "_parameters" if isinstance(tensor, torch.nn.Parameter) else "_buffers"
        shared = getattr(source_owner, slot).get(leaf)
        if shared is None or shared.shape != tensor.shape:
            raise ValueError(f"{type(source).__name__} has no {name} of shape {tuple(tensor.shape)} to share.")
        getattr(owner, slot)[leaf] = shared


def _safe_from_stock(base, stock, stock_processor, safety_fields, policy):
    classes = base.registry
    processor = classes.processor_class.from_base(
        stock_processor, num_llm_safety_tokens=safety_fields["num_llm_safety_tokens"]
    )
    model = classes.model_class.from_base(stock, processor=processor, **safety_fields, **policy).eval()
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


def build_meta_pair(model_spec: dict, base_name: str = "llava"):
    """`(stock, safe)` of a model spec on the meta device (no memory, for parameter and FLOP counts)."""
    base = benchmark_base(base_name)
    stock_fields, safety_fields = split_model_spec(model_spec, base.build_tokenizer(), base)  # as build_models
    with torch.device("meta"):
        stock = base.stock_class(base.stock_config(stock_fields))
        safe = base.registry.model_class(base.registry.config_class(**stock_fields, **safety_fields))
    return stock, safe


def random_images(image_size: tuple, batch_size: int, seed: int) -> list[Image.Image]:
    """`batch_size` RGB noise images of `image_size` (width, height), row `i` from seed `seed + i`."""
    width, height = image_size
    return [
        Image.fromarray((np.random.RandomState(seed + row).rand(height, width, 3) * 255).astype("uint8"))
        for row in range(batch_size)
    ]


def make_inputs(bm: BenchmarkModels, model, batch_size: int, seed: int = 0) -> dict:
    """
    What `model`'s processor makes of `batch_size` rows, each the prompt with one image in the base's chat template:
    `input_ids`, `attention_mask` and the image fields (`pixel_values`, and `image_sizes` or `token_type_ids` where
    the base has them), on the model's device, floating fields in its dtype.
    """
    processor = bm.processor_for(model)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": bm.prompt}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    images = [[image] for image in random_images(bm.image_size, batch_size, seed)]
    inputs = processor(text=[text] * batch_size, images=images, return_tensors="pt", padding=True)
    return {
        name: value.to(model.device, model.dtype if value.is_floating_point() else value.dtype)
        for name, value in inputs.items()
    }


def make_training_batch(bm: BenchmarkModels, model, batch_size: int, answer_tokens: int, seed: int = 0) -> dict:
    """
    A supervised batch: prompt (labels -100) followed by `answer_tokens` answer tokens (labelled, never a special or
    image token); for SafeLlava also one `(level, type)` safety label per row.
    """
    inputs = make_inputs(bm, model, batch_size, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    low = max(bm.tokenizer.all_special_ids) + 1
    answers = torch.randint(low, len(bm.tokenizer), (batch_size, answer_tokens), generator=generator)
    answers = answers.to(model.device)
    batch = dict(inputs)
    batch["input_ids"] = torch.cat([inputs["input_ids"], answers], dim=1)
    batch["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(answers)], dim=1)
    for name in ("token_type_ids", "mm_token_type_ids"):  # answer tokens are text
        if name in inputs:
            batch[name] = torch.cat([inputs[name], torch.zeros_like(answers, dtype=inputs[name].dtype)], dim=1)
    batch["labels"] = torch.cat([torch.full_like(inputs["input_ids"], -100), answers], dim=1)
    if getattr(model.config, "num_llm_safety_tokens", None) is not None:
        rows = torch.arange(batch_size)
        levels, types = len(model.config.safety_level_labels), len(model.config.safety_type_labels)
        batch["safety_labels"] = torch.stack([rows % levels, rows % types], dim=1).to(model.device)
    return batch
