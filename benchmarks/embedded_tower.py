"""The embedded default's vision tower: pretrained EfficientNet-Lite0 against the earlier random CLIP-style tower.

    python -m benchmarks.embedded_tower [--repeats 9] [--threads 2]

Both embedded defaults are built (SmolLM2-135M, safety modules marked trained) in one process. Interleaved, the
benchmark times, per tower:
- the tower's forward per image, at batch 1 and batch 8 (its processor's input size: 224 px vs 48 px);
- the verdict latency of `model.assess_safety` for one image and a chat prompt (processor output in hand).
Medians of `--repeats` interleaved rounds, process CPU time and wall time, and their ratios (pretrained / random)
go to `benchmarks/results/cpu-embedded-tower.json` and `.md`. The ratio says what a real pretrained tower costs
against the toy one; it is not a number about a 7B model.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

RESULTS = Path(__file__).resolve().parent / "results"
TOWERS = ("efficientnet-lite0", "random")


def build(tower: str):
    from modeling_safe_llava.tools.embedded import build_embedded_default

    model, processor = build_embedded_default("smollm2", seed=0, vision_tower=tower)
    model.config.safety_modules_trained = True
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown here?"}]}],
        add_generation_prompt=True,
    )
    images = [Image.new("RGB", (96, 96), (40 * index, 90, 200)) for index in range(8)]
    one = processor(images=images[:1], text=[prompt], return_tensors="pt")
    eight = processor(images=images, text=[prompt] * 8, return_tensors="pt", padding=True)
    return model.eval(), one, eight


def timed(call) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    return time.perf_counter() - wall, time.process_time() - cpu


def cases(model, one, eight) -> dict:
    tower = model.model.vision_tower
    return {
        "tower, batch 1 (per image)": (lambda: tower(one["pixel_values"], output_hidden_states=-1), 1),
        "tower, batch 8 (per image)": (lambda: tower(eight["pixel_values"], output_hidden_states=-1), 8),
        "assess_safety, 1 image": (lambda: model.assess_safety(**one), 1),
    }


def measure(repeats: int) -> dict:
    built = {tower: build(tower) for tower in TOWERS}
    samples = {tower: {} for tower in TOWERS}
    with torch.inference_mode():
        for tower in TOWERS:  # warm-up
            for call, _ in cases(*built[tower]).values():
                call()
        for _ in range(repeats):
            for tower in TOWERS:
                for name, (call, per) in cases(*built[tower]).items():
                    wall, cpu = timed(call)
                    samples[tower].setdefault(name, []).append((wall / per, cpu / per))
    return {
        tower: {
            name: {"wall_ms": 1000 * statistics.median(s[0] for s in values),
                   "cpu_ms": 1000 * statistics.median(s[1] for s in values)}  # fmt: skip
            for name, values in by_case.items()
        }
        for tower, by_case in samples.items()
    }


def markdown(results: dict, meta: dict) -> str:
    lines = [
        f"# Embedded default: vision tower cost ({meta['threads']} torch threads, median of {meta['repeats']})",
        "",
        "| measurement | EfficientNet-Lite0 (224 px) wall / CPU ms | random CLIP-style (48 px) wall / CPU ms | "
        "ratio (wall) |",
        "|---|---|---|---|",
    ]
    pretrained, random = results["efficientnet-lite0"], results["random"]
    for name in pretrained:
        a, b = pretrained[name], random[name]
        lines.append(f"| {name} | {a['wall_ms']:.1f} / {a['cpu_ms']:.1f} | {b['wall_ms']:.1f} / {b['cpu_ms']:.1f} | "
                     f"{a['wall_ms'] / b['wall_ms']:.1f}x |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(RESULTS / "cpu-embedded-tower"), help="path without extension")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    meta = {"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__}
    results = measure(args.repeats)
    output = Path(args.output)
    output.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    output.with_suffix(".md").write_text(markdown(results, meta))
    print(markdown(results, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
