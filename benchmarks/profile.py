"""Where SafeLlava's extra time and memory go in `generate`, next to stock LLaVA (same weights, same inputs).

    python -m benchmarks.profile --config cpu-small --batch-size 8

Writes `<output-dir>/<config>-profile.json` and `.md`:
- per module (vision tower, LLaVA projector, safety projector, safety head, language model prefill and decode, lm_head):
  calls and seconds from forward hooks (the clock of the config: process CPU time or synchronised wall time),
  median of interleaved repeats;
- the top operators of the prefill (`generate` with one new token) by self time, from `torch.profiler`. Over a whole
  generation the profiler itself distorts the picture on CPU: the KV cache's `aten::cat` then spends seconds in the
  kernel (page faults) that it does not spend unprofiled, so decoding is timed by the module hooks only.
"""

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from .measure import keep_freed_memory, synchronize
from .models import NOTHING_FLAGGED, build_models, make_inputs
from .run import DEFAULT_OUTPUT_DIR, check_device, load_config

MODULES = {
    "vision_tower": "model.vision_tower",
    "llava_projector": "model.multi_modal_projector",
    "safety_projector": "model.safety_module.projector",
    "safety_head": "model.safety_module.head",
    "language_model": "model.language_model",
    "lm_head": "lm_head",
}


def module_breakdown(model, call, device: str, clock: str) -> dict:
    """`{module: {"calls", "seconds"}}` of one `call()`; the language model is split into prefill and decode."""
    now = time.process_time if clock == "process_cpu" else time.perf_counter
    totals = defaultdict(lambda: {"calls": 0, "seconds": 0.0})
    handles, starts = [], {}
    named = dict(model.named_modules())
    for label, path in MODULES.items():
        module = named.get(path)
        if module is None:
            continue

        def pre_hook(mod, args, kwargs, label=label):
            synchronize(device)
            starts[label] = now()

        def post_hook(mod, args, kwargs, output, label=label):
            synchronize(device)
            elapsed = now() - starts.pop(label)
            if label == "language_model":
                embeds = kwargs.get("inputs_embeds")
                label = "language_model_prefill" if embeds is not None and embeds.shape[1] > 1 else "language_model_decode"
            totals[label]["calls"] += 1
            totals[label]["seconds"] += elapsed

        handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(module.register_forward_hook(post_hook, with_kwargs=True))
    try:
        synchronize(device)
        start = now()
        call()
        synchronize(device)
        total = now() - start
    finally:
        for handle in handles:
            handle.remove()
    result = dict(totals)
    result["everything_else"] = {"calls": 1, "seconds": total - sum(v["seconds"] for v in totals.values())}
    result["total"] = {"calls": 1, "seconds": total}
    return result


def operator_table(call, device: str, rows: int = 15) -> list[dict]:
    """Top operators by self time of one `call()` (no memory profiling: it slows allocations down a lot)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if str(device).startswith("cuda") else [])
    with profile(activities=activities) as prof:
        call()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    return [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3} for e in events]


def median_breakdown(breakdowns: list[dict]) -> dict:
    labels = {label for breakdown in breakdowns for label in breakdown}
    return {
        label: {
            "calls": breakdowns[0].get(label, {"calls": 0})["calls"],
            "seconds": statistics.median(b.get(label, {"seconds": 0.0})["seconds"] for b in breakdowns),
        }
        for label in labels
    }


def profile_generate(config: dict, batch_size: int, repeats: int) -> dict:
    check_device(config)
    if config.get("num_threads"):
        torch.set_num_threads(config["num_threads"])
    if config.get("keep_freed_memory"):
        keep_freed_memory()
    bm = build_models(config)
    models = {"stock": bm.stock, "safe": bm.safe, "head_only": bm.head_only}
    calls, prefills = {}, {}
    for name, model in models.items():
        inputs = make_inputs(bm, model, batch_size)
        extra = {} if name == "stock" else NOTHING_FLAGGED
        calls[name] = lambda model=model, inputs=inputs, extra=extra: model.generate(**inputs, **extra)
        prefills[name] = lambda model=model, inputs=inputs, extra=extra: model.generate(
            **inputs, **extra, max_new_tokens=1, min_new_tokens=1
        )
        calls[name]()  # warm-up
    breakdowns = {name: [] for name in models}
    for repeat in range(repeats):
        for name in list(models) if repeat % 2 == 0 else list(models)[::-1]:
            breakdowns[name].append(module_breakdown(models[name], calls[name], config["device"], config["timer"]))
    return {
        "config": config["name"],
        "batch_size": batch_size,
        "clock": config["timer"],
        "repeats": repeats,
        "modules": {name: median_breakdown(values) for name, values in breakdowns.items()},
        "prefill_operators": {name: operator_table(prefills[name], config["device"]) for name in models},
    }


def render(results: dict) -> str:
    lines = [
        f"# Profile of `generate`: `{results['config']}`, batch {results['batch_size']} ({results['clock']} clock)",
        "",
        f"Per module (forward hooks), median seconds of {results['repeats']} interleaved repeats, and calls:",
        "",
        "| module | stock s | SafeLlava s | head only s | SafeLlava - stock s | calls (stock, SafeLlava) |",
        "|---|---|---|---|---|---|",
    ]
    modules = results["modules"]
    labels = [
        "vision_tower", "llava_projector", "safety_projector", "safety_head", "language_model_prefill",
        "language_model_decode", "lm_head", "everything_else", "total",
    ]
    for label in labels:
        values = {name: modules[name].get(label, {"calls": 0, "seconds": 0.0}) for name in modules}
        lines.append(
            f"| {label} | {values['stock']['seconds']:.4f} | {values['safe']['seconds']:.4f} | "
            f"{values['head_only']['seconds']:.4f} | {values['safe']['seconds'] - values['stock']['seconds']:+.4f} | "
            f"{values['stock']['calls']}, {values['safe']['calls']} |"
        )
    for name, table in results["prefill_operators"].items():
        lines += [
            "",
            f"Top operators of the prefill (`generate`, 1 new token), {name} (torch.profiler, one call, self CPU ms):",
            "",
            "| op | calls | self CPU ms |",
            "|---|---|---|",
        ]
        lines += [f"| `{r['op']}` | {r['calls']} | {r['self_cpu_ms']:.1f} |" for r in table]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's largest generate batch")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats of the per-module timing")
    parser.add_argument("--output-dir", default=str(DEFAULT_OUTPUT_DIR))
    args = parser.parse_args(argv)
    config, _ = load_config(args.config)
    batch_size = args.batch_size or max(config["generate_batch_sizes"])
    results = profile_generate(config, batch_size, args.repeats)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{config['name']}-profile"
    (output_dir / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (output_dir / f"{stem}.md").write_text(render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
