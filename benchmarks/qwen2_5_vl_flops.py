"""Where one row's FLOPs go in Qwen2.5-VL: vision tower, language-model prefill, decode, for a benchmark config's shape
and for its reference preset (Qwen2.5-VL-7B), so that `cpu-small-qwen2_5_vl` can be sized to split as the 7B does.

`benchmarks/flops.py` counts LLaVA-1.5's one-crop layout on the meta device. Qwen2.5-VL's vision tower cannot run on
meta (its window and attention indices are read from `image_grid_thw` as values), so it is counted on real tensors
with its blocks collapsed to one window-attention and one full-attention block: FlopCounterMode gives each block's
count, and the tower's total is the collapsed total plus the missing blocks of each kind (exact: blocks of one kind
count the same). The language model is counted on meta, as in `benchmarks/flops.py`.

Run: `python -m benchmarks.qwen2_5_vl_flops --config cpu-small-qwen2_5_vl` (seconds; prints a Markdown table).
"""

import argparse
import copy
import sys

import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from .bases import benchmark_base
from .flops import CPU_ATTENTION_FLOPS, _decode_flops, count_flops
from .models import split_model_spec

SHARES = ("vision_tower", "llm_prefill", "llm_decode")


def image_grid(vision_config, image_size: tuple[int, int]) -> torch.Tensor:
    """`image_grid_thw` of one image of `(width, height)` pixels, a multiple of `patch_size * spatial_merge_size`
    (the size Qwen's image processor keeps as it is): `(1, 3)`."""
    width, height = image_size
    unit = vision_config.patch_size * vision_config.spatial_merge_size
    if width % unit or height % unit:
        raise ValueError(f"Image size {image_size} must be a multiple of patch_size * spatial_merge_size = {unit}.")
    return torch.tensor([[1, height // vision_config.patch_size, width // vision_config.patch_size]])


def vision_tower_flops(vision_config, grid_thw: torch.Tensor) -> int:
    """FLOPs of the vision tower (patch embedding, blocks, merger) on one image of `grid_thw`, counted on real
    tensors of a tower with one window block and one full-attention block, scaled to the configured blocks."""
    full_blocks = len(vision_config.fullatt_block_indexes)
    window_blocks = vision_config.depth - full_blocks
    collapsed = copy.deepcopy(vision_config)
    collapsed.depth, collapsed.fullatt_block_indexes = 2, [1]
    tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(collapsed, dtype=torch.float32).eval()
    channels = collapsed.in_channels * collapsed.temporal_patch_size * collapsed.patch_size**2
    pixels = torch.zeros(int(grid_thw.prod()), channels)
    counter = torch.utils.flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    with torch.no_grad(), counter:
        tower(pixels, grid_thw=grid_thw)
    by_module = {name: sum(counts.values()) for name, counts in counter.get_flop_counts().items()}
    window, full = (by_module[f"{type(tower).__name__}.blocks.{index}"] for index in (0, 1))
    return counter.get_total_flops() + (window_blocks - 1) * window + (full_blocks - 1) * full


def flop_split(stock_config, image_size: tuple[int, int], num_text_tokens: int, new_tokens: int) -> dict:
    """
    One row's FLOPs of stock `generate` (one image, `num_text_tokens` text tokens, `new_tokens` greedy tokens) by
    part, and each part's share: the vision tower; the prefill (language model over the prompt, plus `lm_head` once);
    the decode (the `new_tokens - 1` steps after it, each with `lm_head`).
    """
    grid = image_grid(stock_config.vision_config, image_size)
    image_tokens = int(grid.prod()) // stock_config.vision_config.spatial_merge_size**2
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        stock = Qwen2_5_VLForConditionalGeneration(stock_config)
    hidden, length = stock_config.text_config.hidden_size, num_text_tokens + image_tokens
    language_model = stock.model.language_model
    lm_head, _ = count_flops(lambda: stock.lm_head(torch.zeros(1, 1, hidden, device="meta")))
    prefill, _ = count_flops(
        lambda: language_model(inputs_embeds=torch.zeros(1, length, hidden, device="meta"), use_cache=True)
    )
    decode = _decode_flops(language_model, length, new_tokens - 1, hidden, "meta", torch.float32)
    flops = {
        "vision_tower": vision_tower_flops(stock_config.vision_config, grid),
        "llm_prefill": prefill + lm_head,
        "llm_decode": decode + (new_tokens - 1) * lm_head,
    }
    total = sum(flops.values())
    return {
        "image_tokens": image_tokens,
        "prompt_length": length,
        "flops": flops,
        "shares": {name: flops[name] / total for name in SHARES},
    }


def config_splits(config: dict) -> dict:
    """`flop_split` of a Qwen2.5-VL benchmark config's model and of its reference preset, at the config's image size,
    prompt length (the tiny processor's, as the benchmark feeds it) and `new_tokens`."""
    base = benchmark_base(config["base"])
    tokenizer = base.build_tokenizer()
    stock_fields, _ = split_model_spec(config["model"], tokenizer, base)
    stock_config = base.stock_config(stock_fields)
    processor = base.build_processor(tokenizer, stock_config)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": config["prompt"]}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    num_text = len(tokenizer(text)["input_ids"]) - 1  # the template's one image placeholder
    reference, _ = split_model_spec({"preset": config["reference_preset"]}, tokenizer, base)
    image_size = tuple(config["image_size"])
    return {
        "reference": flop_split(base.stock_config(reference), image_size, num_text, config["new_tokens"]),
        "config": flop_split(stock_config, image_size, num_text, config["new_tokens"]),
    }


def markdown(config: dict, splits: dict) -> str:
    rows = [
        f"| shape | image tokens | prompt positions | {' | '.join(SHARES)} | FLOPs per row |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, split in ((config["reference_preset"], splits["reference"]), (config["name"], splits["config"])):
        shares = " | ".join(f"{100 * split['shares'][name]:.1f} %" for name in SHARES)
        total = sum(split["flops"].values())
        rows.append(f"| {label} | {split['image_tokens']} | {split['prompt_length']} | {shares} | {total:.3g} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    from .run import load_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="cpu-small-qwen2_5_vl", help="a Qwen2.5-VL benchmark config")
    config, _ = load_config(parser.parse_args(argv).config)
    if config.get("base") != "qwen2_5_vl":
        raise ValueError(f"Config {config['name']!r} is of base {config.get('base')!r}; this counts 'qwen2_5_vl' only.")
    sys.stdout.write(markdown(config, config_splits(config)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
