"""Runs a benchmark configuration and writes its results.

    python -m benchmarks.run --config cpu-small            # benchmarks/configs/cpu-small.json
    python -m benchmarks.run --config gpu-7b               # needs CUDA; refuses cleanly without it
    python -m benchmarks.run --config path/to/config.json --output-dir /tmp/results --only generate_overhead,refusal
    python -m benchmarks.run --config cpu-serve            # serving: transformers serve vs safe-llava serve vs gate

Writes `<output-dir>/<config name>.json`, `<config name>.md` and `LATEST.md` (default output dir:
`benchmarks/results/`).
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

BENCHMARK_DIR = Path(__file__).resolve().parent
CONFIG_DIR = BENCHMARK_DIR / "configs"
DEFAULT_OUTPUT_DIR = BENCHMARK_DIR / "results"
ITEMS = (
    "generate_overhead", "call_overhead", "generate_memory", "paper_way", "refusal", "assess_throughput", "calibration",
    "audit_scaling", "training",
)  # fmt: skip
# What a config runs unless it names its own "items" (or --only overrides): generate_memory repeats
# generate_overhead's memory part, for shapes too slow to time here; audit_scaling launches torchrun (configs that
# measure it name it: cpu-audit, gpu-7b).
DEFAULT_ITEMS = (
    "generate_overhead", "call_overhead", "paper_way", "refusal", "assess_throughput", "calibration", "training",
)  # fmt: skip
REQUIRED_KEYS = (
    "name", "device", "dtype", "timer", "seed", "reference_preset", "model", "prompt", "new_tokens", "generate_batch_sizes",
    "paper_way_batch_sizes", "refusal_batch_size", "throughput_batch_sizes", "train_batch_size",
    "train_answer_tokens", "lora", "repeats", "warmup", "targets",
)

# Configs with `"kind": "serve"` run `benchmarks/serve.py` (three servers side by side) instead of the model items.
SERVE_REQUIRED_KEYS = (
    "name", "seed", "model", "prompt", "new_tokens", "concurrency", "scaling_concurrency", "requests", "repeats",
    "max_batch_size", "batch_wait_ms", "refusal_new_tokens", "refusal_requests", "moderation_requests",
    "moderation_concurrency", "targets",
)  # fmt: skip


class BenchmarkUnavailable(RuntimeError):
    """The configuration cannot run on this machine (e.g. it needs CUDA)."""


def load_config(name_or_path: str) -> tuple[dict, Path]:
    """A config by name (`benchmarks/configs/<name>.json`) or path; validates its keys."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        available = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise ValueError(f"No benchmark config {name_or_path!r}; available: {available} (or a path to a JSON file).")
    config = json.loads(path.read_text())
    required = SERVE_REQUIRED_KEYS if config.get("kind") == "serve" else REQUIRED_KEYS
    missing = [key for key in required if key not in config]
    if missing:
        raise ValueError(f"Benchmark config {path} lacks {missing}.")
    return config, path


def check_device(config: dict):
    """Raises `BenchmarkUnavailable` with a clear message when the config's device is not usable here."""
    device = config["device"]
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchmarkUnavailable(
            f"Benchmark config {config['name']!r} needs a CUDA GPU (device {device!r}), but torch "
            f"{torch.__version__} sees none (torch.cuda.is_available() is False). Run it on a machine with a GPU "
            "and a CUDA build of torch, or run --config cpu-small here."
        )
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"Unsupported device {device!r} in config {config['name']!r}; accepted: 'cpu', 'cuda[:N]'.")
    if device.startswith("cuda") and config["timer"] != "wall":
        raise ValueError(f"Config {config['name']!r} runs on CUDA: its timer must be 'wall', got {config['timer']!r}.")


def run_benchmark(config: dict, config_path: Path, items=None, command: str = "") -> dict:
    """Builds the models, runs the selected measurements and returns the results dict (nothing written)."""
    from . import audit_scaling, scenarios
    from .models import build_models
    from .report import evaluate_targets, explain_misses

    check_device(config)
    items = config.get("items", DEFAULT_ITEMS) if items is None else items
    unknown = sorted(set(items) - set(ITEMS))
    if unknown:
        raise ValueError(f"Unknown benchmark items {unknown}; accepted: {list(ITEMS)}.")
    if config.get("num_threads"):
        torch.set_num_threads(config["num_threads"])
    allocator = "default"
    if config.get("keep_freed_memory"):
        from .measure import keep_freed_memory

        allocator = keep_freed_memory()
    started, load_before = time.perf_counter(), os.getloadavg()
    bm = build_models(config)
    config = {**config, "model_llm_safety_tokens": bm.safe.config.num_llm_safety_tokens}
    results = {"metadata": _metadata(config, config_path, bm, command, load_before), "config": config}
    results["metadata"]["host_allocator"] = allocator
    if bm.base.counts_flops:
        results["flops"] = _flop_section(config, bm)
    else:
        results["parameters"] = _parameter_section(config, bm)

    steps = {
        "generate_overhead": (scenarios.generate_overhead, scenarios.generate_steps),
        "call_overhead": (scenarios.call_overhead, scenarios.call_overhead_steps),
        "generate_memory": (scenarios.generate_memory, scenarios.generate_memory_steps),
        "paper_way": (scenarios.paper_way, scenarios.paper_way_steps),
        "refusal": (scenarios.refusal, scenarios.refusal_steps),
        "assess_throughput": (scenarios.assess_throughput, scenarios.assess_steps),
        "calibration": (scenarios.calibration_overhead, scenarios.calibration_steps),
        "audit_scaling": (audit_scaling.audit_scaling, audit_scaling.audit_scaling_steps),
        "training": (scenarios.training_steps, scenarios.training_step_count),
    }
    selected = [item for item in ITEMS if item in items]  # training last: it injects LoRA layers in place
    total = sum(steps[item][1](config) for item in selected)
    load_per_item = {}
    with tqdm(total=total, desc=f"benchmark {config['name']}", unit="call") as bar:
        for item in selected:
            bar.set_postfix_str(item)
            load_per_item[item] = os.getloadavg()
            if item == "training":
                bm.head_only = None  # not needed any more; frees memory for the three trainable copies
            results[item] = steps[item][0](bm, config, bar)
    results["metadata"].update(
        load_average_per_item=load_per_item,
        load_average_after=os.getloadavg(),
        wall_time_s=time.perf_counter() - started,
    )
    results["targets"] = evaluate_targets(results, config)
    results["analysis"] = explain_misses(results)
    return results


def _flop_section(config, bm) -> dict:
    """Parameter and FLOP counts of the config's shape and of its reference 7B preset (meta device), checked on
    real tensors."""
    from . import flops
    from .models import build_meta_pair, make_inputs

    new_tokens = config["new_tokens"]
    stock_inputs = make_inputs(bm, bm.stock, 1)
    num_text = int((stock_inputs["input_ids"] != bm.stock.config.image_token_id).sum())
    stock_7b, safe_7b = build_meta_pair({"preset": config["reference_preset"]}, bm.base.name)
    reference = {"parameters": flops.count_parameters(stock_7b, safe_7b)}
    reference.update(flops.flop_report(stock_7b, safe_7b, num_text, new_tokens, "meta"))
    reference["memory_estimate_bf16"] = flops.analytic_generate_memory(
        stock_7b, safe_7b, num_text, new_tokens, config["generate_batch_sizes"], bytes_per_value=2
    )
    stock_meta, safe_meta = build_meta_pair(config["model"], bm.base.name)
    own = {"parameters": flops.count_parameters(bm.stock, bm.safe)}
    own.update(flops.flop_report(stock_meta, safe_meta, num_text, new_tokens, "meta"))
    verification = flops.verify_flop_counts(
        bm.stock, bm.safe, stock_inputs, make_inputs(bm, bm.safe, 1), own, new_tokens
    )
    return {"reference_7b": reference, "config": own, "verification": verification}


def _parameter_section(config, bm) -> dict:
    """Parameter counts of the config's shape and of its reference 7B-class preset (meta device), for bases without
    a FLOP model (`BenchmarkBase.counts_flops`)."""
    from .flops import count_parameters
    from .models import build_meta_pair

    stock_7b, safe_7b = build_meta_pair({"preset": config["reference_preset"]}, bm.base.name)
    return {
        "reference_7b": {"parameters": count_parameters(stock_7b, safe_7b)},
        "config": {"parameters": count_parameters(bm.stock, bm.safe)},
    }


def _metadata(config, config_path, bm, command, load_before) -> dict:
    import peft
    import transformers

    from .models import make_inputs

    text, vision = bm.stock.config.text_config, bm.stock.config.vision_config
    stock_params = sum(p.numel() for p in bm.stock.parameters())
    width, height = bm.image_size
    summary = (
        f"{bm.base.stock_class.__name__} with random weights: {vision.model_type} {vision.num_hidden_layers} layers x "
        f"{vision.hidden_size} ({getattr(vision, 'image_size', None) or 'any'} px input, {vision.patch_size} px patches; {width}x{height} px "
        f"images); {text.model_type} {text.num_hidden_layers} layers x {text.hidden_size} (MLP "
        f"{text.intermediate_size}, vocab {text.vocab_size}); C-Abstractor "
        f"{bm.safe.config.safety_projector_hidden_size} channels x depth {bm.safe.config.safety_projector_depth}; "
        f"{bm.safe.config.num_safety_tokens} head + {bm.safe.config.num_llm_safety_tokens} LLM safety tokens; "
        f"{stock_params / 1e6:,.1f} M stock parameters"
    )
    prompt_length = {
        name: int(make_inputs(bm, model, 1)["input_ids"].shape[1])
        for name, model in (("stock", bm.stock), ("safe", bm.safe))
    }
    return {
        "config": config["name"],
        "config_path": _relative(config_path),
        "command": command,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "device": _device_name(config["device"]),
        "dtype": config["dtype"],
        "torch_threads": torch.get_num_threads(),
        "timer": config["timer"],
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "git_commit": _git_commit(),
        "load_average_before": load_before,
        "model_summary": summary,
        "llm_safety_tokens": bm.safe.config.num_llm_safety_tokens,
        "base": bm.base.name,
        "stock_class": bm.base.stock_class.__name__,
        "safe_class": bm.base.registry.model_class.__name__,
        "prompt_length": prompt_length,
        "new_tokens": config["new_tokens"],
    }


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(BENCHMARK_DIR.parent))
    except ValueError:
        return str(path)


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"CPU: {model}"


def _git_commit() -> str:
    """The checked-out commit, `+dirty` when the tree has changes (read-only git calls)."""
    root = BENCHMARK_DIR.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as error:
        return f"unknown ({error.__class__.__name__})"
    return commit + ("+dirty" if dirty else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="config name in benchmarks/configs/ or a path to a JSON file")
    parser.add_argument("--output-dir", default=str(DEFAULT_OUTPUT_DIR), help="where results are written")
    parser.add_argument(
        "--only",
        default=None,
        help=f"comma-separated subset of {','.join(ITEMS)} (default: the config's \"items\", else {','.join(DEFAULT_ITEMS)})",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads, overriding the config's num_threads (CPU only)"
    )
    parser.add_argument(
        "--timer", choices=("wall", "process_cpu"), default=None, help="clock of the ratios, overriding the config's"
    )
    args = parser.parse_args(argv)
    config, config_path = load_config(args.config)
    if args.timer is not None:
        config["timer"] = args.timer
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}.")
        config["num_threads"] = args.threads
    items = None if args.only is None else [item.strip() for item in args.only.split(",") if item.strip()]
    command = "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:])
    if config.get("kind") == "serve":
        return _run_serve(config, command, Path(args.output_dir))
    try:
        results = run_benchmark(config, config_path, items, command)
    except BenchmarkUnavailable as error:
        print(f"benchmarks.run: {error}", file=sys.stderr)
        return 2
    from .report import write_results

    paths = write_results(results, Path(args.output_dir), config["name"])
    for row in results["targets"]:
        print(f"{'PASS' if row['passed'] else 'FAIL'}  ({row['item']}) {row['name']}: {row['measured']:.4f} (target {row['target']})")
    print(f"Results: {', '.join(paths.values())}")
    return 0


def _run_serve(config: dict, command: str, output_dir: Path) -> int:
    from . import serve

    results = serve.run_serve_benchmark(config, command)
    paths = serve.write_results(results, output_dir, config["name"])
    for row in results["targets"]:
        print(f"{'PASS' if row['passed'] else 'FAIL'}  {row['name']}: {row['measured']:.4f} (target {row['target']})")
    print(f"Results: {', '.join(paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
