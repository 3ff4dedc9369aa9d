"""What safety costs on LLaVA-NeXT, side by side in one process (`cpu-small` widths, LLaVA-NeXT anyres).

Stock `LlavaNextForConditionalGeneration` against SafeLlava-NeXT holding the same weights, head-only
(`num_llm_safety_tokens=0`) and with the paper's 64 LLM safety tokens: `generate` (greedy, `--new-tokens` new tokens,
batch 1, one 672x672-class image: the base image plus 2x2 crops) with safety off (`safety_threshold=1.0`) and with
safety on and every action `allow` (the head judges every crop, nothing changes the answer). The widths and depths are
`benchmarks/configs/cpu-small.json`'s; the anyres pinpoints are LLaVA-v1.6's. Timer: process CPU time, one torch
thread (robust to other work on the machine). Random weights: timings only.

Run: `python -m benchmarks.llava_next_overhead` (a few minutes on 2 CPU cores).
"""

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

from modeling_safe_llava import SafeLlavaNextForConditionalGeneration, SafeLlavaNextProcessor
from modeling_safe_llava.presets import load_safety_policy
from modeling_safe_llava.tiny import build_tiny_llava_next_processor, build_tiny_tokenizer

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def build_models(config_name: str = "cpu-small.json"):
    """`(stock, head_only, with_tokens, processors)`: three models sharing the stock weights' values."""
    spec = json.loads((Path(__file__).parent / "configs" / config_name).read_text())["model"]
    tokenizer = build_tiny_tokenizer()
    text = {**spec["text_config"], "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id}  # fmt: skip
    config = LlavaNextConfig(
        vision_config=spec["vision_config"], text_config=text, image_grid_pinpoints=PINPOINTS,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )  # fmt: skip
    torch.manual_seed(0)
    stock = LlavaNextForConditionalGeneration(config).eval()
    stock_processor = build_tiny_llava_next_processor(tokenizer, config)
    safety = {k: v for k, v in spec.items() if k.startswith(("num_", "safety_"))}
    models, processors = {"stock": stock}, {"stock": stock_processor}
    for name, tokens in (("head_only", 0), ("llm_tokens_64", safety["num_llm_safety_tokens"])):
        processor = SafeLlavaNextProcessor.from_base(copy.deepcopy(stock_processor), num_llm_safety_tokens=tokens)
        fields = {**safety, **load_safety_policy(), "num_llm_safety_tokens": tokens}
        model = SafeLlavaNextForConditionalGeneration.from_base(copy.deepcopy(stock), processor=processor, **fields)
        model.config.safety_modules_trained = True
        models[name], processors[name] = model.eval(), processor
    return models, processors


def inputs_for(processor, prompt: str):
    image = Image.fromarray((np.random.RandomState(0).rand(600, 640, 3) * 255).astype("uint8"))
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}], add_generation_prompt=True
    )
    return processor(images=[image], text=[text], return_tensors="pt")


def timed_generate(model, inputs, new_tokens: int, repeats: int, safety: dict) -> tuple[float, torch.Tensor]:
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, **safety}
    with torch.no_grad():
        tokens = model.generate(**inputs, **kwargs)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.process_time()
            model.generate(**inputs, **kwargs)
            times.append(time.process_time() - start)
    return statistics.median(times), tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    models, processors = build_models()
    safety_on = {"safety_threshold": 0.0, "safety_actions": {t: "allow" for t in models["head_only"].config.risky_type_labels}}
    rows, stock_tokens = {}, None
    for name, model in models.items():
        inputs = inputs_for(processors[name], "What is shown in this image?")
        modes = {"stock": {}} if name == "stock" else {"safety_off": {"safety_threshold": 1.0}, "safety_on_allow": safety_on}
        for mode, safety in modes.items():
            seconds, tokens = timed_generate(model, inputs, args.new_tokens, args.repeats, safety)
            new = tokens[0, inputs["input_ids"].shape[1] :]
            stock_tokens = new if stock_tokens is None else stock_tokens
            rows[f"{name}/{mode}"] = {"seconds": round(seconds, 3), "same_tokens_as_stock": bool(torch.equal(new, stock_tokens))}
    base = rows["stock/stock"]["seconds"]
    for row in rows.values():
        row["ratio_to_stock"] = round(row["seconds"] / base, 3)
    image_tokens = int((inputs_for(processors["stock"], "x")["input_ids"] == models["stock"].config.image_token_id).sum())
    print(json.dumps({"image_placeholders_stock": image_tokens, "new_tokens": args.new_tokens, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
