"""Which LLaVA-NeXT crops should the safety head judge: the base image only, or every crop (riskiest crop wins)?

Two measurements, both side by side in one process:

1. **Robustness (toy case)**: a risk visible only at crop resolution. Each 32x32 image of the tiny LLaVA-NeXT
   (`configuration/llava-next-tiny.json`: 16x16 vision tower, anyres 2x2 crops plus the base image) is smooth
   colour noise; a "risky" image also holds an 8x8 one-pixel black/white checkerboard in one random quadrant. The
   base image is the whole image resized to 16x16, which averages the checkerboard into grey: the detail survives
   only in the crop holding it. A fresh safety module is trained on each strategy's view (same images, labels,
   steps, seed; the random vision tower stays frozen, as in stage 1) and scored on held-out images.
2. **Cost at the 7B shape**: time of the safety projector (C-Abstractor, 24x24 grid, 1088 channels) and head on one
   crop versus the five crops of a 672x672 LLaVA-v1.6 image (the vision tower runs on every crop either way).

Run: `python -m benchmarks.llava_next_crops` (about a minute on 2 CPU cores). Numbers go to the printed table.
"""

import argparse
import json
import math
import time

import numpy as np
import torch
from PIL import Image

from modeling_safe_llava import SafeLlavaNextConfig
from modeling_safe_llava.safety_module_safe_llava import SafeLlavaSafetyModule
from modeling_safe_llava.tiny import build_tiny_llava_next, load_model_preset, safety_fields


def toy_image(rng: np.random.RandomState, risky: bool, size: int = 32) -> Image.Image:
    """Smooth colour noise; a risky image adds an 8x8 one-pixel checkerboard in one quadrant."""
    coarse = rng.rand(4, 4, 3)
    pixels = np.kron(coarse, np.ones((size // 4, size // 4, 1)))
    pixels = 0.25 + 0.5 * pixels
    if risky:
        quadrant_y, quadrant_x = rng.randint(0, 2, size=2)
        top, left = quadrant_y * size // 2 + rng.randint(0, 8), quadrant_x * size // 2 + rng.randint(0, 8)
        checker = (np.indices((8, 8)).sum(0) % 2)[..., None].repeat(3, -1)
        pixels[top : top + 8, left : left + 8] = checker
    return Image.fromarray((pixels * 255).astype("uint8"))


def encode(stock, processor, images):
    """Frozen vision tower on every crop, at the layer the head reads (CLS dropped), as the grid
    `SafeLlavaNextModel.safety_vision_states` gives: `(num_images, num_crops, grid, grid, dim)`."""
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    num_images, num_crops = pixel_values.shape[:2]
    with torch.no_grad():
        out = stock.model.vision_tower(pixel_values.flatten(0, 1), output_hidden_states=True, return_dict=True)
    states = out.hidden_states[stock.config.vision_feature_layer][:, 1:]
    side = int(states.shape[1] ** 0.5)
    return states.reshape(num_images, num_crops, side, side, states.shape[-1]), num_crops


def judge(module, states, query, strategy: str):
    """Level logits per image: the base crop alone, or every crop with the riskiest one per image."""
    num_images, num_crops = states.shape[:2]
    if strategy == "base":
        grids, per_image = states[:, 0], torch.ones(num_images, dtype=torch.long)
    else:
        grids, per_image = states.flatten(0, 1), torch.full((num_images,), num_crops)
    level_logits, _ = module(grids, query.expand(num_images, -1), per_image)
    return level_logits


def train_and_score(config, hidden, labels, test_hidden, test_labels, strategy, steps, seed):
    torch.manual_seed(seed)
    module = SafeLlavaSafetyModule(config)
    for parameter in (module.tokens, *( [module.llm_tokens] if module.llm_tokens is not None else [])):
        torch.nn.init.normal_(parameter, std=0.02)
    query = torch.randn(1, config.text_config.hidden_size) * 0.02
    optimizer = torch.optim.AdamW(module.parameters(), lr=2e-3)
    targets = labels * 3  # level 0 (safe) or 3 (reject)
    start = time.perf_counter()
    for step in range(steps):
        batch = torch.randint(0, len(labels), (32,), generator=torch.Generator().manual_seed(seed * 1000 + step))
        logits = judge(module, hidden[batch], query, strategy)
        loss = torch.nn.functional.cross_entropy(logits, targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    train_s = time.perf_counter() - start
    with torch.no_grad():
        risk = 1 - judge(module, test_hidden, query, strategy).softmax(-1)[:, 0]
    return {"auroc": auroc(risk, test_labels), "accuracy": float(((risk > 0.5).long() == test_labels).float().mean()),
            "train_s": round(train_s, 2)}  # fmt: skip


def auroc(scores, labels) -> float:
    positive, negative = scores[labels == 1], scores[labels == 0]
    wins = (positive[:, None] > negative[None]).float() + 0.5 * (positive[:, None] == negative[None]).float()
    return round(float(wins.mean()), 3)


def robustness(steps: int, seeds: list[int]):
    stock, processor = build_tiny_llava_next(seed=0)
    fields = {**safety_fields("llava-next-tiny.json"), "num_llm_safety_tokens": 0}
    config = SafeLlavaNextConfig.from_base_config(stock.config, **fields)
    rng = np.random.RandomState(0)
    labels = torch.tensor([i % 2 for i in range(256)])
    test_labels = torch.tensor([i % 2 for i in range(200)])
    hidden, _ = encode(stock, processor, [toy_image(rng, bool(y)) for y in labels])
    test_hidden, num_crops = encode(stock, processor, [toy_image(rng, bool(y)) for y in test_labels])
    results = {}
    for strategy in ("base", "every_crop"):
        runs = [train_and_score(config, hidden, labels, test_hidden, test_labels, strategy, steps, s) for s in seeds]
        results[strategy] = {key: [run[key] for run in runs] for key in runs[0]}
    return results, num_crops


def cost_7b(repeats: int):
    """Seconds per image for the safety projector + head at the 7B shape, on 1 crop vs 5 crops (672x672 image)."""
    preset = load_model_preset("llava-next-7b.json")
    config = SafeLlavaNextConfig(
        vision_config=preset["vision_config"], text_config=preset["text_config"],
        **{**safety_fields("llava-next-7b.json"), "num_llm_safety_tokens": 0},
    )  # fmt: skip
    torch.manual_seed(0)
    module = SafeLlavaSafetyModule(config).eval()
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    query = torch.randn(1, config.text_config.hidden_size)
    timings = {}
    side = math.isqrt(patches)
    for crops in (1, 5):
        states = torch.randn(crops, side, side, config.vision_config.hidden_size)
        with torch.no_grad():
            module(states, query, torch.tensor([crops]))  # warm-up
            start = time.perf_counter()
            for _ in range(repeats):
                module(states, query, torch.tensor([crops]))
        timings[f"{crops}_crop"] = round((time.perf_counter() - start) / repeats, 3)
    return timings


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results, num_crops = robustness(args.steps, args.seeds)
    results["cost_7b_seconds_per_image"] = cost_7b(args.repeats)
    results["crops_per_toy_image"] = num_crops
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
