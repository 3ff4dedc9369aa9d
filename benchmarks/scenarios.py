"""The six measurements, each comparing SafeLlava with its stock model (same weights, same prompt and images), on
any base of `benchmarks/bases.py`.

Every function takes the built models, the benchmark config and a tqdm bar, and returns a JSON-ready dict with the
raw timings, medians, ratios and the sanity checks that prove the compared calls did what they claim (token counts,
vision-tower passes, rows refused).
"""

import contextlib
import copy
import functools
import statistics
import time

import torch
from transformers import GenerationMixin

from modeling_safe_llava.checks_safe_llava import is_integer
from modeling_safe_llava.tools.calibration import temperatures

from .flops import count_flops
from .measure import OpSeconds, model_bytes, optimizer_state_bytes, peak_memory, time_interleaved
from .models import NOTHING_FLAGGED, make_inputs, make_training_batch
from .training import prepare_training


@contextlib.contextmanager
def count_calls(module: torch.nn.Module):
    """Counts forward calls of `module` inside the block: `with count_calls(m) as calls: ...; calls[0]`."""
    calls = [0]

    def hook(*_):
        calls[0] += 1

    handle = module.register_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def _sequences(output):
    return output.sequences if hasattr(output, "sequences") else output


def repeats_for(config: dict, kind: str, batch_size: int) -> int:
    """`config["repeats"][kind]`: one count, or `{batch size: count}` (cheap small batches can repeat more)."""
    value = config["repeats"][kind]
    if isinstance(value, dict):
        if str(batch_size) not in value:
            raise ValueError(f"repeats[{kind!r}] has no count for batch size {batch_size}: {value}.")
        value = value[str(batch_size)]
    if not is_integer(value) or value < 1:
        raise ValueError(f"repeats[{kind!r}] must be an integer >= 1 or a dict of them, got {value!r}.")
    return value


def _all_refuse(model) -> dict:
    return {name: "refuse" for name in model.config.risky_type_labels}


# ---------------------------------------------------------------------------------------------------------------
# 1. generate with safety on, nothing flagged, vs stock generate
# ---------------------------------------------------------------------------------------------------------------


def generate_overhead(bm, config: dict, bar) -> dict:
    """
    End-to-end `generate` (exactly `new_tokens` tokens) and prefill (`generate` of 1 token: vision, safety, LLM
    prefill) of stock LLaVA, SafeLlava with LLM safety tokens and head-only SafeLlava, nothing flagged
    (`safety_threshold=1.0`); peak memory of the end-to-end call.
    """
    device, new_tokens = config["device"], config["new_tokens"]
    models = {"stock": bm.stock, "safe": bm.safe, "head_only": bm.head_only}
    results = {}
    for batch_size in config["generate_batch_sizes"]:
        inputs = {name: make_inputs(bm, model, batch_size) for name, model in models.items()}
        outputs = {}

        def call(name, **overrides):
            extra = {} if name == "stock" else NOTHING_FLAGGED

            def run():
                outputs[name] = models[name].generate(**inputs[name], **extra, **overrides)

            return run

        end_to_end = time_interleaved(
            {name: call(name) for name in models},
            repeats_for(config, "generate", batch_size),
            config["warmup"],
            device,
            config["timer"],
            bar,
        )
        checks = {
            f"{name}_new_tokens": _sequences(outputs[name]).shape[1] - inputs[name]["input_ids"].shape[1]
            for name in models
        }
        checks["head_only_tokens_equal_stock"] = bool(
            torch.equal(
                _sequences(outputs["head_only"])[:, -new_tokens:], _sequences(outputs["stock"])[:, -new_tokens:]
            )
        )
        prefill = time_interleaved(
            {name: call(name, max_new_tokens=1, min_new_tokens=1) for name in models},
            repeats_for(config, "prefill", batch_size),
            config["warmup"],
            device,
            config["timer"],
            bar,
        )
        memory = {name: peak_memory(call(name), device, model_bytes(models[name])) for name in models}
        bar.update(len(models))
        results[f"batch_{batch_size}"] = {
            "batch_size": batch_size,
            "new_tokens": new_tokens,
            "end_to_end": end_to_end.to_dict(),
            "prefill": prefill.to_dict(),
            "memory": memory,
            "ratio_spread": {
                "end_to_end_safe_vs_stock": end_to_end.ratio_spread("safe", "stock"),
                "end_to_end_head_only_vs_stock": end_to_end.ratio_spread("head_only", "stock"),
                "prefill_safe_vs_stock": prefill.ratio_spread("safe", "stock"),
                "prefill_head_only_vs_stock": prefill.ratio_spread("head_only", "stock"),
            },
            "ratios": {
                "end_to_end_safe_vs_stock": end_to_end.ratio("safe", "stock"),
                "end_to_end_head_only_vs_stock": end_to_end.ratio("head_only", "stock"),
                "prefill_safe_vs_stock": prefill.ratio("safe", "stock"),
                "prefill_head_only_vs_stock": prefill.ratio("head_only", "stock"),
                **memory_ratios(memory),
            },
            "checks": checks,
        }
    return results


def generate_steps(config: dict) -> int:
    """Timed calls (plus memory runs) of `generate_overhead`, for the progress bar."""
    return sum(
        3 * (repeats_for(config, "generate", b) + repeats_for(config, "prefill", b)) + 3
        for b in config["generate_batch_sizes"]
    )


# ---------------------------------------------------------------------------------------------------------------
# 1b. per-call overhead: one short `generate`, nothing judged, and the Python time outside torch ops
# ---------------------------------------------------------------------------------------------------------------


def call_overhead(bm, config: dict, bar) -> dict:
    """
    Issue 25's per-call shape: `generate` of batch 1, nothing judged (`safety_threshold=1.0`), stock vs SafeLlava vs
    head-only SafeLlava, timed interleaved; then each call 5 more times under a mode that times every torch op
    (`OpSeconds`): the Python time per call outside torch ops is the calling thread's CPU time of the call minus its
    CPU time inside torch ops, median of the 5. The mode's own per-op cost is counted on the Python side, alike for
    every variant (their op counts are recorded): compare the variants. The safety head must not run.
    """
    device = config["device"]
    repeats = config["repeats"].get("call_overhead") or repeats_for(config, "generate", 1)
    models = {"stock": bm.stock, "safe": bm.safe, "head_only": bm.head_only}
    inputs = {name: make_inputs(bm, model, 1) for name, model in models.items()}

    def call(name):
        extra = {} if name == "stock" else NOTHING_FLAGGED
        return lambda: models[name].generate(**inputs[name], **extra)

    with count_calls(bm.safe.model.safety_module) as head_calls:
        variants = {name: call(name) for name in models}
        timing = time_interleaved(variants, repeats, config["warmup"], device, config["timer"], bar)
    python = {name: [] for name in models}
    ops = {}
    for repeat in range(5):
        for name in models if repeat % 2 == 0 else list(models)[::-1]:
            mode = OpSeconds()
            started = time.thread_time()
            with mode:
                call(name)()
            python[name].append(time.thread_time() - started - mode.seconds)
            ops[name] = mode.ops
    bar.update(5 * len(models))
    python_s = {name: statistics.median(values) for name, values in python.items()}
    return {
        "batch_size": 1,
        "new_tokens": config["new_tokens"],
        "repeats": repeats,
        "end_to_end": timing.to_dict(),
        "ratios": {
            "safe_vs_stock": timing.ratio("safe", "stock"),
            "head_only_vs_stock": timing.ratio("head_only", "stock"),
        },
        "ratio_spread": {
            "safe_vs_stock": timing.ratio_spread("safe", "stock"),
            "head_only_vs_stock": timing.ratio_spread("head_only", "stock"),
        },
        "python_outside_ops_s": python_s,
        "python_outside_ops_runs_s": python,
        "torch_ops_per_call": ops,
        "checks": {"safety_head_calls": head_calls[0]},
    }


def call_overhead_steps(config: dict) -> int:
    repeats = config["repeats"].get("call_overhead") or repeats_for(config, "generate", 1)
    return 3 * repeats + 15


def memory_ratios(memory: dict) -> dict:
    """Peak and transient memory of SafeLlava and head-only SafeLlava over stock's."""
    return {
        f"{kind}_memory_{name}_vs_stock": memory[name][f"{key}_bytes"] / memory["stock"][f"{key}_bytes"]
        for kind, key in (("peak", "peak"), ("transient", "transient_peak"))
        for name in ("safe", "head_only")
    }


def generate_memory(bm, config: dict, bar) -> dict:
    """
    Peak memory of one end-to-end `generate` of stock LLaVA, SafeLlava with LLM safety tokens and head-only SafeLlava
    (nothing flagged), without timings: for shapes too slow to time on the machine at hand (the 7B shape on a CPU).
    The wall time of each measured call is recorded for information (memory tracking adds some Python work per
    operator).
    """
    device, new_tokens = config["device"], config["new_tokens"]
    models = {"stock": bm.stock, "safe": bm.safe, "head_only": bm.head_only}
    results = {}
    for batch_size in config["generate_batch_sizes"]:
        inputs = {name: make_inputs(bm, model, batch_size) for name, model in models.items()}
        memory, new, wall = {}, {}, {}
        for name, model in models.items():
            extra = {} if name == "stock" else NOTHING_FLAGGED
            outputs = []
            started = time.perf_counter()
            memory[name] = peak_memory(
                lambda: outputs.append(model.generate(**inputs[name], **extra)), device, model_bytes(model)
            )
            wall[name] = time.perf_counter() - started
            new[f"{name}_new_tokens"] = _sequences(outputs[0]).shape[1] - inputs[name]["input_ids"].shape[1]
            bar.update(1)
        results[f"batch_{batch_size}"] = {
            "batch_size": batch_size,
            "new_tokens": new_tokens,
            "memory": memory,
            "profiled_wall_s": wall,
            "ratios": memory_ratios(memory),
            "checks": new,
        }
    return results


def generate_memory_steps(config: dict) -> int:
    return 3 * len(config["generate_batch_sizes"])


# ---------------------------------------------------------------------------------------------------------------
# 2. The paper's way (classifier call, then generate that encodes the images again) vs one vision pass
# ---------------------------------------------------------------------------------------------------------------


def paper_way(bm, config: dict, bar) -> dict:
    """
    Ours: `SafeLlava.generate` (one vision pass, the safety head reuses it). The paper's way: `assess_safety`, then
    plain `GenerationMixin.generate` with `pixel_values`, which encodes the images a second time. Timed for the full
    generation and, where the extra vision pass weighs most, for the prefill alone (one new token).
    """
    device, model = config["device"], bm.safe
    plain_generate = functools.partial(GenerationMixin.generate, model)  # stock generate, no verdict
    results = {}
    for batch_size in config["paper_way_batch_sizes"]:
        inputs = make_inputs(bm, model, batch_size)
        outputs = {}

        def ours(**overrides):
            outputs["ours"] = model.generate(**inputs, **NOTHING_FLAGGED, **overrides)

        def paper(**overrides):
            assessment = model.assess_safety(**inputs, **NOTHING_FLAGGED)
            if any(action != "allow" for action in assessment.actions):
                raise RuntimeError("safety_threshold=1.0 flagged a row: the paper-way baseline would not generate it.")
            outputs["paper"] = plain_generate(**inputs, **overrides)

        one_token = {"max_new_tokens": 1, "min_new_tokens": 1}
        timing = time_interleaved(
            {"ours": ours, "paper_way": paper},
            repeats_for(config, "paper_way", batch_size),
            config["warmup"],
            device,
            config["timer"],
            bar,
        )
        prefill = time_interleaved(
            {"ours": lambda: ours(**one_token), "paper_way": lambda: paper(**one_token)},
            repeats_for(config, "prefill", batch_size),
            config["warmup"],
            device,
            config["timer"],
            bar,
        )
        vision_passes = {}
        for name, fn in (("ours", ours), ("paper_way", paper)):
            with count_calls(model.model.vision_tower) as calls:
                fn()
            vision_passes[name] = calls[0]
        results[f"batch_{batch_size}"] = {
            "batch_size": batch_size,
            "timing": timing.to_dict(),
            "prefill": prefill.to_dict(),
            "ratios": {
                "paper_way_vs_ours": timing.ratio("paper_way", "ours"),
                "paper_way_vs_ours_prefill": prefill.ratio("paper_way", "ours"),
            },
            "ratio_spread": {
                "paper_way_vs_ours": timing.ratio_spread("paper_way", "ours"),
                "paper_way_vs_ours_prefill": prefill.ratio_spread("paper_way", "ours"),
            },
            "checks": {
                "vision_tower_calls": vision_passes,
                "same_tokens": bool(torch.equal(_sequences(outputs["ours"]), _sequences(outputs["paper"]))),
            },
        }
    return results


def paper_way_steps(config: dict) -> int:
    return sum(
        2 * (repeats_for(config, "paper_way", b) + repeats_for(config, "prefill", b)) for b in config["paper_way_batch_sizes"]
    )


# ---------------------------------------------------------------------------------------------------------------
# 3. An all-refused batch vs the full generation of the same batch
# ---------------------------------------------------------------------------------------------------------------


def refusal(bm, config: dict, bar) -> dict:
    """Same batch twice: nothing flagged (full `new_tokens` generation) vs every row refused (threshold 0.0)."""
    device, model = config["device"], bm.safe
    batch_size = config["refusal_batch_size"]
    inputs = make_inputs(bm, model, batch_size)
    refuse = {"safety_threshold": 0.0, "safety_actions": _all_refuse(model)}
    timing = time_interleaved(
        {
            "full_generation": lambda: model.generate(**inputs, **NOTHING_FLAGGED),
            "all_refused": lambda: model.generate(**inputs, **refuse),
        },
        repeats_for(config, "generate", batch_size),
        config["warmup"],
        device,
        config["timer"],
        bar,
    )
    with count_calls(model.model.language_model) as llm_calls:
        refused = model.generate(**inputs, **refuse, return_dict_in_generate=True)
    return {
        "batch_size": batch_size,
        "timing": timing.to_dict(),
        "ratios": {"all_refused_vs_full": timing.ratio("all_refused", "full_generation")},
        "ratio_spread": {"all_refused_vs_full": timing.ratio_spread("all_refused", "full_generation")},
        "checks": {
            "actions": sorted(set(refused.safety_assessment.actions)),
            "all_rows_refused": all(a == "refuse" for a in refused.safety_assessment.actions),
            "language_model_calls_when_refused": llm_calls[0],
        },
    }


def refusal_steps(config: dict) -> int:
    return 2 * repeats_for(config, "generate", config["refusal_batch_size"])


# ---------------------------------------------------------------------------------------------------------------
# 4. assess_safety throughput vs a full LLaVA forward (prefill)
# ---------------------------------------------------------------------------------------------------------------


def assess_throughput(bm, config: dict, bar) -> dict:
    """Images per second of `SafeLlava.assess_safety` vs stock LLaVA's forward (prefill, `logits_to_keep=1`)."""
    device = config["device"]
    results = {}
    for batch_size in config["throughput_batch_sizes"]:
        stock_inputs = make_inputs(bm, bm.stock, batch_size)
        safe_inputs = make_inputs(bm, bm.safe, batch_size)

        def full_forward():
            with torch.no_grad():
                bm.stock(**stock_inputs, logits_to_keep=1)

        timing = time_interleaved(
            {
                "full_forward": full_forward,
                "assess_safety": lambda: bm.safe.assess_safety(**safe_inputs, **NOTHING_FLAGGED),
            },
            repeats_for(config, "throughput", batch_size),
            config["warmup"],
            device,
            config["timer"],
            bar,
        )
        with count_calls(bm.safe.model.language_model) as llm_calls:
            bm.safe.assess_safety(**safe_inputs, **NOTHING_FLAGGED)
        results[f"batch_{batch_size}"] = {
            "batch_size": batch_size,
            "timing": timing.to_dict(),
            "images_per_second": {
                "full_forward": batch_size / timing.median("full_forward"),
                "assess_safety": batch_size / timing.median("assess_safety"),
            },
            "ratios": {"assess_speedup_vs_full_forward": timing.ratio("full_forward", "assess_safety")},
            "ratio_spread": {"assess_speedup_vs_full_forward": timing.ratio_spread("full_forward", "assess_safety")},
            "checks": {"language_model_calls_in_assess": llm_calls[0]},
        }
    return results


def assess_steps(config: dict) -> int:
    return sum(2 * repeats_for(config, "throughput", b) for b in config["throughput_batch_sizes"])


# ---------------------------------------------------------------------------------------------------------------
# 6. generate with calibrated temperatures vs temperatures 1.0 (the same model, nothing flagged)
# ---------------------------------------------------------------------------------------------------------------

DEFAULT_CALIBRATION_TEMPERATURES = {"level": 1.7, "type": 0.6}


def calibration_overhead(bm, config: dict, bar) -> dict:
    """
    End-to-end `generate` of SafeLlava with both temperatures 1.0 vs calibrated temperatures (one division per head
    before the softmax), nothing flagged (`safety_threshold=1.0`), interleaved on the same model and inputs. Checks:
    same tokens, and the temperatures did change the level head's probabilities.
    """
    device, model = config["device"], bm.safe
    fitted = config.get("calibration_temperatures", DEFAULT_CALIBRATION_TEMPERATURES)
    variants = {"uncalibrated": {"level": 1.0, "type": 1.0}, "calibrated": fitted}
    results = {}
    for batch_size in config["generate_batch_sizes"]:
        inputs = make_inputs(bm, model, batch_size)
        outputs, level_probs = {}, {}

        def call(name):
            def run():
                with temperatures(model, variants[name]["level"], variants[name]["type"]):
                    outputs[name] = model.generate(**inputs, **NOTHING_FLAGGED)

            return run

        timing = time_interleaved(
            {name: call(name) for name in variants},
            repeats_for(config, "generate", batch_size),
            config["warmup"],
            device,
            config["timer"],
            bar,
        )
        for name, values in variants.items():
            with temperatures(model, values["level"], values["type"]), torch.no_grad():
                level_probs[name] = model.assess_safety(**inputs, **NOTHING_FLAGGED).level_probs.float().cpu()
        results[f"batch_{batch_size}"] = {
            "batch_size": batch_size,
            "temperatures": variants,
            "timing": timing.to_dict(),
            "ratios": {"calibrated_vs_uncalibrated": timing.ratio("calibrated", "uncalibrated")},
            "ratio_spread": {"calibrated_vs_uncalibrated": timing.ratio_spread("calibrated", "uncalibrated")},
            "checks": {
                "same_tokens": bool(
                    torch.equal(_sequences(outputs["calibrated"]), _sequences(outputs["uncalibrated"]))
                ),
                "new_tokens": _sequences(outputs["calibrated"]).shape[1] - inputs["input_ids"].shape[1],
                "level_probs_changed": not torch.equal(level_probs["calibrated"], level_probs["uncalibrated"]),
            },
        }
    return results


def calibration_steps(config: dict) -> int:
    """Timed calls of `calibration_overhead`, for the progress bar."""
    return sum(2 * repeats_for(config, "generate", b) for b in config["generate_batch_sizes"])


# ---------------------------------------------------------------------------------------------------------------
# 5. Training steps: stage 1, stage 2 vs a stock LLaVA LoRA step
# ---------------------------------------------------------------------------------------------------------------


def training_steps(bm, config: dict, bar) -> dict:
    """
    One optimizer step (forward, backward, AdamW step, zero_grad) of: stock LLaVA with LoRA on the language model;
    SafeLlava stage 1 (only the safety modules trainable); SafeLlava stage 2 (LoRA on the language model, safety
    modules frozen). Peak memory includes parameters, buffers and the AdamW state.

    Changes the models in place (LoRA layers are injected into `bm.stock` and a copy of `bm.safe`): run it last.
    """
    device = config["device"]
    stage1_model = bm.safe
    stage2_model = copy.deepcopy(bm.safe)
    setups = {
        "stock_lora": prepare_training(bm.stock, "stock_lora", config["lora"]),
        "stage1": prepare_training(stage1_model, "stage1", config["lora"]),
        "stage2": prepare_training(stage2_model, "stage2", config["lora"]),
    }
    steps, step_flops = {}, {}
    for name, setup in setups.items():
        base = setup.base_model
        batch = make_training_batch(bm, base, config["train_batch_size"], config["train_answer_tokens"])
        steps[name] = _optimizer_step(setup.model, setup.optimizer, batch)
        # the first step creates the AdamW state (every timed and measured step is a steady-state one); its forward
        # and backward FLOPs are counted on the way
        step_flops[name], _ = count_flops(steps[name])
    repeats = repeats_for(config, "train", config["train_batch_size"])
    timing = time_interleaved(steps, repeats, config["warmup"], device, config["timer"], bar)
    memory = {
        name: peak_memory(
            steps[name], device, model_bytes(setups[name].model) + optimizer_state_bytes(setups[name].optimizer)
        )
        for name in setups
    }
    bar.update(len(setups))
    return {
        "batch_size": config["train_batch_size"],
        "answer_tokens": config["train_answer_tokens"],
        "lora": config["lora"],
        "timing": timing.to_dict(),
        "memory": memory,
        "trainable_parameters": {name: setup.trainable_parameters for name, setup in setups.items()},
        "flops_per_step": step_flops,
        "setup_source": {name: setup.source for name, setup in setups.items()},
        "ratio_spread": {
            "stage1_vs_stock_lora_time": timing.ratio_spread("stage1", "stock_lora"),
            "stage2_vs_stock_lora_time": timing.ratio_spread("stage2", "stock_lora"),
        },
        "ratios": {
            "stage1_vs_stock_lora_time": timing.ratio("stage1", "stock_lora"),
            "stage2_vs_stock_lora_time": timing.ratio("stage2", "stock_lora"),
            "stage1_vs_stock_lora_flops": step_flops["stage1"] / step_flops["stock_lora"],
            "stage2_vs_stock_lora_flops": step_flops["stage2"] / step_flops["stock_lora"],
            "stage1_vs_stock_lora_peak_memory": memory["stage1"]["peak_bytes"] / memory["stock_lora"]["peak_bytes"],
            "stage2_vs_stock_lora_peak_memory": memory["stage2"]["peak_bytes"] / memory["stock_lora"]["peak_bytes"],
        },
    }


def _optimizer_step(model, optimizer, batch):
    def step():
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def training_step_count(config: dict) -> int:
    return 3 * repeats_for(config, "train", config["train_batch_size"]) + 3
