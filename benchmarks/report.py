"""Targets (PASS/FAIL), the JSON results file and the markdown report."""

import json
from pathlib import Path

MIB = 2**20
# Result sections holding `generate` peak memory: the timed benchmark, or memory alone (shapes too slow to time here)
MEMORY_SECTIONS = ("generate_overhead", "generate_memory")


def _fmt(value, digits=3):
    return "n/a" if value is None else f"{value:.{digits}f}"


def _verdict(passed):
    return "PASS" if passed else "FAIL"


def evaluate_targets(results: dict, config: dict) -> list[dict]:
    """One row per (target, batch size): what was measured, the limit, PASS/FAIL, and the FLOP-count prediction."""
    targets = config["targets"]
    tokens = config["model_llm_safety_tokens"]
    counted = results.get("flops", {})  # bases without a FLOP model: no predictions (n/a)
    flops_config = _default_none(counted.get("config", {}).get("ratios", {}))
    flops_7b = _default_none(counted.get("reference_7b", {}).get("ratios", {}))
    memory_7b = counted.get("reference_7b", {}).get("memory_estimate_bf16", {}).get("by_batch", {})
    rows = []

    def add(item, name, measured, limit_text, passed, flop_config=None, flop_7b=None, spread=None):
        limit = float(limit_text.split()[1].rstrip("%")) / (100 if limit_text.split()[1].endswith("%") else 1)
        rows.append(
            {
                "item": item,
                "name": name,
                "measured": measured,
                "spread": spread,
                "target": limit_text,
                "passed": bool(passed),
                # the limit lies between the smallest and largest paired ratio: at this noise, either verdict
                "limit_within_range": spread is not None and spread[0] <= limit <= spread[1],
                "flops_config": flop_config,
                "flops_7b": flop_7b,
            }
        )

    generate = results.get("generate_overhead", {})
    for key, entry in generate.items():
        ratios, spread, batch = entry["ratios"], entry["ratio_spread"], entry["batch_size"]
        limit = targets["e2e_ratio_llm_tokens_max"]
        add(1, f"generate end-to-end time, {tokens} LLM safety tokens / stock, batch {batch}",
            ratios["end_to_end_safe_vs_stock"], f"<= {limit:.2f}", ratios["end_to_end_safe_vs_stock"] <= limit,
            flops_config["generate_safe_vs_stock"], flops_7b["generate_safe_vs_stock"],
            spread["end_to_end_safe_vs_stock"])
        limit = targets["e2e_ratio_head_only_max"]
        add(1, f"generate end-to-end time, head only / stock, batch {batch}",
            ratios["end_to_end_head_only_vs_stock"], f"<= {limit:.2f}", ratios["end_to_end_head_only_vs_stock"] <= limit,
            flops_config["generate_head_only_vs_stock"], flops_7b["generate_head_only_vs_stock"],
            spread["end_to_end_head_only_vs_stock"])
    call = results.get("call_overhead")
    for variant, label, key in (("safe", f"{tokens} LLM safety tokens", "call_overhead_safe_max"),
                                ("head_only", "head only", "call_overhead_head_only_max")):  # fmt: skip
        if call is not None and key in targets:
            ratio = call["ratios"][f"{variant}_vs_stock"]
            add("1b", f"per-call generate time (issue 25's shape), {label} / stock, batch 1", ratio,
                f"<= {targets[key]:.2f}", ratio <= targets[key], spread=call["ratio_spread"][f"{variant}_vs_stock"])
    limit = targets.get("calibration_ratio_max")
    for entry in results.get("calibration", {}).values() if limit is not None else ():
        ratio, batch = entry["ratios"]["calibrated_vs_uncalibrated"], entry["batch_size"]
        add(6, f"generate end-to-end time, calibrated temperatures / temperatures 1.0, batch {batch}", ratio,
            f"<= {limit:.2f}", ratio <= limit, spread=entry["ratio_spread"]["calibrated_vs_uncalibrated"])
    for section in MEMORY_SECTIONS:
        for key, entry in results.get(section, {}).items():
            limit = targets["peak_memory_ratio_max"]
            for variant, label in (("safe", f"{tokens} LLM safety tokens"), ("head_only", "head only")):
                value = entry["ratios"][f"peak_memory_{variant}_vs_stock"]
                predicted = memory_7b.get(key, {}).get(f"{variant}_vs_stock")
                add(1, f"generate peak memory, {label} / stock, batch {entry['batch_size']}", value, f"<= {limit:.2f}",
                    value <= limit, None, predicted)
    parameters = _parameters(results)
    if parameters is not None:
        share = parameters["reference_7b"]["parameters"]["safety_share_of_stock"]
        limit = targets["safety_parameter_share_7b_max"]
        preset = config.get("reference_preset", "the 7B preset")
        add(1, f"safety parameters / stock parameters at `{preset}` (meta device)", share, f"<= {limit:.0%}",
            share <= limit)
    for key, entry in results.get("paper_way", {}).items():
        value = entry["ratios"]["paper_way_vs_ours"]
        add(2, f"paper's way (assess_safety + generate) / ours, time, batch {entry['batch_size']}", value,
            "> 1.00 (ours faster)", value > 1.0, flops_config["paper_way_vs_ours"], flops_7b["paper_way_vs_ours"],
            entry["ratio_spread"]["paper_way_vs_ours"])
    if "refusal" in results:
        entry = results["refusal"]
        value = entry["ratios"]["all_refused_vs_full"]
        limit = targets["refused_to_full_ratio_max"]
        add(3, f"all-refused batch / full {config['new_tokens']}-token generation, time, batch {entry['batch_size']}",
            value, f"<= {limit:.2f}", value <= limit,
            flops_config["refused_vs_full_generate"], flops_7b["refused_vs_full_generate"],
            entry["ratio_spread"]["all_refused_vs_full"])
    for key, entry in results.get("assess_throughput", {}).items():
        value = entry["ratios"]["assess_speedup_vs_full_forward"]
        limit = targets["assess_speedup_min"]
        add(4, f"assess_safety images/s / full LLaVA forward images/s, batch {entry['batch_size']}", value,
            f">= {limit:.1f}", value >= limit, flops_config["full_forward_vs_assess"], flops_7b["full_forward_vs_assess"],
            entry["ratio_spread"]["assess_speedup_vs_full_forward"])
    return rows


def _default_none(ratios: dict) -> dict:
    """`ratios` where a missing key reads as None (no FLOP prediction)."""
    return {key: ratios.get(key) for key in _FLOP_RATIO_KEYS} | ratios


_FLOP_RATIO_KEYS = (
    "generate_safe_vs_stock", "generate_head_only_vs_stock", "paper_way_vs_ours", "refused_vs_full_generate",
    "full_forward_vs_assess",
)  # fmt: skip


def _parameters(results: dict) -> dict | None:
    """The parameter counts: in the FLOP section, or on their own for bases without a FLOP model."""
    return results.get("flops") or results.get("parameters")


def explain_misses(results: dict) -> list[str]:
    """For every missed target: the measured value, what the FLOP count predicts, and the numbers behind it."""
    notes = []
    lengths = results["metadata"].get("prompt_length", {})
    for row in results["targets"]:
        if row["passed"]:
            continue
        note = f"FAIL ({row['item']}) {row['name']}: measured {row['measured']:.3f}, target {row['target']}."
        if row["flops_config"] is not None:
            note += (
                f" The FLOP count predicts {row['flops_config']:.3f} for this config and {row['flops_7b']:.3f} at the "
                "7B shape."
            )
        if "peak memory" in row["name"]:
            batch = row["name"].rsplit(" ", 1)[-1]
            variant = "head_only" if "head only" in row["name"] else "safe"
            entry = next(results[s][f"batch_{batch}"] for s in MEMORY_SECTIONS if s in results)
            stock, other = entry["memory"]["stock"], entry["memory"][variant]
            mib = 2**20
            note += (
                f" Peak +{(other['peak_bytes'] - stock['peak_bytes']) / mib:.1f} MiB = weights "
                f"+{(other['resident_bytes'] - stock['resident_bytes']) / mib:.1f} MiB (safety modules) + transient "
                f"+{(other['transient_peak_bytes'] - stock['transient_peak_bytes']) / mib:.1f} MiB "
                f"({entry['ratios'][f'transient_memory_{variant}_vs_stock']:.3f}x; the prompt positions grow "
                f"{lengths.get('stock', 'n/a')} -> {lengths.get('safe' if variant == 'safe' else 'stock', 'n/a')}, "
                "and KV cache and activations with them). Weights are "
                f"{stock['resident_bytes'] / stock['peak_bytes']:.0%} of stock's peak here."
            )
            if row["flops_7b"] is not None:
                note += (
                    f" The analytic bf16 estimate at the 7B shape, where weights dominate, is {row['flops_7b']:.3f}; "
                    "`--config cpu-7b-memory` measures the 7B shape itself (results/cpu-7b-memory.md)."
                )
        if row["item"] == 2:
            batch = row["name"].rsplit(" ", 1)[-1]
            entry = results["paper_way"][f"batch_{batch}"]
            low, high = entry["ratio_spread"]["paper_way_vs_ours"]
            note += (
                f" Paired ratios ranged {low:.3f}-{high:.3f}: the saving (one vision pass) is below this machine's "
                f"noise over a full generation; on the prefill alone the paper's way took "
                f"{entry['ratios']['paper_way_vs_ours_prefill']:.3f}x ours, and it ran the vision tower "
                f"{entry['checks']['vision_tower_calls']['paper_way']} times to our "
                f"{entry['checks']['vision_tower_calls']['ours']}."
            )
        if row["limit_within_range"]:
            low, high = row["spread"]
            note += (
                f" The limit lies inside the range of paired ratios ({low:.3f}-{high:.3f}): at this machine's noise "
                "the verdict could go either way."
            )
        notes.append(note)
    return notes


def write_results(results: dict, output_dir: Path, name: str) -> dict:
    """
    Writes `<name>.json`, `<name>.md` and `LATEST.md` (a copy of this run's markdown, unless the config says
    `"update_latest": false`, as partial runs do); returns their paths.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / f"{name}.json", "markdown": output_dir / f"{name}.md"}
    paths["json"].write_text(json.dumps(results, indent=2, sort_keys=False, default=str) + "\n")
    markdown = render_markdown(results)
    paths["markdown"].write_text(markdown)
    if results["config"].get("update_latest", True):
        paths["latest"] = output_dir / "LATEST.md"
        paths["latest"].write_text(markdown)
    return {k: str(v) for k, v in paths.items()}


# ---------------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------------


def render_markdown(results: dict) -> str:
    meta = results["metadata"]
    lines = [
        f"# {meta.get('safe_class', 'SafeLlava')} vs stock {meta.get('stock_class', 'LLaVA')}: `{meta['config']}` "
        "benchmark",
        "",
        f"- **Date (UTC):** {meta['date_utc']}  **Wall time:** {meta['wall_time_s']:.0f} s",
        f"- **Device:** {meta['device']} ({meta['dtype']}, {meta['torch_threads']} torch thread(s)); "
        f"**clock of the timings:** {_CLOCK_TEXT[meta['timer']]}; host allocator: {meta.get('host_allocator', 'default')}",
        f"- **Versions:** python {meta['python']}, torch {meta['torch']}, transformers {meta['transformers']}, "
        f"peft {meta['peft']}; repository commit `{meta['git_commit']}`",
        f"- **Machine load** (1/5/15-min load averages on {meta['cpu_count']} cores): before "
        f"{_load(meta['load_average_before'])}, after {_load(meta['load_average_after'])}. "
        "The cores are shared with other processes; every comparison is interleaved A/B so that load hits both sides.",
        f"- **Model:** {meta['model_summary']}",
        f"- **Config:** `{meta['config_path']}`; command `{meta['command']}`",
        "",
        "Random weights: these are timings and memory of the computation, never a statement about answer quality. "
        "Timings are medians of interleaved repeats; ratios are SafeLlava / stock (lower is better) unless stated.",
        "",
    ]
    lines += _targets_section(results)
    for key, render_section in _sections():
        if key in results:
            lines += render_section(results)
    if results.get("analysis"):
        lines += ["## Analysis", ""] + [f"- {line}" for line in results["analysis"]] + [""]
    lines += _method_section(meta)
    return "\n".join(lines) + "\n"


def _sections():
    """`(results key, renderer)` in the order the markdown shows them."""
    return (
        ("generate_overhead", _generate_section),
        ("call_overhead", _call_overhead_section),
        ("generate_memory", _generate_memory_section),
        ("paper_way", _paper_way_section),
        ("refusal", _refusal_section),
        ("assess_throughput", _assess_section),
        ("calibration", _calibration_section),
        ("training", _training_section),
        ("audit_scaling", _audit_section),
        ("flops", _flops_section),
        ("parameters", _parameters_section),
    )


_CLOCK_TEXT = {
    "wall": "wall time",
    "process_cpu": "CPU time of this process (`time.process_time`; wall time is in the JSON)",
}


def _load(values):
    return "/".join(f"{v:.2f}" for v in values)


def _targets_section(results):
    lines = [
        "## Targets",
        "",
        "| # | Measurement | Measured | Range over repeats | Target | Result | FLOP ratio, this config | "
        "Predicted at the 7B shape |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["targets"]:
        measured = f"{row['measured']:.2%}" if "parameters" in row["name"] else _fmt(row["measured"])
        spread = "" if row["spread"] is None else f"{row['spread'][0]:.3f} - {row['spread'][1]:.3f}"
        verdict = f"**{_verdict(row['passed'])}**" + (" (limit within range)" if row["limit_within_range"] else "")
        lines.append(
            f"| {row['item']} | {row['name']} | {measured} | {spread} | {row['target']} | {verdict} | "
            f"{_fmt(row['flops_config'])} | {_fmt(row['flops_7b'])} |"
        )
    return lines + [
        "",
        "Measured ratios are medians over repeats of paired ratios (the two calls of a repeat ran back to back); the "
        "range is the smallest and largest paired ratio; \"limit within range\" marks a verdict that this machine's "
        "noise could flip. \"FLOP ratio, this config\": the same ratio by FlopCounterMode "
        "counts for the benchmarked shapes (what a compute-bound machine would show). \"Predicted at the 7B shape\": "
        "FLOP ratio at LLaVA-1.5-7B (memory rows: the analytic bf16 estimate of weights + KV cache + kept vision states).",
        "",
    ]


def _ratio_vs_stock(ratios: dict, key: str, name: str) -> str:
    """`ratios["<key>_<name>_vs_stock"]` as table text; stock's own ratio is 1."""
    return "1" if name == "stock" else _fmt(ratios[f"{key}_{name}_vs_stock"])


def _generate_section(results):
    lines = [
        "## 1. `generate` with safety on, nothing flagged (`safety_threshold=1.0`) vs stock `generate`",
        "",
        "| batch | model | end-to-end s | ratio | prefill s | ratio | peak MiB | ratio | transient MiB | ratio | new tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in results["generate_overhead"].values():
        r = entry["ratios"]
        for name in ("stock", "safe", "head_only"):
            e2e, pre, mem = entry["end_to_end"][name], entry["prefill"][name], entry["memory"][name]
            ratio = lambda key: _ratio_vs_stock(r, key, name)  # noqa: E731
            lines.append(
                f"| {entry['batch_size']} | {_variant_label(name, results)} | {e2e['median_s']:.3f} | {ratio('end_to_end')} "
                f"| {pre['median_s']:.4f} | {ratio('prefill')} | {mem['peak_bytes'] / MIB:.1f} | {ratio('peak_memory')} "
                f"| {mem['transient_peak_bytes'] / MIB:.1f} | {ratio('transient_memory')} | {entry['checks'][f'{name}_new_tokens']} |"
            )
    checks = [f"batch {e['batch_size']}: {e['checks']['head_only_tokens_equal_stock']}" for e in results["generate_overhead"].values()]
    lines += [
        "",
        "Prefill = `generate(max_new_tokens=1)`: vision tower, safety modules, LLM prefill, one token. "
        f"Head-only SafeLlava generated exactly stock LLaVA's tokens: {', '.join(checks)}.",
        "",
    ]
    return lines


def _call_overhead_section(results):
    e = results["call_overhead"]
    lines = [
        "## 1b. Per-call overhead: `generate`, batch 1, nothing judged (`safety_threshold=1.0`)",
        "",
        f"{e['new_tokens']} new tokens, {e['repeats']} interleaved repeats. Python outside torch ops: the calling "
        "thread's CPU time of a call minus its CPU time inside torch ops (each op timed by a dispatch mode, whose own "
        "per-op cost is counted on the Python side alike for every variant), median of 5 more calls each.",
        "",
        "| model | median s | ratio vs stock (min-max) | Python outside torch ops, ms per call | torch ops per call |",
        "|---|---|---|---|---|",
    ]
    for name in ("stock", "safe", "head_only"):
        ratio = "1" if name == "stock" else (
            f"{_fmt(e['ratios'][f'{name}_vs_stock'])} ({_fmt(e['ratio_spread'][f'{name}_vs_stock'][0])}-"
            f"{_fmt(e['ratio_spread'][f'{name}_vs_stock'][1])})"
        )  # fmt: skip
        lines.append(
            f"| {_variant_label(name, results)} | {e['end_to_end'][name]['median_s']:.4f} | {ratio} | "
            f"{1000 * e['python_outside_ops_s'][name]:.2f} | {e['torch_ops_per_call'][name]} |"
        )
    lines += ["", f"Safety head calls during the timed SafeLlava calls: {e['checks']['safety_head_calls']}.", ""]
    return lines


def _generate_memory_section(results):
    lines = [
        "## 1. `generate` peak memory with safety on, nothing flagged (`safety_threshold=1.0`) vs stock `generate`",
        "",
        "Memory only (no timings: this shape is too slow to time repeatedly on this machine). One measured call each; "
        "its wall time is given for information.",
        "",
        "| batch | model | peak MiB | ratio | resident MiB | transient MiB | ratio | new tokens | measured call s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in results["generate_memory"].values():
        r = entry["ratios"]
        for name in ("stock", "safe", "head_only"):
            mem = entry["memory"][name]
            ratio = lambda key: _ratio_vs_stock(r, key, name)  # noqa: E731
            lines.append(
                f"| {entry['batch_size']} | {_variant_label(name, results)} | {mem['peak_bytes'] / MIB:,.1f} | "
                f"{ratio('peak_memory')} | {mem['resident_bytes'] / MIB:,.1f} | {mem['transient_peak_bytes'] / MIB:,.1f} | "
                f"{ratio('transient_memory')} | {entry['checks'][f'{name}_new_tokens']} | {entry['profiled_wall_s'][name]:.0f} |"
            )
    return lines + [""]


def _variant_label(name, results):
    tokens = results["metadata"]["llm_safety_tokens"]
    return {"stock": "stock LLaVA", "safe": f"SafeLlava, {tokens} LLM safety tokens", "head_only": "SafeLlava, head only"}[name]


def _paper_way_section(results):
    lines = [
        "## 2. The paper's way (`assess_safety`, then `generate` with `pixel_values`) vs ours (one vision pass)",
        "",
        "| batch | ours s | paper's way s | paper / ours | prefill: ours s | paper's way s | paper / ours | "
        "vision-tower calls (ours, paper) | same tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in results["paper_way"].values():
        calls = e["checks"]["vision_tower_calls"]
        lines.append(
            f"| {e['batch_size']} | {e['timing']['ours']['median_s']:.3f} | {e['timing']['paper_way']['median_s']:.3f} | "
            f"{e['ratios']['paper_way_vs_ours']:.3f} | {e['prefill']['ours']['median_s']:.4f} | "
            f"{e['prefill']['paper_way']['median_s']:.4f} | {e['ratios']['paper_way_vs_ours_prefill']:.3f} | "
            f"{calls['ours']}, {calls['paper_way']} | {e['checks']['same_tokens']} |"
        )
    return lines + [""]


def _refusal_section(results):
    e = results["refusal"]
    return [
        "## 3. All rows refused vs the full generation of the same batch",
        "",
        "| batch | full generation s | all refused s | refused / full | rows refused | LLM calls when refused |",
        "|---|---|---|---|---|---|",
        f"| {e['batch_size']} | {e['timing']['full_generation']['median_s']:.3f} | {e['timing']['all_refused']['median_s']:.4f} | "
        f"{e['ratios']['all_refused_vs_full']:.4f} | {e['checks']['all_rows_refused']} | "
        f"{e['checks']['language_model_calls_when_refused']} |",
        "",
    ]


def _assess_section(results):
    lines = [
        "## 4. `assess_safety` throughput vs a full LLaVA forward (prefill)",
        "",
        "| batch | full forward images/s | assess_safety images/s | speedup | LLM calls in assess_safety |",
        "|---|---|---|---|---|",
    ]
    for e in results["assess_throughput"].values():
        ips = e["images_per_second"]
        lines.append(
            f"| {e['batch_size']} | {ips['full_forward']:.2f} | {ips['assess_safety']:.2f} | "
            f"{e['ratios']['assess_speedup_vs_full_forward']:.2f} | {e['checks']['language_model_calls_in_assess']} |"
        )
    return lines + [""]


def _calibration_section(results):
    lines = [
        "## 6. `generate` with calibrated temperatures vs temperatures 1.0 (same model, nothing flagged)",
        "",
        "| batch | temperatures (level, type) | T = 1 s | calibrated s | ratio | range | same tokens | P(level) changed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in results["calibration"].values():
        fitted, timing = e["temperatures"]["calibrated"], e["timing"]
        low, high = e["ratio_spread"]["calibrated_vs_uncalibrated"]
        lines.append(
            f"| {e['batch_size']} | {fitted['level']:g}, {fitted['type']:g} | {timing['uncalibrated']['median_s']:.3f} | "
            f"{timing['calibrated']['median_s']:.3f} | {e['ratios']['calibrated_vs_uncalibrated']:.3f} | "
            f"{low:.3f} - {high:.3f} | {e['checks']['same_tokens']} | {e['checks']['level_probs_changed']} |"
        )
    return lines + [
        "",
        "Calibration is one division of each head's logits by a scalar before the softmax (4 level + 7 type logits "
        "per image; `safe-llava calibrate` fits the temperatures); the temperatures here are stand-ins (random "
        "weights). Any ratio away from 1 is the machine's noise: compare the two medians and the range.",
        "",
    ]


def _audit_section(results):
    from .audit_scaling import audit_section

    return audit_section(results)


def _training_section(results):
    t = results["training"]
    lines = [
        "## 5. Training step (forward, backward, AdamW step) vs a stock LLaVA LoRA step",
        "",
        f"Batch {t['batch_size']}, {t['answer_tokens']} supervised answer tokens per row, LoRA {_lora(t['lora'])} "
        "on every linear layer of the language model (stock and stage 2 alike). Peak memory includes parameters, "
        "buffers and the AdamW state. FLOP ratio: FlopCounterMode over forward and backward. Stage 1 trains no "
        "language-model weights but still back-propagates through the language model (to the LLM safety tokens), "
        "without LoRA's extra per-layer operators.",
        "",
        "| setup | step s | ratio | FLOP ratio | peak MiB | ratio | transient MiB | trainable parameters |",
        "|---|---|---|---|---|---|---|---|",
    ]
    labels = {"stock_lora": "stock LLaVA + LoRA", "stage1": "SafeLlava stage 1", "stage2": "SafeLlava stage 2 (LoRA)"}
    for name, label in labels.items():
        timing, memory = t["timing"][name], t["memory"][name]
        time_ratio = "1" if name == "stock_lora" else _fmt(t["ratios"][f"{name}_vs_stock_lora_time"])
        flop_ratio = "1" if name == "stock_lora" else _fmt(t["ratios"].get(f"{name}_vs_stock_lora_flops"))
        mem_ratio = "1" if name == "stock_lora" else _fmt(t["ratios"][f"{name}_vs_stock_lora_peak_memory"])
        lines.append(
            f"| {label} | {timing['median_s']:.3f} | {time_ratio} | {flop_ratio} | {memory['peak_bytes'] / MIB:.1f} | {mem_ratio} | "
            f"{memory['transient_peak_bytes'] / MIB:.1f} | {t['trainable_parameters'][name]:,} |"
        )
    return lines + ["", f"Setups: {'; '.join(f'{k}: {v}' for k, v in t['setup_source'].items())}.", ""]


def _lora(lora):
    return ", ".join(f"{k} {v}" for k, v in lora.items() if not k.startswith("_"))


def _flops_section(results):
    f = results["flops"]
    ref, cfg = f["reference_7b"], f["config"]
    p = ref["parameters"]
    lines = [
        "## Parameters and FLOPs (counted on the meta device)",
        "",
        "LLaVA-1.5-7B shape (`configuration/7b.json`), built under `torch.device(\"meta\")`:",
        "",
        "| | parameters |",
        "|---|---|",
        f"| stock LLaVA-1.5-7B | {p['stock_total']:,} |",
        f"| SafeLlava-7B | {p['safe_total']:,} |",
        f"| safety modules | {p['safety_total']:,} ({p['safety_share_of_stock']:.2%} of stock) |",
    ]
    lines += [f"| - `{module}` | {count:,} |" for module, count in p["safety_by_module"].items()]
    lines += [
        "",
        "FLOPs per row (one image, "
        f"{ref['components']['sequence_length_stock']} / {ref['components']['sequence_length_safe']} prompt positions "
        f"stock / SafeLlava, {results['metadata']['new_tokens']} new tokens), FlopCounterMode, 2 FLOPs per MAC:",
        "",
        "| call | 7B shape GFLOP | this config GFLOP |",
        "|---|---|---|",
    ]
    for key in ref["totals"]:
        lines.append(f"| {key.replace('_', ' ')} | {ref['totals'][key] / 1e9:,.1f} | {cfg['totals'][key] / 1e9:,.3f} |")
    lines += ["", "| FLOP ratio | 7B shape | this config |", "|---|---|---|"]
    for key in ref["ratios"]:
        lines.append(f"| {key.replace('_', ' ')} | {ref['ratios'][key]:.4f} | {cfg['ratios'][key]:.4f} |")
    lines += [
        "",
        "Compute proportions (share of the FLOPs of one stock generation plus the safety modules):",
        "",
        "| component | 7B shape | this config |",
        "|---|---|---|",
    ]
    for key in ref["shares_of_generate"]:
        lines.append(f"| {key.replace('_', ' ')} | {ref['shares_of_generate'][key]:.2%} | {cfg['shares_of_generate'][key]:.2%} |")
    memory = ref.get("memory_estimate_bf16")
    if memory:
        lines += [
            "",
            "Analytic peak memory of `generate` at the 7B shape in bf16 (weights + KV cache at the last step + the "
            "vision hidden states `generate` keeps; an estimate, not a measurement):",
            "",
            "| batch | stock GiB | SafeLlava GiB | ratio | head only GiB | ratio |",
            "|---|---|---|---|---|---|",
        ]
        for key, entry in memory["by_batch"].items():
            b = entry["bytes"]
            lines.append(
                f"| {key.split('_')[1]} | {b['stock'] / 2**30:.2f} | {b['safe'] / 2**30:.2f} | {entry['safe_vs_stock']:.3f} | "
                f"{b['head_only'] / 2**30:.2f} | {entry['head_only_vs_stock']:.3f} |"
            )
    v = f.get("verification")
    if v:
        lines += [
            "",
            f"Counting check on `{v['device']}` tensors (this config, batch 1): per-component counts equal the meta "
            f"counts: **{v['meta_equals_real']}**; components add up to FlopCounterMode over the full forward "
            f"(stock {v['stock_forward_counted']:,} vs {v['stock_forward_from_components']:,}; SafeLlava "
            f"{v['safe_forward_counted']:,} vs {v['safe_forward_from_components']:,}): **{v['components_add_up']}**.",
        ]
    return lines + [""]


def _method_section(meta):
    lengths = meta.get("prompt_length", {})
    return [
        "## Method",
        "",
        "- Stock and SafeLlava models hold identical weights: SafeLlava is built with "
        f"`{meta.get('safe_class', 'SafeLlavaForConditionalGeneration')}.from_base(stock, ...)` on the meta device "
        "and then given stock's own tensors (one copy of the weights in memory); the safety modules are random and "
        "marked trained. Inputs: what each model's processor makes of the prompt with one random image per row, in the "
        f"base's chat template ({lengths.get('stock', 'n/a')} prompt positions for stock, {lengths.get('safe', 'n/a')} "
        "for SafeLlava: image tokens + LLM safety tokens + text).",
        "- Both sides decode greedily exactly the configured number of tokens (`min_new_tokens = max_new_tokens`). "
        "\"Nothing flagged\" is `safety_threshold=1.0`; \"all refused\" is `safety_threshold=0.0` with every risky type's "
        "action set to `refuse`.",
        f"- Timing: {_CLOCK_TEXT[meta['timer']]} around each call (CUDA synchronised), warm-up calls first, variants "
        "interleaved with alternating order; times are medians of the repeats, ratios medians of the paired ratios of "
        "calls that ran back to back.",
        "- Peak memory = resident bytes (parameters and buffers, plus AdamW state for training) + transient peak of the "
        "call. Transient peak on CPU: a dispatcher mode (`benchmarks.measure.LiveTensorBytes`) adds the bytes of "
        "every tensor storage an operator creates and takes them off when it is freed; the maximum of that live sum "
        "is the transient peak (exact, unaffected by malloc caching, unlike RSS; tracemalloc cannot see tensor "
        "memory). On CUDA: `max_memory_allocated() - memory_allocated()` at the start. Memory runs are separate "
        "from timed runs.",
        "- FLOPs: `torch.utils.flop_counter.FlopCounterMode` per module (vision tower, projectors, safety head, LLM "
        "prefill, decode steps, lm_head) on meta tensors; checked against real tensors (see above). PyTorch's CPU "
        "attention kernel has no FLOP formula of its own, so it is given the flash-attention one.",
        "",
    ]


def _parameters_section(results):
    """Parameter counts for bases without a FLOP model."""
    lines = ["## Parameters (counted on the meta device)", "", "| | reference 7B-class preset | this config |", "|---|---|---|"]
    ref, own = results["parameters"]["reference_7b"]["parameters"], results["parameters"]["config"]["parameters"]
    for key, label in (("stock_total", "stock"), ("safe_total", "SafeLlava"), ("safety_total", "safety modules")):
        lines.append(f"| {label} | {ref[key]:,} | {own[key]:,} |")
    lines.append(f"| safety share of stock | {ref['safety_share_of_stock']:.2%} | {own['safety_share_of_stock']:.2%} |")
    lines += [
        "",
        "This base has no FLOP model in `benchmarks/flops.py` (it counts LLaVA-1.5's one-crop layout), so the targets "
        "table shows no FLOP predictions (n/a); every ratio above is measured.",
        "",
    ]
    return lines


def main(argv=None) -> int:
    """Re-evaluates the targets of a results JSON and re-renders `<name>.md` and `LATEST.md` (after a change to this
    module; nothing is re-measured)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("results_json", help="e.g. benchmarks/results/cpu-small.json")
    args = parser.parse_args(argv)
    path = Path(args.results_json)
    results = json.loads(path.read_text())
    results["targets"] = evaluate_targets(results, results["config"])
    results["analysis"] = explain_misses(results)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    markdown = render_markdown(results)
    path.with_suffix(".md").write_text(markdown)
    written = [path.with_suffix(".md")]
    if results["config"].get("update_latest", True):
        (path.parent / "LATEST.md").write_text(markdown)
        written.append(path.parent / "LATEST.md")
    print(f"Wrote {' and '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
