"""How the benchmarks build each base from a config's model spec: its tiny offline tokenizer, its stock config and
processor, and where its image token ids go. The SafeLlava classes come from the package's registry of bases
(`modeling_safe_llava.bases`); a benchmark config picks a base with `"base": "llava-next"` (default `"llava"`).

Adding a base to the benchmarks is one `BenchmarkBase` entry below; the measurements themselves (`scenarios.py`) never
branch on a base.
"""

from dataclasses import dataclass
from typing import Callable

from modeling_safe_llava.bases import base_named
from modeling_safe_llava.tiny import build_tiny_llava_next_processor, build_tiny_llava_processor, build_tiny_tokenizer
from modeling_safe_llava.tiny_gemma3 import build_tiny_gemma3_processor, build_tiny_gemma3_tokenizer
from modeling_safe_llava.tiny_qwen2_5_vl import build_tiny_qwen2_5_vl_tokenizer, build_tiny_qwen2_5_vl_processor


@dataclass(frozen=True)
class BenchmarkBase:
    """
    One base as the benchmarks build it.

    Args:
        name: the registry name (`modeling_safe_llava.bases.base_named`), also the config's `"base"`.
        build_tokenizer: `() -> tokenizer`, the base's tiny offline tokenizer.
        build_processor: `(tokenizer, stock_config) -> stock processor` for a config of any size.
        image_token_fields: `tokenizer -> {config field: token id}` for the image tokens the processor writes.
        stock_defaults: `stock_fields -> {field: value}` the stock config needs besides the spec's (e.g. LLaVA's
            `image_seq_length`); the spec's own values win.
        counts_flops: whether `benchmarks/flops.py` has this base's FLOP model (LLaVA-1.5's single-image layout);
            other bases report measured ratios and parameter counts only.
    """

    name: str
    build_tokenizer: Callable
    build_processor: Callable
    image_token_fields: Callable
    stock_defaults: Callable = lambda fields: {}
    counts_flops: bool = False

    @property
    def registry(self):
        """The package's `Base`: the SafeLlava config, model and processor classes."""
        return base_named(self.name)

    @property
    def stock_class(self):
        return self.registry.model_class.stock_class

    def stock_config(self, stock_fields: dict):
        return self.stock_class.config_class(**stock_fields)

    @staticmethod
    def default_image_size(stock_config) -> tuple[int, int]:
        """The vision tower's own input size: one crop, no resizing."""
        size = stock_config.vision_config.image_size
        return (size, size)


def _llava_image_seq_length(fields: dict) -> dict:
    """Stock LLaVA's `<image>` placeholders per image (patches, plus CLS with the `"full"` strategy)."""
    vision = fields["vision_config"]
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    patches += fields.get("vision_feature_select_strategy") == "full"
    return {"image_seq_length": fields.get("image_seq_length", patches)}


def _image_token_id(tokenizer) -> dict:
    return {"image_token_id": tokenizer.convert_tokens_to_ids("<image>")}


def _qwen2_5_vl_image_tokens(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
    }


def _qwen2_5_vl_processor(tokenizer, stock_config):
    """The tiny processor with stock Qwen2.5-VL's pixel limits counted in the config's merged patches (4 to 16,384
    per image: 3,136 to 12,845,056 px at 14 px patches), so that a benchmark's image keeps its own size."""
    vision = stock_config.vision_config
    merged_patch = (vision.patch_size * vision.spatial_merge_size) ** 2
    size = {"shortest_edge": 4 * merged_patch, "longest_edge": 16384 * merged_patch}
    return build_tiny_qwen2_5_vl_processor(tokenizer, stock_config, size=size)


def _gemma3_image_tokens(tokenizer) -> dict:
    return {
        "boi_token_index": tokenizer.convert_tokens_to_ids("<start_of_image>"),
        "eoi_token_index": tokenizer.convert_tokens_to_ids("<end_of_image>"),
        "image_token_index": tokenizer.convert_tokens_to_ids("<image_soft_token>"),
    }


BENCHMARK_BASES = (
    BenchmarkBase(
        "llava",
        build_tiny_tokenizer,
        build_tiny_llava_processor,
        _image_token_id,
        stock_defaults=_llava_image_seq_length,
        counts_flops=True,
    ),
    BenchmarkBase("llava-next", build_tiny_tokenizer, build_tiny_llava_next_processor, _image_token_id),
    BenchmarkBase("gemma3", build_tiny_gemma3_tokenizer, build_tiny_gemma3_processor, _gemma3_image_tokens),
    # Images of any size: a config gives `image_size` (Qwen2.5-VL's vision config has none).
    BenchmarkBase("qwen2_5_vl", build_tiny_qwen2_5_vl_tokenizer, _qwen2_5_vl_processor, _qwen2_5_vl_image_tokens),
)


def benchmark_base(name: str) -> BenchmarkBase:
    """The benchmark entry of base `name`; a `ValueError` naming the accepted ones otherwise."""
    for base in BENCHMARK_BASES:
        if base.name == name:
            return base
    raise ValueError(f"Unknown base {name!r} in the benchmark config; accepted: {[b.name for b in BENCHMARK_BASES]}.")
