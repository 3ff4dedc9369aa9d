"""What the safety head of Safe Gemma 3 reads: FLOPs of the choices at the google/gemma-3-4b-it shape, on the meta device.

SigLIP So400m/14 at 896 px gives a 64 x 64 grid (4096 patches, 1152 channels); Gemma 3's projector average-pools it
to 16 x 16 (256 tokens) for the language model. The safety projector (the paper's C-Abstractor, depth 3,
1152 + 64 channels) can read:

- `full`: the 64 x 64 grid, kept at 64 x 64 (4096 keys for the head, as the paper keeps LLaVA's 24 x 24);
- `full-pooled-inside`: the 64 x 64 grid, pooled to 16 x 16 inside the C-Abstractor (its first stage at 64 x 64);
- `pooled`: the grid average-pooled to 16 x 16 first (Gemma 3's own pooling, before its norm and projection).

Run: `python -m benchmarks.gemma3_vision_states` (a few seconds; prints a Markdown table).
"""

import copy

import torch
from transformers import Gemma3Config, Gemma3ForConditionalGeneration

from benchmarks.flops import count_flops
from modeling_safe_llava.gemma3_safe_llava import SafeGemma3Config
from modeling_safe_llava.presets import load_json_preset
from modeling_safe_llava.safety_module_safe_llava import SafeLlavaCAbstractor, SafeLlavaSafetyHead

PROMPT_TOKENS = 32  # text around one image in a short prompt


def gemma3_4b_config() -> tuple[Gemma3Config, dict]:
    preset = load_json_preset("configuration", "gemma3-4b.json")
    fields = {k: preset[k] for k in ("mm_tokens_per_image", "boi_token_index", "eoi_token_index", "image_token_index")}
    config = Gemma3Config(vision_config=preset["vision_config"], text_config=preset["text_config"], **fields)
    return config, preset


def _safety_config(config, preset, out_side: int) -> SafeGemma3Config:
    """The Safe Gemma 3 config of the 4B preset, with the C-Abstractor's output grid set to `out_side`."""
    fields = {k: v for k, v in preset.items() if k.startswith(("num_", "safety_"))}
    return SafeGemma3Config.from_base_config(config, **fields, safety_projector_grid_size=out_side)


def safety_flops(config, preset, in_side: int, out_side: int) -> int:
    """C-Abstractor reading an `in_side`^2 grid and giving `out_side`^2 tokens, then the head (one query)."""
    safety_config = _safety_config(config, preset, out_side)
    with torch.device("meta"):
        projector = SafeLlavaCAbstractor(safety_config, config.vision_config.hidden_size)
        head = SafeLlavaSafetyHead(safety_config)
        states = torch.zeros(1, in_side, in_side, config.vision_config.hidden_size)
        keys = torch.zeros(1, out_side * out_side + preset["num_safety_tokens"], config.text_config.hidden_size)
        query = torch.zeros(1, config.text_config.hidden_size)
    projector_flops, _ = count_flops(lambda: projector(states))
    head_flops, _ = count_flops(lambda: head(query, keys))
    return projector_flops + head_flops


def stock_flops(config, num_llm_safety_tokens: int) -> dict:
    with torch.device("meta"):
        model = Gemma3ForConditionalGeneration(copy.deepcopy(config))
        side = config.vision_config.image_size
        pixels = torch.zeros(1, 3, side, side)
        tokens = PROMPT_TOKENS + config.mm_tokens_per_image + num_llm_safety_tokens
        embeds = torch.zeros(1, tokens, config.text_config.hidden_size)
        positions = torch.arange(tokens)[None]
    vision, _ = count_flops(lambda: model.model.vision_tower(pixel_values=pixels))
    no_mask = {"full_attention": None, "sliding_attention": None}  # mask building reads values; FLOPs do not need it
    language_model = model.model.language_model
    prefill, _ = count_flops(
        lambda: language_model(inputs_embeds=embeds, attention_mask=no_mask, position_ids=positions, use_cache=False)
    )
    return {"vision_tower": vision, "llm_prefill": prefill}


def main():
    config, preset = gemma3_4b_config()
    grid = config.vision_config.image_size // config.vision_config.patch_size
    pooled = int(config.mm_tokens_per_image**0.5)
    stock = stock_flops(config, preset["num_llm_safety_tokens"])
    reference = stock["vision_tower"] + stock["llm_prefill"]
    print(f"google/gemma-3-4b-it shape, one image, {PROMPT_TOKENS} text tokens; GFLOPs (2 per multiply-accumulate)\n")
    print(f"vision tower {stock['vision_tower'] / 1e9:.0f}, language-model prefill {stock['llm_prefill'] / 1e9:.0f}\n")
    print("| safety projector reads | head keys | safety module GFLOPs | vs vision tower + prefill |")
    print("|---|---|---|---|")
    for name, in_side, out_side in (
        ("full", grid, grid), ("full-pooled-inside", grid, pooled), ("pooled", pooled, pooled)
    ):
        flops = safety_flops(config, preset, in_side, out_side)
        keys = out_side * out_side + preset["num_safety_tokens"]
        print(f"| `{name}` ({in_side}x{in_side} in) | {keys} | {flops / 1e9:.1f} | {flops / reference:.1%} |")


if __name__ == "__main__":
    main()
